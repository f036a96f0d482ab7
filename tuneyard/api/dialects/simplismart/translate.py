"""Simplismart wire <-> tuneyard: the five configs become a Submission; a Job becomes a job record.

The full field mapping is written down in docs/dialects/simplismart.md; keep the two in step.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tuneyard import jsontext
from tuneyard.api.dialects.simplismart.schemas import (
    CONFIGS,
    DatasetConfig,
    DatasetDetails,
    InfraConfig,
    JobRecord,
    JobSummary,
    Metric,
    ModelDetails,
    TrainConfig,
)
from tuneyard.api.wire import echo_as_sent
from tuneyard.data.sources import kind_of
from tuneyard.domain import capabilities
from tuneyard.domain import metrics as metrics_vocabulary
from tuneyard.domain.errors import InvalidRequest, InvalidState, Problems, TuneyardError
from tuneyard.domain.jobs import JobStatus
from tuneyard.domain.spec import (
    AdapterSpec,
    DataSource,
    DataSpec,
    Hyperparameters,
    IntegrationSpec,
    ModelSpec,
    ResourceSpec,
    ScheduleSpec,
    SplitSpec,
    TrainingSpec,
    VisionSpec,
)
from tuneyard.scheduler.capacity import Capacity
from tuneyard.service.jobs import Submission
from tuneyard.service.paths import looks_like_path
from tuneyard.store.models import Job, JobEvent

DIALECT = "simplismart"
# train_config.type -> TrainingSpec.method (ppo has no counterpart).
METHODS = {"sft": "sft", "dpo": "dpo"}
DEFAULT_MAX_LENGTH = 2048
# Simplismart's vocabulary for what a job from another dialect carries; a value outside it is shown as null
# (the Simplismart default: detected from the data, chosen by the server).
DATASET_TYPES = ("jsonl", "csv", "parquet")
DATASET_FORMATS = ("sharegpt", "alpaca", "instruction")
GPU_TYPES = ("h100", "a100", "a10g", "v100", "t4")
TORCH_DTYPES = ("float16", "bfloat16", "float32")
# tuneyard executes the job whatever the caller calls its tuner; these names all mean "the PEFT/TRL stack".
TUNER_BACKENDS = {"simplismart", "tuneyard", "peft", "trl", "transformers", "huggingface"}

STATUS = {
    JobStatus.VALIDATING_FILES: "QUEUED", JobStatus.QUEUED: "QUEUED", JobStatus.PAUSED: "QUEUED",
    JobStatus.RUNNING: "RUNNING", JobStatus.SUCCEEDED: "COMPLETED", JobStatus.FAILED: "FAILED",
    JobStatus.CANCELLED: "CANCELED",
}

# The service names fields by their TrainingSpec role; Simplismart callers know them by these paths.
SERVICE_PARAMS = {
    "model": "model_details.base_model",
    "model_type": "model_details.model_type",
    "quant_bits": "model_details.quantization.quant_bits",
    "torch_dtype": "train_config.torch_dtype",
    "method": "train_config.type",
    "distributed": "train_config.distributed.type",
    "device": "infra_config.gpu_type",
    "gpu_type": "infra_config.gpu_type",
    "gpu_count": "infra_config.gpu_count",
    "node_count": "infra_config.node_count",
    "batch_size": "train_config.hyperparameters.per_device_train_batch_size",
    "lazy_tokenize": "dataset_config.preprocessing.lazy_tokenize",
    "streaming": "dataset_config.preprocessing.streaming",
    "template": "dataset_config.preprocessing.prompt.template",
    "secret_id": "dataset_details.secret_id",
    "model_secret_id": "model_details.secret_id",
    "region": "dataset_details.region",
    "lora": "train_config.train_type",
    "lora_r": "train_config.adapter_config.r",
    "lora_alpha": "train_config.adapter_config.alpha",
    "lora_dropout": "train_config.adapter_config.dropout",
    "target_modules": "train_config.adapter_config.targets",
    "freeze_vit": "train_config.freeze_vit",
    "freeze_aligner": "train_config.freeze_aligner",
    "max_pixels": "train_config.max_pixels",
    "min_pixels": "train_config.min_pixels",
}


# What each job action is called when it cannot be done.
DONE = {"cancel": "cancelled", "pause": "paused", "resume": "resumed"}


def dialect_error(e: TuneyardError) -> TuneyardError:
    """The same error in Simplismart's words: its field names, its status names."""
    if isinstance(e, InvalidState):
        status = STATUS[JobStatus(e.status)]
        already = "already " if JobStatus(e.status).terminal else ""
        e.message = f"Training job {e.job_id} is {already}{status} and cannot be {DONE[e.action]}"
    return e.rename_params(SERVICE_PARAMS)


