"""TrainingSpec: the one description of a fine-tuning run that every API dialect translates into.

The API process builds a spec (with ``"auto"`` where the caller left a choice to us), the
prepare step resolves ``"auto"`` from the data (``domain.hparams``), and the trainer runs exactly
what the resolved spec says. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Auto = Literal["auto"]
# Upper bounds of what a run can mean: past them a value is a mistake (or an attack on what stores it), and
# every dialect's bounds are at most these, so a spec a dialect accepted is always a valid spec.
MAX_COUNT = 1_000_000_000  # steps, limits, examples
MAX_BATCH = 65_536  # examples per step, per device or in all
MAX_LENGTH = 1_048_576  # tokens per example


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """The base model: a Hugging Face hub id or a local directory (already checked against the allowed roots).

    A job that continues a fine-tuned model (``parent``, the ``ft:...`` name the caller gave) names that model's
    own base here and, when it was an adapter, the adapter directory it trains on (``init_adapter``); a fully
    fine-tuned parent is the base itself (``name`` is its directory).
    """

    name: str
    source: Literal["hf", "local", "s3"] = "hf"
    revision: str | None = None
    model_type: Literal["llm", "vlm"] = "llm"
    torch_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # 4 or 8 loads the base quantised with bitsandbytes (QLoRA); None/16 loads it in torch_dtype.
    quant_bits: Literal[4, 8, 16] | None = None
    trust_remote_code: bool = False
    # A stored 'hf' secret whose token reads a private or gated hub model.
    secret_id: str | None = None
    # Continued training: the absolute path of the adapter the job trains on from (the parent's output/ or one
    # of its checkpoints), and the fine-tuned model (or checkpoint) name it continues.
    init_adapter: str | None = None
    parent: str | None = None


class DataSource(_Strict):
    """Where rows come from: a local path, or an uploaded file (the service resolves ``file_id`` to its path)."""

    path: str = ""
    file_id: str | None = None
    # Row format; "auto" detects it from the rows (see tuneyard.data.formats).
    format: str = "auto"
    container: Literal["auto", "jsonl", "json", "csv", "parquet"] = "auto"
    # Name used in error messages / params, e.g. "training_file".
    param: str = "training_file"
    # For remote paths (s3://, hf://, https://): a stored secret of the organisation, the S3 region, and
    # for hub datasets the split, configuration (subset) and revision.
    secret_id: str | None = None
    region: str | None = None
    split: str | None = None
    subset: str | None = None
    revision: str | None = None


class SplitSpec(_Strict):
    """How to carve a validation set out of the training data when none is given."""

    type: Literal["random", "sequential"] = "random"
    validation_ratio: float = Field(0.0, ge=0.0, lt=1.0)


class DataSpec(_Strict):
    """Rows, how they become token sequences, and which tokens carry loss."""

    train: DataSource
    validation: DataSource | None = None
    split: SplitSpec = Field(default_factory=SplitSpec)
    system_prompt: str | None = None
    # None: the tokenizer's chat template (or the documented default when it has none);
    # else a built-in template name or a Jinja string.
    template: str | None = None
    max_length: int = Field(2048, ge=8, le=MAX_LENGTH)
    truncation: Literal["truncate", "drop"] = "truncate"
    train_on_input: bool = False
    last_turn_only: bool = False
    # Concatenate examples into full rows (per-example position_ids, no cross-attention).
    packing: bool = False
    # Padding-free batches: examples of a batch are flattened into one row, no pad tokens computed.
    padding_free: bool = True
    lazy_tokenize: bool = False
    streaming: bool = False
    # False: examples in file order every epoch (Llama Stack's data_config.shuffle), else a seeded shuffle.
    shuffle: bool = True
    min_examples: int = Field(1, ge=1, le=MAX_COUNT)


class AdapterSpec(_Strict):
    """LoRA (or QLoRA when the base is quantised) or full fine-tuning."""

    type: Literal["lora", "full"] = "lora"
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16, gt=0, le=4096)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # "all-linear" or explicit module names (e.g. ["q_proj", "v_proj"]).
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_dora: bool = False
    # Extra modules trained in full next to the adapter (e.g. ["lm_head"]).
    modules_to_save: list[str] = Field(default_factory=list)


class VisionSpec(_Strict):
    """What a vision-language job trains besides the language model, and its image size limits (ms-swift's names)."""

    # Frozen: the vision tower (ViT) and the aligner (projector) get no adapter and no gradient.
    freeze_vit: bool = True
    freeze_aligner: bool = True
    # Pixel limits per image (height x width): stored images are resized to fit; None: the processor's own.
    max_pixels: int | None = Field(None, ge=1, le=MAX_COUNT)
    min_pixels: int | None = Field(None, ge=1, le=MAX_COUNT)


class Hyperparameters(_Strict):
    """Optimisation. ``batch_size`` is global: examples per optimizer step across all ranks."""

    n_epochs: Annotated[int, Field(ge=1, le=1000)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] | Auto = "auto"
    # Multiplies the recipe's base learning rate unless ``learning_rate`` is given.
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Auto = "auto"
    learning_rate: float | None = Field(None, gt=0, le=1)
    # Micro-batch per device; None: chosen from batch_size and the world size.
    per_device_batch_size: int | None = Field(None, ge=1, le=MAX_BATCH)
    per_device_eval_batch_size: int | None = Field(None, ge=1, le=MAX_BATCH)
    gradient_accumulation_steps: int | None = Field(None, ge=1, le=MAX_BATCH)
    max_steps: int | None = Field(None, ge=1, le=MAX_COUNT)
    max_steps_per_epoch: int | None = Field(None, ge=1, le=MAX_COUNT)
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)
    warmup_steps: int | None = Field(None, ge=0, le=MAX_COUNT)
    weight_decay: float = Field(0.0, ge=0.0, le=10)
    max_grad_norm: float = Field(1.0, ge=0.0, le=1e9)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    gradient_checkpointing: bool = False
    # DPO only (domain/capabilities.py says which recipe takes what): the temperature, and the loss.
    beta: Annotated[float, Field(gt=0, le=2)] | Auto | None = None
    dpo_loss: str | None = None
    # The chance a preference label is wrong (conservative DPO); with the sigmoid loss only.
    label_smoothing: float | None = Field(None, ge=0, lt=0.5)


