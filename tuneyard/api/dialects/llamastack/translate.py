"""Llama Stack wire <-> tuneyard: a supervised-fine-tune request becomes a Submission; a Job becomes a status.

The field mapping is written down in docs/dialects/llamastack.md; keep the two in step.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuneyard.api.dialects.llamastack.schemas import (
    ChatCompletionIn,
    CheckpointOut,
    DatasetOut,
    EfficiencyConfig,
    LoraConfig,
    PreferenceOptimizeIn,
    QatConfig,
    SupervisedFineTuneIn,
    TopKIn,
    TopPIn,
    TrainingMetrics,
)
from tuneyard.api.wire import resources_spec
from tuneyard.domain.errors import InvalidRequest, InvalidState, Problems, TuneyardError
from tuneyard.domain.generation import GenerationRequest
from tuneyard.domain.jobs import JobStatus
from tuneyard.domain.spec import (
    AdapterSpec,
    DataSpec,
    Hyperparameters,
    IntegrationSpec,
    ModelSpec,
    ResourceSpec,
    ScheduleSpec,
    TrainingSpec,
)
from tuneyard.service.auth import Principal
from tuneyard.service.datasets import DatasetService
from tuneyard.service.jobs import Submission
from tuneyard.service.models import ModelService
from tuneyard.service.paths import confine
from tuneyard.settings import Settings
from tuneyard.store.models import Checkpoint, Dataset, Job

DIALECT = "llamastack"
STATUS = {
    JobStatus.VALIDATING_FILES: "scheduled", JobStatus.QUEUED: "scheduled", JobStatus.PAUSED: "scheduled",
    JobStatus.RUNNING: "in_progress", JobStatus.SUCCEEDED: "completed", JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
}
# torchtune's module names (what Llama Stack clients send) -> the Hugging Face Llama-family names.
ATTN_MODULES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj",
                "o_proj": "o_proj"}
MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
          "fp16": "float16", "float16": "float16"}
DATA = "training_config.data_config"
# The service names fields by their TrainingSpec role; Llama Stack callers know them by these paths.
SERVICE_PARAMS = {
    "model": "model", "quant_bits": "algorithm_config.quantize_base", "torch_dtype": "training_config.dtype",
    "device": "model", "batch_size": f"{DATA}.batch_size", "method": "algorithm_config",
    "beta": "algorithm_config.beta", "dpo_loss": "algorithm_config.loss_type",
    "label_smoothing": "algorithm_config.epsilon", "packing": f"{DATA}.packed",
    "train_on_input": f"{DATA}.train_on_input",
    "lora": "algorithm_config", "lora_r": "algorithm_config.rank", "lora_alpha": "algorithm_config.alpha",
    "target_modules": "algorithm_config.lora_attn_modules", "use_dora": "algorithm_config.use_dora",
}


# What each job action is called when it cannot be done.
DONE = {"cancel": "cancelled", "pause": "paused", "resume": "resumed"}


def dialect_error(e: TuneyardError) -> TuneyardError:
    """The same error in Llama Stack's words: its field names, the job_uuid its client knows, its status names."""
    if isinstance(e, InvalidState):
        already = "already " if JobStatus(e.status).terminal else ""
        e.message = (f"training job '{e.external_id or e.job_id}' is {already}{STATUS[JobStatus(e.status)]} and "
                     f"cannot be {DONE[e.action]}")
        e.param = e.param or "job_uuid"
    return e.rename_params(SERVICE_PARAMS)


def to_submission(req: SupervisedFineTuneIn, who: Principal, datasets: DatasetService,
                  settings: Settings) -> Submission:
    """Translate POST /post-training/supervised-fine-tune into the dialect-neutral submission.

    Every independent field problem is raised in one 400 (the service's checks follow once these pass).
    """
    problems = Problems()
    if not req.model:
        problems.add(InvalidRequest("model is required: a hub id or a local model directory", param="model"))
    adapter, quant = AdapterSpec(type="full"), None
    with problems.check():
        adapter, quant = _adapter(req.algorithm_config)
    return _submission(req, req.model or "", "sft", adapter, quant, {}, None, who, datasets, settings, problems)


