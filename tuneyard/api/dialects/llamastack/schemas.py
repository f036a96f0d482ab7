"""Llama Stack post-training and datasets wire models (as ``llama-stack-client`` 0.2.12 sends and reads them).

Request models are closed where the client's schema is: an unknown field is a 400 naming it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneyard.api.wire import ResourcesIn, omitted_if_none
from tuneyard.domain.spec import MAX_COUNT


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Closed):
    dataset_id: str = Field(min_length=1)
    batch_size: int = Field(ge=1, le=4096)
    shuffle: bool = True
    data_format: Literal["instruct", "dialog"]
    validation_dataset_id: str | None = None
    packed: bool = False
    train_on_input: bool = False


class OptimizerConfig(_Closed):
    optimizer_type: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=10)
    num_warmup_steps: int = Field(0, ge=0, le=MAX_COUNT)


class EfficiencyConfig(_Closed):
    enable_activation_checkpointing: bool = False
    enable_activation_offloading: bool = False
    memory_efficient_fsdp_wrap: bool = False
    fsdp_cpu_offload: bool = False


class TrainingConfig(_Closed):
    n_epochs: int = Field(ge=1, le=1000)
    max_steps_per_epoch: int = Field(1, ge=1, le=MAX_COUNT)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_validation_steps: int | None = Field(None, ge=1, le=MAX_COUNT)
    data_config: DataConfig | None = None
    optimizer_config: OptimizerConfig | None = None
    efficiency_config: EfficiencyConfig | None = None
    dtype: str | None = "bf16"


class LoraConfig(_Closed):
    type: Literal["LoRA"]
    lora_attn_modules: list[str]
    apply_lora_to_mlp: bool = False
    apply_lora_to_output: bool = False
    rank: int = Field(ge=1, le=1024)
    alpha: float = Field(gt=0, le=4096)
    use_dora: bool = False
    quantize_base: bool = False


class QatConfig(_Closed):
    type: Literal["QAT"]
    quantizer_name: str
    group_size: int


AlgorithmConfig = Annotated[LoraConfig | QatConfig, Field(discriminator="type")]


class SupervisedFineTuneIn(_Closed):
    job_uuid: str = Field(min_length=1, max_length=128)
    model: str | None = None
    checkpoint_dir: str | None = None
    algorithm_config: AlgorithmConfig | None = None
    training_config: TrainingConfig
    hyperparam_search_config: dict[str, Any] = Field(default_factory=dict)
    logger_config: dict[str, Any] = Field(default_factory=dict)
    # tuneyard extension: devices and distribution strategy (api/wire.py ResourcesIn).
    resources: ResourcesIn | None = None


class DPOAlignmentConfig(_Closed):
    """``algorithm_config`` of preference-optimize: the newer spec's ``beta`` + ``loss_type``, or the fields the
    0.2.12 client declares (``reward_scale`` is DPO's beta, ``epsilon`` its label smoothing; ``reward_clip`` and
    ``gamma`` have no counterpart in DPO's loss and must be 0 or absent)."""

    beta: float | None = Field(None, gt=0, le=2)
    loss_type: str | None = None
    reward_scale: float | None = Field(None, gt=0, le=2)
    epsilon: float | None = Field(None, ge=0, lt=0.5)
    reward_clip: float | None = None
    gamma: float | None = None


class PreferenceOptimizeIn(_Closed):
    job_uuid: str = Field(min_length=1, max_length=128)
    finetuned_model: str = Field(min_length=1, max_length=512)
    checkpoint_dir: str | None = None
    algorithm_config: DPOAlignmentConfig = Field(default_factory=DPOAlignmentConfig)
    training_config: TrainingConfig
    hyperparam_search_config: dict[str, Any] = Field(default_factory=dict)
    logger_config: dict[str, Any] = Field(default_factory=dict)
    # tuneyard extension: devices and distribution strategy (api/wire.py ResourcesIn).
    resources: ResourcesIn | None = None


class JobUuid(BaseModel):
    job_uuid: str


class JobUuidIn(_Closed):
    job_uuid: str = Field(min_length=1)


class JobList(BaseModel):
    data: list[JobUuid]


class TrainingMetrics(BaseModel):
    epoch: int | None
    train_loss: float | None
    validation_loss: float | None
    perplexity: float | None


class CheckpointOut(BaseModel):
    identifier: str
    created_at: str
    epoch: int
    post_training_job_id: str
    path: str
    training_metrics: TrainingMetrics | None = None


class JobStatusOut(BaseModel):
    # The optional timestamps are not nullable in the spec: left out until known.
    job_uuid: str
    status: Literal["completed", "in_progress", "failed", "scheduled", "cancelled"]
    scheduled_at: str | None = omitted_if_none()
    started_at: str | None = omitted_if_none()
    completed_at: str | None = omitted_if_none()
    # Also where a failed job says why (``error``): the one object of the status the spec leaves open.
    resources_allocated: dict[str, Any] | None = omitted_if_none()
    checkpoints: list[CheckpointOut]


class JobArtifactsOut(BaseModel):
    job_uuid: str
    checkpoints: list[CheckpointOut]


class UriSource(_Closed):
    type: Literal["uri"]
    uri: str


class RowsSource(_Closed):
    type: Literal["rows"]
    rows: list[Any]


class AppendRowsIn(_Closed):
    """POST /v1/datasetio/append-rows/{dataset_id}."""

    rows: list[Any]


class IterrowsOut(BaseModel):
    """GET /v1/datasetio/iterrows/{dataset_id}: Llama Stack's PaginatedResponse."""

    data: list[dict[str, Any]]
    has_more: bool


class RegisterDatasetIn(_Closed):
    purpose: str
    source: Annotated[UriSource | RowsSource, Field(discriminator="type")]
    dataset_id: str | None = None
    metadata: dict[str, Any] | None = None


class DatasetOut(BaseModel):
    identifier: str
    provider_resource_id: str
    provider_id: str = "tuneyard"
    type: Literal["dataset"] = "dataset"
    purpose: str
    source: dict[str, Any]
    metadata: dict[str, Any]


class DatasetList(BaseModel):
    data: list[DatasetOut]


# ----- inference: chat completion (llama-stack-client 0.2.12 inference.chat_completion) ---------------
class TextContentIn(_Closed):
    type: Literal["text"]
    text: str


class ImageContentIn(_Closed):
    """Accepted on the wire so that the refusal can name it: no served model takes images yet."""

    type: Literal["image"]
    image: Any = None


Content = str | TextContentIn | ImageContentIn | list[
    Annotated[TextContentIn | ImageContentIn, Field(discriminator="type")]]


class MessageIn(_Closed):
    role: Literal["system", "user", "assistant"]
    content: Content
    # A user message's retrieved context (Llama Stack appends it to the content).
    context: Content | None = None
    # An earlier assistant answer sent back: its stop reason is history, its tool calls must be none.
    stop_reason: Literal["end_of_turn", "end_of_message", "out_of_tokens"] | None = None
    tool_calls: list[Any] | None = None


class GreedyIn(_Closed):
    type: Literal["greedy"]


class TopPIn(_Closed):
    type: Literal["top_p"]
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None


class TopKIn(_Closed):
    type: Literal["top_k"]
    top_k: int


class SamplingParamsIn(_Closed):
    strategy: Annotated[GreedyIn | TopPIn | TopKIn, Field(discriminator="type")] | None = None
    # 0: as many as the context leaves room for (Llama Stack's default).
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    repetition_penalty: float | None = None
    stop: Annotated[list[str], Field(max_length=4)] | None = None


class ChatCompletionIn(_Closed):
    model_id: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[MessageIn], Field(min_length=1)]
    sampling_params: SamplingParamsIn | None = None
    stream: bool | None = None
