"""DPO end to end through the unchanged `openai` SDK: a real server, prepare step and trainer on the tiny model.

The preference set is learnable: every chosen answer has one style ("X, of course."), every rejected one another
of the same length ("X, I think."). Training must raise the reward margin and accuracy, and afterwards the adapter
must give the chosen style a higher log-probability than the rejected one on prompts it never saw, by a margin the
base model does not have.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.preference import CITIES, HELD_OUT, chosen, rejected, write_preference_jsonl

pytestmark = pytest.mark.slow

DPO = {"n_epochs": 6, "batch_size": 4, "learning_rate_multiplier": 80, "beta": 0.1}


def wait_for(client, job_id: str, timeout: float = 600):
    deadline = time.time() + timeout
    job = client.fine_tuning.jobs.retrieve(job_id)
    while job.status not in ("succeeded", "failed", "cancelled") and time.time() < deadline:
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job_id)
    return job


@pytest.fixture(scope="module")
def client(server):
    return server.openai(server.key("acme"))


@pytest.fixture(scope="module")
def dpo_file(client, tmp_path_factory):
    p = write_preference_jsonl(tmp_path_factory.mktemp("dpo") / "prefs.jsonl")
    return client.files.create(file=p.open("rb"), purpose="fine-tune")


@pytest.fixture(scope="module")
def dpo_job(client, server, dpo_file):
    job = client.fine_tuning.jobs.create(model=server.model_dir, training_file=dpo_file.id, seed=3, suffix="dpo",
                                         method={"type": "dpo", "dpo": {"hyperparameters": DPO}})
    job = wait_for(client, job.id)
    assert job.status == "succeeded", job.error
    return job


def _sequence_logp(model, tokenizer, prompt: str, answer: str) -> float:
    import torch

    msgs = [{"role": "user", "content": prompt}]
    p = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
    p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logp[len(p_ids) - 1:].sum())


def test_dpo_learns_the_preferred_style(client, server, dpo_job):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert dpo_job.method.type == "dpo" and dpo_job.method.dpo.hyperparameters.beta == 0.1
    events = [e for e in client.fine_tuning.jobs.list_events(dpo_job.id, limit=1000) if e.type == "metrics"]
    steps = sorted((e.data for e in events if e.data and e.data.get("rewards_margins") is not None),
                   key=lambda d: d["step"])
    assert len(steps) >= 6, steps
    first, last = steps[:2], steps[-2:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "rewards_margins") > mean(first, "rewards_margins") + 0.05, steps
    assert mean(last, "rewards_accuracies") >= 0.75, steps
    assert all(k in last[-1] for k in ("rewards_chosen", "rewards_rejected", "train_loss"))

    cks = list(client.fine_tuning.jobs.checkpoints.list(dpo_job.id))
    assert cks and "rewards_margins" in (cks[0].metrics.model_extra or {}) | cks[0].metrics.model_dump()

    output = Path(server.home) / "jobs" / "acme" / dpo_job.id / "output"
    tokenizer = AutoTokenizer.from_pretrained(server.model_dir)
    base = AutoModelForCausalLM.from_pretrained(server.model_dir, dtype=torch.float32).eval()

    def margins(model) -> list[float]:
        return [_sequence_logp(model, tokenizer, f"What is the capital of {c}?", chosen(city))
                - _sequence_logp(model, tokenizer, f"What is the capital of {c}?", rejected(city))
                for c, city in HELD_OUT]

    before = margins(base)
    tuned = PeftModel.from_pretrained(base, str(output)).eval()
    after = margins(tuned)
    assert all(a > b + 1.0 for a, b in zip(after, before, strict=True)), (before, after)
    assert min(after) > 0, after


def _wait_llamastack(ls, job_uuid: str, timeout: float = 600):
    deadline = time.time() + timeout
    status = ls.post_training.job.status(job_uuid=job_uuid)
    while status.status not in ("completed", "failed", "cancelled") and time.time() < deadline:
        time.sleep(0.5)
        status = ls.post_training.job.status(job_uuid=job_uuid)
    return status


def test_llamastack_preference_optimize_trains(server):
    """The unchanged llama-stack-client 0.2.12: rows registered, then preference_optimize with its own
    algorithm_config fields (reward_scale is beta; reward_clip and gamma at 0)."""
    from llama_stack_client import LlamaStackClient

    ls = LlamaStackClient(base_url=server.base_url, api_key=server.key("acme"), max_retries=0)
    rows = [{"prompt": f"What is the capital of {country}?", "chosen": chosen(city), "rejected": rejected(city)}
            for country, city in CITIES]
    ls.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": rows},
                         dataset_id="prefs")
    ls.post_training.preference_optimize(
        job_uuid="dpo-ls", finetuned_model=server.model_dir, hyperparam_search_config={}, logger_config={},
        algorithm_config={"reward_scale": 0.1, "reward_clip": 0.0, "epsilon": 0.0, "gamma": 0.0},
        training_config={"n_epochs": 2, "max_steps_per_epoch": 3, "gradient_accumulation_steps": 1,
                         "optimizer_config": {"optimizer_type": "adamw", "lr": 4e-3, "num_warmup_steps": 0},
                         "data_config": {"dataset_id": "prefs", "batch_size": 4, "shuffle": True,
                                         "data_format": "dialog"}})
    status = _wait_llamastack(ls, "dpo-ls")
    assert status.status == "completed", status
    assert status.checkpoints and status.checkpoints[-1]["training_metrics"]["train_loss"] is not None
    # A field of DPO's loss tuneyard has no counterpart for is refused, naming it.
    import llama_stack_client

    with pytest.raises(llama_stack_client.BadRequestError) as e:
        ls.post_training.preference_optimize(
            job_uuid="dpo-ls-2", finetuned_model=server.model_dir, hyperparam_search_config={}, logger_config={},
            algorithm_config={"reward_scale": 0.1, "reward_clip": 5.0, "epsilon": 0.0, "gamma": 0.0},
            training_config={"n_epochs": 1, "data_config": {"dataset_id": "prefs", "batch_size": 4,
                                                            "shuffle": True, "data_format": "dialog"}})
    assert "algorithm_config.reward_clip" in str(e.value.body)


def test_simplismart_dpo_trains_and_reports_rewards(server, tmp_path):
    """Simplismart's train_config.type "dpo" on its own rows (messages + rejected_response), multipart as its
    clients send it; its metrics endpoint lists the rewards."""
    import httpx

    key = server.key("acme")
    data = Path(server.local) / "prefs-ss.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is the capital of {c}?"},
                                                     {"role": "assistant", "content": chosen(city)}],
                                        "rejected_response": rejected(city)}) + "\n" for c, city in CITIES))
    form = {"org": "acme", "experiment_name": "dpo-ss",
            "dataset_config": json.dumps({"split": {"type": "random", "ratios": [1, 0]}}),
            "model_details": json.dumps({"base_model": server.model_dir, "source_type": "local"}),
            "train_config": json.dumps({"type": "dpo", "train_type": "lora",
                                        "hyperparameters": {"num_epochs": 2, "per_device_train_batch_size": 4,
                                                            "learning_rate": 0.004, "logging_steps": 1}}),
            "dataset_details": json.dumps({"dataset_path": str(data), "source_type": "local"}),
            "infra_config": json.dumps({"gpu_type": "cpu", "gpu_count": 1})}
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        r = c.post("/job/", files={k: (None, v.encode()) for k, v in form.items()})
        assert r.status_code == 200, r.text
        request_id = r.json()["request_id"]
        deadline = time.time() + 600
        while time.time() < deadline:
            job = c.get("/job/get/", params={"org_id": "acme", "request_id": request_id}).json()
            if job["status"] in ("COMPLETED", "FAILED", "CANCELED"):
                break
            time.sleep(0.5)
        assert job["status"] == "COMPLETED", job
        assert job["train_config"]["type"] == "dpo"
        metrics = c.get("/job/metrics/", params={"org_id": "acme", "request_id": request_id}).json()
        keys = {m["key"] for m in metrics["metrics"]}
        assert {"train_loss", "rewards_margins", "rewards_accuracies"} <= keys, keys