def parse_configs(form: dict[str, str]) -> dict[str, Any]:
    """Parse the JSON-string form fields; one 400 names every field (and key inside it) that is wrong."""
    out: dict[str, Any] = {}
    problems = Problems()
    for name, model in CONFIGS.items():
        raw = form[name]
        try:
            value = jsontext.loads(raw) if raw.strip() else {}
        except jsontext.JSONValueError as e:
            problems.add(InvalidRequest(f"{name}.{e.msg}" if e.path else f"{name}: {e.msg}", param=name))
            continue
        except json.JSONDecodeError as e:
            problems.add(InvalidRequest(f"{name} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                                        param=name))
            continue
        if not isinstance(value, dict):
            problems.add(InvalidRequest(f"{name} must be a JSON object, got {type(value).__name__}", param=name))
            continue
        try:
            out[name] = model.model_validate(value)
        except ValidationError as e:
            for error in e.errors():
                problems.add(_validation_error(name, error))
    problems.raise_if_any()
    return out


def _validation_error(config: str, error: Any) -> InvalidRequest:
    loc = [str(p) for p in error.get("loc", ()) if not str(p).startswith(("literal[", "function-"))]
    param = ".".join([config, *loc])
    if error.get("type") == "extra_forbidden":
        return InvalidRequest(f"Unrecognized field '{param}': tuneyard does not know it and will not ignore it",
                              param=param)
    if error.get("type") == "missing":
        return InvalidRequest(f"Missing required field '{param}'", param=param)
    allowed = (error.get("ctx") or {}).get("expected")
    detail = f"{error.get('msg')}" + (f" (allowed: {allowed})" if allowed else "")
    return InvalidRequest(f"Invalid value for '{param}': {detail}", param=param)


def to_submission(org: str, experiment_name: str, c: dict[str, Any]) -> Submission:
    """Translate POST /job/ into the dialect-neutral submission; every independent field problem in one 400."""
    return _to_submission(org, experiment_name, c, Problems())


def _combination_errors(e: ValidationError, problems: Problems) -> None:
    # A combination the spec's own rules refuse (each config alone was valid).
    for error in e.errors():
        problems.add(InvalidRequest(f"Invalid configuration: {error.get('msg')}", param=".".join(
            str(p) for p in error.get("loc", ())) or None))


def _to_submission(org: str, experiment_name: str, c: dict[str, Any], problems: Problems) -> Submission:
    dc: DatasetConfig = c["dataset_config"]
    md: ModelDetails = c["model_details"]
    tc: TrainConfig = c["train_config"]
    dd: DatasetDetails = c["dataset_details"]
    ic: InfraConfig = c["infra_config"]

    if tc.type == "ppo":
        problems.add(InvalidRequest("train_config.type 'ppo' needs a reward model, which tuneyard does not train; use "
                                    f"{capabilities.available(METHODS)}", param="train_config.type",
                                    code="unsupported_method"))
    if tc.task_type != "causal_lm":
        problems.add(InvalidRequest(f"train_config.task_type '{tc.task_type}': tuneyard trains causal language "
                                    "models only", param="train_config.task_type"))
    if tc.tuner_backend is not None and tc.tuner_backend.lower() not in TUNER_BACKENDS:
        problems.add(InvalidRequest(f"train_config.tuner_backend '{tc.tuner_backend}' is not available; tuneyard "
                                    f"runs one of {sorted(TUNER_BACKENDS)} (all the same PEFT/TRL stack)",
                                    param="train_config.tuner_backend"))
    try:
        spec = _spec(dc, tc, ic, _model(md, tc, problems), _adapter(tc, problems), _source(dd, problems))
    except ValidationError as e:
        _combination_errors(e, problems)
        problems.raise_if_any()
        raise  # not reached: the combination's errors were just recorded
    problems.raise_if_any()
    request = {"org": org, "experiment_name": experiment_name,
               **{name: cfg.model_dump(mode="json") for name, cfg in c.items()}}
    return Submission(spec=spec, dialect=DIALECT, request=request, suffix=_suffix(experiment_name))


def _spec(dc: DatasetConfig, tc: TrainConfig, ic: InfraConfig, model: ModelSpec, adapter: AdapterSpec,
          source: DataSource) -> TrainingSpec:
    resources = _resources(tc, ic)
    world = resources.nproc_per_node * resources.node_count
    h = tc.hyperparameters
    hyper = Hyperparameters(
        n_epochs=h.num_epochs, batch_size=h.per_device_train_batch_size * world,
        per_device_batch_size=h.per_device_train_batch_size, gradient_accumulation_steps=1,
        per_device_eval_batch_size=h.per_device_eval_batch_size, learning_rate=h.learning_rate,
        learning_rate_multiplier=1.0, gradient_checkpointing=h.gradient_checkpointing)
    schedule = ScheduleSpec(save_steps=h.save_steps, save_total_limit=h.save_total_limit,
                            keep_best_checkpoint=h.keep_best_checkpoint, eval_steps=h.eval_steps,
                            logging_steps=h.logging_steps, dataloader_num_workers=h.dataloader_num_workers)
    pre = dc.preprocessing
    ratios = dc.split.ratios
    data = DataSpec(train=source, split=SplitSpec(type=dc.split.type,
                                                  validation_ratio=ratios[1] if len(ratios) > 1 else 0.0),
                    system_prompt=pre.prompt.system, template=pre.prompt.template,
                    max_length=pre.prompt.max_length or DEFAULT_MAX_LENGTH, lazy_tokenize=pre.lazy_tokenize,
                    streaming=pre.streaming)
    return TrainingSpec(method=METHODS.get(tc.type, "sft"), model=model, data=data, adapter=adapter,
                        hyperparameters=hyper, schedule=schedule, resources=resources,
                        integrations=_integrations(tc.integrations or []),
                        vision=VisionSpec(freeze_vit=tc.freeze_vit, freeze_aligner=tc.freeze_aligner,
                                          max_pixels=tc.max_pixels, min_pixels=tc.min_pixels))


def _integrations(items: list[dict[str, Any]]) -> list[IntegrationSpec]:
    """``train_config.integrations`` (OpenAI's shape): the type's own block holds the settings; any other key is
    handed on with them, so that the settings check refuses it instead of it being ignored."""
    out = []
    for i, item in enumerate(items):
        kind = str(item.get("type") or "")
        block = item.get(kind)
        config = {**(block if isinstance(block, dict) else {}),
                  **{k: v for k, v in item.items() if k not in ("type", kind)}}
        out.append(IntegrationSpec(type=kind, config=config, param=f"train_config.integrations[{i}]"))
    return out


def _suffix(name: str) -> str | None:
    # Shown in the OpenAI view's fine_tuned_model (ft:<base>:<org>:<suffix>:<id>), where ':' would split it.
    cleaned = name.replace(":", "-")[:64]
    return cleaned or None


def _model(md: ModelDetails, tc: TrainConfig, problems: Problems) -> ModelSpec:
    add = problems.add
    if md.source_type == "s3":
        add(InvalidRequest("model_details.source_type 's3': loading a base model from S3 is not available in this "
                           "installation; use 'hf' or 'local'", param="model_details.source_type"))
    local = looks_like_path(md.base_model)
    if md.source_type == "local" and not local:
        add(InvalidRequest(f"model_details.base_model '{md.base_model}' is not a local path, but source_type is "
                           "'local'", param="model_details.base_model"))
    if md.source_type == "hf" and local:
        add(InvalidRequest(f"model_details.base_model '{md.base_model}' is a local path, but source_type is "
                           "'hf'; use source_type 'local'", param="model_details.source_type"))
    if md.ownership == "private" and md.source_type == "hf" and not md.secret_id:
        add(InvalidRequest("a private hub model needs model_details.secret_id naming a stored hub token",
                           param="model_details.secret_id"))
    if md.secret_id and md.source_type != "hf":
        add(InvalidRequest("model_details.secret_id applies to hub models (source_type 'hf')",
                           param="model_details.secret_id"))
    quant = md.quantization.quant_bits if md.quantization else None
    if tc.train_type == "qlora":
        if quant == 16:
            add(InvalidRequest("train_type 'qlora' trains on a 4- or 8-bit base; quant_bits 16 contradicts it",
                               param="model_details.quantization.quant_bits"))
        quant = quant or 4
    if tc.train_type == "full" and quant in (4, 8):
        add(InvalidRequest(f"a {quant}-bit base can only be trained with an adapter; use train_type 'qlora' or "
                           "'lora'", param="model_details.quantization.quant_bits"))
    return ModelSpec(name=md.base_model, source="local" if local else "hf", model_type=md.model_type,
                     torch_dtype=tc.torch_dtype or "auto", quant_bits=None if quant == 16 else quant,
                     secret_id=md.secret_id)


def _adapter(tc: TrainConfig, problems: Problems) -> AdapterSpec:
    a = tc.adapter_config
    if tc.train_type == "full":
        if a is not None:
            problems.add(InvalidRequest("train_config.adapter_config applies to lora/qlora; train_type is 'full'",
                                        param="train_config.adapter_config"))
        return AdapterSpec(type="full")
    # Only what was asked is set: a job that continues a fine-tuned model takes the rest from it.
    adapter = AdapterSpec(type="lora") if "train_type" in tc.model_fields_set or a is not None else AdapterSpec()
    if a is None:
        return adapter
    targets: list[str] | str = "all-linear" if a.targets == ["all-linear"] else list(a.targets)
    if "all-linear" in a.targets and len(a.targets) > 1:
        problems.add(InvalidRequest("train_config.adapter_config.targets: 'all-linear' already names every linear "
                                    "layer; give it alone or list module names",
                                    param="train_config.adapter_config.targets"))
    given = a.model_fields_set
    for name, value in (("r", a.r), ("alpha", a.alpha), ("dropout", a.dropout), ("target_modules", targets)):
        if (name if name != "target_modules" else "targets") in given:
            setattr(adapter, name, value)
    return adapter


def _resources(tc: TrainConfig, ic: InfraConfig) -> ResourceSpec:
    cpu = ic.gpu_type == "cpu"
    return ResourceSpec(device="cpu" if cpu else "cuda" if ic.gpu_type else "auto", nproc_per_node=ic.gpu_count,
                        node_count=ic.node_count, gpu_type=None if cpu else ic.gpu_type,
                        distributed=tc.distributed.type)


def _source(dd: DatasetDetails, problems: Problems) -> DataSource:
    path = dd.dataset_path.strip()
    param = "dataset_details.dataset_path"
    add = problems.add
    if dd.source_type == "gcs":
        add(InvalidRequest("dataset_details.source_type 'gcs' is not available in this installation; use s3, hf "
                           "or local", param="dataset_details.source_type"))
    expected = {"s3": ("s3://",), "hf": ("hf://", "huggingface://")}.get(dd.source_type)
    if dd.source_type == "hf" and not path.startswith(("hf://", "huggingface://")) and not looks_like_path(path):
        path = f"hf://{path}"  # Simplismart names hub datasets by their bare id
    if expected and not path.startswith(expected):
        add(InvalidRequest(f"dataset_details.dataset_path '{path}' does not match source_type "
                           f"'{dd.source_type}' (expected {' or '.join(expected)}...)", param=param))
    if dd.source_type == "local" and "://" in path and not path.startswith("file://"):
        add(InvalidRequest(f"dataset_details.dataset_path '{path}' is a URL, but source_type is 'local'",
                           param=param))
    if dd.ownership == "private" and dd.source_type == "s3" and not dd.secret_id:
        add(InvalidRequest("a private S3 dataset needs dataset_details.secret_id naming stored AWS credentials",
                           param="dataset_details.secret_id"))
    if dd.region and dd.source_type != "s3":
        add(InvalidRequest(f"dataset_details.region applies to s3 sources only (source_type is "
                           f"'{dd.source_type}')", param="dataset_details.region"))
    if dd.secret_id and dd.source_type not in ("s3", "hf"):
        add(InvalidRequest(f"dataset_details.secret_id applies to s3 and hf sources only (source_type is "
                           f"'{dd.source_type}')", param="dataset_details.secret_id"))
    return DataSource(path=path, format=dd.dataset_format or "auto", container=dd.dataset_type or "auto",
                      param=param, secret_id=dd.secret_id, region=dd.region)


# ----- job -> wire ---------------------------------------------------------------------------------
def iso(ts: float | None) -> str | None:
    """Unix seconds as ISO-8601 UTC (``...Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def progress(job: Job) -> float:
    """0-100 from trained/total steps; 100 once the job has succeeded."""
    if job.status == JobStatus.SUCCEEDED:
        return 100.0
    if job.total_steps and job.trained_steps:
        return round(min(100.0, 100.0 * job.trained_steps / job.total_steps), 1)
    return 0.0


def configs_of(job: Job, cap: Capacity | None = None) -> dict[str, dict[str, Any]]:
    """The five configs as the job actually runs (defaults and resolved values filled in), for any job, in
    Simplismart's words; numbers the Simplismart client sent are echoed as it sent them (16 stays 16)."""
    spec = TrainingSpec.model_validate(job.spec)
    hp = dict(job.resolved_hyperparameters or {})
    req = job.request if job.dialect == DIALECT else {}
    world = spec.world_size
    batch = hp.get("batch_size", spec.hyperparameters.batch_size)
    per_device = hp.get("per_device_batch_size") or spec.hyperparameters.per_device_batch_size
    if per_device is None and isinstance(batch, int):
        per_device = max(1, batch // world)
    src = spec.data.train
    quant = spec.model.quant_bits
    train_type = "full" if spec.adapter.type == "full" else "qlora" if quant in (4, 8) else "lora"
    dd_req = req.get("dataset_details", {})
    out = {
        "dataset_config": {
            "preprocessing": {"lazy_tokenize": spec.data.lazy_tokenize, "streaming": spec.data.streaming,
                              "prompt": {"system": spec.data.system_prompt, "max_length": spec.data.max_length,
                                         "template": spec.data.template}},
            "split": {"type": spec.data.split.type,
                      "ratios": [round(1 - spec.data.split.validation_ratio, 6), spec.data.split.validation_ratio]},
        },
        "model_details": {"base_model": job.model, "ownership": req.get("model_details", {}).get("ownership",
                                                                                                 "public"),
                          "source_type": spec.model.source, "model_type": spec.model.model_type,
                          "quantization": {"quant_bits": quant or 16}},
        "train_config": {
            "type": spec.method,
            "torch_dtype": spec.model.torch_dtype if spec.model.torch_dtype in TORCH_DTYPES else None,
            "task_type": "causal_lm", "train_type": train_type,
            "tuner_backend": req.get("train_config", {}).get("tuner_backend") or "tuneyard",
            "hyperparameters": {
                "num_epochs": hp.get("n_epochs", spec.hyperparameters.n_epochs),
                "per_device_train_batch_size": per_device,
                "per_device_eval_batch_size": hp.get("per_device_eval_batch_size")
                or spec.hyperparameters.per_device_eval_batch_size or per_device,
                "gradient_checkpointing": spec.hyperparameters.gradient_checkpointing,
                "save_steps": spec.schedule.save_steps, "save_total_limit": spec.schedule.save_total_limit,
                "keep_best_checkpoint": spec.schedule.keep_best_checkpoint,
                "eval_steps": spec.schedule.eval_steps, "logging_steps": spec.schedule.logging_steps,
                "learning_rate": hp.get("learning_rate", spec.hyperparameters.learning_rate),
                "dataloader_num_workers": spec.schedule.dataloader_num_workers,
            },
            "adapter_config": None if spec.adapter.type == "full" else {
                "r": spec.adapter.r, "alpha": spec.adapter.alpha, "dropout": spec.adapter.dropout,
                "targets": ["all-linear"] if spec.adapter.target_modules == "all-linear"
                else list(spec.adapter.target_modules)},
            "distributed": {"type": spec.resources.distributed},
        },
        "dataset_details": {
            "dataset_name": dd_req.get("dataset_name") or Path(src.path or "").name or None,
            "dataset_path": dd_req.get("dataset_path") or src.path,
            "dataset_description": dd_req.get("dataset_description"),
            "dataset_type": src.container if src.container in DATASET_TYPES else dd_req.get("dataset_type"),
            "dataset_format": dd_req.get("dataset_format") or (src.format if src.format in DATASET_FORMATS
                                                               else None),
            # Another dialect's uploaded file or registered rows are a file on this server: a local source.
            "source_type": dd_req.get("source_type") or kind_of(src.path or "") or "local",
            "ownership": dd_req.get("ownership", "private"),
            "secret_id": dd_req.get("secret_id") if req else src.secret_id,
            "region": dd_req.get("region") if req else src.region,
        },
        "infra_config": {"gpu_type": _gpu_type(spec, cap), "gpu_count": spec.resources.nproc_per_node,
                         "infra_type": req.get("infra_config", {}).get("infra_type") or "tuneyard",
                         "node_count": spec.resources.node_count},
    }
    if req.get("train_config", {}).get("integrations"):
        out["train_config"]["integrations"] = req["train_config"]["integrations"]
    if spec.model.model_type == "vlm":
        out["train_config"].update(spec.vision.model_dump())
    return echo_as_sent(out, {k: v for k, v in req.items() if k in out})


def _gpu_type(spec: TrainingSpec, cap: Capacity | None) -> str | None:
    """``cpu``, the GPU type asked for, or (a device left to the server) what the worker will run it on."""
    res = spec.resources
    if res.device == "cpu":
        return "cpu"
    if res.gpu_type:
        return res.gpu_type
    if cap is None:
        return None
    if not cap.has_cuda:
        return "cpu"
    name = (cap.gpu_name or "").lower().replace(" ", "")
    # Simplismart's names where the server's GPU is one of them, else the model name as the driver reports it.
    return next((g for g in GPU_TYPES if g in name), name.removeprefix("nvidia") or None)


def experiment_name(job: Job) -> str:
    """The Simplismart experiment name, or the OpenAI suffix / job id for jobs made in other dialects."""
    return (job.request or {}).get("experiment_name") if job.dialect == DIALECT else (job.suffix or job.id)


def job_record(job: Job, cap: Capacity | None = None) -> JobRecord:
    """``GET /job/get/``; ``cap`` (this server's capacity) says where a job that left the device open runs."""
    status = STATUS[JobStatus(job.status)]
    done = job.status == JobStatus.SUCCEEDED and job.output_dir
    return JobRecord(request_id=job.id, experiment_name=experiment_name(job), status=status,
                     created_at=iso(job.created_at), updated_at=iso(job.updated_at), started_at=iso(job.started_at),
                     completed_at=iso(job.finished_at), progress=progress(job), **configs_of(job, cap),
                     output_model_path=str(Path(job.output_dir) / "output") if done else None,
                     error_message=(job.error or {}).get("message"))


def job_summary(job: Job) -> JobSummary:
    """One row of ``GET /job/list/``."""
    spec = TrainingSpec.model_validate(job.spec)
    quant = spec.model.quant_bits
    train_type = "full" if spec.adapter.type == "full" else "qlora" if quant in (4, 8) else "lora"
    return JobSummary(request_id=job.id, experiment_name=experiment_name(job), status=STATUS[JobStatus(job.status)],
                      created_at=iso(job.created_at), updated_at=iso(job.updated_at),
                      model_type=spec.model.model_type, base_model=job.model, train_type=train_type,
                      progress=progress(job))


# Event metric name -> Simplismart metric key.
METRIC_KEYS = {"train_loss": "train_loss", "valid_loss": "eval_loss", "learning_rate": "learning_rate",
               "grad_norm": "grad_norm", "train_mean_token_accuracy": "train_token_accuracy",
               "valid_mean_token_accuracy": "eval_token_accuracy", "tokens_per_second": "tokens_per_second",
               # DPO's (domain/metrics.py): validation ones as eval_, like the loss.
               **{name: name.replace("valid_", "eval_") for name in metrics_vocabulary.REWARDS}}


def metrics(events: list[JobEvent]) -> list[Metric]:
    """Every logged metric value of the job, oldest first."""
    out: list[Metric] = []
    for e in events:
        data = e.data or {}
        step = data.get("step")
        if not isinstance(step, int):
            continue
        for name, key in METRIC_KEYS.items():
            value = data.get(name)
            if isinstance(value, int | float) and math.isfinite(value):
                out.append(Metric(key=key, value=float(value), timestamp=iso(e.created_at), step=step,
                                  epoch=data.get("epoch")))
    return out
