"""Training throughput: tuneyard's trainer vs the plain Hugging Face pipeline, side by side in one run.

    python -m bench train_throughput                 # CPU preset (~34M-parameter Llama-shaped model)
    python -m bench.train_throughput --preset gpu    # Llama-3.2-1B-shaped model at length 2048, on a GPU

Both runs train the same random-weight Llama-shaped model with the same LoRA (r=16 on all linear
layers) on the same tokenised rows, whose lengths follow a skewed (log-normal) distribution: many
short rows and a few long ones, as real chat data has.

(a) baseline: what a user writes by hand: ``transformers.Trainer`` + PEFT, ``DataCollatorForSeq2Seq``
    padding every batch to its longest row;
(b) tuneyard: the job's trainer process (``python -m tuneyard.trainer JOBDIR``), exactly as the local
    launcher runs it, on a job directory holding the same rows; with FlashAttention off for the ratio
    (the baseline has none) and, on a GPU where ``flash-attn`` is installed, once more with it
    (``ratio_flash``).

Each runs in its own process (so peak memory is its own). Throughput counts useful (non-pad) tokens
only, between the end of the warm-up steps and the last step; the ratio is (b)/(a). On a GPU, MFU uses
the LoRA formula of docs: (4N + 12*L*H*Q*T) FLOPs per token against the bf16 dense peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 3
LORA = {"r": 16, "alpha": 32}
# Dense bf16 peak FLOP/s per GPU, by the name torch reports.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

PRESETS: dict[str, dict[str, Any]] = {
    # ~34M parameters: big enough that matmuls, not Python, dominate a CPU step.
    "cpu": {"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 8, "intermediate": 1408, "vocab": 8192,
            "tie": False, "max_len": 512, "batch": 8, "steps": 14, "device": "cpu"},
    # Seconds, for the test suite's smoke run: the figures mean nothing.
    "smoke": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 4, "intermediate": 128, "vocab": 1024,
              "tie": False, "max_len": 128, "batch": 4, "steps": 6, "device": "cpu"},
    # Llama-3.2-1B's shape (random weights): 16 layers, 2048 wide, GQA 32/8, 128k vocabulary, tied head.
    "gpu": {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "intermediate": 8192, "vocab": 128256,
            "tie": True, "max_len": 2048, "batch": 8, "steps": 24, "device": "cuda"},
}


def row_lengths(n: int, max_len: int, seed: int = 0) -> list[int]:
    """Skewed lengths: log-normal with a median of max_len/8, clipped to [16, max_len]."""
    import random

    rng = random.Random(seed)
    median = max_len / 8
    return [int(min(max_len, max(16, rng.lognormvariate(math.log(median), 0.9)))) for _ in range(n)]


def build_inputs(work: Path, p: dict[str, Any]) -> tuple[Path, Path]:
    """Write the random model (+ a tokenizer) and the tokenised rows; return (model_dir, dataset_dir)."""
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneyard.demo.tiny import build_tokenizer, sample_rows

    model_dir, data_dir = work / "model", work / "rows"
    tok = build_tokenizer([json.dumps(r) for r in sample_rows()], model_dir)
    config = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                         num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                         num_key_value_heads=p["kv_heads"], max_position_embeddings=max(2048, p["max_len"]),
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=p["tie"])
    torch.manual_seed(0)
    with torch.device("cuda" if p["device"] == "cuda" else "cpu"):
        model = LlamaForCausalLM(config)
    dtype = torch.bfloat16 if p["device"] == "cuda" else torch.float32
    model.to(dtype).save_pretrained(str(model_dir))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the two training processes need the whole GPU
    g = torch.Generator().manual_seed(1)
    rows = []
    for length in row_lengths(p["batch"] * p["steps"], p["max_len"]):
        ids = torch.randint(len(tok), p["vocab"], (length,), generator=g).tolist()
        prompt = max(1, int(length * 0.3))  # the prompt part carries no loss, as with chat data
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    datasets.Dataset.from_list(rows).save_to_disk(str(data_dir))
    return model_dir, data_dir


def tuneyard_job(work: Path, model_dir: Path, data_dir: Path, p: dict[str, Any], name: str = "ftjob-bench") -> Path:
    """A job directory as the prepare step leaves it: resolved spec + the tokenised rows."""
    import datasets

    from tuneyard.data.splits import write_rows
    from tuneyard.domain.hparams import resolve
    from tuneyard.domain.spec import TrainingSpec
    from tuneyard.jobdir import JobDir, write_json_atomic

    job = JobDir(work / name).create()
    spec = TrainingSpec.model_validate({
        "model": {"name": str(model_dir), "source": "local"},
        "data": {"train": {"path": str(data_dir)}, "max_length": p["max_len"]},
        "adapter": {"type": "lora", "r": LORA["r"], "alpha": LORA["alpha"], "target_modules": "all-linear"},
        "hyperparameters": {"n_epochs": 1, "batch_size": p["batch"], "learning_rate": 2e-4,
                            "per_device_batch_size": p["batch"], "gradient_accumulation_steps": 1,
                            "per_device_eval_batch_size": p["batch"], "max_steps": p["steps"]},
        # No checkpoint inside the timed steps (the baseline saves none either).
        "schedule": {"save_steps": p["steps"] * 10, "logging_steps": 1},
        "resources": {"device": p["device"], "nproc_per_node": 1},
        "seed": 0,
    })
    spec = resolve(spec, p["batch"] * p["steps"])  # as the prepare step does
    write_json_atomic(job.resolved_spec, spec.model_dump(mode="json"))
    # In the prepare step's split format (one memory-mapped Arrow file), which the trainer reads.
    write_rows(job.data / "train", datasets.load_from_disk(str(data_dir)).to_list())
    return job.root


def _env() -> dict[str, str]:
    """This checkout importable in a child process, keeping any PYTHONPATH already set."""
    path = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x)
    return {**os.environ, "PYTHONPATH": path}


def _rate(marks: list[tuple[int, float, int]]) -> dict[str, float]:
    """Useful tokens/s and s/step from (step, seconds, tokens) marks, after the warm-up steps."""
    marks = sorted(marks)
    start = next(m for m in marks if m[0] >= WARMUP_STEPS)
    end = marks[-1]
    dt = end[1] - start[1]
    return {"tokens_per_s": (end[2] - start[2]) / dt, "step_s": dt / (end[0] - start[0]),
            "steps_timed": end[0] - start[0]}


def run_baseline(work: Path, model_dir: Path, data_dir: Path, p: dict[str, Any]) -> dict[str, Any]:
    """(a) plain Trainer + PEFT with padding to the longest row of each batch (runs in this process)."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    cuda = p["device"] == "cuda"
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16 if cuda else torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    marks: list[tuple[int, float, int]] = []

    class Marks(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            marks.append((state.global_step, time.monotonic(), int(state.num_input_tokens_seen)))

    args = TrainingArguments(output_dir=str(work / "baseline-out"), per_device_train_batch_size=p["batch"],
                             max_steps=p["steps"], learning_rate=2e-4, logging_steps=1, save_strategy="no",
                             report_to="none", bf16=cuda, use_cpu=not cuda, disable_tqdm=True, seed=0,
                             include_num_input_tokens_seen="non_padding", remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=datasets.load_from_disk(str(data_dir)),
                      data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100),
                      callbacks=[Marks()])
    trainer.train()
    return _rate(marks)


