"""Resource faults against a real server and trainers: a job over its memory limit, a full disk while
checkpointing, a model that disappears before training. Each job fails with a clear error; the server
stays healthy and earlier checkpoints survive."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import uuid

import httpx
import pytest

from tests.conftest import Server
from tests.faults.helpers import wait_done, wait_steps
from tuneyard.demo.tiny import write_sample_jsonl
from tuneyard.scheduler.local import job_processes

pytestmark = pytest.mark.slow


def _healthy(srv: Server, client) -> None:
    assert httpx.get(f"{srv.base_url}/healthz", timeout=10).status_code == 200
    assert client.fine_tuning.jobs.list(limit=5).data is not None


def _start(tmp_path, tiny_model_dir, env: dict[str, str], home=None):
    srv = Server(home or tmp_path / "home", env)
    model = srv.local / "tiny-llama"
    if "TUNEYARD_LOCAL_ROOTS" in env:
        model = tmp_path / "models" / "tiny-llama"
    shutil.copytree(tiny_model_dir, model)
    client = srv.openai(srv.key("acme"))
    f = client.files.create(file=write_sample_jsonl(tmp_path / "t.jsonl").open("rb"), purpose="fine-tune")
    return srv, client, f, model


def test_a_job_over_its_memory_limit_fails_and_the_server_stays_up(tmp_path, tiny_model_dir):
    # A trainer holds ~500 MiB once torch is imported: far over a 200 MiB limit.
    srv, client, f, model = _start(tmp_path, tiny_model_dir, {"TUNEYARD_JOB_MEMORY_BYTES": str(200 * 2**20)})
    try:
        job = client.fine_tuning.jobs.create(model=str(model), training_file=f.id,
                                             hyperparameters={"n_epochs": 3, "batch_size": 1})
        j = wait_done(client, job.id)
        assert j.status == "failed" and j.error.code == "out_of_memory", j.error
        assert "over this installation's limit of 200 MiB per job (TUNEYARD_JOB_MEMORY_BYTES)" in j.error.message
        assert not job_processes(srv.home / "jobs" / "acme" / job.id)
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert not any("retrying" in m for m in messages), "an out-of-memory job must not be retried"
        _healthy(srv, client)
    finally:
        srv.stop()


@pytest.fixture()
def small_disk(tmp_path):
    """A 64 MiB tmpfs (needs root, as on the CI machines): the home of a server that will fill it."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path) -> None:
    with contextlib.suppress(OSError), (path / f"filler-{uuid.uuid4().hex}").open("wb") as out:
        while True:
            out.write(b"\0" * 2**20)
            out.flush()


def test_a_full_disk_while_checkpointing_fails_the_job_and_keeps_earlier_checkpoints(tmp_path, tiny_model_dir,
                                                                                      small_disk):
    env = {"TUNEYARD_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
           "TUNEYARD_LOCAL_ROOTS": str(tmp_path / "models")}
    srv, client, f, model = _start(tmp_path, tiny_model_dir, env, home=small_disk / "home")
    try:
        # 3 steps an epoch, a checkpoint at each epoch end.
        job = client.fine_tuning.jobs.create(model=str(model), training_file=f.id,
                                             hyperparameters={"n_epochs": 40, "batch_size": 4})
        wait_steps(client, job.id, 4)  # the first checkpoint is complete
        before = [c.fine_tuned_model_checkpoint for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]
        assert before
        _fill(small_disk)
        j = wait_done(client, job.id)
        assert j.status == "failed" and j.error.code == "disk_full", j.error
        assert "full" in j.error.message or "No space left" in j.error.message
        assert not job_processes(srv.home / "jobs" / "acme" / job.id)
        _healthy(srv, client)
        after = [c.fine_tuned_model_checkpoint for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]
        assert set(before) <= set(after), "a checkpoint written before the disk filled was lost"
        jd = srv.home / "jobs" / "acme" / job.id
        complete = [p for p in (jd / "checkpoints").iterdir() if (p / "tuneyard_checkpoint.json").exists()]
        assert complete and all((p / "adapter_model.safetensors").exists() for p in complete)
    finally:
        for filler in small_disk.glob("filler-*"):
            filler.unlink()
        srv.stop()


def test_a_model_that_disappears_before_training_fails_the_job_clearly(tmp_path, tiny_model_dir):
    srv, client, f, model = _start(tmp_path, tiny_model_dir, {})
    try:
        doomed = srv.local / "doomed-model"
        shutil.copytree(model, doomed)
        # The only CPU slot is busy, so the second job waits in the queue after its data was prepared.
        busy = client.fine_tuning.jobs.create(model=str(model), training_file=f.id,
                                              hyperparameters={"n_epochs": 50, "batch_size": 1})
        wait_steps(client, busy.id, 1)
        job = client.fine_tuning.jobs.create(model=str(doomed), training_file=f.id,
                                             hyperparameters={"n_epochs": 1, "batch_size": 1})
        deadline = time.time() + 120
        while client.fine_tuning.jobs.retrieve(job.id).status != "queued":
            assert time.time() < deadline
            time.sleep(0.2)
        shutil.rmtree(doomed)
        client.fine_tuning.jobs.cancel(busy.id)
        j = wait_done(client, job.id)
        assert j.status == "failed" and j.error.code == "model_load_error", j.error
        assert str(doomed) in j.error.message
        _healthy(srv, client)
    finally:
        srv.stop()
