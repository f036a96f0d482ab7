"""From job creation to the first optimizer step, on the tiny model, through a real idle server.

    python -m bench time_to_first_step            # 3 runs (about a minute)

Each run starts a fresh ``tuneyard serve`` (worker on, CPU), uploads the sample data, creates a job with
the OpenAI API and polls it every 20 ms. Printed, as the median of the runs: seconds to ``queued``
(validation and tokenisation), to ``running`` (the trainer launched) and to the first step (``trained_steps``
>= 1: torch, transformers and the model loaded, the first batch trained). The job is the fresh server's
first, so it also waits for the worker's standby processes to finish their imports; the warm
submit-to-running figure is api_load's.

Each round runs the job twice, interleaved: as configured (the worker's standby trainer on) and with
``TUNEYARD_TRAINER_STANDBY=false`` (a trainer started from nothing), and prints the ratio with the spread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, str]] = {"": {}, "no_trainer_standby": {"TUNEYARD_TRAINER_STANDBY": "false"}}
PHASES = ("queued", "running", "first_step")


def _one(work: Path, model: Path, data: Path, env: dict[str, str]) -> dict[str, float]:
    import httpx

    from bench.api_load import _Server

    home = Path(tempfile.mkdtemp(dir=work))
    server = _Server(home, {"TUNEYARD_LOCAL_ROOTS": str(model.parent), "TUNEYARD_POLL_INTERVAL": "0.05", **env})
    try:
        h = {"Authorization": f"Bearer {server.key('ttfs')}"}
        f = httpx.post(f"{server.url}/v1/files", headers=h, files={"file": ("t.jsonl", data.read_bytes())},
                       data={"purpose": "fine-tune"}, timeout=60).json()
        t0 = time.perf_counter()
        job = httpx.post(f"{server.url}/v1/fine_tuning/jobs", headers=h, timeout=60,
                         json={"model": str(model), "training_file": f["id"],
                               "hyperparameters": {"n_epochs": 50, "batch_size": 1}}).json()
        seen: dict[str, float] = {}
        while "first_step" not in seen:
            j = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job['id']}", headers=h, timeout=60).json()
            now = time.perf_counter() - t0
            if j["status"] in ("queued", "running"):
                seen.setdefault("queued", now)
            if j["status"] == "running":
                seen.setdefault("running", now)
            if (j.get("trained_steps") or 0) >= 1:
                seen["first_step"] = now
            if j["status"] in ("failed", "cancelled") or now > 300:
                raise RuntimeError(f"the job did not reach its first step: {j}")
            time.sleep(0.02)
        httpx.post(f"{server.url}/v1/fine_tuning/jobs/{job['id']}/cancel", headers=h, timeout=60)
        return seen
    finally:
        server.stop()


def bench(argv: list[str] | None = None) -> dict[str, Any]:
    """Run ``--runs`` jobs; print and write bench/results/time_to_first_step.json."""
    from bench.common import print_table, write_result
    from tuneyard.demo.tiny import build_tiny_model, write_sample_jsonl

    ap = argparse.ArgumentParser(prog="python -m bench time_to_first_step")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv or [])
    with tempfile.TemporaryDirectory(prefix="tuneyard-bench-ttfs-") as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "models" / "tiny-llama")
        data = write_sample_jsonl(work / "train.jsonl")
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
        for _ in range(args.runs):
            for variant, env in VARIANTS.items():
                runs[variant].append(_one(work, model, data, env))
    figures: dict[str, Any] = {"runs": args.runs}
    for variant, rs in runs.items():
        suffix = f"_{variant}" if variant else ""
        for k in PHASES:
            values = [r[k] for r in rs]
            figures[f"to_{k}_s{suffix}"] = round(statistics.median(values), 2)
            figures[f"to_{k}_s{suffix}_spread"] = round(max(values) - min(values), 2)
    # What the standby trainer saves a job: its start from nothing over its start with the imports done.
    figures["first_step_speedup_from_trainer_standby"] = round(
        figures["to_first_step_s_no_trainer_standby"] / figures["to_first_step_s"], 2)
    # The issue sets no target here; its submit-to-running target (< 2 s + model load, on an idle server) is
    # api_load's figure. A fresh server's first job also waits for the standby prepare process to import.
    targets: dict[str, Any] = {}
    write_result("time_to_first_step", figures, targets)
    print_table("time_to_first_step", [(k, v, targets.get(k)) for k, v in figures.items()])
    return {"figures": figures, "targets": targets}


if __name__ == "__main__":
    bench(sys.argv[1:])
