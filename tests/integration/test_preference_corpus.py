"""The malformed preference (DPO) rows of the corpus, in the other two dialects (the OpenAI upload of every
corpus file is tests/api/test_malformed_uploads.py): each fails before the queue, naming the line and the field.

Llama Stack validates registered rows at registration (a 400); a Simplismart job's local file is validated by the
prepare step, so its DPO job fails in ``validating_files``, never queued, with the same line-numbered message.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server

CORPUS = Path(__file__).resolve().parents[1] / "data" / "malformed"
EXPECTED: dict[str, dict] = json.loads((CORPUS / "expected.json").read_text())
DPO_FILES = sorted(name for name in EXPECTED if name.startswith("dpo_"))


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir):
    s = Server(tmp_path_factory.mktemp("dpo-corpus-home"), {"TUNEYARD_RATE_LIMIT_PER_SECOND": "0"})
    shutil.copytree(tiny_model_dir, s.local / "tiny-llama")
    s.model_dir = str(s.local / "tiny-llama")
    s.http = httpx.Client(base_url=s.base_url, headers={"Authorization": f"Bearer {s.key('acme')}"}, timeout=60)
    yield s
    s.http.close()
    s.stop()


@pytest.mark.parametrize("name", [n for n in DPO_FILES if n.endswith(".jsonl")])
def test_llamastack_registration_names_the_row_and_field(srv, name):
    rows = [json.loads(line) for line in (CORPUS / name).read_text().splitlines() if line.strip()]
    r = srv.http.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": name,
                                            "source": {"type": "rows", "rows": rows}})
    if r.status_code == 200:
        # Rows that are well-formed on their own but wrong for DPO (e.g. equal answers) are refused when a
        # preference job names them: registration does not know the method yet.
        r = srv.http.post("/v1/post-training/preference-optimize", json={
            "job_uuid": f"corpus-{name}", "finetuned_model": srv.model_dir, "algorithm_config": {"beta": 0.1},
            "hyperparam_search_config": {}, "logger_config": {},
            "training_config": {"n_epochs": 1, "data_config": {"dataset_id": name, "batch_size": 1,
                                                               "shuffle": False, "data_format": "dialog"}}})
        if r.status_code == 200:
            status = _wait(lambda: srv.http.get("/v1/post-training/job/status",
                                                params={"job_uuid": f"corpus-{name}"}).json(),
                           lambda st: st["status"] != "scheduled")
            assert status["status"] == "failed", status
            message = status["resources_allocated"]["error"]["message"]
            _assert_names(name, message, row_word=("Example", "Row"))
            return
    assert r.status_code == 400, r.text
    _assert_names(name, r.json()["detail"], row_word=("Row", "Example", "rows["))


@pytest.mark.parametrize("name", DPO_FILES)
def test_simplismart_dpo_job_fails_before_the_queue_naming_the_line(srv, name):
    data = srv.local / name
    shutil.copy(CORPUS / name, data)
    form = {"org": "acme", "experiment_name": f"corpus-{name.split('.')[0]}",
            "dataset_config": "{}", "model_details": json.dumps({"base_model": srv.model_dir, "source_type": "local"}),
            "train_config": json.dumps({"type": "dpo", "train_type": "lora"}),
            "dataset_details": json.dumps({"dataset_path": str(data), "source_type": "local"}),
            "infra_config": json.dumps({"gpu_type": "cpu", "gpu_count": 1})}
    r = srv.http.post("/job/", files={k: (None, v.encode()) for k, v in form.items()})
    assert r.status_code == 200, r.text
    request_id = r.json()["request_id"]
    seen: set[str] = set()

    def read() -> dict:
        job = srv.http.get("/job/get/", params={"org_id": "acme", "request_id": request_id}).json()
        seen.add(job["status"])
        return job

    job = _wait(read, lambda j: j["status"] in ("FAILED", "COMPLETED", "CANCELED"))
    assert job["status"] == "FAILED", job
    events = srv.http.get(f"/v1/fine_tuning/jobs/{request_id}/events", params={"limit": 100}).json()["data"]
    assert not any("Queued" in e["message"] or "started" in e["message"].lower() for e in events), events
    error = srv.http.get(f"/v1/fine_tuning/jobs/{request_id}").json()["error"]
    _assert_names(name, error["message"], row_word=("Example",))
    assert error["param"] == "dataset_details.dataset_path" or error["param"] in ("training_file", None) or \
        "dataset" in str(error["param"]), error


def _assert_names(name: str, message: str, row_word: tuple[str, ...]) -> None:
    expected = EXPECTED[name]["errors"][0]
    # The field the corpus names (quoted in its message) and, for a row's problem, the row's number.
    fields = [part.split("'")[0] for part in expected.split("'")[1::2]][:1]
    for field in fields:
        assert field in message, (name, message)
    if expected.startswith("Example"):
        number = expected.split(":")[0].split(",")[0].removeprefix("Example ").strip()
        assert any(f"{w} {number}" in message or f"{w}{int(number) - 1}]" in message for w in row_word), \
            (name, message)


def _wait(read, done, timeout: float = 120):
    deadline = time.time() + timeout
    value = read()
    while not done(value) and time.time() < deadline:
        time.sleep(0.3)
        value = read()
    return value
