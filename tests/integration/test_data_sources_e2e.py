"""Jobs that train from remote data on a real server: an s3:// dataset on moto's server (signatures and IAM
checked) read with a secret stored by the CLI, and a hub-style dataset directory named by an hf:// URI; wrong
credentials fail naming the field; no secret value is written anywhere in clear."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.api.test_simplismart_api import configs
from tests.conftest import Server
from tests.unit.test_data_sources import moto_s3
from tuneyard.demo.tiny import sample_rows, write_sample_jsonl

pytestmark = pytest.mark.slow
BUCKET = "training-dev-datasets"
WRONG = "Wr0ng-secret-value-Hq2xYz"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    data = write_sample_jsonl(tmp_path_factory.mktemp("s3data") / "chat.jsonl", repeat=2).read_bytes()
    with moto_s3({"ds/chat.jsonl": data}, bucket=BUCKET) as m:
        yield {**m, "data": data}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir, moto):
    s = Server(tmp_path_factory.mktemp("src-home"), {"TUNEYARD_S3_ENDPOINT_URL": moto["url"]})
    shutil.copytree(tiny_model_dir, s.local / "tiny-llama")
    s.model_dir = str(s.local / "tiny-llama")
    s.data = ""
    s.token = s.key("acme")
    yield s
    s.stop()


def _secret(srv, name: str, value: dict) -> None:
    """Store a secret with the CLI, the value on stdin (not on a command line other users can read)."""
    r = subprocess.run([sys.executable, "-m", "tuneyard.cli", "secrets", "create", "--org", "acme", "--name", name,
                        "--type", "aws", "--value-file", "-"], input=json.dumps(value), env=srv.env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert all(v not in r.stdout + r.stderr for v in value.values() if v != "us-west-2")


def _submit_simplismart(srv, dataset_details: dict) -> str:
    cfg = configs(srv)
    cfg["dataset_details"] = {"dataset_name": "ds", "dataset_type": None, "dataset_format": None,
                              "ownership": "private", **dataset_details}
    cfg["dataset_config"]["split"]["ratios"] = [1.0, 0.0]
    cfg["train_config"]["hyperparameters"].update(num_epochs=2, per_device_train_batch_size=4, save_steps=None,
                                                  eval_steps=None, gradient_checkpointing=False,
                                                  dataloader_num_workers=0)
    form = {"org": "acme", "experiment_name": "remote", **{k: json.dumps(v) for k, v in cfg.items()}}
    r = httpx.post(f"{srv.base_url}/job/", data=form, headers={"Authorization": f"Bearer {srv.token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def _wait(srv, rid: str) -> dict:
    deadline = time.time() + 300
    while True:
        rec = httpx.get(f"{srv.base_url}/job/get/", params={"org_id": "acme", "request_id": rid},
                        headers={"Authorization": f"Bearer {srv.token}"}, timeout=30).json()
        if rec["status"] in ("COMPLETED", "FAILED", "CANCELED"):
            return rec
        assert time.time() < deadline, rec
        time.sleep(0.5)


def _nowhere_in_clear(srv, *values: str) -> None:
    """None of ``values`` in any file under the server's home: job directories, logs, database, server log."""
    for path in srv.home.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            body = path.read_bytes()
            for v in values:
                assert v.encode() not in body, f"a secret value is in {path}"


def test_s3_dataset_with_a_stored_secret_trains(srv, moto):
    _secret(srv, "aws-dev", moto["reader"])
    rid = _submit_simplismart(srv, {"dataset_path": f"s3://{BUCKET}/ds/chat.jsonl", "source_type": "s3",
                                    "secret_id": "aws-dev", "region": "us-west-2"})
    rec = _wait(srv, rid)
    assert rec["status"] == "COMPLETED", rec["error_message"]
    assert rec["dataset_details"]["source_type"] == "s3" and rec["dataset_details"]["secret_id"] == "aws-dev"
    raw = srv.home / "jobs" / "acme" / rid / "data" / "raw" / "dataset_details_dataset_path.jsonl"
    assert raw.read_bytes() == moto["data"]
    _nowhere_in_clear(srv, moto["reader"]["secret_access_key"], moto["reader"]["access_key_id"])
    _not_in_responses(srv, rid, moto["reader"]["secret_access_key"], moto["reader"]["access_key_id"])


def _not_in_responses(srv, rid: str, *values: str) -> None:
    """None of ``values`` in what any API answers about the job, its events, metrics, secrets or the audit log."""
    h = {"Authorization": f"Bearer {srv.token}"}
    paths = [("/job/get/", {"org_id": "acme", "request_id": rid}), ("/job/metrics/", {"org_id": "acme",
             "request_id": rid}), ("/job/list/", {"org_id": "acme"}), (f"/v1/fine_tuning/jobs/{rid}", None),
             (f"/v1/fine_tuning/jobs/{rid}/events", {"limit": 1000}), (f"/v1/fine_tuning/jobs/{rid}/checkpoints", None),
             ("/v1/secrets", None), ("/v1/audit", {"limit": 1000}), ("/v1/fine_tuning/jobs", None)]
    for path, params in paths:
        r = httpx.get(f"{srv.base_url}{path}", params=params, headers=h, timeout=30)
        assert r.status_code == 200, (path, r.status_code, r.text)
        assert all(v not in r.text for v in values), f"a secret value is in the answer to {path}"


