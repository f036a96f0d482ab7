"""Fault injection against a real server and real trainers: kill -9 of the server, of a trainer (SFT, DPO)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import Server
from tests.faults.helpers import job_args, train_steps, wait_done, wait_steps
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


def _metrics(client, job_id: str, names: tuple[str, ...]) -> dict[int, dict[str, float]]:
    """{step: {name: value}} of every training metrics event."""
    return {e.data["step"]: {n: e.data[n] for n in names}
            for e in client.fine_tuning.jobs.list_events(job_id, limit=1000)
            if e.type == "metrics" and "train_loss" in e.data}


def _adapter(jd) -> dict:
    from safetensors.torch import load_file

    return load_file(str(jd / "output" / "adapter_model.safetensors"))


# Either recipe on 12 rows at batch 4: 3 steps an epoch, a checkpoint at each epoch's end.
RUNS = {
    "sft": ({"n_epochs": 20, "batch_size": 4}, ("train_loss",)),
    "dpo": ({"n_epochs": 20, "batch_size": 4, "beta": 0.1, "learning_rate_multiplier": 20},
            ("train_loss", "rewards_chosen", "rewards_rejected", "rewards_margins", "rewards_accuracies")),
}


@pytest.mark.parametrize("method", sorted(RUNS))
def test_kill_9_of_a_trainer_retries_from_the_latest_checkpoint(setup, method):
    """The retried run is the uninterrupted one: same metrics step by step, same adapter, same token count."""
    import torch

    srv, key, client, f = setup
    hyperparameters, names = RUNS[method]
    make = {**job_args(srv, client, f, method, hyperparameters), "seed": 7}
    reference = client.fine_tuning.jobs.create(**make)
    job = client.fine_tuning.jobs.create(**make)  # runs once the reference is done (one CPU slot)
    wait_steps(client, job.id, 8, timeout=300)  # past the checkpoints of epochs 1 and 2
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
    ref = wait_done(client, reference.id)
    assert ref.status == "succeeded"
    want, got = _metrics(client, reference.id, names), _metrics(client, job.id, names)
    assert sorted(got) == sorted(want) == list(range(1, 61))
    for k in range(1, 61):
        for n in names:
            assert abs(got[k][n] - want[k][n]) <= 1e-4 * max(1.0, abs(want[k][n])), (k, n, got[k][n], want[k][n])
    # The token count went on from the checkpoint's, not from zero.
    assert j.trained_tokens == ref.trained_tokens and j.trained_tokens > 0
    a, b = _adapter(srv.home / "jobs" / "acme" / reference.id), _adapter(jd)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
