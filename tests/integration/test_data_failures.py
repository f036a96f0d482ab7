"""Data a job is refused in its prepare step: it fails and never reaches `queued`.

Problems only the model's tokenizer can find (every row longer than max_length, tool calls the model's
template cannot show, an unknown template), preference rows for a supervised job, and corpus files given
by path (Simplismart), which no upload ever checked. A real server with its worker and prepare
subprocesses, driven by the `openai` SDK (and Simplismart's multipart call) on the tiny model.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.api.test_simplismart_api import configs

pytestmark = pytest.mark.slow
QUEUED_EVENT = "Files validated, moving job to queued state"
CORPUS = Path(__file__).resolve().parents[1] / "data" / "malformed"
EXPECTED: dict[str, dict] = json.loads((CORPUS / "expected.json").read_text())


@pytest.fixture(scope="module")
def client(server):
    return server.openai(server.key("acme"))


def upload(client, tmp_path, name: str, rows: list[dict]):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return client.files.create(file=path.open("rb"), purpose="fine-tune")


def run_to_the_end(client, job_id: str, timeout: float = 240) -> tuple[object, set[str]]:
    """Poll a job until it ends; return it and every status seen on the way."""
    seen = set()
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        seen.add(job.status)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job, seen
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s")


def assert_failed_before_queue(client, job, seen: set[str], *fragments: str, param: str = "training_file") -> None:
    assert job.status == "failed", job
    assert seen <= {"validating_files", "failed"}, seen
    assert job.error.param == param
    for fragment in fragments:
        assert fragment in job.error.message, job.error.message
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    # The worker records the move to queued as an event: there is none.
    assert QUEUED_EVENT not in messages
    assert any(m.startswith("Validation failed: ") for m in messages)


def test_every_row_longer_than_max_length_fails_the_job(client, server, tmp_path):
    """Truncating to max_length would cut every answer away: nothing is trained silently, the job fails."""
    long_question = "Tell me, with all the detail you can muster, what the capital of France is?"
    rows = [{"messages": [{"role": "user", "content": long_question}, {"role": "assistant", "content": "Paris."}]}
            for _ in range(3)]
    f = upload(client, tmp_path, "long.jsonl", rows)
    job = client.fine_tuning.jobs.create(
        model=server.model_dir, training_file=f.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"context_length": 8}}})
    job, seen = run_to_the_end(client, job.id)
    assert_failed_before_queue(client, job, seen, "no training example is left: 3 longer than max_length 8 tokens")


def test_preference_file_for_a_supervised_job_fails(client, server, tmp_path):
    f = upload(client, tmp_path, "pref.jsonl", [{"prompt": "Capital of France?", "chosen": "Paris.",
                                                 "rejected": "Lyon."}])
    job = client.fine_tuning.jobs.create(model=server.model_dir, training_file=f.id)
    job, seen = run_to_the_end(client, job.id)
    assert_failed_before_queue(client, job, seen, "Training file holds preference (DPO) rows")


def test_tool_calls_the_models_template_cannot_show_fail_the_job(client, server, tmp_path):
    """The tiny model's own chat template renders only content: a call-only answer would train empty."""
    rows = [{"messages": [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "capital", "arguments": '{"country": "FR"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Paris"},
        {"role": "assistant", "content": "Paris."}]}] * 3
    f = upload(client, tmp_path, "tools.jsonl", rows)
    job = client.fine_tuning.jobs.create(model=server.model_dir, training_file=f.id)
    job, seen = run_to_the_end(client, job.id)
    assert_failed_before_queue(client, job, seen,
                               "Example 1: the chat template does not show the tool calls of message 2")


def simplismart_job(server, token: str, path: Path, *, container: str, fmt: str | None = None,
                    template: str | None = None) -> str:
    """Submit a Simplismart job on a local data file; its request_id (the job id)."""
    server.data = str(path)
    cfg = configs(server)
    cfg["dataset_details"].update(dataset_type=container, dataset_format=fmt)
    cfg["dataset_config"]["preprocessing"]["prompt"]["template"] = template
    form = {"org": "acme", "experiment_name": "bad-data", **{k: json.dumps(v) for k, v in cfg.items()}}
    r = httpx.post(f"{server.base_url}/job/", data=form, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


@pytest.mark.parametrize(("name", "container"), [
    ("several_problems.jsonl", "jsonl"), ("csv_missing_column.csv", "csv"), ("csv_ragged_row.csv", "csv"),
    ("parquet_wrong_column_type.parquet", "parquet"), ("json_array_bad_element.json", "jsonl"),
    ("csv_repeated_column_no_format.csv", "csv"),
])
def test_corpus_files_given_by_path_fail_before_the_queue(client, server, name, container):
    """Data given by path is never uploaded: prepare refuses it with the same messages as an upload."""
    local = server.local / "corpus" / name
    local.parent.mkdir(exist_ok=True)
    shutil.copy(CORPUS / name, local)
    job, seen = run_to_the_end(client, simplismart_job(server, server.key("acme"), local, container=container))
    if name.endswith(".json"):
        # A JSON array declared as JSONL (Simplismart's dataset_type has no "json"): the declared container is
        # read, and the message says what the file is.
        assert_failed_before_queue(client, job, seen, "the file is one JSON document spread over several lines, "
                                   "not JSONL", param="dataset_details.dataset_path")
        return
    assert_failed_before_queue(client, job, seen, *EXPECTED[name]["errors"], param="dataset_details.dataset_path")


def test_simplismart_instruction_format_and_unknown_template_fail_before_the_queue(client, server):
    from tuneyard.demo.tiny import write_sample_jsonl

    chat = write_sample_jsonl(server.local / "corpus" / "chat.jsonl")
    job, seen = run_to_the_end(client, simplismart_job(server, server.key("acme"), chat, container="jsonl",
                                                       fmt="instruction"))
    assert_failed_before_queue(client, job, seen, "Example 1: this row is in 'openai' format ('messages'), not in "
                               "the 'instruction' format the data was declared with",
                               param="dataset_details.dataset_path")
    job, seen = run_to_the_end(client, simplismart_job(server, server.key("acme"), chat, container="jsonl",
                                                       template="vicuna"))
    assert_failed_before_queue(client, job, seen, "unknown chat template 'vicuna'", param="template")
