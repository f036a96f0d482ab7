"""Wire models of the OpenAI fine-tuning and files API (with the Nebius hyperparameter extras)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

from tuneyard.api.wire import ResourcesIn, omitted_if_none

Auto = Literal["auto"]
Number = StrictInt | StrictFloat


def _whole(value: Any) -> Any:
    # JSON Schema's "integer" includes 47.0 (OpenAI's document types these fields so); a bool or a string is
    # still refused, and 47.5 stays a float for StrictInt to refuse.
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer field as OpenAI's document types it: a JSON integer, written with or without ".0".
Whole = Annotated[StrictInt, BeforeValidator(_whole)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HyperparametersIn(_In):
    """``method.<type>.hyperparameters`` (and the deprecated top-level ``hyperparameters``)."""

    batch_size: Auto | Annotated[Whole, Field(ge=1, le=256)] | None = None
    learning_rate_multiplier: Auto | Annotated[Number, Field(gt=0, le=100)] | None = None
    n_epochs: Auto | Annotated[Whole, Field(ge=1, le=50)] | None = None
    beta: Auto | Annotated[Number, Field(gt=0, le=2)] | None = None
    # Nebius extras
    learning_rate: Annotated[Number, Field(gt=0, le=1)] | None = None
    warmup_ratio: Annotated[Number, Field(ge=0, le=1)] | None = None
    weight_decay: Annotated[Number, Field(ge=0, le=10)] | None = None
    max_grad_norm: Annotated[Number, Field(ge=0, le=1e9)] | None = None
    context_length: Annotated[Whole, Field(ge=8, le=1_048_576)] | None = None
    packing: StrictBool | None = None
    lora: StrictBool | None = None
    lora_r: Annotated[Whole, Field(ge=1, le=1024)] | None = None
    lora_alpha: Annotated[Number, Field(gt=0, le=4096)] | None = None
    lora_dropout: Annotated[Number, Field(ge=0, lt=1)] | None = None


class MethodBody(_In):
    hyperparameters: HyperparametersIn | None = None


class MethodIn(_In):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: MethodBody | None = None
    dpo: MethodBody | None = None
    reinforcement: dict[str, Any] | None = None


class WandbIn(_In):
    project: str
    name: str | None = None
    entity: str | None = None
    tags: list[str] | None = None
    # tuneyard extension: a stored 'wandb' secret (default: the organisation's one 'wandb' secret).
    secret_id: str | None = None


class MlflowIn(_In):
    """tuneyard extension: ``{"type": "mlflow", "mlflow": {...}}``."""

    tracking_uri: str
    experiment: str | None = None
    run_name: str | None = None


class IntegrationIn(_In):
    type: Literal["wandb", "mlflow"]
    wandb: WandbIn | None = None
    mlflow: MlflowIn | None = None

    @model_validator(mode="after")
    def _one_block(self) -> IntegrationIn:
        # The block named by ``type`` holds the settings; another block would be ignored.
        other = {"wandb", "mlflow"} - {self.type}
        if getattr(self, self.type) is None:
            raise ValueError(f"an integration of type '{self.type}' needs its '{self.type}' object")
        if any(getattr(self, o) is not None for o in other):
            raise ValueError(f"an integration of type '{self.type}' takes only its '{self.type}' object")
        return self


class CreateJobIn(_In):
    """POST /v1/fine_tuning/jobs."""

    model: Annotated[str, Field(min_length=1, max_length=512)]
    training_file: Annotated[str, Field(min_length=1, max_length=128)]
    validation_file: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    suffix: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    seed: Annotated[Whole, Field(ge=0, le=2147483647)] | None = None
    metadata: dict[str, str] | None = None
    integrations: list[IntegrationIn] | None = None
    hyperparameters: HyperparametersIn | None = None
    method: MethodIn | None = None
    # tuneyard extension (the SDK's extra_body): devices and distribution strategy.
    resources: ResourcesIn | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("at most 16 key-value pairs")
        for k, val in v.items():
            if "\x00" in k or "\x00" in val:
                raise ValueError("keys and values may not contain NUL characters")
            if len(k) > 64:
                raise ValueError(f"key '{k[:20]}...' is longer than 64 characters")
            if len(val) > 512:
                raise ValueError(f"value of '{k}' is longer than 512 characters")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix_chars(cls, v: str | None) -> str | None:
        if v is not None and not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("may contain only letters, digits, '-', '_' and '.'")
        return v


# ----- responses --------------------------------------------------------------------------------
class ExpiresAfterIn(_In):
    """``expires_after`` of POST /v1/files, in either form: ``expires_after[anchor]``/``[seconds]`` parts, or one
    ``expires_after`` part holding the JSON object."""

    anchor: Literal["created_at"]
    seconds: Annotated[Whole, Field(ge=3600, le=2592000)]


class ErrorOut(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: ErrorOut | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: str
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    suffix: str | None = None
    trained_steps: int | None = None
    total_steps: int | None = None


class EventOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class CheckpointOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


class FileOut(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    # Optional, not nullable in OpenAI's spec: left out when the file has none.
    status_details: str | None = omitted_if_none()
    expires_at: int | None = omitted_if_none()


class FileDeletedOut(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ListOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


# ----- export (tuneyard's extension, OpenAI's error format) ---------------------------------------
class HubPushIn(_In):
    """Where to push an export on the Hugging Face Hub, with the organisation's stored ``hf`` secret."""

    repo_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")]
    secret_id: str | None = None  # name or id of an 'hf' secret; default the one named "hf"
    private: StrictBool = True


class ExportIn(_In):
    merged: StrictBool = False
    checkpoint: str | None = None  # a checkpoint id (ftckpt-...) instead of the final model
    push_to_hub: HubPushIn | None = None


class HubOut(BaseModel):
    repo_id: str
    url: str


class ExportOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.export"] = "fine_tuning.job.export"
    created_at: int
    fine_tuning_job_id: str
    checkpoint_id: str | None
    merged: bool
    bytes: int
    content_url: str
    hub: HubOut | None


class ModelDeletedOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


# ----- inference: chat completions and completions ------------------------------------------------
class TextPartIn(_In):
    type: Literal["text"]
    text: str


class ImagePartIn(_In):
    """Accepted on the wire so that the refusal can name it: no served model takes images yet."""

    type: Literal["image_url", "input_audio", "file"]
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


class ChatMessageIn(_In):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPartIn | ImagePartIn, Field(discriminator="type")]] | None = None
    name: str | None = None
    refusal: str | None = None


class StreamOptionsIn(_In):
    include_usage: StrictBool | None = None
    include_obfuscation: StrictBool | None = None


Stop = str | Annotated[list[str], Field(min_length=1, max_length=4)] | None


class _SamplingIn(_In):
    model: Annotated[str, Field(min_length=1)]
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    stop: Stop = None
    seed: StrictInt | None = None
    n: Annotated[StrictInt, Field(ge=1, le=16)] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptionsIn | None = None
    user: str | None = None


class ChatCompletionIn(_SamplingIn):
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None


class CompletionIn(_SamplingIn):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=16)]
    # OpenAI's default for the legacy completions endpoint.
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16
    echo: StrictBool | None = None


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
