"""SFT, then more training on the result, through the unchanged `openai` SDK (and the other dialects' requests):
a real server, prepare step and trainer on the tiny model.

A job whose model is a succeeded job's ``fine_tuned_model`` trains that job's adapter on: a second SFT job on the
same data starts at about the loss the first one ended with (not the base's), and a DPO job on it succeeds and
keeps what SFT taught. LoRA settings that differ from the adapter being continued are refused by name.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import httpx
import llama_stack_client
import openai
import pytest
from llama_stack_client import LlamaStackClient

from tuneyard.demo.tiny import CAPITALS, sample_rows, write_sample_jsonl

pytestmark = pytest.mark.slow
SFT = {"n_epochs": 12, "batch_size": 4, "learning_rate": 5e-3, "lora_r": 16, "lora_alpha": 32}
# Chosen: the answers SFT taught; rejected: another style. DPO then sharpens what SFT learnt rather than undoing it.
DPO = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 20, "beta": 0.1}


def wait_for(client, job_id: str, timeout: float = 600):
    deadline = time.time() + timeout
    job = client.fine_tuning.jobs.retrieve(job_id)
    while job.status not in ("succeeded", "failed", "cancelled") and time.time() < deadline:
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job_id)
    return job


def metrics(client, job_id: str) -> list[dict]:
    events = client.fine_tuning.jobs.list_events(job_id, limit=1000)
    rows = [e.data for e in events if e.type == "metrics" and e.data and e.data.get("train_loss") is not None]
    return sorted(rows, key=lambda d: d["step"])


def job_dir(server, job_id: str) -> Path:
    return Path(server.home) / "jobs" / "acme" / job_id


@pytest.fixture(scope="module")
def client(server):
    server.token = server.key("acme")
    return server.openai(server.token)


@pytest.fixture(scope="module")
def sft_file(client, tmp_path_factory):
    p = write_sample_jsonl(tmp_path_factory.mktemp("sft") / "train.jsonl")
    return client.files.create(file=p.open("rb"), purpose="fine-tune")


@pytest.fixture(scope="module")
def dpo_file(client, tmp_path_factory):
    rows = [{"input": {"messages": [{"role": "system", "content": "You answer in one word."},
                                    {"role": "user", "content": f"What is the capital of {country}?"}]},
             "preferred_output": [{"role": "assistant", "content": f"{city}."}],
             "non_preferred_output": [{"role": "assistant", "content": "I do not know."}]}
            for country, city in CAPITALS]
    p = tmp_path_factory.mktemp("dpo") / "prefs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return client.files.create(file=p.open("rb"), purpose="fine-tune")


@pytest.fixture(scope="module")
def sft_job(client, server, sft_file):
    job = client.fine_tuning.jobs.create(model=server.model_dir, training_file=sft_file.id, seed=5, suffix="sft",
                                         method={"type": "supervised", "supervised": {"hyperparameters": SFT}})
    job = wait_for(client, job.id)
    assert job.status == "succeeded", job.error
    return job


def test_refused_lora_settings_that_differ_from_the_adapter_name_each_field(client, sft_job, sft_file):
    before = len(list(client.fine_tuning.jobs.list(limit=100)))
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=sft_job.fine_tuned_model, training_file=sft_file.id,
                                       hyperparameters={"lora_r": 8, "lora_alpha": 32})
    assert e.value.body["param"] == "lora_r" and "differs from the adapter" in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=sft_job.fine_tuned_model, training_file=sft_file.id,
                                       hyperparameters={"lora": False})
    assert e.value.body["param"] == "lora" and "LoRA adapter" in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError) as e:  # every difference at once
        client.fine_tuning.jobs.create(model=sft_job.fine_tuned_model, training_file=sft_file.id,
                                       hyperparameters={"lora_r": 4, "lora_alpha": 4, "lora_dropout": 0.2})
    msg = e.value.body["message"]
    assert all(f in msg for f in ("lora_r", "lora_alpha", "lora_dropout")), msg
    assert len(list(client.fine_tuning.jobs.list(limit=100))) == before


def test_weights_gone_from_disk_are_a_400_and_a_checkpoint_on_disk_is_continued(client, server, sft_job, sft_file):
    ck = list(client.fine_tuning.jobs.checkpoints.list(sft_job.id))[-1]
    name = ck.fine_tuned_model_checkpoint
    assert name == f"{sft_job.fine_tuned_model}:ckpt-step-{ck.step_number}"
    path = job_dir(server, sft_job.id) / "checkpoints" / f"checkpoint-{ck.step_number}"
    for model, gone in ((name, path), (sft_job.fine_tuned_model, job_dir(server, sft_job.id) / "output")):
        aside = gone.with_name("aside")
        gone.rename(aside)
        try:
            with pytest.raises(openai.BadRequestError) as e:
                client.fine_tuning.jobs.create(model=model, training_file=sft_file.id)
            assert e.value.body["param"] == "model" and "no longer on disk" in e.value.body["message"]
        finally:
            aside.rename(gone)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model=f"{sft_job.fine_tuned_model}:ckpt-step-999", training_file=sft_file.id)
    job = client.fine_tuning.jobs.create(model=name, training_file=sft_file.id, suffix="ck")
    client.fine_tuning.jobs.cancel(job.id)
    spec = json.loads((job_dir(server, job.id) / "spec.json").read_text())
    assert job.model == name and spec["model"]["init_adapter"] == str(path) and spec["model"]["parent"] == name
    assert spec["model"]["name"] == server.model_dir and spec["adapter"]["r"] == 16


def test_the_other_dialects_continue_the_same_model(client, server, sft_job):
    ls = LlamaStackClient(base_url=server.base_url, api_key=server.token, max_retries=0)
    ls.datasets.register(purpose="post-training/messages", dataset_id="capitals",
                         source={"type": "rows", "rows": [{"messages": r["messages"]} for r in sample_rows()]})
    body = {"model": sft_job.fine_tuned_model,
            "algorithm_config": {"type": "LoRA", "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
                                 "apply_lora_to_mlp": True, "rank": 16, "alpha": 32},
            "training_config": {"n_epochs": 1, "dtype": "fp32",
                                "data_config": {"dataset_id": "capitals", "batch_size": 2, "data_format": "dialog"}},
            "hyperparam_search_config": {}, "logger_config": {}}
    with pytest.raises(llama_stack_client.BadRequestError) as e:
        ls.post_training.supervised_fine_tune(job_uuid="ls-rank", **{**body, "algorithm_config": {
            **body["algorithm_config"], "rank": 8, "apply_lora_to_mlp": False}})
    assert "algorithm_config.rank" in e.value.body["detail"] and "lora_attn_modules" in e.value.body["detail"]
    # Every linear layer named one by one is the parent's "all-linear", as PEFT expanded it on disk.
    ls.post_training.supervised_fine_tune(job_uuid="ls-ok", **body)
    ls.post_training.job.cancel(job_uuid="ls-ok")

    cfg = {"dataset_config": {"preprocessing": {"lazy_tokenize": False, "streaming": False}},
           "model_details": {"base_model": sft_job.fine_tuned_model, "source_type": "hf"},
           "train_config": {"type": "sft", "train_type": "lora", "adapter_config": {"r": 8}},
           "dataset_details": {"dataset_name": "d", "dataset_path": str(write_sample_jsonl(server.local / "d.jsonl")),
                               "dataset_type": "jsonl", "source_type": "local"},
           "infra_config": {"gpu_type": "cpu", "gpu_count": 1, "node_count": 1}}
    form = {"org": "acme", "experiment_name": "continue", **{k: json.dumps(v) for k, v in cfg.items()}}
    r = httpx.post(f"{server.base_url}/job/", data=form, headers={"Authorization": f"Bearer {server.token}"})
    assert r.status_code == 400 and r.json()["field"] == "train_config.adapter_config.r", r.text
    del cfg["train_config"]["adapter_config"]
    form = {"org": "acme", "experiment_name": "continue", **{k: json.dumps(v) for k, v in cfg.items()}}
    r = httpx.post(f"{server.base_url}/job/", data=form, headers={"Authorization": f"Bearer {server.token}"})
    assert r.status_code == 200, r.text
    httpx.post(f"{server.base_url}/job/cancel/", params={"org_id": "acme", "request_id": r.json()["request_id"]},
               headers={"Authorization": f"Bearer {server.token}"})


def test_sft_on_the_fine_tuned_model_starts_where_the_first_job_ended(client, sft_job, sft_file):
    first = metrics(client, sft_job.id)
    job = client.fine_tuning.jobs.create(model=sft_job.fine_tuned_model, training_file=sft_file.id, seed=6,
                                         suffix="more", hyperparameters={"n_epochs": 1, "batch_size": 4,
                                                                         "learning_rate": 5e-3})
    job = wait_for(client, job.id)
    assert job.status == "succeeded", job.error
    second = metrics(client, job.id)
    start, end, cont = first[0]["train_loss"], first[-1]["train_loss"], second[0]["train_loss"]
    # From the base the first step's loss is `start`; from the adapter it is about where the first job ended.
    assert cont < end + 0.2 * (start - end), (start, end, cont)
    # The lineage: the job's model is the parent, its own name keeps the original base (OpenAI's convention).
    assert job.model == sft_job.fine_tuned_model
    assert job.fine_tuned_model == f"ft:tiny-llama:acme:more:{job.id.removeprefix('ftjob-')}"
    assert job.hyperparameters.lora_r == 16  # the adapter's own settings, not the defaults
    assert client.models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model


def _sft_loss(model, tokenizer) -> float:
    """Mean loss on the answers of the SFT rows."""
    import torch

    total, n = 0.0, 0
    for row in sample_rows():
        msgs = row["messages"]
        p_ids = tokenizer(tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False)["input_ids"]
        ids = tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        answer = logp[len(p_ids) - 1:]
        total, n = total - float(answer.sum()), n + len(answer)
    return total / n


def test_dpo_on_the_fine_tuned_model_keeps_what_sft_taught(client, server, sft_job, dpo_file):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = client.fine_tuning.jobs.create(model=sft_job.fine_tuned_model, training_file=dpo_file.id, seed=7,
                                         suffix="dpo", method={"type": "dpo", "dpo": {"hyperparameters": DPO}})
    job = wait_for(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.model == sft_job.fine_tuned_model and job.fine_tuned_model.startswith("ft:tiny-llama:acme:dpo:")
    steps = metrics(client, job.id)
    assert steps and all(k in steps[-1] for k in ("rewards_chosen", "rewards_rejected", "rewards_margins",
                                                  "rewards_accuracies")), steps
    # The reference is the starting model: the first step's loss is log 2, as for any DPO run.
    assert abs(steps[0]["train_loss"] - math.log(2)) < 0.01, steps[0]
    assert steps[-1]["rewards_margins"] > 0, steps

    tokenizer = AutoTokenizer.from_pretrained(server.model_dir)

    def loaded(job_id: str | None):
        base = AutoModelForCausalLM.from_pretrained(server.model_dir, dtype=torch.float32).eval()
        return base if job_id is None else PeftModel.from_pretrained(base, str(job_dir(server, job_id) / "output"))

    out = job_dir(server, job.id) / "output"
    # One adapter on the original base, like any other job's output.
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    assert not (out / "ref").exists()
    base, sft, dpo = (_sft_loss(loaded(j).eval(), tokenizer) for j in (None, sft_job.id, job.id))
    # The base knows nothing of the answers; SFT taught them; DPO on top keeps that (far from the base's loss).
    assert abs(dpo - sft) < 0.25 * (base - sft), (base, sft, dpo)
    # ... and DPO did train it: the adapter is no longer the SFT one.
    a, b = (loaded(j).state_dict() for j in (sft_job.id, job.id))
    assert any(not torch.equal(a[k], b[k]) for k in a if "lora_" in k)
