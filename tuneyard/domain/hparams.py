"""How "auto" hyperparameters are resolved from the data (the rule is documented in docs/hyperparameters.md)."""

from __future__ import annotations

import math

from tuneyard.domain.errors import InvalidRequest
from tuneyard.domain.spec import TrainingSpec

# OpenAI's published rule: aim for ~3 epochs, but see at least 100 and at most 25,000 examples in all.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_AUTO_EPOCHS = 1
MAX_AUTO_EPOCHS = 25
# Base learning rates that learning_rate_multiplier scales, by recipe and adapter: preference training moves
# further from the start with each step than SFT does, and is run an order of magnitude or more slower.
BASE_LR = {("sft", "lora"): 2e-4, ("sft", "full"): 2e-5, ("dpo", "lora"): 5e-5, ("dpo", "full"): 1e-6}
# DPO's temperature when "auto": TRL's and the DPO paper's default.
AUTO_BETA = 0.1
MAX_MICRO_BATCH = 8


def auto_epochs(n_examples: int) -> int:
    """Epochs for ``n_examples`` when the caller said "auto"."""
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n_examples))
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_AUTO_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS


def auto_batch_size(n_examples: int) -> int:
    """About 0.2% of the examples, as a power of two between 1 and 256."""
    target = max(1.0, n_examples * 0.002)
    return int(min(256, 2 ** round(math.log2(target))))


def micro_batching(batch_size: int, world_size: int, per_device: int | None,
                   accumulation: int | None) -> tuple[int, int]:
    """Split a global batch into (per-device micro batch, gradient accumulation steps) for ``world_size`` ranks."""
    if per_device is not None and accumulation is not None:
        if per_device * accumulation * world_size != batch_size:
            raise InvalidRequest(
                f"batch_size {batch_size} != per_device_batch_size {per_device} x gradient_accumulation_steps "
                f"{accumulation} x {world_size} processes", param="batch_size")
        return per_device, accumulation
    if batch_size % world_size:
        raise InvalidRequest(f"batch_size {batch_size} must be a multiple of the {world_size} training processes",
                             param="batch_size")
    per_rank = batch_size // world_size
    if per_device is not None:
        if per_rank % per_device:
            raise InvalidRequest(f"batch_size {batch_size} is not a multiple of per_device_batch_size {per_device}"
                                 f" x {world_size} processes", param="batch_size")
        return per_device, per_rank // per_device
    if accumulation is not None:
        if per_rank % accumulation:
            raise InvalidRequest(f"batch_size {batch_size} is not a multiple of gradient_accumulation_steps "
                                 f"{accumulation} x {world_size} processes", param="batch_size")
        return per_rank // accumulation, accumulation
    micro = max(d for d in range(1, min(per_rank, MAX_MICRO_BATCH) + 1) if per_rank % d == 0)
    return micro, per_rank // micro


def steps_per_epoch(n_examples: int, batch_size: int, max_steps_per_epoch: int | None = None) -> int:
    """Optimizer steps in one epoch (a last partial batch still makes a step)."""
    steps = max(1, math.ceil(n_examples / batch_size))
    return min(steps, max_steps_per_epoch) if max_steps_per_epoch else steps


def resolve(spec: TrainingSpec, n_examples: int) -> TrainingSpec:
    """Return ``spec`` with every "auto" replaced by its value for a training set of ``n_examples`` rows."""
    hp = spec.hyperparameters.model_copy()
    if hp.n_epochs == "auto":
        hp.n_epochs = auto_epochs(n_examples)
    if hp.batch_size == "auto":
        hp.batch_size = auto_batch_size(n_examples)
        # An automatic batch must divide evenly across the ranks.
        hp.batch_size = max(spec.world_size, hp.batch_size - hp.batch_size % spec.world_size)
    if hp.learning_rate_multiplier == "auto":
        hp.learning_rate_multiplier = 1.0
    if hp.beta == "auto":
        hp.beta = AUTO_BETA
    if hp.learning_rate is None:
        hp.learning_rate = BASE_LR[spec.method, spec.adapter.type] * float(hp.learning_rate_multiplier)
    micro, accum = micro_batching(hp.batch_size, spec.world_size, hp.per_device_batch_size,
                                  hp.gradient_accumulation_steps)
    hp.per_device_batch_size, hp.gradient_accumulation_steps = micro, accum
    if hp.per_device_eval_batch_size is None:
        hp.per_device_eval_batch_size = micro
    return spec.model_copy(update={"hyperparameters": hp})


def total_steps(spec: TrainingSpec, n_examples: int) -> int:
    """Optimizer steps the resolved ``spec`` will take on ``n_examples`` training rows."""
    hp = spec.hyperparameters
    assert isinstance(hp.batch_size, int) and isinstance(hp.n_epochs, int)
    if hp.max_steps:
        return hp.max_steps
    return hp.n_epochs * steps_per_epoch(n_examples, hp.batch_size, hp.max_steps_per_epoch)
