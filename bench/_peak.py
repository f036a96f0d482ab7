"""Run a module as ``__main__`` and record its peak memory: ``python -m bench._peak OUT.json MODULE ARGS...``.

Peak RSS (and peak CUDA memory when the module used the GPU) is written to OUT.json at exit, so
a benchmark can measure a process it does not control (the tuneyard trainer) the same way as its own.

Peaks are the kernel's high-water marks of each process's own memory (``VmHWM``), not ``ru_maxrss``:
on Linux a child's ``ru_maxrss`` starts from its parent's size at the fork before its exec, so a
subprocess of a big benchmark process would seem as big as its parent.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import threading
import time

_children_peak_kb = 0


def _hwm_kb(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return 0


def _watch_children() -> None:
    """Sample the high-water mark of every direct child (a pool of workers, say): the largest one."""
    global _children_peak_kb
    me = str(os.getpid())
    while True:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent = f.read().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                continue
            if parent == me:
                _children_peak_kb = max(_children_peak_kb, _hwm_kb(name))
        time.sleep(0.2)


def _dump(path: str) -> None:
    peak = {"max_rss_mb": _hwm_kb() / 1024,
            # The largest of its child processes, each on its own (sampled every 0.2 s).
            "children_max_rss_mb": _children_peak_kb / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    with open(path, "w") as f:
        json.dump(peak, f)


def main() -> None:
    """Entry point: register the dump, then hand the process over to the module."""
    out, module, *args = sys.argv[1:]
    atexit.register(_dump, out)
    # A module that ends with os._exit (the prepare step skips interpreter teardown) runs no atexit hooks.
    real_exit = os._exit

    def _exit(status: int) -> None:
        _dump(out)
        real_exit(status)

    os._exit = _exit
    threading.Thread(target=_watch_children, daemon=True).start()
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
