"""tuneyard's training loop against plain TRL ``SFTTrainer(padding_free=True)`` on the same rows, per CPU-second.

    python -m bench.profile_loop                       # 1 round, both sides, issue 14's CPU shape
    python -m bench.profile_loop --rounds 3 --steps 60
    python -m bench.profile_loop --sides tuneyard --cprofile   # where tuneyard's loop spends its time
    python -m bench.profile_loop --sides tuneyard --torch-profile

The model is issue 14's: Llama-shaped, 4 layers, hidden 256, LoRA r=16 on all linear layers; rows of skewed
length up to 512 tokens, 30% of each a prompt without loss; batch 8. Each side runs in its own process, spawned
back to back, rounds interleaved:

- ``tuneyard``: ``tuneyard.trainer.__main__.main`` on a job directory as the prepare step leaves it (the code path a
  job uses: recipes/sft.py, plumbing.py, fastpath.py), with one extra callback that takes the marks below;
- ``tuneyard_chunked``: the same with ``TUNEYARD_DENSE_LM_HEAD=false`` (TRL's chunked LM head, as before the dense
  one);
- ``trl_pf``: TRL's SFTTrainer as its docs show, with ``padding_free=True`` (TRL's defaults otherwise: bf16
  autocast and gradient checkpointing on);
- ``trl_pf_fp32``: the same with ``bf16=False, gradient_checkpointing=False`` (the faster TRL run on this CPU).

Useful tokens are the rows' tokens (no pad exists in either: both batch padding-free). Marks are taken at every
step end: wall clock, the process's CPU time (all threads) and tokens; rates run from the end of the warm-up steps
to the last step. ``startup_s`` is the time from the spawn of the process to the end of its first step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WARMUP = 3
SHAPE: dict[str, Any] = {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 4, "intermediate": 688, "vocab": 8192,
                         "tie": False, "max_len": 512, "batch": 8, "device": "cpu"}


def _marks_callback(out: Path, spawned: float):
    from transformers import TrainerCallback

    class Marks(TrainerCallback):
        """(step, wall, cpu, tokens) at every step end; written to ``out`` at the end of training."""

        def __init__(self) -> None:
            self.marks: list[tuple[int, float, float, int]] = []

        def on_step_end(self, args, state, control, **kw):
            self.marks.append((state.global_step, time.time(), time.process_time(), int(state.num_input_tokens_seen)))

        def on_train_end(self, args, state, control, **kw):
            first = self.marks[0][1] if self.marks else time.time()
            out.write_text(json.dumps({"marks": self.marks, "startup_s": first - spawned,
                                       "loss": [h["loss"] for h in state.log_history if "loss" in h]}))

    return Marks()


def _side_tuneyard(work: Path, out: Path, spawned: float) -> None:
    from tuneyard.trainer import __main__ as entry
    from tuneyard.trainer import tracking

    plain = tracking.callbacks
    marks = _marks_callback(out, spawned)
    tracking.callbacks = lambda *a, **k: [*plain(*a, **k), marks]
    code = entry.main([str(work / "ftjob-prof")])
    if code != 0:
        raise SystemExit(f"tuneyard trainer failed: {(work / 'ftjob-prof' / 'result.json').read_text()}")


def _side_trl(work: Path, out: Path, spawned: float, fp32: bool, steps: int) -> None:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(str(work / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"))
    extra = {"bf16": False, "gradient_checkpointing": False} if fp32 else {}
    # max_length=None: the rows are already truncated, as TRL asks of padding-free batches without packing.
    args = SFTConfig(output_dir=str(work / "trl-out"), padding_free=True, per_device_train_batch_size=SHAPE["batch"],
                     max_steps=steps, learning_rate=2e-4, save_strategy="no", report_to="none", use_cpu=True,
                     disable_tqdm=True, seed=0, include_num_input_tokens_seen="all", max_length=None, **extra)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.load_from_disk(str(work / "rows")),
                         processing_class=tok, callbacks=[_marks_callback(out, spawned)],
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    trainer.train()


def _prepare(work: Path, rows: int, steps: int) -> None:
    """The model, the rows (for TRL) and the job directory (for tuneyard), all from the same tokenised rows."""
    from bench.train_throughput import build_inputs, tuneyard_job

    p = {**SHAPE, "steps": rows // SHAPE["batch"]}
    build_inputs(work, p)
    job = tuneyard_job(work, work / "model", work / "rows", {**p, "steps": steps}, "ftjob-prof")
    # A job's spec logs every step below 100 steps; keep that, but never save inside the timed span.
    spec = json.loads((job / "resolved_spec.json").read_text())
    spec["schedule"]["logging_steps"] = None
    (job / "resolved_spec.json").write_text(json.dumps(spec))


def _rates(res: dict[str, Any]) -> dict[str, float]:
    marks = res["marks"]
    start = next(m for m in marks if m[0] >= WARMUP)
    end = marks[-1]
    tokens = end[3] - start[3]
    return {"tok_per_s": tokens / (end[1] - start[1]), "tok_per_cpu_s": tokens / (end[2] - start[2]),
            "startup_s": res["startup_s"], "final_loss": res["loss"][-1] if res["loss"] else None}


def _run_side(work: Path, side: str, steps: int, env: dict[str, str], cprofile: bool, torch_profile: bool
              ) -> dict[str, Any]:
    import shutil

    out = work / f"{side}.json"
    shutil.rmtree(work / "ftjob-prof" / "checkpoints", ignore_errors=True)
    for f in ("result.json", "events.jsonl"):
        (work / "ftjob-prof" / f).unlink(missing_ok=True)
    cmd = [sys.executable]
    if cprofile:
        cmd += ["-m", "cProfile", "-o", str(work / f"{side}.pstats")]
    cmd += ["-m", "bench.profile_loop", "--side", side, str(work), str(steps)]
    child_env = {**env, "PROFILE_LOOP_SPAWNED": repr(time.time())}
    if torch_profile:
        child_env["PROFILE_LOOP_TORCH"] = str(work / f"{side}.torchprof.txt")
    proc = subprocess.run(cmd, cwd=REPO, env=child_env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed: {proc.stderr[-4000:]}")
    if cprofile:
        import pstats

        pstats.Stats(str(work / f"{side}.pstats")).sort_stats("cumulative").print_stats(45)
    if torch_profile:
        print((work / f"{side}.torchprof.txt").read_text())
    return _rates(json.loads(out.read_text()))


def _child(side: str, work: Path, steps: int) -> None:
    spawned = float(os.environ["PROFILE_LOOP_SPAWNED"])
    out = work / f"{side}.json"
    prof_out = os.environ.get("PROFILE_LOOP_TORCH")
    if prof_out:
        _with_torch_profiler(Path(prof_out))
    if side.startswith("tuneyard"):
        _side_tuneyard(work, out, spawned)
    else:
        _side_trl(work, out, spawned, side == "trl_pf_fp32", steps)


def _with_torch_profiler(out: Path) -> None:
    """Profile steps 5-12 of whichever Trainer runs in this process; the op table goes to ``out``."""
    import torch
    import transformers

    train_step = transformers.Trainer.training_step
    state = {"n": 0, "prof": None}

    def step(self, *a, **k):
        state["n"] += 1
        if state["n"] == 5:
            state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            state["prof"].__enter__()
        try:
            return train_step(self, *a, **k)
        finally:
            if state["n"] == 12 and state["prof"] is not None:
                state["prof"].__exit__(None, None, None)
                out.write_text(state["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=30))

    transformers.Trainer.training_step = step


def main(argv: list[str] | None = None) -> None:
    """Run the sides for the given rounds and print each side's rates and the ratios to TRL."""
    ap = argparse.ArgumentParser(prog="python -m bench.profile_loop")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps timed per side (plus warm-up)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--sides", default="tuneyard,tuneyard_chunked,trl_pf,trl_pf_fp32")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--torch-profile", action="store_true")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the tuneyard side (repeatable)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tuneyard-profile-"))
    _prepare(work, args.rows, args.steps)
    path = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x)
    base_env = {**os.environ, "PYTHONPATH": path, "TUNEYARD_JOB_ID": "ftjob-prof"}
    sides = args.sides.split(",")
    results: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
    for r in range(args.rounds):
        for side in sides:
            env = dict(base_env)
            if side.startswith("tuneyard"):
                env.update(kv.split("=", 1) for kv in args.env)
            if side == "tuneyard_chunked":
                env["TUNEYARD_DENSE_LM_HEAD"] = "false"
            res = _run_side(work, side, args.steps, env, args.cprofile, args.torch_profile)
            results[side].append(res)
            print(f"round {r + 1} {side}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items() if v is not None),
                  flush=True)
    summary = {s: {k: statistics.median(x[k] for x in rs) for k in rs[0] if rs[0][k] is not None}
               for s, rs in results.items()}
    if "tuneyard" in summary:
        for s in sides:
            if s != "tuneyard" and s in summary:
                summary[f"ratio_vs_{s}"] = {
                    "tok_per_cpu_s": summary["tuneyard"]["tok_per_cpu_s"] / summary[s]["tok_per_cpu_s"],
                    "tok_per_s": summary["tuneyard"]["tok_per_s"] / summary[s]["tok_per_s"]}
    print(json.dumps({"rounds": args.rounds, "steps": args.steps, "median": summary}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--side":
        _child(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
    else:
        main(sys.argv[1:])
