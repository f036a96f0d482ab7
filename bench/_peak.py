"""Run a module as ``__main__`` and record its peak memory: ``python -m bench._peak OUT.json MODULE ARGS...``.

Peak RSS (and peak CUDA memory when the module used the GPU) is written to OUT.json at exit, so
a benchmark can measure a process it does not control (the tuneyard trainer) the same way as its own.
"""

from __future__ import annotations

import atexit
import json
import resource
import runpy
import sys


def _dump(path: str) -> None:
    peak = {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    with open(path, "w") as f:
        json.dump(peak, f)


def main() -> None:
    """Entry point: register the dump, then hand the process over to the module."""
    out, module, *args = sys.argv[1:]
    atexit.register(_dump, out)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