def test_hf_uri_of_a_local_dataset_directory_trains(srv):
    """Submitted through the service layer, as a dialect would: TrainingSpec + JobService.submit."""
    import datasets

    from tuneyard.domain.spec import TrainingSpec
    from tuneyard.service import Services
    from tuneyard.service.auth import Principal
    from tuneyard.service.jobs import Submission
    from tuneyard.settings import Settings

    saved = srv.local / "hub-style"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(sample_rows() * 2),
                          "test": datasets.Dataset.from_list(sample_rows()[:4])}).save_to_disk(str(saved))
    services = Services.build(Settings(home=srv.home, local_roots=str(srv.local)))
    who = Principal(org_id="acme", key_id="test", role="admin")
    try:
        spec = TrainingSpec.model_validate({
            "model": {"name": srv.model_dir, "torch_dtype": "float32"},
            "data": {"train": {"path": f"hf://{saved}"},
                     "validation": {"path": f"hf://{saved}?split=test", "param": "validation_file"}},
            "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0},
            "resources": {"device": "cpu"}})
        job = services.jobs.submit(who, Submission(spec=spec, dialect="test"))
        deadline = time.time() + 300
        while (job := services.jobs.get(who, job.id)).status not in ("succeeded", "failed", "cancelled"):
            assert time.time() < deadline, job.status
            time.sleep(0.5)
        assert job.status == "succeeded", job.error
        prepared = json.loads((Path(job.output_dir) / "prepared.json").read_text())
        assert (prepared["n_train"], prepared["n_validation"]) == (24, 4)
        assert (Path(job.output_dir) / "data" / "raw" / "validation_file.parquet").exists()
    finally:
        services.store.dispose()


def test_wrong_credentials_fail_naming_the_field(srv, moto):
    _secret(srv, "aws-wrong", {**moto["reader"], "secret_access_key": WRONG})
    rid = _submit_simplismart(srv, {"dataset_path": f"s3://{BUCKET}/ds/chat.jsonl", "source_type": "s3",
                                    "secret_id": "aws-wrong", "region": "us-west-2"})
    rec = _wait(srv, rid)
    assert rec["status"] == "FAILED"
    assert f"s3://{BUCKET}/ds/chat.jsonl" in rec["error_message"]
    assert "secret access key does not match" in rec["error_message"]
    oa = srv.openai(srv.token).fine_tuning.jobs.retrieve(rid)
    assert oa.error.param == "dataset_details.dataset_path"
    _nowhere_in_clear(srv, WRONG, moto["reader"]["secret_access_key"])


def test_a_trickling_https_source_fails_the_job_at_the_download_deadline(tmp_path, tiny_model_dir):
    """A server sending one byte every 2 s kept its job in validating_files for ever; now the job fails at
    TUNEYARD_DOWNLOAD_TIMEOUT_SECONDS, naming the source."""
    import http.server
    import threading

    from llama_stack_client import LlamaStackClient

    from tests.api.test_llamastack_api import request

    class Trickle(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"{")
                    self.wfile.flush()
                    time.sleep(2)
            except OSError:
                pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/train.jsonl"
    s = Server(tmp_path / "home", {"TUNEYARD_DOWNLOAD_TIMEOUT_SECONDS": "3"})
    try:
        shutil.copytree(tiny_model_dir, s.local / "tiny-llama")
        s.model_dir = str(s.local / "tiny-llama")
        key = s.key("acme")
        ls = LlamaStackClient(base_url=s.base_url, api_key=key, max_retries=0)
        ls.datasets.register(purpose="post-training/messages", source={"type": "uri", "uri": url},
                             dataset_id="capitals")
        ls.post_training.supervised_fine_tune(**request(s, job_uuid="trickle"))
        started = time.monotonic()
        while (st := ls.post_training.job.status(job_uuid="trickle")).status not in ("completed", "failed",
                                                                                     "cancelled"):
            assert time.monotonic() - started < 120, st
            time.sleep(0.5)
        assert st.status == "failed"
        job = s.openai(key).fine_tuning.jobs.list().data[0]
        assert job.error.param == "training_config.data_config.dataset_id", job.error
        assert f"{url} did not finish downloading within the 3 second deadline" in job.error.message
        assert "TUNEYARD_DOWNLOAD_TIMEOUT_SECONDS" in job.error.message
    finally:
        s.stop()
        httpd.shutdown()
