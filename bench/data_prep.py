"""Data preparation speed and memory: the full pipeline against the raw fast tokenizer, and peak RSS vs size.

    python -m bench data_prep                 # 1 GB of chat rows (the issue's figure; several minutes)
    python -m bench data_prep --mb 200        # smaller, for a quick look

1. Throughput: on the same rows (``--sample-mb``), (a) the raw batched fast-tokenizer pass over the
   chat-templated text (``tokenizer(texts)``, the upper bound a pipeline can reach) and (b) tuneyard's
   pipeline as the prepare step runs it (``tuneyard.data.pipeline.encode_stream``): JSON parsing, format
   conversion, chat template, tokenisation, loss masking and Arrow tables, in one process and in the pool
   of one process per core that the prepare step uses for big files. Prints tokens/s of each and the
   ratio pool/raw (target >= 0.7).
2. Memory: the real prepare step (``python -m tuneyard.data.prepare JOBDIR``, a subprocess each) on the
   full file and on a tenth of it, both through the pool; prints the peak RSS of the prepare process and
   of its largest worker for each, and the big/small ratios (target <= 1.5: memory does not grow with
   the data).

The tokenizer is the first of: ``--tokenizer`` (a local directory or a cached hub id), else the tiny
byte-level BPE tokenizer tuneyard builds for its tests (named in the output either way).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORDS = (
    "the", "model", "learns", "to", "answer", "questions", "about", "data", "pipelines", "tokenisers",
    "templates", "and", "masks", "while", "keeping", "memory", "flat", "as", "files", "grow", "from",
    "megabytes", "to", "gigabytes", "of", "conversations",
)


def write_rows(path: Path, megabytes: float, seed: int = 0) -> int:
    """Write multi-turn chat rows until the file holds ``megabytes`` MB; return the row count."""
    rng = random.Random(seed)
    target = int(megabytes * 1024 * 1024)
    n = 0
    with path.open("w") as f:
        while f.tell() < target:
            turns = []
            for _ in range(rng.randint(1, 3)):
                turns.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(8, 60)))})
                turns.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(8, 120)))})
            f.write(json.dumps({"messages": [{"role": "system", "content": "Be helpful."}, *turns]}) + "\n")
            n += 1
    return n


def throughput(path: Path, tokenizer: Any, sample_mb: float) -> dict[str, float]:
    """Tokens/s of the raw batched tokenizer and of tuneyard's pipeline (as the prepare step runs it), same rows."""
    from tuneyard.data.formats import convert_row
    from tuneyard.data.pipeline import default_workers, encode_stream
    from tuneyard.data.templates import resolve_template
    from tuneyard.data.tokenize import EncodeStats

    rows, size = [], 0
    with path.open() as f:
        for line in f:
            size += len(line)
            rows.append(line)
            if size > sample_mb * 1024 * 1024:
                break
    template = resolve_template(tokenizer, None)
    texts = [tokenizer.apply_chat_template(json.loads(r)["messages"], tokenize=False, chat_template=template)
             for r in rows]
    t0 = time.perf_counter()
    raw_tokens = 0
    for i in range(0, len(texts), 1000):
        raw_tokens += sum(len(ids) for ids in tokenizer(texts[i:i + 1000], add_special_tokens=False)["input_ids"])
    raw_s = time.perf_counter() - t0
    options = {"template": template, "max_length": 1 << 20}
    out: dict[str, float] = {"rows": len(rows), "raw_tokens_per_s": raw_tokens / raw_s}
    for label, workers in (("one_process", 1), ("pipeline", default_workers())):
        # From the raw lines, as the prepare step reads them: parse, convert, render, tokenise, mask, to Arrow.
        t0 = time.perf_counter()
        stream = ((n, convert_row(json.loads(line), "auto")) for n, line in enumerate(rows, 1))
        stats = EncodeStats()
        for _ in encode_stream(stream, tokenizer, options, stats, workers=workers):
            pass
        tokens = stats.tokens
        seconds = time.perf_counter() - t0
        assert tokens == raw_tokens, (label, tokens, raw_tokens)
        out[f"{label}_tokens_per_s"] = tokens / seconds
        out[f"{label}_workers"] = workers
    out["ratio"] = out["pipeline_tokens_per_s"] / out["raw_tokens_per_s"]
    return out


