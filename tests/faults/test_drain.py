"""SIGTERM drains: running jobs checkpoint and go back to the queue; the next server resumes them, losing nothing."""

from __future__ import annotations

import time

import pytest

from tests.conftest import Server
from tests.faults.helpers import job_args, train_steps, wait_done, wait_steps
from tuneyard.scheduler.local import job_processes

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_sigterm_checkpoints_running_jobs_and_the_next_server_resumes_them(setup, method):
    srv, key, client, f = setup
    home = srv.home
    # 12 steps an epoch, checkpoints at epoch ends: step 4 is far from the next one.
    job = client.fine_tuning.jobs.create(**job_args(srv, client, f, method, {"n_epochs": 6, "batch_size": 1}))
    wait_steps(client, job.id, 4)
    jd = home / "jobs" / "acme" / job.id
    t0 = time.time()
    srv.stop()  # SIGTERM, as systemd or Kubernetes stop it
    # uvicorn shuts down gracefully, then re-raises the signal: the exit status says SIGTERM.
    assert srv.proc.returncode in (0, -15)
    print(f"drained in {time.time() - t0:.1f}s")
    assert not job_processes(jd), "the drained trainer is still running"
    checkpoints = sorted(p.name for p in (jd / "checkpoints").iterdir() if (p / "tuneyard_checkpoint.json").exists())
    assert checkpoints, "no checkpoint was written on the way out"
    drained_at = int(checkpoints[-1].split("-")[1])
    # Steps are fast on a quiet machine: the drain may land on an epoch's end, so the checkpoint's own event
    # (below) is what shows the drain wrote it, not its step number.
    assert 4 <= drained_at < 72, checkpoints

    srv2 = Server(home, {})
    try:
        client = srv2.openai(key)
        j = wait_done(client, job.id)
        assert j.status == "succeeded", j.error
        assert j.trained_steps == j.total_steps == 72
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
        assert any(m.startswith(f"The worker is shutting down: checkpointed at step {drained_at}")
                   for m in messages), messages[:15]
        assert any(m.startswith(f"Training resumed at step {drained_at}/") for m in messages), messages[:15]
        # A drain is not a failed attempt: the job counts one attempt and no crash.
        assert not any("exited unexpectedly" in m for m in messages)
        steps = train_steps(client, job.id)
        every = steps[0]
        assert steps == list(range(every, 73, every)), "metrics lost or duplicated across the drain"
    finally:
        srv2.stop()
