"""End to end: a real server process with its worker, real prepare and torchrun trainer subprocesses,
driven by the unchanged `openai` SDK on the tiny model."""

from __future__ import annotations

import csv
import io
import json
import tarfile
import time

import pytest

from tuneyard.demo.tiny import write_sample_jsonl

pytestmark = pytest.mark.slow
LEARN = {"n_epochs": 25, "batch_size": 4, "learning_rate": 5e-3, "lora_r": 16, "lora_alpha": 32}


def wait_for(client, job_id: str, statuses: set[str], timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s")


@pytest.fixture(scope="module")
def client(server):
    return server.openai(server.key("acme"))


@pytest.fixture(scope="module")
def training_file(client, tmp_path_factory):
    p = write_sample_jsonl(tmp_path_factory.mktemp("d") / "train.jsonl")
    return client.files.create(file=p.open("rb"), purpose="fine-tune")


@pytest.fixture(scope="module")
def validation_file(client, tmp_path_factory):
    p = write_sample_jsonl(tmp_path_factory.mktemp("v") / "valid.jsonl")
    return client.files.create(file=p.open("rb"), purpose="fine-tune")


@pytest.fixture(scope="module")
def lora_job(client, server, training_file, validation_file):
    job = client.fine_tuning.jobs.create(
        model=server.model_dir, training_file=training_file.id, validation_file=validation_file.id, suffix="e2e",
        seed=11, method={"type": "supervised", "supervised": {"hyperparameters": LEARN}})
    seen = {job.status}
    deadline = time.time() + 300
    while job.status not in ("succeeded", "failed", "cancelled") and time.time() < deadline:
        time.sleep(0.3)
        job = client.fine_tuning.jobs.retrieve(job.id)
        seen.add(job.status)
    assert job.status == "succeeded", job.error
    return job, seen


def test_lora_job_succeeds_through_every_status(lora_job):
    job, seen = lora_job
    assert {"validating_files", "running", "succeeded"} <= seen
    assert job.fine_tuned_model == f"ft:tiny-llama:acme:e2e:{job.id.removeprefix('ftjob-')}"
    assert job.trained_steps == job.total_steps == 25 * 3
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at
    assert job.hyperparameters.n_epochs == 25 and job.hyperparameters.batch_size == 4


def test_loss_goes_down_and_events_carry_metrics(client, lora_job):
    job, _ = lora_job
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e for e in reversed(events) if e.type == "metrics" and e.data.get("train_loss") is not None]
    assert len(metrics) >= 10
    first, last = metrics[0].data["train_loss"], metrics[-1].data["train_loss"]
    assert last < first * 0.5, (first, last)
    assert {"step", "total_steps", "train_loss", "learning_rate"} <= set(metrics[-1].data)
    assert any(e.data.get("valid_loss") is not None for e in events if e.type == "metrics")
    assert events[0].message == "The job has successfully completed"  # newest first


def test_result_file_is_a_metrics_csv(client, lora_job):
    job, _ = lora_job
    (rid,) = job.result_files
    assert client.files.retrieve(rid).purpose == "fine-tune-results"
    rows = list(csv.DictReader(io.StringIO(client.files.content(rid).read().decode())))
    assert rows[0].keys() >= {"step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"}
    assert int(rows[-1]["step"]) == job.total_steps


def test_checkpoints_listed_with_metrics(client, lora_job):
    job, _ = lora_job
    cks = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert cks, "no checkpoints"
    steps = [c.step_number for c in cks]
    assert steps == sorted(steps, reverse=True) and steps[0] == job.total_steps
    assert cks[0].metrics.train_loss is not None
    assert cks[0].fine_tuned_model_checkpoint.endswith(f":ckpt-step-{steps[0]}")


def test_adapter_downloads_reloads_and_changes_output(server, client, lora_job, tmp_path):
    import httpx
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job, _ = lora_job
    r = httpx.get(f"{server.base_url}/v1/fine_tuning/jobs/{job.id}/artifacts",
                  headers={"Authorization": f"Bearer {client.api_key}"}, timeout=60)
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    adapter = tmp_path / job.id
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16
    tok = AutoTokenizer.from_pretrained(str(adapter))
    base = AutoModelForCausalLM.from_pretrained(server.model_dir)
    msgs = [{"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "What is the capital of Japan?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        before = base(**enc).logits[0, -1]
        tuned = PeftModel.from_pretrained(base, str(adapter))
        after_ids = tuned.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        after = tuned(**enc).logits[0, -1]
    assert not torch.allclose(before, after)
    assert tok.decode(after_ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).startswith("Tokyo")


def test_full_fine_tune(client, server, training_file):
    job = client.fine_tuning.jobs.create(
        model=server.model_dir, training_file=training_file.id, seed=3,
        hyperparameters={"n_epochs": 2, "batch_size": 6, "lora": False, "learning_rate": 1e-3})
    job = wait_for(client, job.id, {"succeeded", "failed", "cancelled"})
    assert job.status == "succeeded", job.error
    assert job.hyperparameters.lora is False
    out = server.home / "jobs" / "acme" / job.id / "output"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))


def test_cancel_running_job_within_10_seconds(client, server, training_file):
    job = client.fine_tuning.jobs.create(
        model=server.model_dir, training_file=training_file.id,
        hyperparameters={"n_epochs": 50, "batch_size": 1})
    job = wait_for(client, job.id, {"running"})
    # wait for the first real step so the trainer is mid-training
    deadline = time.time() + 120
    while (client.fine_tuning.jobs.retrieve(job.id).trained_steps or 0) < 1 and time.time() < deadline:
        time.sleep(0.3)
    pid_file = server.home / "jobs" / "acme" / job.id / "train.pid"
    pid = int(pid_file.read_text())
    t0 = time.time()
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    from tuneyard.scheduler.local import pid_alive

    while pid_alive(pid, job.id) and time.time() - t0 < 10:
        time.sleep(0.2)
    assert not pid_alive(pid, job.id), "trainer still running 10 s after cancel"
    assert _no_processes_of(job.id)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"


def _no_processes_of(job_id: str) -> bool:
    import os

    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if job_id.encode() in f.read():
                        return False
            except OSError:
                continue
    return True


def test_bad_model_fails_validation_with_param(client, server, training_file):
    bogus = server.local / "not-a-model"
    bogus.mkdir(exist_ok=True)
    (bogus / "README").write_text("nothing here")
    job = client.fine_tuning.jobs.create(model=str(bogus), training_file=training_file.id)
    job = wait_for(client, job.id, {"failed", "queued", "running", "succeeded"}, timeout=120)
    assert job.status == "failed"
    assert job.error.param == "model" and "not-a-model" in job.error.message