def prepare_peak_rss(path: Path, model_dir: Path, work: Path) -> tuple[float, float, float]:
    """(peak RSS in MiB of the prepare process, of its largest worker process, seconds) of the real prepare
    step on ``path``, run as its own process."""
    from tuneyard.domain.spec import DataSource, DataSpec, Hyperparameters, ModelSpec, TrainingSpec
    from tuneyard.jobdir import JobDir, PreparedOk

    job = JobDir(work / f"job-{path.stem}").create()
    spec = TrainingSpec(model=ModelSpec(name=str(model_dir), source="local"),
                        data=DataSpec(train=DataSource(path=str(path)), max_length=4096),
                        hyperparameters=Hyperparameters(n_epochs=1, batch_size=8))
    job.spec.write_text(spec.model_dump_json())
    env = {"PYTHONPATH": str(REPO), "TUNEYARD_HOME": str(work / "home"), "TUNEYARD_TOKENISED_CACHE_BYTES": "0",
           # Both files through the same pool of processes (a small one would otherwise stay in-process).
           "TUNEYARD_PREPARE_PARALLEL_MIN_EXAMPLES": "1",
           "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    t0 = time.perf_counter()
    peak_file = work / f"peak-{path.stem}.json"
    proc = subprocess.run([sys.executable, "-m", "bench._peak", str(peak_file), "tuneyard.data.prepare",
                           str(job.root)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    prepared = job.read_prepared()
    if proc.returncode != 0 or not isinstance(prepared, PreparedOk):
        raise RuntimeError(f"prepare failed: {prepared} {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    peak = json.loads(peak_file.read_text())
    return peak["max_rss_mb"], peak["children_max_rss_mb"], seconds


def bench(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both measurements; print and write bench/results/data_prep.json."""
    from bench.common import print_table, write_result

    ap = argparse.ArgumentParser(prog="python -m bench data_prep")
    ap.add_argument("--mb", type=float, default=1024.0, help="size of the big JSONL file in MB (default 1024)")
    ap.add_argument("--sample-mb", type=float, default=150.0,
                    help="MB of rows for the throughput comparison (enough to amortise starting the pool)")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory or cached hub id (default: tiny)")
    args = ap.parse_args(argv or [])
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="tuneyard-bench-data-") as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        if args.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
            tokenizer.save_pretrained(str(model_dir))
            from transformers import AutoConfig

            AutoConfig.from_pretrained(args.tokenizer).save_pretrained(str(model_dir))
            name = args.tokenizer
        else:
            from tuneyard.demo.tiny import build_tiny_model

            build_tiny_model(model_dir)
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            name = "tuneyard tiny byte-level BPE (512 tokens)"
        big, small = work / "big.jsonl", work / "small.jsonl"
        n_big = write_rows(big, args.mb)
        write_rows(small, args.mb / 10)
        tp = throughput(big, tokenizer, args.sample_mb)
        rss_small, worker_small, s_small = prepare_peak_rss(small, model_dir, work)
        rss_big, worker_big, s_big = prepare_peak_rss(big, model_dir, work)
    figures = {
        "tokenizer": name, "file_mb": args.mb, "rows": n_big,
        "raw_tokens_per_s": round(tp["raw_tokens_per_s"]),
        "one_process_tokens_per_s": round(tp["one_process_tokens_per_s"]),
        "pipeline_tokens_per_s": round(tp["pipeline_tokens_per_s"]), "pipeline_workers": tp["pipeline_workers"],
        "ratio": round(tp["ratio"], 3),
        "prepare_peak_rss_mb_small": round(rss_small), "prepare_peak_rss_mb_big": round(rss_big),
        "rss_ratio_big_small": round(rss_big / rss_small, 3),
        "worker_peak_rss_mb_small": round(worker_small), "worker_peak_rss_mb_big": round(worker_big),
        "worker_rss_ratio_big_small": round(worker_big / max(worker_small, 1), 3),
        "prepare_seconds_small": round(s_small, 1), "prepare_seconds_big": round(s_big, 1),
    }
    targets = {"ratio": ">= 0.7", "rss_ratio_big_small": "<= 1.5", "worker_rss_ratio_big_small": "<= 1.5"}
    write_result("data_prep", figures, targets)
    print_table("data_prep", [(k, v, targets.get(k)) for k, v in figures.items()])
    return {"figures": figures, "targets": targets}


if __name__ == "__main__":
    bench(sys.argv[1:])
