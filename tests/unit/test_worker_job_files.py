"""The worker reads the job processes' files through tuneyard.jobdir: files in the previous version's shape take a
job through, and a malformed file gets the classification a missing one gets, never an error of the loop.

The job processes are stand-ins (a shell script as the interpreter, as in test_scheduler_local) that leave the
files under test in the job directory; the worker, its launcher, the store and the service are the real ones.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from tuneyard.demo.tiny import sample_rows
from tuneyard.domain.spec import TrainingSpec
from tuneyard.scheduler.local import LocalLauncher
from tuneyard.scheduler.worker import MAX_ATTEMPTS, Worker
from tuneyard.service import Services
from tuneyard.service.auth import Principal, ensure_org
from tuneyard.service.jobs import Submission
from tuneyard.settings import Settings

WHO = Principal(org_id="acme", key_id="k", role="admin")
HP = {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0, "learning_rate": 0.0002,
      "per_device_batch_size": 1, "gradient_accumulation_steps": 1}
# prepared.json as the previous version's prepare step wrote it (json.dumps of a dict).
OLD_PREPARED = json.dumps({"ok": True, "n_train": 3, "n_validation": 0, "train_tokens": 90, "trainable_tokens": 30,
                           "validation_tokens": 0, "truncated": 0, "dropped": 0, "total_steps": 3,
                           "format": "openai", "template": "chatml", "hyperparameters": HP})
# The stand-in for the interpreter: called as "<python> -m tuneyard.data.prepare JOBDIR" or "... -m tuneyard.trainer
# JOBDIR", it copies what the test left beside it into the job directory, then exits 0.
STAND_IN = """#!/bin/sh
here="$(dirname "$0")"
for a in "$@"; do job="$a"; done
case " $* " in
  *" tuneyard.data.prepare "*) name=prepared.json ;;
  *) name=result.json; [ -f "$here/events.jsonl" ] && cat "$here/events.jsonl" >> "$job/events.jsonl" ;;
