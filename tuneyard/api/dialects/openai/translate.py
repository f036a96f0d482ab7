"""OpenAI wire <-> tuneyard: a create request becomes a Submission; a Job becomes a FineTuningJob; a chat
completion or completion request becomes a GenerationRequest and the inference events the response."""

from __future__ import annotations

import json
import secrets
from typing import Any

from pydantic import ValidationError

from tuneyard import jsontext
from tuneyard.api.dialects.openai.schemas import (
    ChatCompletionIn,
    CheckpointOut,
    CompletionIn,
    CreateJobIn,
    EventOut,
    ExpiresAfterIn,
    FileOut,
    HyperparametersIn,
    JobOut,
    MethodBody,
)
from tuneyard.api.wire import resources_spec
from tuneyard.domain import capabilities
from tuneyard.domain import metrics as metrics_vocabulary
from tuneyard.domain.errors import InvalidRequest, Problems
from tuneyard.domain.generation import GenerationRequest
from tuneyard.domain.jobs import fine_tuned_model_name
from tuneyard.domain.spec import (
    AdapterSpec,
    DataSource,
    DataSpec,
    Hyperparameters,
    IntegrationSpec,
    ModelSpec,
    ResourceSpec,
    TrainingSpec,
)
from tuneyard.service.jobs import Submission
from tuneyard.store.models import Checkpoint, File, Job, JobEvent

DIALECT = "openai"
# method.type -> TrainingSpec.method (reinforcement has no counterpart).
METHODS = {"supervised": "sft", "dpo": "dpo"}


def to_submission(req: CreateJobIn, idempotency_key: str | None, problems: Problems) -> Submission:
    """Translate POST /v1/fine_tuning/jobs into the dialect-neutral submission.

    The fields refused here go into ``problems`` (none of them changes what the service checks), so that the
    service reports them with its own in one 400.
    """
    method_type = req.method.type if req.method else "supervised"
    if method_type == "reinforcement":
        problems.add(InvalidRequest("Reinforcement fine-tuning needs graders, which tuneyard does not provide; use "
                                    f"{capabilities.available(METHODS)}", param="method.type",
                                    code="unsupported_method"))
    hp = _method_hyperparameters(req, method_type, problems)
    # Only what was asked is set: a job that continues a fine-tuned model takes the rest from it.
    adapter = AdapterSpec() if hp.lora is None else AdapterSpec(type="lora" if hp.lora else "full")
    if hp.lora is False and any(v is not None for v in (hp.lora_r, hp.lora_alpha, hp.lora_dropout)):
        problems.add(InvalidRequest("lora_r, lora_alpha and lora_dropout apply only when lora is true",
                                    param="hyperparameters.lora"))
    if hp.lora_r is not None:
        adapter.r = hp.lora_r
    if hp.lora_alpha is not None:
        adapter.alpha = float(hp.lora_alpha)
    if hp.lora_dropout is not None:
        adapter.dropout = float(hp.lora_dropout)
    data = DataSpec(
        train=DataSource(file_id=req.training_file, param="training_file"),
        validation=DataSource(file_id=req.validation_file, param="validation_file") if req.validation_file else None,
        max_length=hp.context_length or 2048,
        packing=bool(hp.packing),
    )
    hyper = Hyperparameters(
        n_epochs=hp.n_epochs if hp.n_epochs is not None else "auto",
        batch_size=hp.batch_size if hp.batch_size is not None else "auto",
        learning_rate_multiplier=hp.learning_rate_multiplier if hp.learning_rate_multiplier is not None else "auto",
        learning_rate=hp.learning_rate,
        warmup_ratio=hp.warmup_ratio or 0.0,
        weight_decay=hp.weight_decay or 0.0,
        max_grad_norm=hp.max_grad_norm if hp.max_grad_norm is not None else 1.0,
        beta=(hp.beta if hp.beta is not None else "auto") if method_type == "dpo" else None,
    )
    integrations = [IntegrationSpec(type=i.type, config=getattr(i, i.type).model_dump(exclude_none=True),
                                    param="integrations")
                    for i in req.integrations or []]
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    spec = TrainingSpec(method=METHODS.get(method_type, "sft"), model=ModelSpec(name=req.model),
                        data=data, adapter=adapter, hyperparameters=hyper, seed=seed, integrations=integrations,
                        resources=resources_spec(req.resources, ResourceSpec(), "resources"))
    echo = {"method": {"type": method_type}, "integrations": [i.model_dump(exclude_none=True)
                                                              for i in req.integrations or []] or None,
            "requested_hyperparameters": hp.model_dump(exclude_none=True),
            "resources": req.resources.model_dump(exclude_none=True) if req.resources else None}
    return Submission(spec=spec, dialect=DIALECT, request=echo, suffix=req.suffix, metadata=req.metadata,
                      idempotency_key=idempotency_key,
                      default_devices=req.resources is None or req.resources.gpu_count is None)


