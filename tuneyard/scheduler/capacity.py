"""What this machine can run: GPUs (counted without importing torch) and CPU job slots."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache

from tuneyard.settings import Settings


@dataclass(frozen=True)
class Capacity:
    """Devices a launcher may hand out: in all (per node), and free now (``Launcher.capacity``)."""

    gpus: int
    gpu_name: str | None
    cpu_slots: int
    gpu_memory_mib: int | None = None
    # Free now: GPUs on the node with the most free ones, CPU job slots; None: all of them (nothing runs).
    free_gpus: int | None = None
    free_cpu_slots: int | None = None
    # Nodes a job may spread over (the local launcher: this one).
    nodes: int = 1

    @property
    def has_cuda(self) -> bool:
        return self.gpus > 0


@lru_cache(maxsize=4)
def _nvidia_smi() -> tuple[int, str | None, int | None]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0, None, None
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return 0, None, None
    rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
    if not rows:
        return 0, None, None
    memory = int(rows[0][1]) if len(rows[0]) > 1 and rows[0][1].isdigit() else None
    return len(rows), rows[0][0], memory


def detect(settings: Settings) -> Capacity:
    """The capacity of this machine, ``TUNEYARD_GPU_COUNT`` overriding detection."""
    n, name, memory = _nvidia_smi()
    if settings.gpu_count is not None:
        n = settings.gpu_count
    return Capacity(gpus=n, gpu_name=name, cpu_slots=max(1, settings.cpu_slots), gpu_memory_mib=memory)


def bitsandbytes_available() -> bool:
    """True when bitsandbytes is installed (checked without importing it)."""
    return importlib.util.find_spec("bitsandbytes") is not None
