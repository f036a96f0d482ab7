"""Wire details the official specs and clients check, in all three dialects (a real server, worker off).

Where a test needs a job that finished, it moves the job in the database the way the worker would
(``repo.transition``): the point is how each dialect shows that state, not how the job got there.
"""

from __future__ import annotations

import json
import time

import httpx
import llama_stack_client
import openai
import pytest
from llama_stack_client import LlamaStackClient

from tests.api.test_llamastack_api import ROWS
from tests.api.test_llamastack_api import request as ls_request
from tests.api.test_simplismart_api import configs as ss_configs
from tests.conftest import Server
from tuneyard.demo.tiny import write_sample_jsonl


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir):
    import shutil

    srv = Server(tmp_path_factory.mktemp("wire-home"), {"TUNEYARD_RUN_WORKER": "false", "TUNEYARD_GPU_COUNT": "0",
                                                        "TUNEYARD_RATE_LIMIT_PER_SECOND": "0"})
    shutil.copytree(tiny_model_dir, srv.local / "tiny-llama")
    srv.model_dir = str(srv.local / "tiny-llama")
    srv.data = str(write_sample_jsonl(srv.local / "data" / "train.jsonl"))
    srv.token = srv.key("acme")
    srv.h = {"Authorization": f"Bearer {srv.token}"}
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oa(api):
    return api.openai(api.token)


@pytest.fixture(scope="module")
def ls(api):
    return LlamaStackClient(base_url=api.base_url, api_key=api.token, max_retries=0)


@pytest.fixture(scope="module")
def train_file(oa, api):
    with open(api.data, "rb") as fh:
        return oa.files.create(file=fh, purpose="fine-tune")


@pytest.fixture(scope="module")
def capitals(ls):
    return ls.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": ROWS},
                                dataset_id="capitals")


def _store(api):
    from tuneyard.store.db import Store

    return Store(f"sqlite:///{api.home / 'tuneyard.db'}", run_migrations=False)


def job_id_of(api, job_uuid: str) -> str:
    """tuneyard's id of the job a Llama Stack client created as ``job_uuid``."""
    from sqlalchemy import select

    from tuneyard.store.models import Job

    store = _store(api)
    try:
        with store.session() as s:
            return s.scalar(select(Job.id).where(Job.external_id == job_uuid))
    finally:
        store.dispose()


def finish(api, job_id: str, status: str, error: dict | None = None) -> None:
    """Move a job to ``status`` in the server's database, as the worker does when the job ends."""
    from tuneyard.domain.jobs import JobStatus
    from tuneyard.store.repo import transition

    store = _store(api)
    try:
        with store.session(write=True) as s:
            if status == "succeeded":
                assert transition(s, job_id, JobStatus.QUEUED) and transition(s, job_id, JobStatus.RUNNING,
                                                                              started_at=time.time())
            assert transition(s, job_id, JobStatus(status), **({"error": error} if error else {}))
    finally:
        store.dispose()


def upload(api, parts: dict[str, str]) -> httpx.Response:
    from pathlib import Path

    content = Path(api.data).read_bytes()
    return httpx.post(f"{api.base_url}/v1/files", headers=api.h, files={"file": ("t.jsonl", content)},
                      data={"purpose": "fine-tune", **parts}, timeout=30)


def n_files(oa) -> int:
    return len(list(oa.files.list()))


# ----- optional fields are left out while unknown -----------------------------------------------------
def test_a_file_without_expiry_or_details_leaves_them_out(api, oa):
    r = upload(api, {})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "expires_at" not in body and "status_details" not in body
    listed = httpx.get(f"{api.base_url}/v1/files", headers=api.h).json()["data"]
    assert all("expires_at" not in f and "status_details" not in f for f in listed)
    assert oa.files.retrieve(body["id"]).expires_at is None


def test_checkpoint_metrics_leave_out_what_was_not_measured():
    from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

    from tuneyard.api.dialects.openai.translate import checkpoint_out
    from tuneyard.store.models import Checkpoint, Job

    job = Job(id="ftjob-x", model="m", org_id="acme", suffix=None)
    ck = Checkpoint(id="ftckpt-1", job_id="ftjob-x", step=3, created_at=1.0,
                    metrics={"train_loss": 1.5, "train_mean_token_accuracy": 0.5, "valid_loss": None})
    out = checkpoint_out(ck, job).model_dump(mode="json")
    assert out["metrics"] == {"step": 3, "train_loss": 1.5, "train_mean_token_accuracy": 0.5}
    assert FineTuningJobCheckpoint.model_validate(out).metrics.valid_loss is None
    ck.metrics = {"train_loss": 1.5, "valid_loss": 2.0}
    assert checkpoint_out(ck, job).metrics["full_valid_loss"] == 2.0


