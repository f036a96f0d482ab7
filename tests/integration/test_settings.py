"""Every documented setting and `tuneyard serve` flag changes what it says it does (docs/operations.md, "Settings").

Each test shows a behaviour against a real `tuneyard serve` process, several settings per server where they
can share one. Settings guarded elsewhere are listed with their test in the table in docs/operations.md.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tuneyard.demo.tiny import write_sample_jsonl

# Long enough for a worker ticking every 0.2 s (the test servers' TUNEYARD_POLL_INTERVAL) to have claimed a job
# many times over.
SETTLE_SECONDS = 2.0


def start(tmp_path_factory, tiny_model_dir, name: str, env: dict[str, str], args: tuple[str, ...] = ()) -> Server:
    """A server (env and command-line args) whose local roots hold the tiny model."""
    srv = Server(tmp_path_factory.mktemp(name), env, args)
    shutil.copytree(tiny_model_dir, srv.local / "tiny-llama")
    srv.model_dir = str(srv.local / "tiny-llama")
    return srv


def submit(srv: Server, client, tmp_path: Path, **hyperparameters) -> str:
    """Upload the sample data and create an OpenAI job on the tiny model; the job's id."""
    f = client.files.create(file=write_sample_jsonl(tmp_path / f"train-{time.monotonic_ns()}.jsonl").open("rb"),
                            purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=srv.model_dir, training_file=f.id,
                                         hyperparameters=hyperparameters or None)
    return job.id


def job_row(srv: Server, job_id: str) -> tuple[str, str | None]:
    """(status, worker_id) of a job, read from the server's database: the worker that claimed it, if any."""
    with sqlite3.connect(f"file:{srv.home / 'tuneyard.db'}?mode=ro", uri=True) as db:
        return db.execute("SELECT status, worker_id FROM jobs WHERE id = ?", (job_id,)).fetchone()


def health(srv: Server) -> dict:
    return httpx.get(f"{srv.base_url}/healthz").json()


def assert_never_claimed(srv: Server, job_id: str) -> None:
    """No worker takes the job: it stays in validating_files, unclaimed, with no process started for it."""
    time.sleep(SETTLE_SECONDS)
    assert job_row(srv, job_id) == ("validating_files", None)
    assert not list((srv.home / "jobs").glob(f"*/{job_id}/logs/*"))


# ----- TUNEYARD_RUN_WORKER, --worker/--no-worker, --api-workers, TUNEYARD_POLL_INTERVAL ------------------------
@pytest.mark.parametrize("args", [(), ("--api-workers", "2")], ids=["one-process", "api-workers-2"])
def test_run_worker_false_starts_no_worker(tmp_path_factory, tmp_path, tiny_model_dir, args):
    srv = start(tmp_path_factory, tiny_model_dir, "no-worker", {"TUNEYARD_RUN_WORKER": "false"}, args)
    try:
        # With several HTTP processes /healthz always answers from one of them (no worker there): only the job
        # staying unclaimed shows that the serving process runs none either.
        assert health(srv)["worker"] is None
        assert_never_claimed(srv, submit(srv, srv.openai(srv.key()), tmp_path))
    finally:
        srv.stop()


def test_the_worker_flags_override_the_setting(tmp_path_factory, tmp_path, tiny_model_dir):
    srv = start(tmp_path_factory, tiny_model_dir, "flag-no-worker", {"TUNEYARD_RUN_WORKER": "true"}, ("--no-worker",))
    try:
        assert health(srv)["worker"] is None
        assert_never_claimed(srv, submit(srv, srv.openai(srv.key()), tmp_path))
    finally:
        srv.stop()
    # --worker wins over TUNEYARD_RUN_WORKER=false. A worker ticking every 60 s (TUNEYARD_POLL_INTERVAL) made its
    # first pass at start-up, before the job existed, and leaves it alone until its next one.
    srv = start(tmp_path_factory, tiny_model_dir, "flag-worker", {"TUNEYARD_RUN_WORKER": "false",
                                                                  "TUNEYARD_POLL_INTERVAL": "60",
                                                                  "TUNEYARD_PREPARE_STANDBY": "false"}, ("--worker",))
    try:
        assert health(srv)["worker"]["id"].startswith("local:")
        assert_never_claimed(srv, submit(srv, srv.openai(srv.key()), tmp_path))
    finally:
        srv.stop()
