"""DPO end to end through the unchanged `openai` SDK: a real server, prepare step and trainer on the tiny model.

The preference set is learnable: every chosen answer has one style ("Sure! The answer is X."), every rejected one
another (a bare "X"). Training must raise the reward margin and accuracy, and afterwards the adapter must give
the chosen style a higher log-probability than the rejected one on prompts it never saw, by a margin the base
model does not have.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.preference import HELD_OUT, chosen, write_preference_jsonl

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
                - _sequence_logp(model, tokenizer, f"What is the capital of {c}?", city) for c, city in HELD_OUT]

    before = margins(base)
    tuned = PeftModel.from_pretrained(base, str(output)).eval()
    after = margins(tuned)
    assert all(a > b + 1.0 for a, b in zip(after, before, strict=True)), (before, after)
    assert min(after) > 0, after
