"""The distribution strategies: the TrainingArguments built for FSDP and DeepSpeed, and where each is refused."""

from __future__ import annotations

import pytest

from tuneyard.domain import capabilities
from tuneyard.domain.spec import TrainingSpec
from tuneyard.scheduler.capacity import Capacity
from tuneyard.scheduler.launcher import Placement
from tuneyard.trainer.strategies import deepspeed_config, strategy_args

FP32 = {"bf16": False, "fp16": False}


def spec(**resources) -> TrainingSpec:
    return TrainingSpec.model_validate({"model": {"name": "org/base"}, "data": {"train": {"path": "t.jsonl"}},
                                        "resources": resources})


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config_is_generated_for_the_stage(stage):
    cfg = deepspeed_config(spec(distributed="deepspeed", deepspeed_stage=stage), FP32)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage
    # Batch sizes, clipping and precision come from the TrainingArguments ("auto"): one source of truth.
    assert {k: cfg[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                "gradient_clipping")} == dict.fromkeys(
        ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"), "auto")
    # Stage 3 shards the parameters: the saved model is gathered whole, so outputs read as DDP's.
    assert zero.get("stage3_gather_16bit_weights_on_model_save") is (True if stage == 3 else None)
    assert strategy_args(spec(distributed="deepspeed", deepspeed_stage=stage), FP32) == {"deepspeed": cfg}


def test_fsdp_arguments_follow_the_spec():
    args = strategy_args(spec(distributed="fsdp", fsdp_reshard_after_forward=False, fsdp_cpu_offload=True), FP32)
    assert args["fsdp"] is True
    assert {k: args["fsdp_config"][k] for k in ("version", "reshard_after_forward", "cpu_offload",
                                                 "state_dict_type")} == {
        "version": 2, "reshard_after_forward": False, "cpu_offload": True, "state_dict_type": "FULL_STATE_DICT"}
    assert strategy_args(spec(), FP32) == {}  # DDP: torchrun and the Trainer's own wrapping


def test_fsdp_and_deepspeed_are_refused_where_they_cannot_run():
    cpu = Capacity(gpus=0, gpu_name=None, cpu_slots=1)
    gpus = Capacity(gpus=2, gpu_name="NVIDIA H200", cpu_slots=1)

    def refused(s, hw, deepspeed=False):
        return [(p.param, p.message) for p in capabilities.check_hardware(s, hw, bitsandbytes=False,
                                                                          deepspeed=deepspeed)]

    assert refused(spec(distributed="fsdp"), cpu)[0][0] == "distributed"
    assert "accelerate does not shard" in refused(spec(distributed="fsdp"), cpu)[0][1]
    assert refused(spec(distributed="fsdp", device="cpu"), gpus)[0][0] == "distributed"
    assert refused(spec(distributed="fsdp"), gpus) == []
    assert "needs CUDA GPUs" in refused(spec(distributed="deepspeed"), cpu)[0][1]
    assert "deepspeed package" in refused(spec(distributed="deepspeed"), gpus)[0][1]
    assert refused(spec(distributed="deepspeed"), gpus, deepspeed=True) == []
    # The refusal names the caller's field that chose the strategy.
    assert refused(spec(distributed="fsdp", distributed_param="training_config.efficiency_config.fsdp_cpu_offload"),
                   cpu)[0][0] == "training_config.efficiency_config.fsdp_cpu_offload"


def test_fsdp_and_deepspeed_start_a_process_group_even_for_one_rank():
    assert Placement.for_spec(spec(distributed="fsdp"), cuda=True) == Placement(gpus_per_node=1, cpu_ranks=0,
                                                                                rendezvous=True)
    assert Placement.for_spec(spec(nproc_per_node=2), cuda=False) == Placement(cpu_ranks=2)


def test_llama_stack_fsdp_flags_ask_for_fsdp():
    from tuneyard.api.dialects.llamastack.schemas import EfficiencyConfig
    from tuneyard.api.dialects.llamastack.translate import _resources

    assert _resources(None).distributed == "ddp"
    assert _resources(EfficiencyConfig(enable_activation_checkpointing=True)).distributed == "ddp"
    wrap = _resources(EfficiencyConfig(memory_efficient_fsdp_wrap=True))
    assert (wrap.distributed, wrap.fsdp_reshard_after_forward, wrap.fsdp_cpu_offload) == ("fsdp", True, False)
    offload = _resources(EfficiencyConfig(fsdp_cpu_offload=True))
    assert (offload.distributed, offload.fsdp_reshard_after_forward, offload.fsdp_cpu_offload) == ("fsdp", False, True)
    assert offload.distributed_param == "training_config.efficiency_config.fsdp_cpu_offload"
