"""End to end in the Simplismart dialect: the seed's multipart call (by curl) trains to COMPLETED."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest

from tests.api.test_simplismart_api import configs
from tuneyard.demo.tiny import write_sample_jsonl

pytestmark = pytest.mark.slow


def test_seed_call_trains_to_completed_with_progress_metrics_and_adapter(server, tmp_path):
    server.data = str(write_sample_jsonl(server.local / "ss" / "train.jsonl", repeat=2))
    token = server.key("acme")
    cfg = configs(server)
    cfg["dataset_details"]["dataset_format"] = None
    cfg["dataset_config"]["preprocessing"]["prompt"]["max_length"] = 256
    cfg["dataset_config"]["preprocessing"]["lazy_tokenize"] = True  # as the seed page sends it
    cfg["dataset_config"]["split"]["ratios"] = [0.75, 0.25]
    hp = cfg["train_config"]["hyperparameters"]
    hp.update(num_epochs=6, per_device_train_batch_size=2, per_device_eval_batch_size=4, gradient_checkpointing=False,
              save_steps=20, eval_steps=20, logging_steps=2, learning_rate=0.005, dataloader_num_workers=0)
    cfg["train_config"]["adapter_config"] = {"r": 16, "alpha": 32, "dropout": 0.0, "targets": ["all-linear"]}
    args = ["curl", "-sS", "--request", "POST", "--url", f"{server.base_url}/job/",
            "--header", f"Authorization: Bearer {token}", "--header", "Content-Type: multipart/form-data",
            "--form", "org=acme", "--form", "experiment_name=launch-simplismart-causal_lm-lora"]
    for k, v in cfg.items():
        args += ["--form", f"{k}={json.dumps(v, indent=2)}\n"]
    out = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
    rid = out["request_id"]

    h = {"Authorization": f"Bearer {token}"}
    seen_progress, statuses = [], set()
    deadline = time.time() + 300
    while True:
        rec = httpx.get(f"{server.base_url}/job/get/", params={"org_id": "acme", "request_id": rid}, headers=h).json()
        statuses.add(rec["status"])
        seen_progress.append(rec["progress"])
        if rec["status"] in ("COMPLETED", "FAILED", "CANCELED"):
            break
        assert time.time() < deadline, rec
        time.sleep(0.3)
    assert rec["status"] == "COMPLETED", rec["error_message"]
    assert "RUNNING" in statuses and seen_progress == sorted(seen_progress) and rec["progress"] == 100
    assert rec["started_at"] and rec["completed_at"] >= rec["started_at"]
    # 24 rows, 25% held out: 18 for training, 9 steps an epoch at 2 per step, 6 epochs.
    assert rec["train_config"]["hyperparameters"]["learning_rate"] == 0.005

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(server.model_dir),
                                        rec["output_model_path"])
    assert adapter.peft_config["default"].r == 16

    metrics = httpx.get(f"{server.base_url}/job/metrics/", params={"org_id": "acme", "request_id": rid},
                        headers=h).json()["metrics"]
    by_key: dict[str, list] = {}
    for m in metrics:
        by_key.setdefault(m["key"], []).append(m)
    assert {"train_loss", "eval_loss", "learning_rate"} <= set(by_key)
    train = by_key["train_loss"]
    assert [m["step"] for m in train] == sorted(m["step"] for m in train) and train[-1]["step"] == 54
    assert train[-1]["value"] < train[0]["value"]
    assert all(m["epoch"] is not None and m["timestamp"].endswith("Z") for m in metrics)
