"""``tuneyard demo``: the whole user flow, for real, on this machine.

Starts ``tuneyard serve`` in a fresh state directory, uploads the sample data, creates a LoRA job
through the OpenAI-style HTTP API, follows it with a progress bar, downloads the adapter and
compares the model's answers before and after fine-tuning.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tuneyard.demo.tiny import CAPITALS, build_tiny_model, write_sample_jsonl

QUESTIONS = [CAPITALS[0][0], CAPITALS[3][0], CAPITALS[9][0]]
SYSTEM = "You answer in one word."
# Settings that let the tiny random model learn the sample task in about a minute on 2 CPU cores.
TINY_HYPERPARAMETERS = {"n_epochs": 30, "batch_size": 4, "learning_rate": 5e-3, "lora_r": 16, "lora_alpha": 32}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(model_dir: str, adapter_dir: Path | None, questions: list[str]) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    out = []
    for country in questions:
        msgs = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"What is the capital of {country}?"}]
        enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def _quiet_libraries() -> None:
    """Keep the demo's output to what it reports: no per-file progress bars or library deprecation notes."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def run_demo(*, model: str | None, home: Path | None, port: int, epochs: int | None, console: Console) -> int:
    """Run the demo; returns the process exit code."""
    from tuneyard.cli import follow_job
    from tuneyard.client import Client, wait_healthy
    from tuneyard.service import Services
    from tuneyard.service.auth import create_key
    from tuneyard.settings import Settings

    _quiet_libraries()
    t0 = time.time()
    home = Path(home or tempfile.mkdtemp(prefix="tuneyard-demo-")).resolve()
    local = home / "local"
    local.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]tuneyard demo")
    console.print(f"state directory: {home}")
    hyper = dict(TINY_HYPERPARAMETERS)
    if model is None:
        model_dir = str(build_tiny_model(local / "models" / "tiny-chat"))
        console.print(f"built a tiny random Llama-shaped model at {model_dir}")
    else:
        model_dir = model
        hyper = {"n_epochs": 3, "batch_size": 4}
    if epochs:
        hyper["n_epochs"] = epochs
    data = write_sample_jsonl(home / "sample" / "train.jsonl")
    port = port or _free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TUNEYARD_HOME": str(home), "TUNEYARD_PORT": str(port), "TUNEYARD_HOST": "127.0.0.1",
           "TUNEYARD_LOCAL_ROOTS": str(local), "TUNEYARD_LOG_LEVEL": "warning"}
    key = create_key(Services.build(Settings(home=home, local_roots=str(local))).store, "demo")
    server = subprocess.Popen([sys.executable, "-m", "tuneyard.cli", "serve"], env=env,
                              stdout=(home / "server.log").open("ab"), stderr=subprocess.STDOUT)
    try:
        wait_healthy(base_url)
        console.print(f"server up at {base_url} (log: {home / 'server.log'})")
        # A throwaway key of a throwaway home: shown so the run can be watched in a browser while it lasts.
        console.print(f"dashboard: {base_url}/dashboard/ (sign in with the demo's key {key}; it ends with the demo)")
        before = _answers(model_dir, None, QUESTIONS)
        client = Client(base_url, key)
        f = client.upload(data)
        console.print(f"uploaded {data.name}: {f['id']} ({f['bytes']} bytes, {f['status']})")
        job = client.create_job(model=model_dir, training_file=f["id"], suffix="demo", seed=7,
                                method={"type": "supervised", "supervised": {"hyperparameters": hyper}})
        console.print(f"created {job['id']} (status {job['status']})")
        status = follow_job(client, job["id"], print_events=False)
        job = client.job(job["id"])
        if status != "succeeded":
            console.print(f"[red]job {status}: {job.get('error')}")
            for e in client.all_events(job["id"])[-10:]:
                console.print(f"  [{e['level']}] {e['message']}")
            return 1
        losses = [e["data"]["train_loss"] for e in client.all_events(job["id"])
                  if e["type"] == "metrics" and e["data"].get("train_loss") is not None]
        archive = client.download_artifacts(job["id"], home / f"{job['id']}.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(home / "artifacts", filter="data")
        adapter = home / "artifacts" / job["id"]
        after = _answers(model_dir, adapter, QUESTIONS)
        _report(console, job, losses, adapter, before, after, time.time() - t0)
        return 0
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()


def _report(console: Console, job: dict, losses: list[float], adapter: Path, before: list[str], after: list[str],
            elapsed: float) -> None:
    console.rule("[bold]result")
    if losses:
        n = len(losses)
        marks = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})
        curve = "  ".join(f"step {i + 1}: {losses[i]:.3f}" for i in marks)
        console.print(f"loss curve ({n} logged steps): {curve}")
        console.print(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    console.print(f"steps: {job['trained_steps']}/{job['total_steps']}, trained tokens: {job['trained_tokens']}")
    console.print(f"fine-tuned model: {job['fine_tuned_model']}")
    console.print(f"adapter: {adapter}")
    t = Table("question", "before", "after")
    for country, b, a in zip(QUESTIONS, before, after, strict=True):
        t.add_row(f"What is the capital of {country}?", repr(b), repr(a))
    console.print(t)
    console.print(f"done in {elapsed:.0f} s")
