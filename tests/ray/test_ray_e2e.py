"""The Ray launcher end to end: the seed's Simplismart call with node_count 2 trains across the two nodes of a
real Ray cluster, its data and every file of the job passing through moto's S3; a lost node is survived by a
resume from the newest checkpoint; what the cluster can never hold is a 400 naming the field."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import httpx
import pytest

from tests.api.test_simplismart_api import configs
from tests.conftest import Server
from tests.trainer.trainer_helpers import run_trainer, train_losses
from tests.unit.test_data_sources import moto_s3
from tuneyard.demo.tiny import write_sample_jsonl
from tuneyard.jobdir import JobDir

pytestmark = pytest.mark.slow
BUCKET = "tuneyard-shared"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    data = write_sample_jsonl(tmp_path_factory.mktemp("s3data") / "chat.jsonl", repeat=2).read_bytes()
    with moto_s3({"ds/chat.jsonl": data}, bucket=BUCKET) as m:
        yield m


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir, ray_cluster, s3):
    s = Server(tmp_path_factory.mktemp("ray-home"), {
        "TUNEYARD_LAUNCHER": "ray", "TUNEYARD_RAY_ADDRESS": ray_cluster.address,
        "TUNEYARD_STORAGE_URL": f"s3://{BUCKET}/tuneyard", "TUNEYARD_STORAGE_CREDENTIALS": json.dumps(s3["writer"]),
        "TUNEYARD_S3_ENDPOINT_URL": s3["url"], "TUNEYARD_RAY_PLACEMENT_WAIT_SECONDS": "1",
        # A stopped server leaves its Ray jobs running, for the next one to adopt.
        "TUNEYARD_DRAIN_SECONDS": "0"})
    shutil.copytree(tiny_model_dir, s.local / "tiny-llama")
    s.model_dir = str(s.local / "tiny-llama")
    s.data = ""
    s.token = s.key("acme")
    r = subprocess.run([*_cli(), "secrets", "create", "--org", "acme", "--name", "aws-dev", "--type", "aws",
                        "--value-file", "-"], input=json.dumps(s3["reader"]), env=s.env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    yield s
    s.stop()


def _cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "tuneyard.cli"]


def _seed_call(srv, *, node_count: int = 2, gpu_count: int = 1, epochs: int = 2, save_steps: int | None = None
               ) -> httpx.Response:
    """The seed page's multipart call (by curl), its data on S3, across ``node_count`` nodes."""
    cfg = configs(srv)
    cfg["dataset_details"] = {"dataset_name": "ds", "dataset_type": None, "dataset_format": None,
                              "ownership": "private", "dataset_path": f"s3://{BUCKET}/ds/chat.jsonl",
                              "source_type": "s3", "secret_id": "aws-dev", "region": "us-west-2"}
    cfg["dataset_config"]["split"]["ratios"] = [1.0, 0.0]
    cfg["dataset_config"]["preprocessing"]["prompt"]["max_length"] = 256
    cfg["train_config"]["hyperparameters"].update(
        num_epochs=epochs, per_device_train_batch_size=2, save_steps=save_steps, eval_steps=None, logging_steps=1,
        gradient_checkpointing=False, dataloader_num_workers=0, learning_rate=0.005, save_total_limit=2)
    cfg["train_config"]["adapter_config"]["dropout"] = 0.0
    cfg["infra_config"].update(node_count=node_count, gpu_count=gpu_count, gpu_type="cpu")
    args = ["curl", "-sS", "--request", "POST", "--url", f"{srv.base_url}/job/", "--write-out", "\n%{http_code}",
            "--header", f"Authorization: Bearer {srv.token}", "--form", "org=acme",
            "--form", "experiment_name=launch-simplismart-causal_lm-lora"]
    for k, v in cfg.items():
        args += ["--form", f"{k}={json.dumps(v)}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    body, _, code = out.rpartition("\n")
    return httpx.Response(int(code), content=body.encode())


def _get(srv, path: str, **params) -> dict:
    r = httpx.get(f"{srv.base_url}{path}", params={"org_id": "acme", **params},
                  headers={"Authorization": f"Bearer {srv.token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _wait(srv, rid: str, until=lambda rec: rec["status"] in ("COMPLETED", "FAILED", "CANCELED"),
          timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while not until(rec := _get(srv, "/job/get/", request_id=rid)):
        assert time.time() < deadline, rec
        time.sleep(0.5)
    return rec


def _events(srv, rid: str) -> list[dict]:
    r = httpx.get(f"{srv.base_url}/v1/fine_tuning/jobs/{rid}/events", params={"limit": 1000},
                  headers={"Authorization": f"Bearer {srv.token}"}, timeout=30)
    return list(reversed(r.json()["data"]))


def _s3_keys(s3, prefix: str) -> list[str]:
    import boto3

    c = boto3.client("s3", endpoint_url=s3["url"], region_name="us-west-2",
                     aws_access_key_id=s3["writer"]["access_key_id"],
                     aws_secret_access_key=s3["writer"]["secret_access_key"])
    return [o["Key"] for p in c.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in p.get("Contents", [])]


def _one_process_losses(srv, rid: str, tmp_path) -> list[tuple[int, float]]:
    """The same job run by one trainer process at the same global batch (2 micro-batches accumulated)."""
    src = JobDir(srv.home / "jobs" / "acme" / rid)
    ref = JobDir(tmp_path / "ftjob-one").create()
    spec = json.loads(src.resolved_spec.read_text())
    spec["resources"].update(node_count=1, nproc_per_node=1)
    hp = spec["hyperparameters"]
    hp["gradient_accumulation_steps"] *= 2
    ref.resolved_spec.write_text(json.dumps(spec))
    shutil.copy(src.prepared, ref.prepared)
    shutil.copytree(src.data / "train", ref.data / "train")
    assert run_trainer(ref, timeout=300).returncode == 0
    return train_losses(ref)


def test_seed_call_trains_across_two_nodes_like_one_process(srv, s3, tmp_path):
    r = _seed_call(srv)
    assert r.status_code == 200, r.text
    rid = r.json()["request_id"]
    rec = _wait(srv, rid)
    assert rec["status"] == "COMPLETED", rec["error_message"]
    jd = JobDir(srv.home / "jobs" / "acme" / rid)
    msgs = [e["message"] for e in _events(srv, rid)]
    assert any(m.endswith("2 process(es), cpu") for m in msgs), msgs
    # Rank 0 and rank 1 ran on different nodes: each rank's actor lives on one node of the placement group.
    keys = _s3_keys(s3, f"tuneyard/jobs/acme/{rid}/")
    assert any("/output/adapter_model.safetensors" in k for k in keys) and any(k.endswith("/result.json")
                                                                              for k in keys)
    assert (jd.output / "adapter_model.safetensors").is_file()
    two = train_losses(jd)
    one = _one_process_losses(srv, rid, tmp_path)
    assert [s for s, _ in one] == [s for s, _ in two]
    assert max(abs(a - b) for (_, a), (_, b) in zip(one, two, strict=True)) < 1e-4


def test_more_than_the_cluster_has_is_refused_naming_the_field(srv):
    r = _seed_call(srv, node_count=3)
    assert r.status_code == 400 and "node_count" in r.text, r.text
    r = _seed_call(srv, node_count=1, gpu_count=2)
    assert r.status_code == 400 and "gpu_count" in r.text, r.text


def test_a_lost_node_is_survived_by_a_resume_and_a_restarted_worker_adopts_the_job(srv, ray_cluster):
    r = _seed_call(srv, epochs=8, save_steps=4)
    assert r.status_code == 200, r.text
    rid = r.json()["request_id"]
    jd = JobDir(srv.home / "jobs" / "acme" / rid)

    def checkpointed(rec: dict) -> bool:
        assert rec["status"] not in ("COMPLETED", "FAILED", "CANCELED"), rec
        return jd.checkpoints.is_dir() and any((d / "tuneyard_checkpoint.json").is_file()
                                               for d in jd.checkpoints.glob("checkpoint-*"))

    _wait(srv, rid, checkpointed)
    ray_cluster.workers.pop(0).kill()  # the second node's Ray processes, and the rank on it, gone at once
    ray_cluster.add_node()  # a new node, as an autoscaler would bring

    def resumed(rec: dict) -> bool:
        assert rec["status"] not in ("COMPLETED", "FAILED", "CANCELED"), rec
        return any("restarted (attempt 2)" in e["message"] for e in _events(srv, rid))

    _wait(srv, rid, resumed)
    # The tuneyard worker restarts mid-job: the new one finds the ranks by name and goes on reading them.
    srv.stop()
    again = Server(srv.home, {k: v for k, v in srv.env.items() if k.startswith("TUNEYARD_")}, port=srv.port)
    srv.proc, srv.log = again.proc, again.log
    rec = _wait(srv, rid)
    assert rec["status"] == "COMPLETED", rec["error_message"]
    msgs = [e["message"] for e in _events(srv, rid)]
    assert any("retrying from the latest checkpoint" in m for m in msgs), msgs
    assert sum("restarted (attempt" in m for m in msgs) == 1, msgs  # adopted, not started a third time
    steps = [m["step"] for m in _get(srv, "/job/metrics/", request_id=rid)["metrics"] if m["key"] == "train_loss"]
    assert steps == sorted(set(steps)) and steps[-1] == max(steps), steps  # each step reported once