def test_llama_stack_status_leaves_out_unknown_timestamps(api, ls, capitals):
    ls.post_training.supervised_fine_tune(**ls_request(api, job_uuid="wire-ts"))
    body = httpx.get(f"{api.base_url}/v1/post-training/job/status", params={"job_uuid": "wire-ts"},
                     headers=api.h).json()
    assert "started_at" not in body and "completed_at" not in body and body["scheduled_at"]
    st = ls.post_training.job.status(job_uuid="wire-ts")
    assert st.started_at is None and st.completed_at is None and st.scheduled_at is not None


# ----- expires_after: both multipart forms, the same rules -----------------------------------------------
BOGUS = [{"expires_after": json.dumps({"anchor": "bogus", "seconds": 5})},
         {"expires_after[anchor]": "bogus", "expires_after[seconds]": "5"}]


@pytest.mark.parametrize("parts", BOGUS, ids=["json", "brackets"])
def test_a_bogus_expires_after_is_refused_in_either_form(api, oa, parts):
    before = n_files(oa)
    r = upload(api, parts)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "expires_after[anchor]"
    assert "expires_after[anchor]" in err["message"] and "expires_after[seconds]" in err["message"]
    assert n_files(oa) == before


@pytest.mark.parametrize("parts", [{"expires_after": json.dumps({"anchor": "created_at", "seconds": 7200})},
                                   {"expires_after[anchor]": "created_at", "expires_after[seconds]": "7200"}],
                         ids=["json", "brackets"])
def test_a_good_expires_after_is_honoured_in_either_form(api, parts):
    r = upload(api, parts)
    assert r.status_code == 200, r.text
    assert r.json()["expires_at"] == r.json()["created_at"] + 7200


def test_the_sdk_form_and_other_expires_after_mistakes(api, oa):
    with open(api.data, "rb") as fh:
        f = oa.files.create(file=fh, purpose="fine-tune", expires_after={"anchor": "created_at", "seconds": 3600})
    assert f.expires_at == f.created_at + 3600
    before = n_files(oa)
    for parts, param in [
        ({"expires_after": '{"anchor": "created_at", "seconds": 7200}', "expires_after[seconds]": "7200"},
         "expires_after"),
        ({"expires_after": "not json"}, "expires_after"),
        ({"expires_after": json.dumps({"anchor": "created_at", "seconds": 7200, "extra": 1})},
         "expires_after[extra]"),
        ({"expires_after": json.dumps({"anchor": "created_at", "seconds": "7200"})}, "expires_after[seconds]"),
        ({"expires_after[seconds]": "7200"}, "expires_after[anchor]"),
        ({"expires_at": "123"}, "expires_at"),  # not a part of this call: refused, not ignored
    ]:
        r = upload(api, parts)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (parts, r.text)
    assert n_files(oa) == before


# ----- Llama Stack datasets and datasetio ------------------------------------------------------------
def test_a_rows_dataset_reads_back_as_a_rows_source(api, ls, capitals):
    assert capitals.source.type == "rows" and capitals.source.rows == ROWS
    assert ls.datasets.retrieve("capitals").source.rows == ROWS
    listed = next(d for d in ls.datasets.list() if d.identifier == "capitals")
    assert listed.source.type == "rows" and len(listed.source.rows) == len(ROWS)
    raw = httpx.get(f"{api.base_url}/v1/datasets/capitals", headers=api.h).json()["source"]
    assert set(raw) == {"type", "rows"}


def test_iterrows_pages_the_rows(api, ls, capitals):
    page = ls.datasets.iterrows("capitals", start_index=2, limit=3)
    assert page.data == ROWS[2:5] and page.has_more is True
    assert ls.datasets.iterrows("capitals").data == ROWS
    last = ls.datasets.iterrows("capitals", start_index=len(ROWS) - 2, limit=5)
    assert last.data == ROWS[-2:] and last.has_more is False
    assert ls.datasets.iterrows("capitals", limit=-1).has_more is False
    for params, field in [({"start_index": -1}, "start_index"), ({"limit": 0}, "limit"),
                          ({"start_index": 2**70}, "start_index")]:
        with pytest.raises(llama_stack_client.BadRequestError) as e:
            ls.datasets.iterrows("capitals", **params)
        assert e.value.body["status"] == 400 and field in e.value.body["detail"]
    with pytest.raises(llama_stack_client.NotFoundError) as e:
        ls.datasets.iterrows("nope")
    assert e.value.body["instance"] == "/v1/datasetio/iterrows/nope"


