"""The trainers a user would run instead of tuneyard, each as a subprocess on the bench's rows.

Each peer is a script in this folder (``trl_sft.py``, ``llamafactory_sft.py``) run as
``PYTHON SCRIPT CONFIG.json OUT.json``: it reads the same JSONL chat rows and the same model directory, trains
one LoRA run as that tool's documentation shows, and writes its marks (``_marks.py``). TRL runs in this
checkout's environment (tuneyard depends on it); the others each get a virtual environment of their own under
``$TUNEYARD_BENCH_CACHE/venvs/<name>`` (default ``~/.cache/tuneyard-bench``), built on first use: torch at this
environment's version first (so pip takes the CPU build where that is what is installed), then the tool with
torch held there by a constraint. A tool that does not install or import is skipped with the reason,
remembered in ``<venv>.failed`` until ``--rebuild-venvs``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("TUNEYARD_BENCH_CACHE") or Path.home() / ".cache" / "tuneyard-bench")


@dataclass(frozen=True)
class Peer:
    """One system to compare with: its script, the venv it needs (None: this one) and its extra settings."""

    script: str
    venv: str | None = None
    install: tuple[str, ...] = ()
    check: str = ""  # a module the venv must import
    extra: dict[str, Any] = field(default_factory=dict)


PEERS: dict[str, Peer] = {
    "trl": Peer("trl_sft.py"),
    "trl_padding_free": Peer("trl_sft.py", extra={"padding_free": True}),
    "llamafactory": Peer("llamafactory_sft.py", "llamafactory", ("llamafactory",), "llamafactory.train.tuner"),
    "llamafactory_neat_packing": Peer("llamafactory_sft.py", "llamafactory", ("llamafactory",),
                                      "llamafactory.train.tuner", {"neat_packing": True}),
    "axolotl": Peer("axolotl_sft.py", "axolotl", ("axolotl",), "axolotl"),
}


def _torch_pin() -> str:
    import torch

    return f"torch=={torch.__version__.split('+')[0]}"


def _tail(text: str, n: int = 6) -> str:
    lines = [x for x in text.splitlines() if x.strip() and "is ignored: it is neither" not in x]
    return " | ".join(lines[-n:])[-800:]


def peer_python(peer: Peer, rebuild: bool = False) -> tuple[str | None, str]:
    """The interpreter to run ``peer`` with, building its venv when needed; (None, why) when it cannot."""
    if peer.venv is None:
        return sys.executable, ""
    root = CACHE / "venvs" / peer.venv
    ready, failed = root / ".ready", root.with_name(peer.venv + ".failed")
    if rebuild:
        shutil.rmtree(root, ignore_errors=True)
        failed.unlink(missing_ok=True)
    if ready.exists():
        return str(root / "bin" / "python"), ""
    if failed.exists():
        return None, failed.read_text().strip()
    print(f"building the {peer.venv} venv in {root} (once)", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    py = str(root / "bin" / "python")
    # The tool's own requirements may not move torch (to another version, or to a CUDA build on a CPU machine).
    pin = root.with_name(peer.venv + ".constraints.txt")
    pin.write_text(_torch_pin() + "\n")
    steps = [[sys.executable, "-m", "venv", str(root)],
             [py, "-m", "pip", "install", "-q", _torch_pin()],
             [py, "-m", "pip", "install", "-q", "-c", str(pin), *peer.install],
             [py, "-c", f"import {peer.check}"]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env())
        if proc.returncode != 0:
            why = f"`{' '.join(cmd[1:])}` failed: {_tail(proc.stderr + proc.stdout)}"
            failed.write_text(why + "\n")
            shutil.rmtree(root, ignore_errors=True)
            return None, why
    ready.write_text(json.dumps({"built": time.strftime("%Y-%m-%d %H:%M:%S"), "install": peer.install}) + "\n")
    return py, ""


def _clean_env() -> dict[str, str]:
    """The environment without this checkout on the path: a peer's venv sees only its own packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "WANDB_DISABLED": "true", "DISABLE_VERSION_CHECK": "1",
            # Axolotl's usage telemetry would try to reach its collector from every run.
            "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"}


def run_peer(name: str, python: str, config: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """Run peer ``name`` once; its marks plus the whole script's wall and CPU seconds (rusage of the child)."""
    peer = PEERS[name]
    work.mkdir(parents=True, exist_ok=True)
    cfg_path, out = work / "config.json", work / "marks.json"
    cfg_path.write_text(json.dumps({**config, **peer.extra, "work": str(work)}))
    log = (work / "peer.log").open("wb")
    t0 = time.time()
    proc = subprocess.Popen([python, str(HERE / peer.script), str(cfg_path), str(out)], cwd=work,
                            env=_clean_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = t0 + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.time() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    t1 = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0 or not out.exists():
        text = (work / "peer.log").read_text(errors="replace")
        raise RuntimeError(f"{name} exited with {proc.returncode}: {_tail(text, 12)}")
    marks = json.loads(out.read_text())
    marks["marks"]["exit"] = t1
    marks["marks"]["spawn"] = t0
    return {**marks, "script_wall_s": t1 - t0, "script_cpu_s": usage.ru_utime + usage.ru_stime,
            "max_rss_mb": usage.ru_maxrss / 1024}


__all__ = ["PEERS", "Peer", "peer_python", "run_peer"]
