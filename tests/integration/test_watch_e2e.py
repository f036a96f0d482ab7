"""Watching jobs through a real server with two HTTP processes and its worker: GET /metrics during and after one
trained job (tiny model, a few steps)."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server
from tuneyard.demo.tiny import write_sample_jsonl

ORG = "watch"
# 12 demo rows, batch 4, 2 epochs: 6 steps.
HYPER = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir):
    s = Server(tmp_path_factory.mktemp("watch-home"), {"TUNEYARD_API_WORKERS": "2",
                                                       "TUNEYARD_RATE_LIMIT_PER_SECOND": "0"})
    shutil.copytree(tiny_model_dir, s.local / "tiny-llama")
    s.client = s.openai(s.key(ORG))
    yield s
    s.stop()


def scrape(srv, **headers) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one GET /metrics."""
    r = httpx.get(f"{srv.base_url}/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_count_a_job_while_it_runs_and_after(srv, tmp_path):
    client = srv.client
    f = client.files.create(file=write_sample_jsonl(tmp_path / "t.jsonl").open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=str(srv.local / "tiny-llama"), training_file=f.id,
                                         method={"type": "supervised", "supervised": {"hyperparameters": HYPER}})
    during = None
    deadline = time.time() + 300
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, job.status
        if job.status == "running" and during is None:
            during = scrape(srv)
        time.sleep(0.2)
    assert job.status == "succeeded", job.error
    # The job might have run between two polls; then "during" saw it queued or done, which proves less.
    if during is not None and value(during, "tuneyard_running_trainers") == 1:
        assert value(during, "tuneyard_jobs", status="running", org=ORG) == 1
    after = scrape(srv)
    assert value(after, "tuneyard_jobs", status="succeeded", org=ORG) == 1
    assert value(after, "tuneyard_jobs", status="running", org=ORG) == 0
    assert value(after, "tuneyard_running_trainers") == 0
    assert value(after, "tuneyard_trained_tokens_total", org=ORG) == job.trained_tokens > 0
    assert value(after, "tuneyard_job_run_seconds_count") == 1
    assert value(after, "tuneyard_job_queue_wait_seconds_count") == 1

    # HTTP figures are whole: requests spread over both processes (new connections) are all counted in one scrape.
    before = value(scrape(srv), "tuneyard_http_requests_total", route="/v1/models", method="GET", status="200") or 0
    key = client.api_key

    def get(_: int) -> int:
        return httpx.get(f"{srv.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(get, range(40))) == {200}
    for _ in range(4):  # whichever process answers the scrape
        assert value(scrape(srv), "tuneyard_http_requests_total", route="/v1/models", method="GET",
                     status="200") == before + 40
    latency = scrape(srv)
    assert value(latency, "tuneyard_http_request_duration_seconds_count", route="/v1/models", method="GET") >= 40


def test_metrics_need_the_token_when_one_is_set(tmp_path):
    s = Server(tmp_path / "home", {"TUNEYARD_RUN_WORKER": "false", "TUNEYARD_METRICS_TOKEN": "scrape-me"})
    try:
        refused = httpx.get(f"{s.base_url}/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_metrics_token"
        assert httpx.get(f"{s.base_url}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        samples = scrape(s, Authorization="Bearer scrape-me")
        assert value(samples, "tuneyard_running_trainers") == 0
    finally:
        s.stop()
