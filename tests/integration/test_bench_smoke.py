"""Every benchmark of ``python -m bench`` still runs end to end, at a size that takes seconds.

The figures of these runs mean nothing (a tiny model, a few steps, loaded CI cores); what is checked is that
each benchmark finishes and writes ``{"figures": ..., "targets": ...}`` with a figure for each target.
The results go to a temporary directory (TUNEYARD_BENCH_RESULTS_DIR), not to bench/results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import tuneyard

REPO = os.path.dirname(os.path.dirname(tuneyard.__file__))

SMOKE = {
    "train_throughput": ["--preset", "smoke"],
    "data_prep": ["--mb", "2", "--sample-mb", "1"],
    "api_load": ["--jobs", "300", "--clients", "10", "--seconds", "2", "--open-seconds", "2", "--submits", "20"],
    "time_to_first_step": ["--runs", "1"],
    "inference": ["--runs", "1", "--tokens", "8"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMOKE))
def test_benchmark_runs_and_writes_its_figures(tmp_path, name):
    from bench.__main__ import BENCHMARKS

    assert set(SMOKE) == set(BENCHMARKS)  # a new benchmark gets a smoke run here too
    env = {**os.environ, "TUNEYARD_BENCH_RESULTS_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "bench", name, *SMOKE[name]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / f"{name}.json").read_text())
    figures, targets = result["figures"], result["targets"]
    assert set(targets) <= set(figures), (targets, figures)
    assert all(figures[k] is not None for k in targets)
    assert name in proc.stdout  # the printed table's title
    if name == "train_throughput":
        # The same rows, LoRA and loss through tuneyard's whole job and TRL's SFTTrainer (with and without
        # padding-free batches): the same computation, so the same final loss; every figure from real runs.
        assert result["skipped"] == {}, result["skipped"]
        assert figures["final_loss_max_rel_diff"] < 1e-3, result["losses"]
        assert figures["supervised_tokens"] == figures["tuneyard_own_supervised_tokens"]
        for side in ("tuneyard", "trl", "trl_padding_free"):
            assert figures[f"{side}_tokens_per_cpu_s"] > 0 and figures[f"{side}_script_s"] > 0
            assert result["phases"][side][0]["training loop"] > 0
