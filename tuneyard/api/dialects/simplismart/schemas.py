"""Simplismart Training Suite wire models: the five JSON configs of ``POST /job/`` and the job record.

Every config is closed (``extra="forbid"``): a field tuneyard does not know is a 400 naming it, never
silently ignored. Enumerations are exactly Simplismart's, plus ``infra_config.gpu_type = "cpu"``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tuneyard.domain.spec import MAX_COUNT

# Numbers a client may write either way: kept as written (16 stays 16, the record echoes it so).
Number = int | float


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Prompt(_Closed):
    system: str | None = None
    max_length: int | None = Field(None, ge=8, le=1_048_576)
    template: str | None = None


class Preprocessing(_Closed):
    lazy_tokenize: bool = False
    streaming: bool = False
    prompt: Prompt = Field(default_factory=Prompt)


class Split(_Closed):
    type: Literal["random", "sequential"] = "random"
    # [train, validation]; a third, test share is not used by training and must be 0.
    ratios: list[Number] = Field(default_factory=lambda: [1.0, 0.0], min_length=1, max_length=3)

    @field_validator("ratios")
    @classmethod
    def _shares(cls, v: list[Number]) -> list[Number]:
        if any(not 0.0 <= r <= 1.0 for r in v):
            raise ValueError("each ratio must be between 0 and 1")
        if not math.isclose(sum(v), 1.0, abs_tol=1e-6):
            raise ValueError(f"ratios must add up to 1 (they add up to {sum(v):g})")
        if len(v) == 3 and v[2] > 0:
            raise ValueError("a test share is not used by training: give [train, validation] ratios")
        if v[0] <= 0:
            raise ValueError("the training share must be above 0")
        return v


class DatasetConfig(_Closed):
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    split: Split = Field(default_factory=Split)


class Quantization(_Closed):
    quant_bits: Literal[4, 8, 16] | None = None


class ModelDetails(_Closed):
    base_model: str = Field(min_length=1, max_length=512)
    ownership: Literal["public", "private"] = "public"
    source_type: Literal["hf", "s3", "local"] = "hf"
    model_type: Literal["llm", "vlm"] = "llm"
    quantization: Quantization | None = None
    secret_id: str | None = None


class TrainHyperparameters(_Closed):
    num_epochs: int = Field(1, ge=1, le=1000)
    per_device_train_batch_size: int = Field(1, ge=1, le=4096)
    per_device_eval_batch_size: int | None = Field(None, ge=1, le=4096)
    gradient_checkpointing: bool = False
    save_steps: int | None = Field(None, ge=1, le=MAX_COUNT)
    save_total_limit: int | None = Field(None, ge=1, le=MAX_COUNT)
    # tuneyard extension: also keep the checkpoint with the lowest validation loss.
    keep_best_checkpoint: bool = False
    eval_steps: int | None = Field(None, ge=1, le=MAX_COUNT)
    logging_steps: int | None = Field(None, ge=1, le=MAX_COUNT)
    learning_rate: Number | None = Field(None, gt=0, le=1)
    dataloader_num_workers: int = Field(0, ge=0, le=64)


class AdapterConfig(_Closed):
    r: int = Field(8, ge=1, le=1024)
    alpha: Number = Field(16, gt=0, le=4096)
    dropout: Number = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: ["all-linear"], min_length=1)


class Distributed(_Closed):
    type: Literal["ddp", "fsdp", "deepspeed"] = "ddp"


class TrainConfig(_Closed):
    type: Literal["sft", "dpo", "ppo"] = "sft"
    torch_dtype: Literal["float16", "bfloat16", "float32"] | None = None
    task_type: Literal["causal_lm", "seq2seq"] = "causal_lm"
    train_type: Literal["lora", "qlora", "full"] = "lora"
    tuner_backend: str | None = None
    hyperparameters: TrainHyperparameters = Field(default_factory=TrainHyperparameters)
    adapter_config: AdapterConfig | None = None
    distributed: Distributed = Field(default_factory=Distributed)
    # tuneyard extension: experiment trackers in OpenAI's shape, [{"type": "mlflow", "mlflow": {...}}, ...]
    # (domain/tracking.py checks each one's settings).
    integrations: list[dict[str, Any]] | None = Field(None, max_length=8)
    # tuneyard extension, ms-swift's names (model_type 'vlm' only): train the vision tower / the aligner too, and the
    # images' pixel limits.
    freeze_vit: bool = True
    freeze_aligner: bool = True
    max_pixels: int | None = Field(None, ge=1, le=MAX_COUNT)
    min_pixels: int | None = Field(None, ge=1, le=MAX_COUNT)


class DatasetDetails(_Closed):
    dataset_name: str | None = None
    dataset_path: str = Field(min_length=1, max_length=2048)
    dataset_description: str | None = None
    dataset_type: Literal["jsonl", "csv", "parquet"] | None = None
    dataset_format: Literal["sharegpt", "alpaca", "instruction"] | None = None
    source_type: Literal["s3", "gcs", "local", "hf"] = "local"
    ownership: Literal["public", "private"] = "public"
    secret_id: str | None = None
    region: str | None = None


class InfraConfig(_Closed):
    gpu_type: Literal["h100", "a100", "a10g", "v100", "t4", "cpu"] | None = None
    gpu_count: int = Field(1, ge=1, le=64)
    infra_type: str | None = None
    node_count: int = Field(1, ge=1, le=1024)


# The form fields of POST /job/ that carry JSON, and the model each must parse into.
CONFIGS: dict[str, type[_Closed]] = {
    "dataset_config": DatasetConfig, "model_details": ModelDetails, "train_config": TrainConfig,
    "dataset_details": DatasetDetails, "infra_config": InfraConfig,
}

Status = Literal["QUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCELED"]


class CreateOut(BaseModel):
    request_id: str
    status: Status
    message: str
    experiment_name: str


class JobRecord(BaseModel):
    """``GET /job/get/``: the whole job, configs echoed as resolved."""

    request_id: str
    experiment_name: str
    status: Status
    created_at: str
    updated_at: str
    started_at: str | None
    completed_at: str | None
    progress: float
    dataset_config: dict[str, Any]
    model_details: dict[str, Any]
    train_config: dict[str, Any]
    dataset_details: dict[str, Any]
    infra_config: dict[str, Any]
    output_model_path: str | None
    error_message: str | None


class JobSummary(BaseModel):
    request_id: str
    experiment_name: str
    status: Status
    created_at: str
    updated_at: str
    model_type: str
    base_model: str
    train_type: str
    progress: float


class JobList(BaseModel):
    jobs: list[JobSummary]
    total_count: int


class Metric(BaseModel):
    key: str
    value: float
    timestamp: str
    step: int
    epoch: float | None


class MetricsOut(BaseModel):
    request_id: str
    metrics: list[Metric]


class CancelOut(BaseModel):
    request_id: str
    status: Status
    message: str
