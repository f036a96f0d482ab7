"""``python -m bench strategies``: the GPU check of FSDP and DeepSpeed against DDP (needs CUDA GPUs).

The tiny random model trains the same 12 steps under each strategy, at one global batch, in fp32: DDP on the
GPUs the machine has (one rank per GPU), FSDP (LoRA and full fine-tuning, with and without CPU offload) and,
where the deepspeed package is installed, ZeRO stages 2 and 3. Each strategy's losses must match DDP's to 1e-4,
as the CPU DDP test holds 2 ranks to one. On a machine without CUDA it says so and exits 2 (the CPU refusal of
these strategies is tested in tests/unit/test_strategies.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import print_table, write_result

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4


def _rows(model_dir: Path) -> list[dict]:
    """The demo rows as the prepare step hands them over: chat-templated ids, labels on the answer only."""
    from transformers import AutoTokenizer

    from tuneyard.demo.tiny import sample_rows

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    for row in sample_rows():
        full = tok.apply_chat_template(row["messages"], tokenize=True)["input_ids"]
        prompt = tok.apply_chat_template(row["messages"][:-1], tokenize=True, add_generation_prompt=True)["input_ids"]
        out.append({"input_ids": list(full), "labels": [-100] * len(prompt) + list(full[len(prompt):])})
    return out


def _job(root: Path, name: str, model_dir: Path, rows: list[dict], ranks: int, resources: dict,
         adapter: dict) -> Path:
    from tuneyard.data.splits import write_rows
    from tuneyard.domain.spec import TrainingSpec
    from tuneyard.jobdir import JobDir

    jd = JobDir(root / name).create()
    spec = TrainingSpec.model_validate({
        "model": {"name": str(model_dir), "source": "local", "torch_dtype": "float32"},
        "data": {"train": {"path": "train.jsonl"}, "max_length": 128},
        "adapter": adapter,
        "hyperparameters": {"n_epochs": 1, "batch_size": 4 * ranks, "learning_rate_multiplier": 1.0,
                            "learning_rate": 5e-3, "per_device_batch_size": 4, "gradient_accumulation_steps": 1},
        "resources": {"device": "cuda", "nproc_per_node": ranks, **resources},
        "seed": 11,
    })
    jd.resolved_spec.write_text(spec.model_dump_json(indent=2))
    write_rows(jd.data / "train", rows * 4)
    return jd.root


def _train(job: Path, ranks: int, group: bool) -> tuple[list[float], str]:
    """The job's per-step training losses, and the tail of its log when it failed."""
    from tuneyard.jobdir import iter_events

    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if group else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *launcher, "-m", "tuneyard.trainer", str(job)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    losses = [e.data["train_loss"] for e in iter_events(job / "events.jsonl")
              if e.type == "metrics" and "train_loss" in e.data]
    return losses, "" if proc.returncode == 0 else proc.stderr[-3000:]


def bench(argv: list[str]) -> dict[str, Any]:
    """Train under each strategy and compare with DDP; figures: the largest loss difference of each."""
    parser = argparse.ArgumentParser(prog="python -m bench strategies")
    parser.add_argument("--gpus", type=int, default=0, help="ranks (GPUs) per run; 0: every GPU")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench strategies needs CUDA GPUs: FSDP and DeepSpeed are refused on CPU", file=sys.stderr)
        sys.exit(2)
    ranks = args.gpus or torch.cuda.device_count()
    from tuneyard.demo.tiny import build_tiny_model

    lora = {"type": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}
    full = {"type": "full"}
    runs = [("ddp-lora", {}, lora), ("fsdp-lora", {"distributed": "fsdp"}, lora),
            ("fsdp-lora-offload", {"distributed": "fsdp", "fsdp_cpu_offload": True}, lora),
            ("fsdp-full", {"distributed": "fsdp", "fsdp_reshard_after_forward": False}, full),
            ("ddp-full", {}, full)]
    if importlib.util.find_spec("deepspeed") is not None:
        runs += [(f"deepspeed{s}-{a}", {"distributed": "deepspeed", "deepspeed_stage": s}, ad)
                 for s in (2, 3) for a, ad in (("lora", lora), ("full", full))]
    figures: dict[str, Any] = {"ranks": ranks, "deepspeed_installed": importlib.util.find_spec("deepspeed") is not None}
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="tuneyard-strategies-") as tmp:
        root = Path(tmp)
        model_dir = build_tiny_model(root / "tiny-llama")
        rows = _rows(model_dir)
        losses: dict[str, list[float]] = {}
        for name, resources, adapter in runs:
            job = _job(root, name, model_dir, rows, ranks, resources, adapter)
            losses[name], err = _train(job, ranks, group=ranks > 1 or bool(resources))
            if err:
                failures[name] = err
        for name, _, adapter in runs:
            if name.startswith("ddp") or name in failures:
                continue
            ref = losses["ddp-full" if adapter is full else "ddp-lora"]
            ok = len(ref) == len(losses[name]) and len(ref) > 0
            figures[f"{name}_max_loss_diff"] = max(abs(a - b) for a, b in zip(ref, losses[name], strict=True)) \
                if ok else None
    targets = {k: f"<= {TOLERANCE}" for k in figures if k.endswith("_max_loss_diff")}
    write_result("strategies", figures, targets, {"failures": failures})
    print_table("strategies against DDP (fp32, the same global batch)",
                [(k, v, targets.get(k)) for k, v in figures.items()])
    if failures:
        print(json.dumps(failures, indent=2), file=sys.stderr)
    bad = [k for k, v in figures.items() if k.endswith("_max_loss_diff") and (v is None or v > TOLERANCE)]
    if failures or bad:
        sys.exit(1)
    return {"figures": figures, "targets": targets}
