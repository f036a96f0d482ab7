"""Wire details every dialect shares: optional fields left out while unknown, numbers echoed as they were sent."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tuneyard.domain.spec import ResourceSpec


def omitted_if_none(**kw: Any) -> Any:
    """A response field that is left out of the body while it is None.

    For fields a spec types as optional but not nullable: its clients expect an unknown value to be absent,
    and some (the generated SDKs) refuse a ``null``.
    """
    return Field(None, exclude_if=lambda v: v is None, **kw)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def echo_as_sent(out: Any, sent: Any) -> Any:
    """``out`` with every number that equals the one the client sent at the same place replaced by the sent one.

    The spec stores numbers in its own types (an alpha of 16 becomes 16.0); a client reading its job back
    should see what it wrote.
    """
    if isinstance(out, dict) and isinstance(sent, dict):
        return {k: echo_as_sent(v, sent[k]) if k in sent else v for k, v in out.items()}
    if isinstance(out, list) and isinstance(sent, list) and len(out) == len(sent):
        return [echo_as_sent(o, s) for o, s in zip(out, sent, strict=True)]
    if _number(out) and _number(sent) and out == sent:
        return sent
    return out


class ResourcesIn(BaseModel):
    """tuneyard's ``resources`` extension of the OpenAI and Llama Stack job requests: devices and strategy.

    Absent, a job runs on TUNEYARD_GPUS_PER_JOB GPUs with DDP (on a machine without GPUs:
    TUNEYARD_CPU_PROCS_PER_JOB CPU ranks). Each strategy's own options are refused beside another strategy.
    """

    model_config = ConfigDict(extra="forbid")

    # Devices on the node, one rank each (on CPU: gloo ranks).
    gpu_count: int | None = Field(None, ge=1, le=1024)
    distributed: Literal["ddp", "fsdp", "deepspeed"] | None = None
    fsdp_reshard_after_forward: bool | None = None
    fsdp_cpu_offload: bool | None = None
    deepspeed_stage: Literal[2, 3] | None = None

    @model_validator(mode="after")
    def _options_of_its_strategy(self) -> ResourcesIn:
        strategy = self.distributed or "ddp"
        for name, owner in (("fsdp_reshard_after_forward", "fsdp"), ("fsdp_cpu_offload", "fsdp"),
                            ("deepspeed_stage", "deepspeed")):
            if getattr(self, name) is not None and strategy != owner:
                raise ValueError(f"{name} applies to distributed '{owner}', not '{strategy}'")
        return self


def resources_spec(given: ResourcesIn | None, base: ResourceSpec, param: str) -> ResourceSpec:
    """``base`` with what the ``resources`` extension asks for; ``param``: where the extension sits in the request."""
    if given is None:
        return base
    update: dict[str, Any] = {k: v for k, v in given.model_dump(exclude_none=True).items() if k != "gpu_count"}
    if given.gpu_count is not None:
        update["nproc_per_node"] = given.gpu_count
    if given.distributed is not None:
        update["distributed_param"] = f"{param}.distributed"
    return base.model_copy(update=update)
