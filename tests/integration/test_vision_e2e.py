"""End to end in the Simplismart dialect: a vision-language job on ms-swift-style image rows (``<image>`` tags and
an ``images`` list of paths beside the dataset file) trains to COMPLETED, and the fine-tuned model names the colour
of held-out images."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.api.test_simplismart_api import configs
from tests.vision import QUESTION, colour_accuracy, colour_rows

pytestmark = pytest.mark.slow


def test_simplismart_vlm_job_learns_the_colours(server, tiny_qwen2_vl_dir, tmp_path):
    model = server.local / "tiny-qwen2-vl"
    shutil.copytree(tiny_qwen2_vl_dir, model)
    data = server.local / "vlm"
    rows = colour_rows(data, 4, seed=1)
    with (data / "train.jsonl").open("w") as f:
        for row in rows:
            colour = row["colour"]
            f.write(json.dumps({"messages": [{"role": "user", "content": f"<image>{QUESTION}"},
                                             {"role": "assistant", "content": f"{colour}."}],
                                "images": [row["messages"][0]["content"][0]["image"]]}) + "\n")
    token = server.key("acme")
    cfg = configs(server)
    cfg["model_details"].update(base_model=str(model), model_type="vlm")
    cfg["dataset_details"].update(dataset_path=str(data / "train.jsonl"), dataset_format=None)
    cfg["dataset_config"]["preprocessing"]["lazy_tokenize"] = False
    cfg["dataset_config"]["split"]["ratios"] = [1.0, 0.0]
    hp = cfg["train_config"]["hyperparameters"]
    hp.update(num_epochs=4, per_device_train_batch_size=4, gradient_checkpointing=False, save_steps=None,
              eval_steps=None, logging_steps=1, learning_rate=0.01, dataloader_num_workers=0)
    cfg["train_config"].update(freeze_aligner=False, adapter_config={"r": 8, "alpha": 16, "dropout": 0.0,
                                                                      "targets": ["all-linear"]})
    form = {"org": "acme", "experiment_name": "colours", **{k: json.dumps(v) for k, v in cfg.items()}}
    h = {"Authorization": f"Bearer {token}"}
    r = httpx.post(f"{server.base_url}/job/", data=form, headers=h, timeout=30)
    assert r.status_code == 200, r.text
    rid = r.json()["request_id"]
    deadline = time.time() + 900
    while True:
        rec = httpx.get(f"{server.base_url}/job/get/", params={"org_id": "acme", "request_id": rid}, headers=h,
                        timeout=30).json()
        if rec["status"] in ("COMPLETED", "FAILED", "CANCELED"):
            break
        assert time.time() < deadline, rec
        time.sleep(1)
    assert rec["status"] == "COMPLETED", rec["error_message"]
    assert rec["model_details"]["model_type"] == "vlm" and rec["train_config"]["freeze_aligner"] is False
    held = colour_rows(tmp_path, 4, seed=2)
    accuracy = colour_accuracy(model, Path(rec["output_model_path"]), held, tmp_path)
    assert accuracy >= 0.75, accuracy