def run_tuneyard(job_root: Path, env_over: dict[str, str] | None = None) -> dict[str, Any]:
    """(b) the trainer process on the job directory; rates from its own metrics events."""
    from tuneyard.jobdir import JobDir, Succeeded, iter_events

    peak_file = job_root.parent / f"peak-{job_root.name}.json"
    env = {**_env(), "TUNEYARD_JOB_ID": job_root.name, **(env_over or {})}
    proc = subprocess.run([sys.executable, "-m", "bench._peak", str(peak_file), "tuneyard.trainer", str(job_root)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    result = JobDir(job_root).read_result()
    if proc.returncode != 0 or not isinstance(result, Succeeded):
        raise RuntimeError(f"tuneyard trainer failed ({proc.returncode}): {result}\n{proc.stderr[-3000:]}")
    marks = [(e.data["step"], e.data["elapsed_s"], e.data["trained_tokens"])
             for e in iter_events(job_root / "events.jsonl")
             if e.type == "metrics" and "trained_tokens" in e.data]
    return {**_rate(marks), **json.loads(peak_file.read_text())}


def mfu(tokens_per_s: float, p: dict[str, Any], mean_len: float, gpu_name: str) -> float | None:
    """Model FLOPs utilisation of a LoRA run: (4N + 12*L*H*Q*T) per token over the GPU's bf16 peak."""
    peak = next((v for k, v in PEAK_FLOPS.items() if k in gpu_name), None)
    if peak is None:
        return None
    h, layers, q = p["hidden"], p["layers"], p["hidden"] // p["heads"]
    kv = p["kv_heads"] * q
    n = layers * (2 * h * h + 2 * h * kv + 3 * h * p["intermediate"])  # non-embedding parameters
    flops = 4 * n + 12 * layers * p["heads"] * q * mean_len
    return tokens_per_s * flops / peak


def bench(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both sides and return {"figures", "targets", ...} (also printed)."""
    from bench.common import print_table, write_result

    ap = argparse.ArgumentParser(prog="python -m bench train_throughput")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="model/data size (default: gpu when CUDA is available, else cpu)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv or [])
    import torch
    from transformers.utils import is_flash_attn_2_available

    preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    p = dict(PRESETS[preset])
    if args.steps:
        p["steps"] = args.steps
    work = Path(tempfile.mkdtemp(prefix="tuneyard-bench-"))
    try:
        model_dir, data_dir = build_inputs(work, p)
        lengths = row_lengths(p["batch"] * p["steps"], p["max_len"])
        peak_file = work / "peak-baseline.json"
        proc = subprocess.run([sys.executable, "-m", "bench._peak", str(peak_file), "bench.train_throughput",
                               "--worker", str(work), preset, str(p["steps"])],
                              cwd=REPO, env=_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"baseline failed: {proc.stderr[-3000:]}")
        base = {**json.loads((work / "baseline.json").read_text()), **json.loads(peak_file.read_text())}
        # The ratio is with FlashAttention off (the baseline has none); with it, a figure of its own.
        ours = run_tuneyard(tuneyard_job(work, model_dir, data_dir, p), {"TUNEYARD_FLASH_ATTENTION": "false"})
        flash = None
        if p["device"] == "cuda" and is_flash_attn_2_available():
            flash = run_tuneyard(tuneyard_job(work, model_dir, data_dir, p, "ftjob-bench-flash"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    mem_key = "cuda_peak_mb" if p["device"] == "cuda" else "max_rss_mb"
    figures: dict[str, Any] = {
        "preset": preset,
        "baseline_tokens_per_s": round(base["tokens_per_s"], 1),
        "tuneyard_tokens_per_s": round(ours["tokens_per_s"], 1),
        "ratio": round(ours["tokens_per_s"] / base["tokens_per_s"], 3),
        "baseline_step_s": round(base["step_s"], 4),
        "tuneyard_step_s": round(ours["step_s"], 4),
        f"baseline_peak_{mem_key}": round(base.get(mem_key, 0.0)),
        f"tuneyard_peak_{mem_key}": round(ours.get(mem_key, 0.0)),
        "mean_row_tokens": round(sum(lengths) / len(lengths), 1),
    }
    targets: dict[str, Any] = {"ratio": ">= 1.5" if p["device"] == "cuda" else ">= 1.8"}
    if p["device"] == "cuda":
        name = torch.cuda.get_device_name(0)
        figures["device"] = name
        token_mean_len = sum(x * x for x in lengths) / sum(lengths)  # the length an average token sees
        sides = [("baseline", base), ("tuneyard", ours)]
        if flash is not None:
            figures["tuneyard_flash_tokens_per_s"] = round(flash["tokens_per_s"], 1)
            figures["ratio_flash"] = round(flash["tokens_per_s"] / base["tokens_per_s"], 3)
            figures["tuneyard_flash_peak_cuda_peak_mb"] = round(flash.get(mem_key, 0.0))
            sides.append(("tuneyard_flash", flash))
        for side, r in sides:
            m = mfu(r["tokens_per_s"], p, token_mean_len, name)
            figures[f"{side}_mfu"] = None if m is None else round(m, 4)
        targets["tuneyard_flash_mfu" if flash is not None else "tuneyard_mfu"] = ">= 0.40"
    write_result("train_throughput", figures, targets, {"preset_config": p})
    print_table(f"train_throughput ({preset})", [(k, v, targets.get(k)) for k, v in figures.items()])
    return {"figures": figures, "targets": targets}


def _worker(work: Path, preset: str, steps: int) -> None:
    p = {**PRESETS[preset], "steps": steps}
    res = run_baseline(work, work / "model", work / "rows", p)
    (work / "baseline.json").write_text(json.dumps(res))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    else:
        bench(sys.argv[1:])