def to_preference_submission(req: PreferenceOptimizeIn, who: Principal, datasets: DatasetService,
                             settings: Settings) -> Submission:
    """Translate POST /post-training/preference-optimize into the dialect-neutral (DPO) submission.

    ``finetuned_model`` is the model to optimise: a base model, or a fine-tuned model (or checkpoint) whose
    adapter then trains on. The request names no adapter: a new one is tuneyard's default LoRA.
    """
    problems = Problems()
    ac = req.algorithm_config
    if ac.beta is not None and ac.reward_scale is not None and ac.beta != ac.reward_scale:
        problems.add(InvalidRequest("algorithm_config: beta and reward_scale are the same DPO temperature; give "
                                    "one of them", param="algorithm_config.reward_scale"))
    for name in ("reward_clip", "gamma"):
        if getattr(ac, name):
            problems.add(InvalidRequest(f"algorithm_config.{name} has no counterpart in DPO's loss (TRL's "
                                        "DPOTrainer); send 0 or leave it out", param=f"algorithm_config.{name}"))
    beta = ac.beta if ac.beta is not None else ac.reward_scale
    dpo = {"beta": beta if beta is not None else "auto", "dpo_loss": ac.loss_type,
           "label_smoothing": ac.epsilon or None}
    return _submission(req, req.finetuned_model, "dpo", AdapterSpec(type="lora"), None, dpo, "dpo", who, datasets,
                       settings, problems)


def _submission(req: SupervisedFineTuneIn | PreferenceOptimizeIn, model: str, method: str, adapter: AdapterSpec,
                quant: int | None, extra_hp: dict, data_format: str | None, who: Principal, datasets: DatasetService,
                settings: Settings, problems: Problems) -> Submission:
    """What both post-training requests share: data, training and efficiency configs, checkpoint_dir."""
    if req.hyperparam_search_config:
        problems.add(InvalidRequest("hyperparam_search_config: tuneyard runs one configuration per job; send it "
                                    "empty", param="hyperparam_search_config"))
    tc = req.training_config
    dc = tc.data_config
    if dc is None:
        problems.add(InvalidRequest("training_config.data_config is required (dataset_id, batch_size, "
                                    "data_format...)", param=DATA))
    eff = tc.efficiency_config
    fsdp_flags = eff is not None and (eff.memory_efficient_fsdp_wrap or eff.fsdp_cpu_offload)
    if fsdp_flags and req.resources is not None and req.resources.distributed not in (None, "fsdp"):
        problems.add(InvalidRequest(f"resources.distributed '{req.resources.distributed}': the FSDP flags of "
                                    "training_config.efficiency_config ask for 'fsdp'", param="resources.distributed"))
    if eff is not None and eff.enable_activation_offloading:
        problems.add(InvalidRequest("training_config.efficiency_config.enable_activation_offloading is not available "
                                    "in this installation (activation checkpointing is)",
                                    param="training_config.efficiency_config.enable_activation_offloading"))
    dtype = "auto" if tc.dtype is None else DTYPES.get(tc.dtype.lower())
    if dtype is None:
        problems.add(InvalidRequest(f"training_config.dtype '{tc.dtype}' is not one of {sorted(DTYPES)}",
                                    param="training_config.dtype"))
    train = valid = None
    if dc is not None:
        # A preference job's rows are recognised by their keys; data_format ("instruct" or "dialog") describes
        # supervised rows and is read for those.
        fmt = data_format or dc.data_format
        with problems.check():
            train = datasets.source_for(who, dc.dataset_id, data_format=fmt, param=f"{DATA}.dataset_id")
        if dc.validation_dataset_id:
            with problems.check():
                valid = datasets.source_for(who, dc.validation_dataset_id, data_format=fmt,
                                            param=f"{DATA}.validation_dataset_id")
    export = None
    if req.checkpoint_dir:
        with problems.check():
            export = str(confine(req.checkpoint_dir, settings.allowed_roots, param="checkpoint_dir", want_dir=True))
    problems.raise_if_any()
    assert dc is not None and train is not None  # both recorded a problem otherwise, raised just above
    opt = tc.optimizer_config
    hyper = Hyperparameters(
        n_epochs=tc.n_epochs, batch_size=dc.batch_size * tc.gradient_accumulation_steps,
        per_device_batch_size=dc.batch_size, gradient_accumulation_steps=tc.gradient_accumulation_steps,
        learning_rate_multiplier=1.0, learning_rate=opt.lr if opt else None,
        optimizer=opt.optimizer_type if opt else "adamw", weight_decay=opt.weight_decay if opt else 0.0,
        warmup_steps=opt.num_warmup_steps if opt else None, max_steps_per_epoch=tc.max_steps_per_epoch,
        gradient_checkpointing=bool(eff and eff.enable_activation_checkpointing), **extra_hp)
    spec = TrainingSpec(
        method=method,
        model=ModelSpec(name=model, torch_dtype=dtype, quant_bits=quant),
        data=DataSpec(train=train, validation=valid, packing=dc.packed, train_on_input=dc.train_on_input,
                      shuffle=dc.shuffle),
        adapter=adapter, hyperparameters=hyper,
        schedule=ScheduleSpec(max_validation_steps=tc.max_validation_steps),
        resources=resources_spec(req.resources, _resources(eff), "resources"), export_dir=export,
        integrations=_integrations(req.logger_config))
    return Submission(spec=spec, dialect=DIALECT, request=req.model_dump(mode="json"), external_id=req.job_uuid,
                      default_devices=req.resources is None or req.resources.gpu_count is None)