def _method_hyperparameters(req: CreateJobIn, method_type: str, problems: Problems) -> HyperparametersIn:
    legacy = req.hyperparameters
    body = getattr(req.method, method_type, None) if req.method else None
    # reinforcement's body is free-form (and refused): only supervised/dpo bodies hold hyperparameters.
    from_method = body.hyperparameters if isinstance(body, MethodBody) else None
    if legacy is not None and from_method is not None:
        problems.add(InvalidRequest("Give hyperparameters either in 'method' or at the top level, not both",
                                    param="hyperparameters"))
    hp = from_method or legacy or HyperparametersIn()
    if hp.beta is not None:
        where = f"method.{method_type}.hyperparameters" if hp is from_method else "hyperparameters"
        # Which recipe takes beta is the capabilities table's to say; here only the field's place is named.
        if "beta" not in capabilities.RECIPES[METHODS.get(method_type, "sft")].hyperparameters:
            problems.add(InvalidRequest(f"beta applies only to {capabilities.recipes_with('beta')}",
                                        param=f"{where}.beta"))
    return hp


def hyperparameters_out(job: Job) -> dict[str, Any]:
    """The job's hyperparameters: the resolved values once known, else what was asked ("auto" included)."""
    spec = TrainingSpec.model_validate(job.spec)
    hp = job.resolved_hyperparameters or spec.hyperparameters.model_dump()
    out: dict[str, Any] = {
        "batch_size": hp.get("batch_size"),
        "learning_rate_multiplier": hp.get("learning_rate_multiplier"),
        "n_epochs": hp.get("n_epochs"),
        "learning_rate": hp.get("learning_rate"),
        "warmup_ratio": hp.get("warmup_ratio"),
        "weight_decay": hp.get("weight_decay"),
        "max_grad_norm": hp.get("max_grad_norm"),
        "context_length": spec.data.max_length,
        "packing": spec.data.packing,
        "lora": spec.adapter.type == "lora",
    }
    if spec.adapter.type == "lora":
        out.update(lora_r=spec.adapter.r, lora_alpha=spec.adapter.alpha, lora_dropout=spec.adapter.dropout)
    if spec.method == "dpo":
        out["beta"] = hp.get("beta")
    return out


def job_out(job: Job) -> JobOut:
    """A Job as OpenAI's FineTuningJob (with Nebius' trained_steps/total_steps)."""
    hp = hyperparameters_out(job)
    method_type = (job.request or {}).get("method", {}).get("type", "supervised")
    method_hp = {k: hp[k] for k in ("batch_size", "learning_rate_multiplier", "n_epochs", "beta") if k in hp}
    return JobOut(
        id=job.id, created_at=int(job.created_at), error=job.error or None, fine_tuned_model=job.fine_tuned_model,
        finished_at=int(job.finished_at) if job.finished_at else None, hyperparameters=hp, model=job.model,
        organization_id=job.org_id, result_files=list(job.result_files or []), seed=job.seed, status=job.status,
        trained_tokens=job.trained_tokens, training_file=job.training_file or "", validation_file=job.validation_file,
        estimated_finish=int(job.estimated_finish) if job.estimated_finish and job.status == "running" else None,
        integrations=(job.request or {}).get("integrations"), metadata=job.metadata_,
        method={"type": method_type, method_type: {"hyperparameters": method_hp}}, suffix=job.suffix,
        trained_steps=job.trained_steps, total_steps=job.total_steps,
    )


