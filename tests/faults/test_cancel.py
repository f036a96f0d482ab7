"""Cancel at every stage ends in `cancelled` with no process of the job left: queued, running, paused."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.conftest import Server
from tests.faults.helpers import job_args, train_steps, wait_steps
from tuneyard.demo.tiny import write_sample_jsonl
from tuneyard.jobdir import read_json
from tuneyard.scheduler.local import job_processes

pytestmark = pytest.mark.slow


def _wait_status(client, job_id: str, status: str, timeout: float = 120):
    deadline = time.time() + timeout
    while (j := client.fine_tuning.jobs.retrieve(job_id)).status != status:
        assert time.time() < deadline, f"{job_id} is {j.status}, not {status}"
        time.sleep(0.2)
    return j


def test_cancel_queued_and_paused_jobs(tmp_path, tiny_model_dir):
    srv = Server(tmp_path / "home", {})
    try:
        shutil.copytree(tiny_model_dir, srv.local / "tiny-llama")
        client = srv.openai(srv.key("acme"))
        f = client.files.create(file=write_sample_jsonl(tmp_path / "t.jsonl").open("rb"), purpose="fine-tune")
        make = {"model": str(srv.local / "tiny-llama"), "training_file": f.id,
                "hyperparameters": {"n_epochs": 50, "batch_size": 1}}
        running = client.fine_tuning.jobs.create(**make)
        wait_steps(client, running.id, 1)
        queued = client.fine_tuning.jobs.create(**make)  # the only CPU slot is taken
        _wait_status(client, queued.id, "queued")
        assert client.fine_tuning.jobs.cancel(queued.id).status == "cancelled"

        client.fine_tuning.jobs.pause(running.id)
        _wait_status(client, running.id, "paused")
        root = srv.home / "jobs" / "acme" / running.id
        deadline = time.time() + 60
        while job_processes(root):  # the trainer writes its checkpoint, then exits
            assert time.time() < deadline, "the paused trainer did not exit"
            time.sleep(0.2)
        kept = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(running.id).data]
        assert kept, "pausing wrote no checkpoint"
        assert client.fine_tuning.jobs.cancel(running.id).status == "cancelled"

        time.sleep(2.0)  # a few worker ticks: nothing may start again
        for job in (queued, running):
            j = client.fine_tuning.jobs.retrieve(job.id)
            assert j.status == "cancelled" and j.finished_at, j.status
            assert not job_processes(srv.home / "jobs" / "acme" / job.id)
        assert not (srv.home / "jobs" / "acme" / queued.id / "train.pid").exists(), "the queued job was started"
        # The paused run's checkpoints stay listed after the cancel.
        assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(running.id).data] == kept
    finally:
        srv.stop()


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_cancel_a_running_job_stops_its_trainer_at_the_next_step(setup, method):
    srv, key, client, f = setup
    job = client.fine_tuning.jobs.create(**job_args(srv, client, f, method, {"n_epochs": 50, "batch_size": 1}))
    wait_steps(client, job.id, 14)  # past the checkpoint of epoch 1 (12 steps an epoch)
    root = srv.home / "jobs" / "acme" / job.id
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    deadline = time.time() + 30
    while job_processes(root):
        assert time.time() < deadline, "the cancelled trainer did not exit"
        time.sleep(0.2)
    result = read_json(root / "result.json")
    assert result["status"] == "stopped" and result["reason"] == "cancel", result
    assert not (root / "output").exists(), "a cancelled run saved its output"
    time.sleep(1.0)  # a few worker ticks: the job stays cancelled, its steps as the trainer left them
    j = client.fine_tuning.jobs.retrieve(job.id)
    assert j.status == "cancelled" and j.finished_at
    steps = train_steps(client, job.id)  # 600 steps: logged every 6th
    assert steps == list(range(steps[0], steps[-1] + 1, steps[0])) and 12 <= steps[-1] < 600, steps
    assert 12 in [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]