def _resources(eff: EfficiencyConfig | None) -> ResourceSpec:
    """The FSDP flags of efficiency_config: either one asks for FSDP (they mean nothing without it).

    memory_efficient_fsdp_wrap is FSDP2's memory-for-speed choice, resharding parameters after the forward pass
    (FULL_SHARD; without it they stay gathered until the backward, SHARD_GRAD_OP); fsdp_cpu_offload keeps
    parameters and optimizer state on the CPU.
    """
    if eff is None or not (eff.memory_efficient_fsdp_wrap or eff.fsdp_cpu_offload):
        return ResourceSpec()
    flag = "fsdp_cpu_offload" if eff.fsdp_cpu_offload else "memory_efficient_fsdp_wrap"
    return ResourceSpec(distributed="fsdp", fsdp_reshard_after_forward=eff.memory_efficient_fsdp_wrap,
                        fsdp_cpu_offload=eff.fsdp_cpu_offload,
                        distributed_param=f"training_config.efficiency_config.{flag}")


def _integrations(logger_config: dict) -> list[IntegrationSpec]:
    """The trackers a logger_config asks for: ``{"type": "mlflow", ...settings}`` or ``{"mlflow": {...settings}}``
    (one key per tracker); the service checks the settings (domain/tracking.py)."""
    if not logger_config:
        return []
    kind_key = next((k for k in ("type", "logger", "backend") if logger_config.get(k)), None)
    if kind_key is not None:
        rest = {k: v for k, v in logger_config.items() if k != kind_key}
        return [IntegrationSpec(type=str(logger_config[kind_key]), config=rest, param="logger_config")]
    return [IntegrationSpec(type=key, config=value if isinstance(value, dict) else {}, param=f"logger_config.{key}")
            for key, value in logger_config.items()]


def _adapter(cfg: LoraConfig | QatConfig | None) -> tuple[AdapterSpec, int | None]:
    if cfg is None:
        # No algorithm: Llama Stack's full-parameter fine-tuning.
        return AdapterSpec(type="full"), None
    if isinstance(cfg, QatConfig):
        raise InvalidRequest("algorithm_config type 'QAT' (quantisation-aware training) is not available; use "
                             "'LoRA' (with quantize_base for QLoRA)", param="algorithm_config.type")
    unknown = [m for m in cfg.lora_attn_modules if m not in ATTN_MODULES]
    if unknown:
        raise InvalidRequest(f"algorithm_config.lora_attn_modules: unknown module(s) {unknown}; use "
                             f"{sorted(ATTN_MODULES)}", param="algorithm_config.lora_attn_modules")
    targets = list(dict.fromkeys(ATTN_MODULES[m] for m in cfg.lora_attn_modules))
    if cfg.apply_lora_to_mlp:
        targets += MLP_MODULES
    if cfg.apply_lora_to_output:
        targets.append("lm_head")
    if not targets:
        raise InvalidRequest("LoRA needs at least one module: name lora_attn_modules or set apply_lora_to_mlp",
                             param="algorithm_config.lora_attn_modules")
    adapter = AdapterSpec(type="lora", r=cfg.rank, alpha=cfg.alpha, target_modules=targets)
    if "use_dora" in cfg.model_fields_set:
        adapter.use_dora = cfg.use_dora  # else a continued adapter's own
    return adapter, 4 if cfg.quantize_base else None


