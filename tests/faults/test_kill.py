"""Fault injection against a real server and real trainers: kill -9 of the server, kill -9 of a trainer."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import Server
from tests.faults.helpers import train_steps, wait_done, wait_steps
from tuneyard.scheduler.local import pid_alive

pytestmark = pytest.mark.slow


def test_kill_9_of_the_server_loses_nothing(setup, tmp_path):
    srv, key, client, f = setup
    job = client.fine_tuning.jobs.create(model=str(srv.local / "tiny-llama"), training_file=f.id,
                                         hyperparameters={"n_epochs": 30, "batch_size": 1})
    wait_steps(client, job.id, 3)
    pid = int((srv.home / "jobs" / "acme" / job.id / "train.pid").read_text())
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(10)
    assert pid_alive(pid, job.id), "the trainer died with the server"
    time.sleep(1.0)
    srv2 = Server(srv.home, {})
    srv.proc, srv.log = srv2.proc, srv2.log  # the fixture stops whichever server runs last
    client = srv2.openai(key)
    j = wait_done(client, job.id)
    assert j.status == "succeeded", j.error
    steps = train_steps(client, job.id)
    every = steps[0]
    assert steps == list(range(every, j.total_steps + 1, every)), "metrics lost or duplicated across the kill"


def _losses(client, job_id: str) -> dict[int, float]:
    return {e.data["step"]: e.data["train_loss"] for e in client.fine_tuning.jobs.list_events(job_id, limit=1000)
            if e.type == "metrics" and "train_loss" in e.data}


def _adapter(jd) -> dict:
    from safetensors.torch import load_file

    return load_file(str(jd / "output" / "adapter_model.safetensors"))


def test_kill_9_of_a_trainer_retries_from_the_latest_checkpoint(setup):
    """The retried run is the uninterrupted one: same losses step by step, same adapter."""
    import torch

    srv, key, client, f = setup
    make = {"model": str(srv.local / "tiny-llama"), "training_file": f.id, "seed": 7,
            "hyperparameters": {"n_epochs": 20, "batch_size": 4}}
    reference = client.fine_tuning.jobs.create(**make)
    job = client.fine_tuning.jobs.create(**make)  # runs once the reference is done (one CPU slot)
    wait_steps(client, job.id, 8, timeout=300)  # past the checkpoints of epochs 1 and 2 (3 steps an epoch)
    jd = srv.home / "jobs" / "acme" / job.id
    pid = int((jd / "train.pid").read_text())
    os.killpg(pid, signal.SIGKILL)  # torchrun and its trainer, as an OOM kill or a reboot would
    j = wait_done(client, job.id)
    assert j.status == "succeeded", j.error
    assert j.trained_steps == j.total_steps == 60
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
    assert any("Trainer exited unexpectedly" in m and "attempt 2 of 3" in m for m in messages), messages[:20]
    resumed = [m for m in messages if m.startswith("Training resumed at step")]
    assert resumed, messages[:20]
    step = int(resumed[0].split("Training resumed at step ")[1].split("/")[0])
    assert step >= 6 and step % 3 == 0  # an epoch-end checkpoint, complete before the kill
    rows = client.files.content(j.result_files[0]).read().decode().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 61)), "one CSV row per step, no repeats"

    # The steps the killed attempt logged past its checkpoint were trained again: each is reported once.
    steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)
             if e.type == "metrics" and "train_loss" in e.data]
    assert sorted(steps) == list(range(1, 61)), "a step is reported twice (or not at all) after the retry"

    # Deterministic resume: optimizer, scheduler, RNG and data position came back with the checkpoint.
    assert wait_done(client, reference.id).status == "succeeded"
    want, got = _losses(client, reference.id), _losses(client, job.id)
    assert sorted(got) == sorted(want) == list(range(1, 61))
    for k in range(1, 61):
        assert abs(got[k] - want[k]) <= 1e-4 * max(1.0, abs(want[k])), (k, got[k], want[k])
    a, b = _adapter(srv.home / "jobs" / "acme" / reference.id), _adapter(jd)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
