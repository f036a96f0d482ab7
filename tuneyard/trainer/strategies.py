"""The distribution strategies' TrainingArguments: FSDP2 through accelerate, DeepSpeed ZeRO from a generated config.

DDP needs nothing beyond torchrun (the Trainer wraps the model itself). The one place that knows the Trainer's
``fsdp``/``fsdp_config``/``deepspeed`` argument names; ``plumbing.common_args`` merges what this returns.
"""

from __future__ import annotations

from typing import Any

from tuneyard.domain.spec import TrainingSpec


def strategy_args(spec: TrainingSpec, precision: dict[str, Any]) -> dict[str, Any]:
    """The TrainingArguments of the spec's ``resources.distributed`` strategy ({} for DDP)."""
    res = spec.resources
    if res.distributed == "fsdp":
        return {"fsdp": True, "fsdp_config": {
            "version": 2,
            "reshard_after_forward": res.fsdp_reshard_after_forward,
            "cpu_offload": res.fsdp_cpu_offload,
            # One unit per decoder layer (the model's _no_split_modules), the rest in the root unit.
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            # Checkpoints and the output hold whole tensors: resume and the API read them as DDP's.
            "state_dict_type": "FULL_STATE_DICT",
        }}
    if res.distributed == "deepspeed":
        return {"deepspeed": deepspeed_config(spec, precision)}
    return {}


def deepspeed_config(spec: TrainingSpec, precision: dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config for ZeRO stage ``resources.deepspeed_stage``; batch sizes and the optimizer's
    numbers are left "auto", so the Trainer fills them from its own arguments (one source of truth)."""
    stage = spec.resources.deepspeed_stage
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if stage == 3:
        # The full model is gathered onto rank 0 when saved, so checkpoints and outputs read as DDP's.
        zero.update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                     "stage3_gather_16bit_weights_on_model_save": True})
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }
