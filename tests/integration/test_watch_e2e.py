"""Watching jobs through a real server with two HTTP processes and its worker: GET /metrics during and after one
trained job (tiny model, a few steps), that job's signed fine_tuning.job.succeeded webhook, and a webhook delivery
retried across a receiver that is down and a server restart."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server
from tuneyard.demo.tiny import write_sample_jsonl

ORG = "watch"
WANDB_KEY = "wandb-key-from-the-org-secret-5d1e"
# 12 demo rows, batch 4, 2 epochs: 6 steps.
HYPER = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir):
    # W&B offline: its run files stay in the job directory, where the test reads them.
    s = Server(tmp_path_factory.mktemp("watch-home"), {"TUNEYARD_API_WORKERS": "2",
                                                       "TUNEYARD_RATE_LIMIT_PER_SECOND": "0", "WANDB_MODE": "offline"})
    shutil.copytree(tiny_model_dir, s.local / "tiny-llama")
    s.client = s.openai(s.key(ORG))
    made = httpx.post(f"{s.base_url}/v1/secrets", headers={"Authorization": f"Bearer {s.client.api_key}"},
                      json={"name": "wb", "type": "wandb", "value": {"api_key": WANDB_KEY}})
    assert made.status_code == 200, made.text
    yield s
    s.stop()


class Receiver:
    """A webhook receiver on loopback: answers 500 to its first ``fail_first`` requests, then 200."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[tuple[int, dict, bytes]] = []
        self.fail_first = fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                status = 500 if len(outer.calls) < outer.fail_first else 200
                outer.calls.append((status, dict(self.headers.items()), body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while len(self.calls) < n:
            assert time.time() < deadline, f"{len(self.calls)} webhook requests, waiting for {n}"
            time.sleep(0.1)

    def close(self) -> None:
        self.server.shutdown()


def register(srv, key: str, **body) -> httpx.Response:
    return httpx.post(f"{srv.base_url}/v1/webhooks", json=body, headers={"Authorization": f"Bearer {key}"})


@pytest.fixture(scope="module")
def hook(srv):
    receiver = Receiver()
    r = register(srv, srv.client.api_key, url=receiver.url)
    assert r.status_code == 200, r.text
    receiver.secret = r.json()["secret"]
    yield receiver
    receiver.close()


def unwrap(call: tuple[int, dict, bytes], secret: str):
    """The event, verified by the openai SDK exactly as a receiver would."""
    from openai import OpenAI

    _, headers, body = call
    return OpenAI(api_key="unused").webhooks.unwrap(body.decode(), headers, secret=secret)


def scrape(srv, **headers) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one GET /metrics."""
    r = httpx.get(f"{srv.base_url}/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_count_a_job_while_it_runs_and_after(srv, hook, tmp_path):
    client = srv.client
    f = client.files.create(file=write_sample_jsonl(tmp_path / "t.jsonl").open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=str(srv.local / "tiny-llama"), training_file=f.id,
                                         method={"type": "supervised", "supervised": {"hyperparameters": HYPER}},
                                         integrations=[{"type": "wandb", "wandb": {"project": "watch"}}])
    during = None
    deadline = time.time() + 300
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, job.status
        if job.status == "running" and during is None:
            during = scrape(srv)
        time.sleep(0.2)
    assert job.status == "succeeded", job.error
    srv.job_id = job.id
    # Scraped just after the API said running: counted as running (or, had it ended in between, as succeeded).
    assert during is not None, "the job was never seen running"
    assert (value(during, "tuneyard_jobs", status="running", org=ORG),
            value(during, "tuneyard_jobs", status="succeeded", org=ORG)) in ((1, 0), (0, 1)), during
    after = scrape(srv)
    assert value(after, "tuneyard_jobs", status="succeeded", org=ORG) == 1
    assert value(after, "tuneyard_jobs", status="running", org=ORG) == 0
    assert value(after, "tuneyard_running_trainers") == 0
    assert value(after, "tuneyard_trained_tokens_total", org=ORG) == job.trained_tokens > 0
    assert value(after, "tuneyard_job_run_seconds_count") == 1
    assert value(after, "tuneyard_job_queue_wait_seconds_count") == 1

    # The W&B run: the job's id, the organisation's key handed to the trainer by the worker, never written down.
    root = srv.home / "jobs" / ORG / job.id
    runs = list((root / "tracking" / "wandb" / "wandb").glob(f"offline-run-*-{job.id}/run-{job.id}.wandb"))
    assert len(runs) == 1, list(root.rglob("*.wandb"))
    for path in [*root.rglob("*"), *srv.home.glob("*.log")]:
        if path.is_file():
            assert WANDB_KEY.encode() not in path.read_bytes(), path

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


def test_the_job_that_succeeded_is_announced_with_a_signed_webhook(srv, hook):
    hook.wait(1)
    time.sleep(1)  # nothing else follows
    assert len(hook.calls) == 1
    event = unwrap(hook.calls[0], hook.secret)
    assert event.type == "fine_tuning.job.succeeded" and event.data.id == srv.job_id and event.object == "event"
    with pytest.raises(Exception, match="(?i)signature"):
        unwrap(hook.calls[0], "whsec_" + "A" * 44)
    listed = httpx.get(f"{srv.base_url}/v1/webhooks", headers={"Authorization": f"Bearer {srv.client.api_key}"})
    assert listed.status_code == 200 and "secret" not in listed.json()["data"][0], listed.text


def test_a_delivery_survives_a_receiver_that_is_down_and_a_server_restart(tmp_path, tiny_model_dir):
    env = {"TUNEYARD_WEBHOOK_RETRY_SECONDS": "3", "TUNEYARD_RATE_LIMIT_PER_SECOND": "0"}
    home = tmp_path / "home"
    s = Server(home, env)
    shutil.copytree(tiny_model_dir, s.local / "tiny-llama")
    receiver = Receiver(fail_first=2)
    try:
        key = s.key("hooks")
        # Refused, every problem at once, nothing stored: a private address and an unknown event.
        bad = register(s, key, url="http://10.1.2.3/hook", events=["fine_tuning.job.exploded"])
        assert bad.status_code == 400, bad.text
        assert "private" in bad.json()["error"]["message"] and "exploded" in bad.json()["error"]["message"]
        made = register(s, key, url=receiver.url, events=["fine_tuning.job.cancelled"])
        assert made.status_code == 200, made.text
        endpoint, secret = made.json()["id"], made.json()["secret"]
        client = s.openai(key)
        f = client.files.create(file=write_sample_jsonl(tmp_path / "t.jsonl").open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=str(s.local / "tiny-llama"), training_file=f.id)
        client.fine_tuning.jobs.cancel(job.id)
        receiver.wait(1)
        s.stop()
        assert len(receiver.calls) == 1  # the restart comes between the first try and the second
        time.sleep(1)
        s = Server(home, env)
        receiver.wait(3, timeout=60)
        time.sleep(2)
        assert [c[0] for c in receiver.calls] == [500, 500, 200]
        assert len({c[1]["webhook-id"] for c in receiver.calls}) == 1
        event = unwrap(receiver.calls[-1], secret)
        assert event.type == "fine_tuning.job.cancelled" and event.data.id == job.id
        log = httpx.get(f"{s.base_url}/v1/webhooks/{endpoint}/deliveries", headers={"Authorization": f"Bearer {key}"})
        assert log.status_code == 200, log.text
        (entry,) = log.json()["data"]
        assert entry["id"] == receiver.calls[0][1]["webhook-id"] and entry["status"] == "delivered"
        assert entry["attempts"] == 3 and entry["last_status_code"] == 200

        # The CLI sees and removes the same endpoints.
        def cli(*args: str) -> str:
            return subprocess.run([sys.executable, "-m", "tuneyard.cli", "webhooks", *args, "--org", "hooks"],
                                  env=s.env, capture_output=True, text=True, check=True).stdout

        assert cli("list").split("\t")[:2] == [endpoint, receiver.url]
        cli("delete", "--id", endpoint)
        assert cli("list") == ""
    finally:
        receiver.close()
        s.stop()
