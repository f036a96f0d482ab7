"""What every benchmark shares: where results go and how a result is printed."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

# TUNEYARD_BENCH_RESULTS_DIR elsewhere: the smoke runs of the test suite leave bench/results alone.
RESULTS_DIR = Path(os.environ.get("TUNEYARD_BENCH_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def free_port() -> int:
    """A free TCP port on loopback, for a server a benchmark starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM ``proc`` (a server drains on it) and wait ``timeout`` seconds before SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def device_name() -> str:
    """The accelerator the benchmark ran on, or the CPU model."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}"


def write_result(name: str, figures: dict[str, Any], targets: dict[str, Any],
                 notes: dict[str, Any] | None = None) -> Path:
    """Write ``bench/results/NAME.json`` as {"figures", "targets", ...}; return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    body = {"figures": figures, "targets": targets, "device": device_name(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), **(notes or {})}
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def print_table(title: str, rows: list[tuple[str, Any, Any]]) -> None:
    """Print (figure, value, target) rows as a table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    for name, value, target in rows:
        shown = f"{value:,.3g}" if isinstance(value, float) else str(value)
        table.add_row(name, shown, "" if target is None else str(target))
    Console().print(table)
