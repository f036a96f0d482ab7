"""The launcher seam: what the worker asks of whatever runs a job's processes (this machine, a Ray cluster).

The worker decides (which job to claim, when to stop, retry or fail it); a launcher carries the decisions out
and reports back through a ``JobHandle`` and the job directory's files. ``LAUNCHERS`` names the implementations;
``TUNEYARD_LAUNCHER`` picks one (``make_launcher``). Only ``local`` is imported eagerly: the others may need
optional packages (ray) that an installation without them never loads.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from tuneyard.domain.errors import Problem
from tuneyard.domain.spec import TrainingSpec
from tuneyard.jobdir import JobDir, StopReason
from tuneyard.scheduler.capacity import Capacity

if TYPE_CHECKING:
    from tuneyard.settings import Settings

# name -> "module:Class"; a new launcher is a new module and one line here.
LAUNCHERS: dict[str, str] = {
    "local": "tuneyard.scheduler.local:LocalLauncher",
    "ray": "tuneyard.scheduler.ray_launcher:RayLauncher",
}


@dataclass(frozen=True)
class Placement:
    """Where one training attempt runs: nodes, GPUs per node (0: CPU ranks) and, where chosen, which GPUs."""

    node_count: int = 1
    gpus_per_node: int = 0
    # CPU ranks (gloo processes) per node of a CPU job.
    cpu_ranks: int = 1
    # The local launcher's choice of devices (CUDA indices); empty where the launcher picks them itself.
    gpus: tuple[int, ...] = ()
    # A process group even for one rank: FSDP and DeepSpeed set the model up through one.
    rendezvous: bool = False

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.cpu_ranks

    @classmethod
    def for_spec(cls, spec: TrainingSpec, *, cuda: bool) -> Placement:
        """What ``spec`` asks for on a launcher that has (``cuda``) or has no GPUs."""
        res = spec.resources
        group = res.distributed != "ddp"
        if cuda and res.device != "cpu":
            return cls(node_count=res.node_count, gpus_per_node=res.nproc_per_node, cpu_ranks=0, rendezvous=group)
        return cls(node_count=res.node_count, gpus_per_node=0, cpu_ranks=res.nproc_per_node, rendezvous=group)


@runtime_checkable
class JobHandle(Protocol):
    """One phase of one job as started (or adopted) by a launcher."""

    job_id: str
    phase: str  # "prepare" | "train"
    # The attempt it was started for; None when adopted and not known.
    attempt: int | None
    # The local process id where there is one (recorded in the job row); None elsewhere.
    pid: int | None

    def poll(self) -> int | None:
        """None while any of its processes runs; the exit code once all ended (-1: unknown)."""
        ...


@dataclass
class Ended:
    """A job phase that ended while no worker watched it: only its files say how."""

    job_id: str
    phase: str
    attempt: int | None = None
    pid: int | None = None

    def poll(self) -> int | None:
        """Always ended, exit code unknown."""
        return -1


class Launcher(Protocol):
    """Runs a job's prepare step and trainer somewhere; the worker holds only the handles it returns."""

    name: str

    def capacity(self) -> Capacity:
        """What the launcher has in all and has free now (``free_gpus``, ``free_cpu_slots``)."""
        ...

    def fits(self, spec: TrainingSpec) -> list[Problem]:
        """Why ``spec`` can never run here (checked at submission, one problem per field); [] when it can."""
        ...

    def idle(self, jd: JobDir) -> bool:
        """True when no process of an earlier run of the job is still alive (never two trainers on one job)."""
        ...

    def prepare(self, job_id: str, jd: JobDir, attempt: int, env: dict[str, str]) -> JobHandle:
        """Start the prepare step; ``env`` holds the credentials the worker decrypted for it."""
        ...

    def train(self, job_id: str, jd: JobDir, attempt: int, resources: Placement, env: dict[str, str]
              ) -> JobHandle | None:
        """Start the trainer on ``resources``; None when they are not free now (the job waits)."""
        ...

    def adopt(self, job_id: str, jd: JobDir, phase: str) -> JobHandle | None:
        """The still-running phase of a job started before this worker restarted, or None."""
        ...

    def stop(self, h: JobHandle, jd: JobDir, reason: StopReason) -> None:
        """Ask the trainer to stop at its next step (``reason``: cancel, pause, drain)."""
        ...

    def terminate(self, h: JobHandle) -> None:
        """Ask every process of the phase to exit now (SIGTERM or its equivalent)."""
        ...

    def kill(self, h: JobHandle) -> None:
        """End every process of the phase at once."""
        ...

    def resident_bytes(self, h: JobHandle) -> int | None:
        """Memory the phase's processes hold together, or None where it cannot be measured."""
        ...

    def warm(self) -> None:
        """Get ready for the next job ahead of need (a standby process); may do nothing."""
        ...

    def close(self) -> None:
        """Release what ``warm`` holds; running jobs are left alone."""
        ...


def launcher_class(name: str) -> type:
    """The class registered as ``name`` (ValueError naming the known ones otherwise)."""
    target = LAUNCHERS.get(name)
    if target is None:
        raise ValueError(f"TUNEYARD_LAUNCHER={name!r}: there is no such launcher; use one of {sorted(LAUNCHERS)}")
    module, cls = target.split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:  # an optional dependency (ray) that is not installed
        raise ValueError(f"TUNEYARD_LAUNCHER={name!r} cannot be used here: {e}") from None


def make_launcher(settings: Settings) -> Launcher:
    """The launcher ``TUNEYARD_LAUNCHER`` names, built from the settings."""
    return launcher_class(settings.launcher).from_settings(settings)


class LaunchError(Exception):
    """A launcher could not start a phase (the job fails with ``launch_failed``, saying why)."""
