"""Cooperative stop through JOBDIR/control/stop, and resuming from the checkpoint a pause leaves."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.trainer.trainer_helpers import (
    REPO_ROOT,
    events,
    result,
    run_trainer,
    train_losses,
    trainer_command,
    trainer_env,
)
from tuneyard.jobdir import JobDir
from tuneyard.trainer.progress import CHECKPOINT_MARKER

pytestmark = pytest.mark.slow


def start_and_stop_at(job: JobDir, reason: str, after_step: int, timeout: float = 120) -> tuple[int, float]:
    """Start the trainer; once ``after_step`` is logged, ask it to stop. -> (exit code, seconds to exit)."""
    log = (job.logs / "trainer.log").open("w")
    proc = subprocess.Popen(trainer_command(job), cwd=REPO_ROOT, env=trainer_env(), stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + timeout
        while not any(step >= after_step for step, _ in train_losses(job)):
            assert proc.poll() is None, (job.logs / "trainer.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no progress from the trainer"
            time.sleep(0.02)
        (job.control / "stop").write_text(reason)
        asked = time.monotonic()
        code = proc.wait(timeout=60)
        return code, time.monotonic() - asked
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_cancel_stops_promptly(make_job):
    job = make_job("ftjob-cancel", hyperparameters={"max_steps": 2000}, schedule={"logging_steps": 1},
                   validation=False)
    code, took = start_and_stop_at(job, "cancel", after_step=3)
    assert code == 0
    res = result(job)
    assert res["status"] == "stopped" and res["reason"] == "cancel"
    assert 3 <= res["step"] < 2000
    assert took < 10, f"took {took:.1f}s to stop"  # ~50 ms a step here; the rest is interpreter teardown
    # Nothing was saved on the way out: no checkpoint at the stop step, no output.
    assert not (job.checkpoints / f"checkpoint-{res['step']}").exists()
    assert not job.output.exists()
    assert events(job)[-1]["message"] == f"Training stopped (cancel) at step {res['step']}"


def test_pause_checkpoints_then_resume_continues_the_same_run(make_job, lora_run):
    job = make_job("ftjob-pause")  # the same spec as lora_run
    code, _ = start_and_stop_at(job, "pause", after_step=3)
    assert code == 0
    res = result(job)
    assert res["status"] == "stopped" and res["reason"] == "pause"
    paused = res["step"]
    assert 3 <= paused < 48, "the run ended before the pause was seen"
    ckpt = job.checkpoints / f"checkpoint-{paused}"
    assert res["checkpoint"] == str(ckpt)
    assert (ckpt / CHECKPOINT_MARKER).is_file() and (ckpt / "optimizer.pt").is_file()
    assert events(job, "checkpoint")[-1]["data"]["step"] == paused

    # The scheduler clears the request and starts the trainer again on the same directory.
    (job.control / "stop").unlink()
    proc = run_trainer(job)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert result(job)["status"] == "succeeded" and result(job)["trained_steps"] == 48
    starts = [e["message"] for e in events(job, "message") if e["message"].startswith("Training ")]
    assert any(m.startswith(f"Training resumed at step {paused}/48") for m in starts), starts

    # Steps after the pause reproduce the uninterrupted run (same data order, optimizer and RNG state).
    reference = dict(train_losses(lora_run))
    resumed = [(s, loss) for s, loss in train_losses(job) if s > paused]
    assert resumed and resumed[0][0] == paused + 1
    assert max(abs(loss - reference[s]) for s, loss in resumed) < 1e-4
    assert result(job)["trained_tokens"] == result(lora_run)["trained_tokens"]


def test_stop_requested_before_start(make_job):
    job = make_job("ftjob-early", validation=False)
    (job.control / "stop").write_text("cancel")
    proc = run_trainer(job)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert result(job) == {"status": "stopped", "reason": "cancel", "step": 0, "checkpoint": None}
    assert not train_losses(job)
