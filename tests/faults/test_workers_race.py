"""Several workers on one PostgreSQL database race for the same jobs: each job runs exactly once."""

from __future__ import annotations

import io
import json
import time
import uuid

import pytest

from tests.integration.test_store import PG_ADMIN, _pg_available
from tuneyard.demo.tiny import sample_rows
from tuneyard.domain.spec import TrainingSpec
from tuneyard.scheduler.worker import Worker
from tuneyard.service import Services
from tuneyard.service.auth import Principal, ensure_org
from tuneyard.service.jobs import Submission
from tuneyard.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture()
def pg_url():
    if not _pg_available():
        pytest.skip("PostgreSQL is not running at 127.0.0.1:5432")
    import psycopg

    name = f"tuneyard_race_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_three_workers_run_each_job_once(pg_url, tmp_path, tiny_model_dir):
    settings = Settings(home=tmp_path / "home", database_url=pg_url, local_roots=str(tiny_model_dir.parent),
                        poll_interval=0.05, cpu_slots=1, prepare_slots=2, gpu_count=0)
    svc = Services.build(settings)
    ensure_org(svc.store, "acme")
    who = Principal(org_id="acme", key_id="k", role="admin")
    body = "".join(json.dumps(r) + "\n" for r in sample_rows()).encode()
    f = svc.files.create(who, io.BytesIO(body), "train.jsonl", "fine-tune")
    spec = {"model": {"name": str(tiny_model_dir)}, "data": {"train": {"file_id": f.id}},
            "hyperparameters": {"n_epochs": 1, "batch_size": 4}, "resources": {"device": "cpu"}}
    jobs = [svc.jobs.submit(who, Submission(spec=TrainingSpec.model_validate(spec), dialect="test")).id
            for _ in range(5)]
    workers = [Worker(Services.build(settings).store, settings, svc.files, worker_id=f"racer-{i}") for i in range(3)]
    for w in workers:
        w.start()
    try:
        deadline = time.time() + 240
        while True:
            done = [svc.jobs.get(who, j) for j in jobs]
            if all(j.status in ("succeeded", "failed", "cancelled") for j in done):
                break
            assert time.time() < deadline, [j.status for j in done]
            time.sleep(0.5)
    finally:
        for w in workers:
            w.shutdown()
    assert [j.status for j in done] == ["succeeded"] * 5, [j.error for j in done]
    for j in done:
        assert j.attempt == 1, "a job was started more than once"
        events, _ = svc.jobs.events(who, j.id, after=None, limit=1000)
        messages = [e.message for e in events]
        assert messages.count("Fine-tuning job started") == 1
        assert messages.count("Files validated, moving job to queued state") == 1
        assert messages.count("The job has successfully completed") == 1
        logs = sorted(p.name for p in (settings.jobs_dir / "acme" / j.id / "logs").iterdir())
        assert logs == ["prepare-0.log", "train-1.log"], logs
    svc.store.dispose()
