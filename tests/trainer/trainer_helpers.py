"""Helpers for the trainer tests: run the trainer as a subprocess and read what it wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import tuneyard
from tuneyard.jobdir import JobDir, iter_events, read_json

REPO_ROOT = Path(tuneyard.__file__).resolve().parent.parent
# The training set is the 12 demo rows x 4: a task the tiny random model visibly learns in a few epochs.
TRAIN_REPEAT = 4


def trainer_env() -> dict[str, str]:
    """The environment of a trainer subprocess: this checkout importable, no model hub."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    return env


def trainer_command(job: JobDir, nproc: int = 1) -> list[str]:
    """`python -m tuneyard.trainer JOBDIR`, or the torchrun form for ``nproc`` > 1 processes."""
    if nproc == 1:
        return [sys.executable, "-m", "tuneyard.trainer", str(job.root)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "tuneyard.trainer", str(job.root)]


def run_trainer(job: JobDir, nproc: int = 1, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the trainer to its end as a real subprocess; stderr (the structured log) is kept in job/logs."""
    env = trainer_env()
    if read_json(job.resolved_spec)["resources"]["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # as the local launcher does for a CPU job, also on a GPU machine
    if nproc > 1:
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.monotonic()
    proc = subprocess.run(trainer_command(job, nproc), cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    (job.logs / "trainer.log").write_text(proc.stderr)
    print(f"trainer ({nproc} proc) on {job.root.name}: rc={proc.returncode} in {time.monotonic() - t0:.1f}s")
    return proc


def events(job: JobDir, type: str | None = None) -> list[dict]:
    """The job's events, optionally of one type."""
    return [e.model_dump() for e in iter_events(job.events) if type is None or e.type == type]


def train_losses(job: JobDir) -> list[tuple[int, float]]:
    """(step, train_loss) of every training metrics event."""
    return [(e["data"]["step"], e["data"]["train_loss"]) for e in events(job, "metrics")
            if "train_loss" in e["data"]]


def result(job: JobDir) -> dict:
    """result.json, which must exist and read as a Result, as a dict."""
    res = job.read_result()
    assert res is not None, f"no result.json in {job.root}"
    return res.model_dump()
