"""Pause under load: a job is `paused` only once its trainer has stopped and its checkpoint is complete.

The machine is made "busy" by stopping the trainer (SIGSTOP) while the pause is asked for: the API must
go on saying `running` (with a "pausing" event) until the trainer, let go again, has stopped at its next
step and written that step's checkpoint; the resumed run then trains each step once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.faults.helpers import job_args, train_steps, wait_done
from tuneyard.jobdir import CHECKPOINT_MARKER, iter_events
from tuneyard.scheduler.local import job_processes
from tuneyard.service.jobs import PAUSING_MESSAGE

pytestmark = pytest.mark.slow
EPOCH = 12  # the 12 rows (SFT or DPO), one a step: a metrics event, a stop check each step; a checkpoint each epoch


def _trained(root: Path) -> list[int]:
    """Every training step any attempt of the job logged, from its event file (nothing there is ever removed)."""
    return [e.data["step"] for e in iter_events(root / "events.jsonl")
            if e.type == "metrics" and "train_loss" in e.data]


def _until(what: Callable[[], object], timeout: float = 90, every: float = 0.05) -> object:
    deadline = time.time() + timeout
    while not (got := what()):
        assert time.time() < deadline, "timed out"
        time.sleep(every)
    return got


def _signal(root: Path, sig: int) -> None:
    for pid in job_processes(root):
        os.kill(pid, sig)


def _create(srv, client, f, epochs: int, method: str = "sft"):
    job = client.fine_tuning.jobs.create(**job_args(srv, client, f, method, {"n_epochs": epochs, "batch_size": 1}))
    return job, srv.home / "jobs" / "acme" / job.id


def _messages(client, job_id: str) -> list[str]:
    return [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=1000)]


def _wait_not_running(client, job_id: str, timeout: float = 90):
    return _until(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status != "running" and j, timeout)


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_paused_only_once_the_checkpoint_of_the_stop_step_is_complete(setup, method):
    srv, key, client, f = setup
    steps = 2 * EPOCH
    job, root = _create(srv, client, f, 2, method)
    _until(lambda: len(_trained(root)) >= 2)
    _signal(root, signal.SIGSTOP)  # a busy machine: the trainer makes no progress for a while
    try:
        last = max(_trained(root))
        assert client.fine_tuning.jobs.pause(job.id).status == "running"
        assert client.fine_tuning.jobs.pause(job.id).status == "running"  # asked twice: the same pause
        time.sleep(1.5)  # several worker ticks
        assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
        assert _messages(client, job.id).count(PAUSING_MESSAGE) == 1
        before = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]
        assert all(s <= last for s in before)  # no pause checkpoint is listed before it exists
        h = {"Authorization": f"Bearer {key}"}
        sim = httpx.get(f"{srv.base_url}/job/get/", params={"org_id": "acme", "request_id": job.id}, headers=h)
        assert sim.json()["status"] == "RUNNING"
        ls = httpx.get(f"{srv.base_url}/v1/post-training/job/status", params={"job_uuid": job.id}, headers=h)
        assert ls.json()["status"] == "in_progress"
    finally:
        _signal(root, signal.SIGCONT)

    j = _wait_not_running(client, job.id)
    # The first reading of `paused` is already the whole truth: no trainer left, its checkpoint listed.
    assert j.status == "paused", j.status
    assert not job_processes(root)
    step = j.trained_steps
    assert last + 1 <= step <= last + 2, (last, step)  # the first step boundary after the request
    assert max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data) == step
    assert (root / "checkpoints" / f"checkpoint-{step}" / CHECKPOINT_MARKER).is_file()
    assert max(_trained(root)) == step, "the trainer went on past its pause"
    assert f"Fine-tuning job paused at step {step}; resume continues from its checkpoint" in _messages(client, job.id)

    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    assert wait_done(client, job.id).status == "succeeded"
    assert any(m.startswith(f"Training resumed at step {step}/{steps}") for m in _messages(client, job.id))
    # Across both attempts each step was trained exactly once, as in an uninterrupted run.
    assert sorted(_trained(root)) == list(range(1, steps + 1))
    assert train_steps(client, job.id) == list(range(1, steps + 1))


def test_queued_pause_crash_while_pausing_and_cancel_while_pausing(setup):
    srv, key, client, f = setup
    # Long enough that it is still training when stopped below, however fast this machine trains.
    epochs = 20
    job, root = _create(srv, client, f, epochs)
    _until(lambda: any(e.type == "checkpoint" for e in iter_events(root / "events.jsonl")))  # end of epoch 1
    # The only CPU slot is taken: a second job waits in the queue, and with no trainer it pauses at once.
    queued, _ = _create(srv, client, f, 1)
    _until(lambda: client.fine_tuning.jobs.retrieve(queued.id).status == "queued", every=0.2)
    assert client.fine_tuning.jobs.pause(queued.id).status == "paused"

    # The trainer dies while pausing: paused at its newest complete checkpoint, never claiming more. Which one
    # that is depends on how far it got meanwhile (a checkpoint each epoch): the newest marked when it stopped.
    _signal(root, signal.SIGSTOP)
    newest = max(int(d.name.split("-")[1]) for d in (root / "checkpoints").glob("checkpoint-*")
                 if (d / CHECKPOINT_MARKER).is_file())
    assert newest % EPOCH == 0 and newest < epochs * EPOCH, newest
    assert client.fine_tuning.jobs.pause(job.id).status == "running"
    _signal(root, signal.SIGKILL)
    j = _wait_not_running(client, job.id)
    assert j.status == "paused" and j.trained_steps == newest, (j.status, j.trained_steps, newest)
    assert not job_processes(root)
    assert max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data) == newest
    assert max(train_steps(client, job.id)) == newest  # the steps lost with the trainer are not reported
    assert any(m.startswith("The trainer exited unexpectedly (exit code -9) while pausing; paused at the newest "
                            f"complete checkpoint, step {newest}") for m in _messages(client, job.id))

    # Resumed from there; then cancelled while pausing: the cancel wins, nothing pauses afterwards.
    client.fine_tuning.jobs.resume(job.id)
    _until(lambda: any(e.message.startswith(f"Training resumed at step {newest}/{epochs * EPOCH}")
                       for e in iter_events(root / "events.jsonl")))
    _signal(root, signal.SIGSTOP)
    try:
        assert client.fine_tuning.jobs.pause(job.id).status == "running"
        assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    finally:
        _signal(root, signal.SIGCONT)
    _until(lambda: not job_processes(root), timeout=30, every=0.2)
    time.sleep(1.0)  # a few worker ticks
    j = client.fine_tuning.jobs.retrieve(job.id)
    assert j.status == "cancelled" and j.finished_at
    messages = _messages(client, job.id)  # newest first
    assert messages.index("Fine-tuning job cancelled by request") < messages.index(PAUSING_MESSAGE)
    assert not any(m.startswith("Fine-tuning job paused at") for m in messages)
    assert client.fine_tuning.jobs.retrieve(queued.id).status == "paused"