# ----- job -> wire ---------------------------------------------------------------------------------
def iso(ts: float | None) -> str | None:
    """Unix seconds as ISO-8601 UTC."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def job_uuid(job: Job) -> str:
    """The id a Llama Stack client knows the job by: its own job_uuid, or tuneyard's id."""
    return job.external_id or job.id


def _epoch(job: Job, step: int) -> int:
    hp = job.resolved_hyperparameters or {}
    epochs = hp.get("n_epochs")
    if not isinstance(epochs, int) or not job.total_steps:
        return 0
    per_epoch = max(1, math.ceil(job.total_steps / epochs))
    return min(epochs, math.ceil(step / per_epoch))


def _metrics(epoch: int, m: dict) -> TrainingMetrics:
    valid = m.get("valid_loss")
    perplexity = None
    if isinstance(valid, int | float):
        perplexity = math.exp(valid) if valid < 700 else math.inf
    return TrainingMetrics(epoch=epoch, train_loss=m.get("train_loss"), validation_loss=valid, perplexity=perplexity)


def checkpoint_out(job: Job, ck: Checkpoint) -> CheckpointOut:
    """One checkpoint with its training metrics (perplexity = exp(validation loss))."""
    epoch = _epoch(job, ck.step)
    return CheckpointOut(identifier=ck.id, created_at=iso(ck.created_at), epoch=epoch,
                         post_training_job_id=job_uuid(job), path=ck.path,
                         training_metrics=_metrics(epoch, ck.metrics or {}))


CHECKPOINT_PREFIX = "ftckpt-"


def callable_model(models: ModelService, who: Principal, model_id: str) -> str:
    """The shared model name for a Llama Stack ``model_id``: a checkpoint's identifier (``ftckpt-...``, as the job's
    artifacts list it) becomes ``<fine_tuned_model>:ckpt-step-N``; anything else is the name itself."""
    return models.checkpoint_model(who, model_id) if model_id.startswith(CHECKPOINT_PREFIX) else model_id


def final_output(job: Job, last: Checkpoint | None) -> CheckpointOut | None:
    """The trained adapter (or model) as the job's last artifact, once it succeeded."""
    if job.status != JobStatus.SUCCEEDED or not job.output_dir:
        return None
    epochs = (job.resolved_hyperparameters or {}).get("n_epochs") or 0
    metrics = _metrics(int(epochs), (last.metrics if last else {}) or {})
    return CheckpointOut(identifier=job.fine_tuned_model or f"{job_uuid(job)}-final", created_at=iso(job.finished_at),
                         epoch=int(epochs), post_training_job_id=job_uuid(job),
                         path=str(Path(job.output_dir) / "output"), training_metrics=metrics)


def resources(job: Job, settings: Settings) -> dict:
    """What the job runs on: device kind, process count and the memory each device has."""
    from tuneyard.scheduler.capacity import detect

    spec = TrainingSpec.model_validate(job.spec)
    cap = detect(settings)
    cuda = cap.has_cuda and spec.resources.device != "cpu"
    if cuda:
        return {"device": "cuda", "count": spec.resources.nproc_per_node, "gpu_type": cap.gpu_name,
                "memory_mib_per_device": cap.gpu_memory_mib}
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"device": "cpu", "count": spec.resources.nproc_per_node,
            "memory_mib_total": total // 2**20}