esac
[ -f "$here/$name" ] && cp "$here/$name" "$job/$name"
exit 0
"""


@pytest.fixture()
def env(tmp_path, tiny_model_dir):
    settings = Settings(home=tmp_path / "home", local_roots=str(tiny_model_dir.parent), gpu_count=0,
                        prepare_standby=False, drain_seconds=0)
    svc = Services.build(settings)
    ensure_org(svc.store, "acme")
    f = svc.files.create(WHO, io.BytesIO("".join(json.dumps(r) + "\n" for r in sample_rows()).encode()),
                         "train.jsonl", "fine-tune")
    spec = TrainingSpec.model_validate({"model": {"name": str(tiny_model_dir)}, "data": {"train": {"file_id": f.id}},
                                        "resources": {"device": "cpu"}})
    job = svc.jobs.submit(WHO, Submission(spec=spec, dialect="test"))
    stand_in = tmp_path / "bin"
    stand_in.mkdir()
    (stand_in / "python").write_text(STAND_IN)
    (stand_in / "python").chmod(0o755)
    worker = Worker(svc.store, settings, svc.files, launcher=LocalLauncher(python=str(stand_in / "python")),
                    worker_id="w")
    yield svc, worker, job.id, stand_in
    worker.launcher.close()
    svc.store.dispose()


def _until_done(svc, worker: Worker, job_id: str, timeout: float = 60):
    """Tick the worker (an exception from a tick fails the test) until the job is final."""
    deadline = time.time() + timeout
    while (job := svc.jobs.get(WHO, job_id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, job.status
        worker.tick()
        time.sleep(0.05)
    return job


def _messages(svc, job_id: str) -> list[str]:
    events, _ = svc.jobs.events(WHO, job_id, after=None, limit=1000)
    return [e.message for e in events]


def test_files_in_the_previous_versions_shape_take_a_job_through(env):
    svc, worker, job_id, stand_in = env
    (stand_in / "prepared.json").write_text(OLD_PREPARED)
    root = Path(svc.jobs.get(WHO, job_id).output_dir)
    old_events = [
        {"seq": 1, "ts": 10.0, "source": "trainer", "type": "message", "level": "info",
         "message": "Training started: 3 steps", "data": {"total_steps": 3, "start_step": 0, "n_epochs": 1}},
        {"seq": 2, "ts": 11.0, "source": "trainer", "type": "metrics", "level": "info",
         "message": "Step 3/3: training loss=1.5", "data": {"step": 3, "total_steps": 3, "trained_tokens": 90,
                                                            "eta_s": 0.0, "train_loss": 1.5}},
        {"seq": 3, "ts": 12.0, "source": "trainer", "type": "checkpoint", "level": "info",
         "message": "Checkpoint saved at step 3", "data": {"step": 3, "path": str(root / "checkpoints" /
                                                                                 "checkpoint-3"),
                                                           "metrics": {"train_loss": 1.5}}}]
    (stand_in / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in old_events))
    ckpt = root / "checkpoints" / "checkpoint-3"  # listed only while it exists
    ckpt.mkdir(parents=True)
    (ckpt / "tuneyard_checkpoint.json").write_text(json.dumps({"step": 3, "trained_tokens": 90,
                                                               "metrics": {"train_loss": 1.5}}))
    (stand_in / "result.json").write_text(json.dumps({
        "status": "succeeded", "output_dir": str(root / "output"), "trained_tokens": 90, "trained_steps": 3,
        "final_metrics": {"train_loss": float("nan")}, "adapter": True}))
    job = _until_done(svc, worker, job_id)
    assert job.status == "succeeded", job.error
    assert (job.total_steps, job.n_train_examples, job.trained_steps, job.trained_tokens) == (3, 3, 3, 90)
    assert job.resolved_hyperparameters == HP
    ckpts, _ = svc.jobs.checkpoints(WHO, job_id, after=None, limit=10)
    assert [(c.step, c.metrics) for c in ckpts] == [(3, {"step": 3, "train_loss": 1.5})]
    assert "Step 3/3: training loss=1.5" in _messages(svc, job_id)


@pytest.mark.parametrize("result", [None, "{\"status\": \"succ", "[]", "{\"status\": \"failed\"}",
                                    "{\"status\": \"succeeded\"}", "{\"status\": \"stopped\", \"reason\": \"nap\"}"],
                         ids=["missing", "torn", "list", "failed-without-error", "succeeded-without-output",
                              "unknown-reason"])
def test_a_malformed_result_is_classified_as_no_result(env, result):
    """A trainer that left no readable result is retried, then the job fails as 'trainer_crashed', as when none."""
    svc, worker, job_id, stand_in = env
    (stand_in / "prepared.json").write_text(OLD_PREPARED)
    if result is not None:
        (stand_in / "result.json").write_text(result)
    job = _until_done(svc, worker, job_id)
    assert job.status == "failed" and job.error["code"] == "trainer_crashed" and job.attempt == MAX_ATTEMPTS
    retries = [m for m in _messages(svc, job_id) if m.startswith("Trainer exited unexpectedly")]
    assert len(retries) == MAX_ATTEMPTS - 1
    if result is not None:  # the event and the error say which file could not be read, and why
        assert "its result.json is unreadable: " in job.error["message"], job.error
        assert all("its result.json is unreadable: " in m for m in retries)


@pytest.mark.parametrize("prepared", [None, "{", "{\"ok\": true}", "{\"ok\": false, \"error\": {\"code\": 1}}"],
                         ids=["missing", "torn", "ok-without-counts", "error-of-wrong-type"])
def test_a_malformed_prepared_is_classified_as_no_result(env, prepared):
    svc, worker, job_id, stand_in = env
    if prepared is not None:
        (stand_in / "prepared.json").write_text(prepared)
    job = _until_done(svc, worker, job_id)
    assert job.status == "failed" and job.error["code"] == "internal_error", job.error
    assert "data preparation exited with code 0 without a result" in job.error["message"]
    if prepared is not None:
        assert "its prepared.json is unreadable: " in job.error["message"], job.error
