"""From job creation to the first optimizer step, on the tiny model, through a real idle server.

    python -m bench time_to_first_step            # 3 runs (about a minute)

Each run starts a fresh ``tuneyard serve`` (worker on, CPU), uploads the sample data, creates a job with
the OpenAI API and polls it every 20 ms. Printed, as the median of the runs: seconds to ``queued``
(validation and tokenisation), to ``running`` (the trainer launched) and to the first step (``trained_steps``
>= 1: torch, transformers and the model loaded, the first batch trained). The job is the fresh server's
first, so it also waits for the worker's standby prepare process to finish its imports (about 2 s); the
warm submit-to-running figure is api_load's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _one(work: Path, model: Path, data: Path) -> dict[str, float]:
    import httpx

    from bench.api_load import _Server

    home = Path(tempfile.mkdtemp(dir=work))
    server = _Server(home, {"TUNEYARD_LOCAL_ROOTS": str(model.parent), "TUNEYARD_POLL_INTERVAL": "0.05"})
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
        runs = [_one(work, model, data) for _ in range(args.runs)]
    figures = {"runs": args.runs, **{f"to_{k}_s": round(statistics.median(r[k] for r in runs), 2)
                                     for k in ("queued", "running", "first_step")}}
    # The issue sets no target here; its submit-to-running target (< 2 s + model load, on an idle server) is
    # api_load's figure. A fresh server's first job also waits for the standby prepare process to import.
    targets: dict[str, Any] = {}
    write_result("time_to_first_step", figures, targets)
    print_table("time_to_first_step", [(k, v, targets.get(k)) for k, v in figures.items()])
    return {"figures": figures, "targets": targets}


if __name__ == "__main__":
    bench(sys.argv[1:])