class ScheduleSpec(_Strict):
    """When the trainer logs, evaluates and checkpoints (in optimizer steps; None: the default rule)."""

    logging_steps: int | None = Field(None, ge=1, le=MAX_COUNT)
    eval_steps: int | None = Field(None, ge=1, le=MAX_COUNT)
    save_steps: int | None = Field(None, ge=1, le=MAX_COUNT)
    save_total_limit: int | None = Field(None, ge=1, le=MAX_COUNT)
    # Keep the checkpoint with the lowest validation loss too, beyond the save_total_limit newest ones.
    keep_best_checkpoint: bool = False
    max_validation_steps: int | None = Field(None, ge=1, le=MAX_COUNT)
    dataloader_num_workers: int = Field(0, ge=0, le=64)


class ResourceSpec(_Strict):
    """Where the job runs: device kind, processes per node, nodes and the distribution strategy."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Processes per node (one per GPU; on CPU, gloo processes).
    nproc_per_node: int = Field(1, ge=1, le=1024)
    node_count: int = Field(1, ge=1, le=1024)
    gpu_type: str | None = None
    distributed: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    # FSDP (FSDP2): parameters resharded after the forward pass (least memory, FULL_SHARD) or kept gathered
    # until the backward (SHARD_GRAD_OP: faster, more memory); parameters and optimizer state kept on the CPU.
    fsdp_reshard_after_forward: bool = True
    fsdp_cpu_offload: bool = False
    # DeepSpeed ZeRO stage (2: optimizer state and gradients sharded; 3: parameters too).
    deepspeed_stage: Literal[2, 3] = 2
    # The caller's field that chose the strategy, named by a refusal of it (Llama Stack's efficiency flags).
    distributed_param: str = "distributed"
    # torch.compile the model (TUNEYARD_TORCH_COMPILE sets it for every job): faster steps after a compile
    # of a minute or more, worth it for long runs.
    torch_compile: bool = False


class RuntimeSpec(_Strict):
    """The installation's settings a job's processes follow, written in at submission (TUNEYARD_* of the server).

    The processes read them from here, never from their environment, so a job runs the same wherever a
    launcher starts it. The defaults are the settings' defaults (a spec written before this section existed).
    """

    # GPU kernels used when their package is installed (TUNEYARD_FLASH_ATTENTION, TUNEYARD_LIGER_KERNELS).
    flash_attention: bool = True
    liger_kernels: bool = True
    # Remote data (TUNEYARD_S3_ENDPOINT_URL, ..._S3_AMBIENT_CREDENTIALS, ..._MAX_DOWNLOAD_BYTES,
    # ..._DOWNLOAD_ALLOW_PRIVATE_HOSTS, ..._DOWNLOAD_TIMEOUT_SECONDS).
    s3_endpoint_url: str | None = None
    s3_ambient_credentials: bool = False
    max_download_bytes: int = Field(50 * 1024**3, ge=0)
    download_allow_private_hosts: bool = False
    download_timeout_seconds: float = Field(3600.0, ge=0)
    # The prepare step's limits and pool (TUNEYARD_MAX_ERROR_REPORT, ..._MIN_EXAMPLES, ..._MAX_EXAMPLES_PER_JOB,
    # ..._MAX_TOKENS_PER_JOB, ..._PREPARE_WORKERS, ..._PREPARE_PARALLEL_MIN_EXAMPLES).
    max_error_report: int = Field(20, ge=1)
    min_examples: int = Field(1, ge=0)
    max_examples_per_job: int = Field(0, ge=0)
    max_tokens_per_job: int = Field(0, ge=0)
    prepare_workers: int = Field(0, ge=0)
    prepare_parallel_min_examples: int = Field(20000, ge=0)
    # The tokenised-data cache: its directory (None: off) and bound (TUNEYARD_TOKENISED_CACHE_BYTES).
    tokenised_cache_dir: str | None = None
    tokenised_cache_bytes: int = Field(0, ge=0)
    # The trainer's dense CPU LM head (TUNEYARD_DENSE_LM_HEAD).
    dense_lm_head: bool = True
    # Images in rows (TUNEYARD_MAX_IMAGE_BYTES, ..._MAX_IMAGE_PIXELS, ..._MAX_IMAGES_PER_EXAMPLE,
    # ..._MAX_IMAGE_EXAMPLES) and the local roots their paths must lie under (TUNEYARD_LOCAL_ROOTS, resolved).
    max_image_bytes: int = Field(10 * 1024**2, ge=1)
    max_image_pixels: int = Field(64 * 1024**2, ge=1)
    max_images_per_example: int = Field(10, ge=1)
    max_image_examples: int = Field(50_000, ge=1)
    allowed_roots: list[str] = Field(default_factory=list)


class IntegrationSpec(_Strict):
    """An experiment tracker a caller asked for (wandb...); ``param`` names the field it came from."""

    type: str
    config: dict = Field(default_factory=dict)
    param: str = "integrations"


# The training methods the trainer runs in this installation: every refusal of a method, in every dialect, says
# what is available from this (each dialect in its own words), so no message offers a method that is refused.
class TrainingSpec(_Strict):
    """A whole fine-tuning run, independent of the dialect that asked for it."""

    method: Literal["sft", "dpo"] = "sft"
    model: ModelSpec
    data: DataSpec
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    vision: VisionSpec = Field(default_factory=VisionSpec)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    seed: int = Field(42, ge=0, le=2**31 - 1)
    integrations: list[IntegrationSpec] = Field(default_factory=list)
    # A directory (already confined to the allowed roots) that also receives a copy of the final output,
    # as <export_dir>/<job id>/ (Llama Stack's checkpoint_dir).
    export_dir: str | None = None
    # Set by the service, whatever a caller sent: the installation's settings the job runs under.
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSpec:
        if self.model.quant_bits in (4, 8) and self.adapter.type == "full":
            raise ValueError("a quantised base model can only be trained with an adapter (QLoRA), not full")
        v = self.vision
        if v.max_pixels is not None and v.min_pixels is not None and v.min_pixels > v.max_pixels:
            raise ValueError("vision.min_pixels is larger than vision.max_pixels")
        if self.model.init_adapter and self.adapter.type == "full":
            raise ValueError("a job that continues an adapter trains that adapter; it cannot be full fine-tuning")
        return self

    @property
    def world_size(self) -> int:
        return self.resources.nproc_per_node * self.resources.node_count

    def is_resolved(self) -> bool:
        """True when no hyperparameter is left as "auto"."""
        hp = self.hyperparameters
        return "auto" not in (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier)
