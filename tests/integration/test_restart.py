"""Restarting `tuneyard serve` leaves a running trainer alone; the new server adopts it and records its result."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.conftest import Server
from tuneyard.demo.tiny import write_sample_jsonl
from tuneyard.scheduler.local import pid_alive

pytestmark = pytest.mark.slow


def test_server_restart_keeps_the_trainer_and_its_results(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    # No drain on stop: the trainer is to keep running, to be re-adopted (tests/faults/test_drain.py drains).
    srv = Server(home, {"TUNEYARD_DRAIN_SECONDS": "0"})
    shutil.copytree(tiny_model_dir, srv.local / "tiny-llama")
    key = srv.key("acme")
    client = srv.openai(key)
    f = client.files.create(file=write_sample_jsonl(tmp_path / "t.jsonl").open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=str(srv.local / "tiny-llama"), training_file=f.id,
                                         hyperparameters={"n_epochs": 40, "batch_size": 1})
    deadline = time.time() + 120
    while (client.fine_tuning.jobs.retrieve(job.id).trained_steps or 0) < 2:
        assert time.time() < deadline, "trainer never started stepping"
        time.sleep(0.3)
    pid = int((home / "jobs" / "acme" / job.id / "train.pid").read_text())
    srv.stop()
    assert pid_alive(pid, job.id), "stopping the server killed the trainer"
    time.sleep(1.0)  # the trainer keeps going with no server
    srv2 = Server(home, {"TUNEYARD_DRAIN_SECONDS": "0"})
    try:
        client = srv2.openai(key)
        deadline = time.time() + 300
        while (j := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
            assert time.time() < deadline, f"still {j.status}"
            time.sleep(0.5)
        assert j.status == "succeeded", j.error
        assert j.trained_steps == j.total_steps == 40 * 12
        csv_steps = [int(line.split(",")[0]) for line in
                     client.files.content(j.result_files[0]).read().decode().splitlines()[1:]]
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert messages[0] == "The job has successfully completed"
        steps = sorted(e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)
                       if e.type == "metrics" and "train_loss" in e.data)
        # Every logging step made it into the events and the CSV, including those logged while no server ran.
        every = steps[0]
        assert steps == csv_steps == list(range(every, 40 * 12 + 1, every)), "metrics lost across the restart"
    finally:
        srv2.stop()