def event_out(ev: JobEvent) -> EventOut:
    return EventOut(id=ev.id, created_at=int(ev.created_at), level=ev.level if ev.level in ("info", "warn", "error")
                    else "info", message=ev.message, type="metrics" if ev.type == "metrics" else "message",
                    data=ev.data or {})


# OpenAI's checkpoint metrics, then the preference metrics of a DPO job (names from domain/metrics.py: the object
# is open to more keys, and OpenAI's own DPO jobs report their rewards besides the loss).
METRIC_KEYS = ("step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
               "full_valid_loss", "full_valid_mean_token_accuracy", *metrics_vocabulary.REWARDS)


def checkpoint_out(ck: Checkpoint, job: Job) -> CheckpointOut:
    """A checkpoint with the metrics it has: a metric not measured (no validation file: ``valid_*``) is left out,
    the spec's metrics being optional but not nullable."""
    metrics = {k: ck.metrics.get(k) for k in METRIC_KEYS}
    metrics["step"] = ck.step
    if metrics.get("full_valid_loss") is None:
        metrics["full_valid_loss"] = metrics.get("valid_loss")
    if metrics.get("full_valid_mean_token_accuracy") is None:
        metrics["full_valid_mean_token_accuracy"] = metrics.get("valid_mean_token_accuracy")
    metrics = {k: v for k, v in metrics.items() if v is not None}
    model_name = fine_tuned_model_name(job.model, job.org_id, job.suffix, job.id)
    return CheckpointOut(id=ck.id, created_at=int(ck.created_at), fine_tuning_job_id=ck.job_id, step_number=ck.step,
                         fine_tuned_model_checkpoint=f"{model_name}:ckpt-step-{ck.step}",
                         metrics=metrics)


FILE_PARTS = {"file", "purpose", "expires_after", "expires_after[anchor]", "expires_after[seconds]"}


def check_file_parts(names: list[str]) -> None:
    """A missing ``file`` part, and any part POST /v1/files does not know (it would otherwise be ignored), are a
    400 naming each."""
    problems = [] if "file" in names else [("file", "Missing required parameter: 'file'.")]
    problems += [(n, f"Unrecognized request argument supplied: '{n}'.") for n in sorted(set(names) - FILE_PARTS)]
    if problems:
        raise InvalidRequest(" ".join(m for _, m in problems), param=problems[0][0])


def expires_after_seconds(json_part: str | None, anchor: str | None, seconds: str | None) -> int | None:
    """``expires_after`` from one JSON part or from the ``[anchor]``/``[seconds]`` parts, checked by the same rules
    either way; a 400 names every problem (as ``expires_after[<key>]``)."""
    if json_part is None and anchor is None and seconds is None:
        return None
    if json_part is not None:
        if anchor is not None or seconds is not None:
            raise InvalidRequest("Give expires_after either as one JSON part or as expires_after[anchor] and "
                                 "expires_after[seconds], not both", param="expires_after")
        try:
            value = jsontext.loads(json_part)
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"expires_after is not valid JSON: {e.msg}", param="expires_after") from None
        if not isinstance(value, dict):
            raise InvalidRequest("expires_after must be a JSON object {\"anchor\": \"created_at\", \"seconds\": N}",
                                 param="expires_after")
    else:
        value = {k: v for k, v in (("anchor", anchor), ("seconds", seconds)) if v is not None}
        # Multipart values are text: a whole number is the number it spells.
        if isinstance(seconds, str) and seconds.strip().lstrip("-").isdigit():
            value["seconds"] = int(seconds)
    try:
        return ExpiresAfterIn.model_validate(value).seconds
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                # OpenAI's own wording for an argument it does not know.
                problems.append((f"expires_after[{key}]", f"Unrecognized request argument supplied: "
                                                          f"'expires_after[{key}]'"))
                continue
            what = "is required" if err["type"] == "missing" else err["msg"].replace("Input should be", "must be")
            problems.append((f"expires_after[{key}]", f"expires_after[{key}] {what}"))
        raise InvalidRequest("; ".join(m for _, m in problems), param=problems[0][0]) from None


def file_out(f: File) -> FileOut:
    return FileOut(id=f.id, bytes=f.bytes, created_at=int(f.created_at), filename=f.filename, purpose=f.purpose,
                   status=f.status, status_details=f.status_details,
                   expires_at=int(f.expires_at) if f.expires_at else None)