def failure(job: Job) -> dict | None:
    """Why a failed job failed, ``{code, message}``, for the status' ``resources_allocated.error``."""
    if job.status != JobStatus.FAILED or not job.error:
        return None
    return {"code": job.error.get("code"), "message": job.error.get("message")}


def dataset_out(ds: Dataset, rows: list[dict] | None) -> DatasetOut:
    """The Llama Stack view of a registered dataset: a ``rows`` source reads back with its rows (as stored, appended
    ones included), a ``uri`` source as registered."""
    source = {"type": "rows", "rows": rows or []} if ds.source.get("type") == "rows" else dict(ds.source)
    return DatasetOut(identifier=ds.dataset_id, provider_resource_id=ds.dataset_id, purpose=ds.purpose,
                      source=source, metadata=ds.metadata_ or {})


# ----- inference ---------------------------------------------------------------------------------
def _content(content: Any, where: str, problems: Problems) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    items = content if isinstance(content, list) else [content]
    out = []
    for j, item in enumerate(items):
        if item.type != "text":
            problems.add(InvalidRequest(f"{where}[{j}] is an image: the models this server serves take text only",
                                        param=f"{where}[{j}]"))
        else:
            out.append(item.text)
    return "".join(out)


def chat_request(body: ChatCompletionIn) -> GenerationRequest:
    """inference.chat_completion as a GenerationRequest, or one 400 listing every problem."""
    problems = Problems()
    messages = []
    for i, m in enumerate(body.messages):
        text = _content(m.content, f"messages[{i}].content", problems)
        if m.context is not None:
            text += "\n\n" + _content(m.context, f"messages[{i}].context", problems)
        if m.tool_calls:
            problems.add(InvalidRequest(f"messages[{i}].tool_calls: tool calls are not supported by this server",
                                        param=f"messages[{i}].tool_calls"))
        messages.append({"role": m.role, "content": text})
    sp = body.sampling_params
    out: dict[str, Any] = {"temperature": 0.0}  # Llama Stack's default strategy is greedy
    if sp is not None:
        if isinstance(sp.strategy, TopKIn):
            problems.add(InvalidRequest("sampling_params.strategy: top_k sampling is not supported by this server; "
                                        "use greedy or top_p", param="sampling_params.strategy"))
        elif isinstance(sp.strategy, TopPIn):
            out = {"temperature": 1.0 if sp.strategy.temperature is None else sp.strategy.temperature,
                   "top_p": 1.0 if sp.strategy.top_p is None else sp.strategy.top_p}
        if sp.repetition_penalty not in (None, 1.0):
            problems.add(InvalidRequest("sampling_params.repetition_penalty: only 1.0 (none) is supported by this "
                                        "server", param="sampling_params.repetition_penalty"))
        if sp.stop is not None and any(not s for s in sp.stop):
            problems.add(InvalidRequest("sampling_params.stop strings must not be empty", param="sampling_params.stop"))
        out["max_tokens"] = sp.max_tokens or None
        out["stop"] = list(sp.stop or [])
    problems.raise_if_any()
    return GenerationRequest(messages=messages, **out)


STOP_REASON = {"stop": "end_of_turn", "length": "out_of_tokens"}


def usage_metrics(usage: dict[str, int]) -> list[dict[str, Any]]:
    """Llama Stack's token metrics."""
    return [{"metric": k, "value": usage[k], "unit": "tokens"}
            for k in ("prompt_tokens", "completion_tokens", "total_tokens")]


def chat_response(text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
    """The ChatCompletionResponse."""
    return {"completion_message": {"role": "assistant", "content": text, "stop_reason": STOP_REASON[finish_reason],
                                   "tool_calls": []}, "logprobs": None, "metrics": usage_metrics(usage)}


def chat_chunk(event_type: str, text: str = "", finish_reason: str | None = None,
               usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One ChatCompletionResponseStreamChunk: start, progress (text) or complete (stop reason, metrics)."""
    event: dict[str, Any] = {"event_type": event_type, "delta": {"type": "text", "text": text}, "logprobs": None,
                             "stop_reason": STOP_REASON[finish_reason] if finish_reason else None}
    return {"event": event, "metrics": usage_metrics(usage) if usage else None}