def test_append_rows_validates_like_registration_and_stores_all_or_nothing(api, ls):
    ls.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": ROWS[:3]},
                         dataset_id="growing")

    def append(rows):
        return httpx.post(f"{api.base_url}/v1/datasetio/append-rows/growing", json={"rows": rows}, headers=api.h)

    # The unchanged 0.2.12 client has no method for it: its generic post, as a Llama Stack app would call it.
    ls.post("/v1/datasetio/append-rows/growing", body={"rows": ROWS[3:5]}, cast_to=httpx.Response)
    assert ls.datasets.iterrows("growing").data == ROWS[:5]
    assert ls.datasets.retrieve("growing").source.rows == ROWS[:5]
    bad = [ROWS[5], {"dialog": [{"role": "user", "content": "hi"}]}, ROWS[6], {"dialog": [{"role": "bot",
                                                                                            "content": "x"}]}]
    r = append(bad)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["title"] == "Bad Request" and "Row 2" in body["detail"] and "Row 4" in body["detail"]
    r = append([ROWS[5], "not a row", 3])
    assert r.status_code == 400 and "rows[1]" in r.json()["detail"] and "rows[2]" in r.json()["detail"]
    r = append([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    assert r.status_code == 400 and "format" in r.json()["detail"]
    assert append([]).status_code == 400
    assert ls.datasets.iterrows("growing").data == ROWS[:5]  # nothing of the refused calls was kept
    ls.datasets.register(purpose="post-training/messages", dataset_id="remote",
                         source={"type": "uri", "uri": "https://example.com/x.jsonl"})
    r = httpx.post(f"{api.base_url}/v1/datasetio/append-rows/remote", json={"rows": ROWS[:1]}, headers=api.h)
    assert r.status_code == 400 and "URI" in r.json()["detail"]
    with pytest.raises(llama_stack_client.BadRequestError) as e:
        ls.datasets.iterrows("remote")
    assert "not stored" in e.value.body["detail"]
    r = httpx.post(f"{api.base_url}/v1/datasetio/append-rows/nope", json={"rows": ROWS[:1]}, headers=api.h)
    assert r.status_code == 404 and r.json()["status"] == 404


def test_a_failed_jobs_reason_shows_in_llama_stack_status(api, ls, capitals):
    ls.post_training.supervised_fine_tune(**ls_request(api, job_uuid="wire-fail"))
    finish(api, job_id_of(api, "wire-fail"), "failed", {
        "code": "invalid_training_file", "message": "Row 3: no assistant message",
        "param": "training_config.data_config.dataset_id"})
    st = ls.post_training.job.status(job_uuid="wire-fail")
    assert st.status == "failed"
    assert st.resources_allocated["error"] == {"code": "invalid_training_file",
                                               "message": "Row 3: no assistant message"}
    assert "error" not in ls.post_training.job.status(job_uuid="wire-ts").resources_allocated


# ----- every path under a dialect's prefix answers in that dialect's shape; 405 says what is allowed -----
@pytest.mark.parametrize("path,shape", [
    ("/v1/datasetio/nope", "llamastack"), ("/v1alpha/nope", "llamastack"), ("/v1beta/datasets-nope/x", "llamastack"),
    ("/v1/post-training/nope", "llamastack"), ("/job/nope/", "simplismart"), ("/jobs/nope", "openai"),
    ("/v1/nope", "openai"), ("/api/llm/nope", "openai"),
])
def test_unknown_paths_answer_in_their_dialects_shape(api, path, shape):
    r = httpx.get(f"{api.base_url}{path}", headers=api.h)
    assert r.status_code == 404
    body = r.json()
    keys = {"llamastack": {"status", "title", "detail", "instance"},
            "simplismart": {"detail", "field", "code", "errors"}, "openai": {"error"}}[shape]
    assert set(body) == keys, body


@pytest.mark.parametrize("method,path,allow,shape", [
    ("PUT", "/v1/files", "GET, POST", "openai"),
    ("POST", "/api/llm/fine_tuning/jobs/ftjob-x", "GET", "openai"),
    ("DELETE", "/job/get/", "GET", "simplismart"),
    ("GET", "/job/", "POST", "simplismart"),
    ("PUT", "/v1/post-training/job/status", "GET", "llamastack"),
    ("PATCH", "/v1beta/datasets/capitals", "DELETE, GET", "llamastack"),
    ("GET", "/v1/datasetio/append-rows/capitals", "POST", "llamastack"),
])
def test_405_carries_allow(api, method, path, allow, shape):
    r = httpx.request(method, f"{api.base_url}{path}", headers=api.h)
    assert r.status_code == 405 and r.headers["allow"] == allow, (r.headers, r.text)
    body = r.json()
    text = {"openai": lambda b: b["error"]["message"], "simplismart": lambda b: b["detail"],
            "llamastack": lambda b: b["detail"]}[shape](body)
    assert allow in text and method in text


# ----- each dialect speaks its own words -------------------------------------------------------------
def test_llama_stack_cancel_conflict_names_its_job_uuid_and_status(api, ls, capitals):
    ls.post_training.supervised_fine_tune(**ls_request(api, job_uuid="ls-twice"))
    ls.post_training.job.cancel(job_uuid="ls-twice")
    with pytest.raises(llama_stack_client.ConflictError) as e:
        ls.post_training.job.cancel(job_uuid="ls-twice")
    detail = e.value.body["detail"]
    assert "'ls-twice'" in detail and "already cancelled" in detail and "ftjob" not in detail
    assert "Fine-tuning" not in detail


def test_simplismart_cancel_conflict_uses_its_status_names(api, oa, train_file):
    job = oa.fine_tuning.jobs.create(model=api.model_dir, training_file=train_file.id)
    finish(api, job.id, "succeeded")
    r = httpx.post(f"{api.base_url}/job/cancel/", params={"org_id": "acme", "request_id": job.id}, headers=api.h)
    assert r.status_code == 409
    assert "already COMPLETED" in r.json()["detail"] and "succeeded" not in r.json()["detail"]
    with pytest.raises(openai.ConflictError) as e:  # the OpenAI dialect keeps its own words
        oa.fine_tuning.jobs.cancel(job.id)
    assert "already succeeded" in e.value.body["message"]
    with pytest.raises(llama_stack_client.ConflictError) as e:
        LlamaStackClient(base_url=api.base_url, api_key=api.token, max_retries=0).post_training.job.cancel(
            job_uuid=job.id)
    assert "already completed" in e.value.body["detail"]


def test_simplismart_shows_an_openai_job_in_simplismart_words(api, oa, train_file):
    job = oa.fine_tuning.jobs.create(model=api.model_dir, training_file=train_file.id,
                                     hyperparameters={"lora_alpha": 16, "lora_r": 4})
    rec = httpx.get(f"{api.base_url}/job/get/", params={"org_id": "acme", "request_id": job.id},
                    headers=api.h).json()
    dd = rec["dataset_details"]
    # The uploaded file is a file on this server: a local source, named by its path (not by the OpenAI file id).
    assert dd["source_type"] == "local" and dd["dataset_path"].startswith(str(api.home))
    assert dd["dataset_path"] != train_file.id and dd["dataset_name"]
    assert rec["infra_config"]["gpu_type"] == "cpu"  # what this GPU-less server runs it on
    assert rec["train_config"]["torch_dtype"] is None and rec["dataset_details"]["dataset_format"] is None
    assert rec["train_config"]["adapter_config"]["r"] == 4


def test_simplismart_echoes_numbers_as_sent(api):
    from tests.api.test_simplismart_api import post_job

    cfg = ss_configs(api)
    cfg["dataset_details"]["dataset_format"] = None
    cfg["train_config"]["adapter_config"].update(alpha=16, dropout=0)
    cfg["dataset_config"]["split"]["ratios"] = [1, 0]
    r = post_job(api, cfg)
    assert r.status_code == 200, r.text
    rec = httpx.get(f"{api.base_url}/job/get/", params={"org_id": "acme", "request_id": r.json()["request_id"]},
                    headers=api.h).json()
    ad = rec["train_config"]["adapter_config"]
    assert type(ad["alpha"]) is int and ad["alpha"] == 16 and type(ad["dropout"]) is int
    assert rec["dataset_config"]["split"]["ratios"] == [1, 0]
    assert all(type(x) is int for x in rec["dataset_config"]["split"]["ratios"])
    assert type(rec["train_config"]["hyperparameters"]["learning_rate"]) is float


def test_simplismart_shows_a_llama_stack_job_without_foreign_formats(api, ls, capitals):
    ls.post_training.supervised_fine_tune(**ls_request(api, job_uuid="ls-in-ss"))
    jobs = httpx.get(f"{api.base_url}/job/list/", params={"org_id": "acme"}, headers=api.h).json()["jobs"]
    for j in jobs:
        rec = httpx.get(f"{api.base_url}/job/get/", params={"org_id": "acme", "request_id": j["request_id"]},
                        headers=api.h).json()
        assert rec["dataset_details"]["dataset_format"] in (None, "sharegpt", "alpaca", "instruction")
        assert rec["dataset_details"]["source_type"] in ("local", "s3", "hf", "gcs")
        assert rec["train_config"]["torch_dtype"] in (None, "float16", "bfloat16", "float32")
