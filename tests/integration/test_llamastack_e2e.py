"""End to end with llama-stack-client 0.2.12: register rows, supervised-fine-tune, watch status, artifacts, cancel."""

from __future__ import annotations

import time

import pytest
from llama_stack_client import LlamaStackClient

from tests.api.test_llamastack_api import ROWS

pytestmark = pytest.mark.slow


def _sft(server, job_uuid: str, **training) -> dict:
    return {
        "job_uuid": job_uuid, "model": server.model_dir, "checkpoint_dir": str(server.local),
        "algorithm_config": {"type": "LoRA", "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
                             "apply_lora_to_mlp": True, "apply_lora_to_output": False, "rank": 16, "alpha": 32},
        "training_config": {"n_epochs": training.get("n_epochs", 4), "max_steps_per_epoch": 1000,
                            "gradient_accumulation_steps": 1, "max_validation_steps": 2, "dtype": "fp32",
                            "data_config": {"dataset_id": "capitals", "batch_size": 2, "shuffle": True,
                                            "data_format": "dialog", "validation_dataset_id": "capitals-valid"},
                            "optimizer_config": {"optimizer_type": "adamw", "lr": 5e-3, "weight_decay": 0.0,
                                                 "num_warmup_steps": 0}},
        "hyperparam_search_config": {}, "logger_config": {},
    }


def test_llama_stack_client_drives_a_job(server):
    client = LlamaStackClient(base_url=server.base_url, api_key=server.key("acme"), max_retries=0)
    client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": ROWS * 2},
                             dataset_id="capitals")
    client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": ROWS[:4]},
                             dataset_id="capitals-valid")
    client.post_training.supervised_fine_tune(**_sft(server, "ls-e2e"))
    seen_running_checkpoints = False
    statuses = set()
    deadline = time.time() + 300
    while True:
        st = client.post_training.job.status(job_uuid="ls-e2e")
        statuses.add(st.status)
        if st.status == "in_progress" and st.checkpoints:
            seen_running_checkpoints = True
            ck = st.checkpoints[0]
            assert ck["training_metrics"]["train_loss"] is not None and ck["epoch"] >= 1
        if st.status in ("completed", "failed", "cancelled"):
            break
        assert time.time() < deadline, st
        time.sleep(0.3)
    assert st.status == "completed" and {"scheduled", "in_progress"} <= statuses
    assert seen_running_checkpoints, "no checkpoint was listed while the job ran"
    assert st.started_at and st.completed_at and st.resources_allocated["device"] == "cpu"
    epochs = [c["epoch"] for c in st.checkpoints]
    assert epochs == [1, 2, 3, 4]  # 24 rows, 2 a step: one checkpoint an epoch
    m = st.checkpoints[-1]["training_metrics"]
    assert m["validation_loss"] is not None and abs(m["perplexity"] - 2.718281828 ** m["validation_loss"]) < 1e-3
    assert st.checkpoints[-1]["training_metrics"]["train_loss"] < st.checkpoints[0]["training_metrics"]["train_loss"]

    art = client.post_training.job.artifacts(job_uuid="ls-e2e")
    final = art.checkpoints[-1]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(server.model_dir), final["path"])
    # checkpoint_dir received a copy of the adapter under the job_uuid.
    assert (server.local / "ls-e2e" / "adapter_model.safetensors").exists()

    client.post_training.supervised_fine_tune(**_sft(server, "ls-cancel", n_epochs=100))
    while client.post_training.job.status(job_uuid="ls-cancel").status != "in_progress":
        assert time.time() < deadline
        time.sleep(0.3)
    t0 = time.time()
    client.post_training.job.cancel(job_uuid="ls-cancel")
    assert client.post_training.job.status(job_uuid="ls-cancel").status == "cancelled"
    from tuneyard.scheduler.local import job_processes

    job_dirs = list((server.home / "jobs" / "acme").iterdir())
    while any(job_processes(d) for d in job_dirs) and time.time() - t0 < 10:
        time.sleep(0.2)
    assert not any(job_processes(d) for d in job_dirs), "trainer still running 10 s after cancel"
