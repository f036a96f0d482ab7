"""What the fault tests share: a server with the tiny model and a training file, jobs of either recipe, and waits
on a job."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.conftest import Server
from tests.preference import write_preference_jsonl
from tuneyard.demo.tiny import write_sample_jsonl


@pytest.fixture()
def setup(tmp_path, tiny_model_dir):
    """(server, key, client, uploaded sample file); the server at the end of ``srv.proc`` is stopped after."""
    home = tmp_path / "home"
    srv = Server(home, {})
    shutil.copytree(tiny_model_dir, srv.local / "tiny-llama")
    key = srv.key("acme")
    client = srv.openai(key)
    f = client.files.create(file=write_sample_jsonl(tmp_path / "t.jsonl").open("rb"), purpose="fine-tune")
    yield srv, key, client, f
    srv.stop()


def job_args(srv, client, f, method: str, hyperparameters: dict) -> dict:
    """``jobs.create`` arguments for a job of ``method`` on the tiny model: SFT on the sample file ``f``, DPO on the
    shared preference set (uploaded here). Both sets are 12 rows, so a schedule has the same steps either way."""
    args = {"model": str(srv.local / "tiny-llama")}
    if method == "sft":
        return {**args, "training_file": f.id, "hyperparameters": hyperparameters}
    assert method == "dpo", method
    prefs = write_preference_jsonl(srv.home / "prefs.jsonl")
    return {**args, "training_file": client.files.create(file=prefs.open("rb"), purpose="fine-tune").id,
            "method": {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}}


def wait_steps(client, job_id: str, steps: int, timeout: float = 120):
    deadline = time.time() + timeout
    while (client.fine_tuning.jobs.retrieve(job_id).trained_steps or 0) < steps:
        assert time.time() < deadline, "the trainer did not reach the step in time"
        time.sleep(0.3)


def wait_done(client, job_id: str, timeout: float = 300):
    deadline = time.time() + timeout
    while (j := client.fine_tuning.jobs.retrieve(job_id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, f"still {j.status}"
        time.sleep(0.5)
    return j


def train_steps(client, job_id: str) -> list[int]:
    return sorted(e.data["step"] for e in client.fine_tuning.jobs.list_events(job_id, limit=1000)
                  if e.type == "metrics" and "train_loss" in e.data)
