"""Generation by a fine-tuned model: time to the first token and tokens/s, through the API, beside plain
transformers + PEFT in this process.

    python -m bench inference                     # the tiny model, CPU (about a minute)
    python -m bench inference --model DIR --runs 5 --tokens 128

A fresh ``tuneyard serve`` trains a one-epoch LoRA job on the sample data, then the `openai` SDK streams
``--runs`` greedy chat completions of ``--tokens`` tokens from its fine-tuned model (the first one, which
starts the inference process and loads the model, is reported apart as ``cold_first_token_s``). The
baseline loads the same base and adapter with ``PeftModel.from_pretrained`` and generates with a streamer.
Figures are medians; ``streamer_us_per_token_1024`` is the streamer's own cost per token (decoding, stop strings)
on a 1024-token completion. vLLM is not a backend yet: on a GPU machine both columns are transformers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MESSAGES = [{"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "What is the capital of Japan?"}]


def _stream(client: Any, model: str, tokens: int) -> tuple[float, float]:
    """(seconds to the first content, tokens/s of the whole request) of one streamed greedy completion."""
    t0 = time.perf_counter()
    first = None
    usage = None
    for chunk in client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=tokens, temperature=0,
                                                stop=["<never>"], stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    first = first or end
    # Over the whole request: the first content may come a few tokens late (text held back until it decodes).
    return first - t0, usage.completion_tokens / max(end - t0, 1e-9)


def _plain(model_dir: str, adapter: str, tokens: int, runs: int) -> tuple[float, float]:
    """The same with transformers + PEFT in this process, the model loaded once."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    tok = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    enc = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ttft, rates = [], []
    for _ in range(runs):
        streamer = TextIteratorStreamer(tok, skip_prompt=True)
        out: dict[str, Any] = {}

        def work(streamer: TextIteratorStreamer = streamer, out: dict[str, Any] = out) -> None:
            with torch.no_grad():
                out["ids"] = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                            streamer=streamer, pad_token_id=tok.pad_token_id)

        t0 = time.perf_counter()
        t = threading.Thread(target=work)
        t.start()
        first = None
        for piece in streamer:
            if piece and first is None:
                first = time.perf_counter()
        t.join()
        end = time.perf_counter()
        first = first or end
        n = out["ids"].shape[1] - enc["input_ids"].shape[1]
        ttft.append(first - t0)
        rates.append(n / max(end - t0, 1e-9))
    return statistics.median(ttft), statistics.median(rates)


def _streamer_cost(tokenizer_dir: str, tokens: int = 1024, runs: int = 3) -> float:
    """Microseconds per token the inference process's streamer spends (decode + stop-string search) on a
    completion of ``tokens`` tokens fed one at a time, best of ``runs``: flat in the length, or it grows with it."""
    import queue

    import torch
    from transformers import AutoTokenizer

    from tuneyard.inference.generate import _Streamer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok("Paris is the capital of France. Tokyo is the capital of Japan. " * (tokens // 8),
              add_special_tokens=False)["input_ids"][:tokens]
    best = float("inf")
    for _ in range(runs):
        st = _Streamer(tok, ["</answer>", "\n\n"], queue.Queue())
        st.put(torch.tensor([[1]]))  # the prompt comes first
        t0 = time.perf_counter()
        for i in ids:
            st.put(torch.tensor([i]))
        st.end()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6 / len(ids)


def bench(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, then time generation; print and write bench/results/inference.json."""
    import httpx
    from openai import OpenAI

    from bench.api_load import _Server
    from bench.common import print_table, write_result
    from tuneyard.demo.tiny import build_tiny_model, write_sample_jsonl

    ap = argparse.ArgumentParser(prog="python -m bench inference")
    ap.add_argument("--model", help="a local model directory (default: the tiny model)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args(argv or [])
    with tempfile.TemporaryDirectory(prefix="tuneyard-bench-infer-") as tmp:
        work = Path(tmp)
        model = Path(args.model).resolve() if args.model else build_tiny_model(work / "models" / "tiny-llama")
        (work / "home").mkdir()
        server = _Server(work / "home", {"TUNEYARD_LOCAL_ROOTS": str(model.parent)})
        try:
            key = server.key("bench")
            client = OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=600)
            f = client.files.create(file=write_sample_jsonl(work / "t.jsonl").open("rb"), purpose="fine-tune")
            job = client.fine_tuning.jobs.create(model=str(model), training_file=f.id,
                                                 hyperparameters={"n_epochs": 1, "batch_size": 4})
            while job.status not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.5)
                job = client.fine_tuning.jobs.retrieve(job.id)
            if job.status != "succeeded":
                raise RuntimeError(f"the bench job did not succeed: {job.error}")
            cold, _ = _stream(client, job.fine_tuned_model, 8)
            timed = [_stream(client, job.fine_tuned_model, args.tokens) for _ in range(args.runs)]
            loads = httpx.get(f"{server.url}/healthz").json()["inference"]
            adapter = str(work / "home" / "jobs" / "bench" / job.id / "output")
            plain_ttft, plain_rate = _plain(str(model), adapter, args.tokens, args.runs)
            streamer_us = _streamer_cost(adapter)
        finally:
            server.stop()
    figures = {"runs": args.runs, "tokens": args.tokens, "backend": loads["backend"], "device": loads["device"],
               "vllm_installed": loads["vllm"]["installed"], "cold_first_token_s": round(cold, 2),
               "first_token_s": round(statistics.median(t for t, _ in timed), 4),
               "tokens_per_s": round(statistics.median(r for _, r in timed), 1),
               "plain_first_token_s": round(plain_ttft, 4), "plain_tokens_per_s": round(plain_rate, 1),
               "streamer_us_per_token_1024": round(streamer_us)}
    targets: dict[str, Any] = {}
    write_result("inference", figures, targets)
    print_table("inference", [(k, v, targets.get(k)) for k, v in figures.items()])
    return {"figures": figures, "targets": targets}


if __name__ == "__main__":
    bench(sys.argv[1:])
