"""One organisation never sees or touches another's objects: every endpoint answers 404, lists leave them out."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Server
from tuneyard.demo.tiny import write_sample_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    import shutil

    srv = Server(tmp_path_factory.mktemp("iso-home"), {"TUNEYARD_RUN_WORKER": "false",
                                                       "TUNEYARD_RATE_LIMIT_PER_SECOND": "0"})
    shutil.copytree(tiny_model_dir, srv.local / "tiny-llama")
    a, b = srv.openai(srv.key("alpha")), srv.openai(srv.key("beta"))
    path = write_sample_jsonl(tmp_path_factory.mktemp("iso") / "t.jsonl")
    with path.open("rb") as fh:
        f = a.files.create(file=fh, purpose="fine-tune")
    job = a.fine_tuning.jobs.create(model=str(srv.local / "tiny-llama"), training_file=f.id)
    yield srv, a, b, f.id, job.id
    srv.stop()


def test_every_object_endpoint_is_404_for_another_org(world):
    srv, a, b, file_id, job_id = world
    h = {"Authorization": f"Bearer {b.api_key}"}
    calls = [
        ("GET", f"/v1/files/{file_id}"), ("GET", f"/v1/files/{file_id}/content"), ("DELETE", f"/v1/files/{file_id}"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}"), ("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel"),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/pause"), ("POST", f"/v1/fine_tuning/jobs/{job_id}/resume"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/events"), ("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints/ftckpt-x"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/artifacts"),
        ("GET", f"/api/llm/fine_tuning/jobs/{job_id}"),
        ("GET", f"/job/get/?org_id=beta&request_id={job_id}"),
        ("GET", f"/job/metrics/?org_id=beta&request_id={job_id}"),
        ("POST", f"/job/cancel/?org_id=beta&request_id={job_id}"),
        ("GET", f"/job/get/?org_id=alpha&request_id={job_id}"), ("GET", "/job/list/?org_id=alpha"),
    ]
    ghost_file, ghost_job = "file-" + "Z" * 24, "ftjob-" + "Z" * 24
    for method, path in calls:
        r = httpx.request(method, f"{srv.base_url}{path}", headers=h, json={} if method == "POST" else None)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        # The answer is the one for an id that exists nowhere: it says nothing about the other org's object.
        ghost_path = path.replace(file_id, ghost_file).replace(job_id, ghost_job)
        g = httpx.request(method, f"{srv.base_url}{ghost_path}", headers=h, json={} if method == "POST" else None)
        assert g.status_code == 404
        assert r.text.replace(file_id, ghost_file).replace(job_id, ghost_job) == g.text, (path, r.text, g.text)
    # Nothing changed for the owner.
    # (The worker may have moved it on meanwhile: the standby prepare step takes a fraction of a second.)
    assert a.fine_tuning.jobs.retrieve(job_id).status in ("validating_files", "queued", "running", "succeeded")
    assert a.files.retrieve(file_id).id == file_id


def test_another_orgs_file_cannot_be_trained_on(world):
    srv, a, b, file_id, job_id = world
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        b.fine_tuning.jobs.create(model=str(srv.local / "tiny-llama"), training_file=file_id)
    assert e.value.body["param"] == "training_file" and "not found" in e.value.body["message"]


def test_lists_and_counts_leave_other_orgs_out(world):
    srv, a, b, file_id, job_id = world
    assert [j.id for j in b.fine_tuning.jobs.list()] == []
    assert [f.id for f in b.files.list()] == []
    assert job_id not in [m.id for m in b.models.list()]
    r = httpx.get(f"{srv.base_url}/job/list/", params={"org_id": "beta"},
                  headers={"Authorization": f"Bearer {b.api_key}"})
    assert r.json() == {"jobs": [], "total_count": 0}
    assert [j.id for j in a.fine_tuning.jobs.list()] == [job_id]
