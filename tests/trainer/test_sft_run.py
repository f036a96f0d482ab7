"""The SFT trainer run as a real subprocess on the tiny model: learning, events, checkpoints, outputs, DDP."""

from __future__ import annotations

import json

import pytest

from tests.trainer.trainer_helpers import TRAIN_REPEAT, events, result, run_trainer, train_losses
from tuneyard.jobdir import read_json
from tuneyard.trainer.progress import CHECKPOINT_MARKER

pytestmark = pytest.mark.slow

METRIC_FIELDS = {"step", "total_steps", "epoch", "train_loss", "train_mean_token_accuracy", "learning_rate",
                 "tokens_per_second", "trained_tokens", "elapsed_s", "eta_s"}


def test_loss_goes_down(lora_run):
    losses = [loss for _, loss in train_losses(lora_run)]
    assert len(losses) == 48  # every step is logged in a run under 100 steps
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 2.0, losses
    valid = [e["data"]["valid_loss"] for e in events(lora_run, "metrics") if "valid_loss" in e["data"]]
    assert len(valid) == 4 and valid[-1] < valid[0]


def test_events_carry_the_documented_fields(lora_run):
    evs = events(lora_run)
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
    assert all(e["source"] == "trainer" for e in evs)
    assert evs[0]["type"] == "message"
    assert evs[0]["message"] == ("Training started: 48 steps, 4 epochs, LoRA r=8 on 7 modules, "
                                 "1 process(es), cpu")

    train = [e for e in evs if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert set(train[0]["data"]) >= METRIC_FIELDS
    third = train[2]
    assert third["message"].startswith("Step 3/48: training loss=")
    assert third["data"]["step"] == 3 and third["data"]["total_steps"] == 48
    tokens = [e["data"]["trained_tokens"] for e in train]
    assert tokens == sorted(tokens) and tokens[0] > 0
    assert train[-1]["data"]["eta_s"] == 0
    assert all(e["data"]["tokens_per_second"] > 0 for e in train)

    valid = [e for e in evs if e["type"] == "metrics" and "valid_loss" in e["data"]]
    assert [e["data"]["step"] for e in valid] == [12, 24, 36, 48]  # each epoch end
    assert "valid_mean_token_accuracy" in valid[0]["data"]

    ckpts = [e for e in evs if e["type"] == "checkpoint"]
    assert [e["data"]["step"] for e in ckpts] == [12, 24, 36, 48]
    for e in ckpts:
        assert e["data"]["path"] == str(lora_run.checkpoints / f"checkpoint-{e['data']['step']}")
        assert {"train_loss", "valid_loss"} <= set(e["data"]["metrics"])
    # Each checkpoint event follows the validation of its step: its metrics are that step's.
    assert ckpts[-1]["data"]["metrics"]["valid_loss"] == valid[-1]["data"]["valid_loss"]
    assert evs[-1]["type"] == "message" and evs[-1]["message"].startswith("Training finished: 48 steps")


def test_checkpoints_are_complete_and_rotated(lora_run):
    kept = sorted(p.name for p in lora_run.checkpoints.glob("checkpoint-*"))
    assert kept == ["checkpoint-36", "checkpoint-48"]  # save_total_limit=2
    ckpt = lora_run.checkpoints / "checkpoint-48"
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                 "rng_state.pth", "trainer_state.json", CHECKPOINT_MARKER):
        assert (ckpt / name).is_file(), name
    marker = read_json(ckpt / CHECKPOINT_MARKER)
    assert marker["step"] == 48 and marker["spec"]["seed"] == 11
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 48


def test_result_and_output(lora_run, tokenised_rows):
    res = result(lora_run)
    assert res["status"] == "succeeded" and res["adapter"] is True
    assert res["output_dir"] == str(lora_run.output)
    assert res["trained_steps"] == 48
    # Padding-free: every token of the 48 rows counts once per epoch, and nothing else does.
    assert res["trained_tokens"] == 4 * TRAIN_REPEAT * sum(len(r["input_ids"]) for r in tokenised_rows)
    assert res["trained_tokens"] == [e for e in events(lora_run, "metrics") if "trained_tokens" in e["data"]][
        -1]["data"]["trained_tokens"]
    assert {"train_loss", "valid_loss", "train_mean_token_accuracy", "valid_mean_token_accuracy"} <= set(
        res["final_metrics"])
    files = {p.name for p in lora_run.output.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    assert not (lora_run.root / ".output.partial").exists()


def test_adapter_reloads_and_changes_the_model(lora_run, tiny_model_dir, tokenised_rows):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    batch = tokenised_rows[:4]

    def answer_loss(model) -> float:
        total, n = 0.0, 0
        for row in batch:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            with torch.no_grad():
                out = model(input_ids=ids, labels=labels)
            k = int((labels[0, 1:] != -100).sum())
            total, n = total + out.loss.item() * k, n + k
        return total / n

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                                      str(lora_run.output)).eval()
    ids = torch.tensor([batch[0]["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits, atol=1e-3)
    # Not just different: better on the answers it was trained on.
    assert answer_loss(tuned) < answer_loss(base) - 0.5


def test_two_processes_match_one(lora_run, make_job):
    """torchrun with 2 gloo ranks at the same global batch (2 x 2 x 1 vs 2 x 1 x 2) follows the same curve.

    Each rank gets every other micro-batch of the same seeded permutation, the loss is normalised by the
    token count of the whole global batch, and DDP averages the gradients, so the run is the same
    computation in another order: differences are float rounding only. Tolerance: 1e-4 absolute on every
    logged loss (observed: identical to the last bit on this machine).
    """
    job = make_job("ftjob-ddp", resources={"nproc_per_node": 2},
                   hyperparameters={"gradient_accumulation_steps": 1})
    proc = run_trainer(job, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert result(job)["status"] == "succeeded"
    assert events(job)[0]["message"].endswith("2 process(es), cpu")
    one, two = train_losses(lora_run), train_losses(job)
    assert [s for s, _ in one] == [s for s, _ in two]
    assert max(abs(a - b) for (_, a), (_, b) in zip(one, two, strict=True)) < 1e-4
    assert (job.checkpoints / "checkpoint-48" / "rng_state_1.pth").is_file()
    assert result(job)["trained_tokens"] == result(lora_run)["trained_tokens"]


def test_full_fine_tune(make_job, tiny_model_dir, tokenised_rows):
    import torch
    from transformers import AutoModelForCausalLM

    job = make_job("ftjob-full", adapter={"type": "full"},
                   hyperparameters={"n_epochs": 2, "learning_rate": 3e-3}, validation=False)
    proc = run_trainer(job)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = result(job)
    assert res["status"] == "succeeded" and res["adapter"] is False and res["trained_steps"] == 24
    assert "valid_loss" not in res["final_metrics"]
    assert events(job)[0]["message"].startswith("Training started: 24 steps, 2 epochs, full fine-tuning of ")
    losses = [loss for _, loss in train_losses(job)]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 1.0, losses
    assert (job.output / "model.safetensors").is_file() and (job.output / "config.json").is_file()
    assert (job.checkpoints / "checkpoint-24" / "model.safetensors").is_file()

    tuned = AutoModelForCausalLM.from_pretrained(str(job.output)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    ids = torch.tensor([tokenised_rows[0]["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits, atol=1e-3)