# ----- inference ---------------------------------------------------------------------------------
def _sampling(body: ChatCompletionIn | CompletionIn, problems: Problems) -> dict[str, Any]:
    if body.stream_options is not None and not body.stream:
        problems.add(InvalidRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                                    param="stream_options"))
    if body.stream_options is not None and body.stream_options.include_obfuscation:
        problems.add(InvalidRequest("'stream_options.include_obfuscation' is not supported by this server",
                                    param="stream_options.include_obfuscation"))
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stop):
        problems.add(InvalidRequest("'stop' strings must not be empty", param="stop"))
    out: dict[str, Any] = {"stop": stop, "seed": body.seed, "n": body.n or 1}
    if body.temperature is not None:
        out["temperature"] = float(body.temperature)
    if body.top_p is not None:
        out["top_p"] = float(body.top_p)
    return out


def _text(content: Any, i: int, problems: Problems) -> str:
    if content is None:
        problems.add(InvalidRequest(f"messages[{i}].content is required", param=f"messages[{i}].content"))
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        if part.type != "text":
            problems.add(InvalidRequest(f"messages[{i}].content[{j}] is of type '{part.type}': the models this "
                                        "server serves take text only", param=f"messages[{i}].content[{j}].type"))
        else:
            parts.append(part.text)
    return "".join(parts)


def chat_request(body: ChatCompletionIn) -> GenerationRequest:
    """A chat completion request as a GenerationRequest, or one 400 listing every problem."""
    problems = Problems()
    sampling = _sampling(body, problems)
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        problems.add(InvalidRequest("Give 'max_completion_tokens' or its deprecated form 'max_tokens', not both with "
                                    "different values", param="max_completion_tokens"))
    # OpenAI's developer messages are the system messages of open models' chat templates.
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content, i, problems)}
                for i, m in enumerate(body.messages)]
    problems.raise_if_any()
    return GenerationRequest(messages=messages, max_tokens=body.max_completion_tokens or body.max_tokens,
                             **sampling)


def completion_requests(body: CompletionIn) -> list[GenerationRequest]:
    """A completion request as one GenerationRequest per prompt, or one 400 listing every problem."""
    problems = Problems()
    sampling = _sampling(body, problems)
    problems.raise_if_any()
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    return [GenerationRequest(prompt=p, max_tokens=body.max_tokens, **sampling) for p in prompts]


def completion_id(kind: str) -> str:
    """``chatcmpl-...`` or ``cmpl-...``."""
    return f"{kind}-{secrets.token_hex(12)}"


def usage_out(usage: dict[str, int]) -> dict[str, int]:
    return {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def chat_completion_out(cid: str, created: int, model: str, texts: dict[int, str], reasons: dict[int, str],
                        usage: dict[str, int]) -> dict[str, Any]:
    """The ``chat.completion`` object."""
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant", "content": texts.get(i, ""), "refusal": None},
                         "logprobs": None, "finish_reason": reasons.get(i, "stop")} for i in sorted(reasons)],
            "usage": usage_out(usage)}


def chat_chunk(cid: str, created: int, model: str, index: int | None = None, delta: dict[str, Any] | None = None,
               finish_reason: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``: a choice's delta or end, or (index None) the closing usage chunk."""
    choices = [] if index is None else [{"index": index, "delta": delta or {}, "logprobs": None,
                                         "finish_reason": finish_reason}]
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, "usage": None if usage is None else usage_out(usage)}


def completion_out(cid: str, created: int, model: str, texts: dict[int, str], reasons: dict[int, str],
                   usage: dict[str, int]) -> dict[str, Any]:
    """The ``text_completion`` object."""
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
            "choices": [{"index": i, "text": texts.get(i, ""), "logprobs": None,
                         "finish_reason": reasons.get(i, "stop")} for i in sorted(reasons)],
            "usage": usage_out(usage)}


def completion_chunk(cid: str, created: int, model: str, index: int | None = None, text: str = "",
                     finish_reason: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed ``text_completion``: a choice's text or end, or (index None) the closing usage chunk."""
    choices = [] if index is None else [{"index": index, "text": text, "logprobs": None,
                                         "finish_reason": finish_reason}]
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
            "choices": choices, "usage": None if usage is None else usage_out(usage)}
