"""Experiment tracking: W&B (offline run files), a real MLflow server on loopback and TensorBoard event files, across a
pause and resume; a tracker that is down costs only a warning event."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.trainer.test_stop_resume import start_and_stop_at
from tests.trainer.trainer_helpers import events, result, run_trainer, train_losses

pytestmark = pytest.mark.slow

WANDB_KEY = "wandb-test-key-7f3c9e1d"
STEPS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> str:
    """A real MLflow tracking server on loopback (one per module: it takes ~20 s to start)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
                             "--default-artifact-root", str(root / "artifacts")], stdout=log, stderr=log,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the MLflow server did not start"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def wandb_records(path: Path):
    """The Record protobufs of a W&B run file (.wandb: a LevelDB-style log of 32 KiB blocks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    block = 32768
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        else:  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_mlflow_and_tensorboard_follow_one_run_across_a_pause(make_job, mlflow_server, monkeypatch):
    import json

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    # As the worker hands it over: the key in the trainer's environment only.
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    job = make_job("ftjob-tracked", validation=False, hyperparameters={"max_steps": STEPS},
                   schedule={"logging_steps": 1},
                   integrations=[{"type": "wandb", "config": {"project": "tuneyard-test", "tags": ["ci"],
                                                              "secret_id": "secret-abc"}},
                                 {"type": "mlflow", "config": {"tracking_uri": mlflow_server,
                                                               "experiment": "tuneyard-test"}}])
    code, _ = start_and_stop_at(job, "pause", after_step=3)
    assert code == 0
    paused = result(job)
    assert paused["status"] == "stopped" and paused["step"] < STEPS, paused
    (job.control / "stop").unlink()
    proc = run_trainer(job)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert result(job)["status"] == "succeeded"
    losses = dict(train_losses(job))
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert not [e for e in events(job) if "could not be sent" in e["message"]]

    # W&B: one run per attempt, both with the job's id; every step's loss; the spec in its config, the key nowhere.
    runs = sorted((job.tracking / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2, runs
    history: dict[int, float] = {}
    for path in runs:
        records = list(wandb_records(path))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.run_id == job.root.name and run.project == "tuneyard-test" and list(run.tags) == ["ci"]
        config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") in ("run", "config")
                  for u in (r.run.config.update if r.WhichOneof("record_type") == "run" else r.config.update)}
        tuneyard = config["tuneyard"].get("value", config["tuneyard"])
        assert tuneyard["spec"]["hyperparameters"]["max_steps"] == STEPS
        for r in records:
            if r.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                if "train/loss" in row:
                    history[int(row["train/global_step"])] = row["train/loss"]
    assert history == pytest.approx(losses)
    for f in job.root.rglob("*"):
        if f.is_file():
            assert WANDB_KEY.encode() not in f.read_bytes(), f

    # MLflow: the same run across both attempts, every step's loss.
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tuneyard-test")
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 1 and found[0].data.tags["tuneyard.job_id"] == job.root.name
    logged = {m.step: m.value for m in client.get_metric_history(found[0].info.run_id, "loss")}
    assert logged == pytest.approx(losses)

    # TensorBoard: in the output (downloaded with the artifacts), both attempts' event files, every step's loss.
    board = job.output / "tensorboard"
    assert len(list(board.glob("events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(board))
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("train/loss")} == pytest.approx(losses, rel=1e-5)


def test_a_tracker_that_is_down_costs_a_warning_not_the_run(make_job):
    dead = f"http://127.0.0.1:{free_port()}"
    job = make_job("ftjob-untracked", validation=False, hyperparameters={"max_steps": 2},
                   integrations=[{"type": "mlflow", "config": {"tracking_uri": dead}}])
    proc = run_trainer(job)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert result(job)["status"] == "succeeded"
    warned = [e for e in events(job) if e["message"].startswith("MLflow: the metrics could not be sent")]
    assert len(warned) == 1 and warned[0]["level"] == "warn", events(job)
    assert (job.output / "tensorboard").is_dir()
