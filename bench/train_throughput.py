"""Training throughput: tuneyard against what a user would run instead, side by side, interleaved over rounds.

    python -m bench train_throughput                      # CPU: 2,000 rows, 3 rounds, every peer that installs
    python -m bench train_throughput --rows 800 --rounds 1 --systems tuneyard,trl_padding_free
    python -m bench train_throughput --preset gpu         # Llama-3.2-1B shape, length 2048, on a CUDA GPU

Every system trains the same random-weight Llama-shaped model (CPU: 4 layers, hidden 256) with the same LoRA
(r=16, alpha 32, all linear layers, no dropout), batch 8, one epoch, learning rate 2e-4, seed 0, loss on the
assistant's tokens only, on the same JSONL chat rows (one user and one assistant turn; token lengths skewed:
log-normal, median max_len/8, up to max_len):

- ``tuneyard``: the whole job through the OpenAI API of a running server (upload, create, poll until
  succeeded; the adapter on disk), timed from the events and logs it leaves in the job directory;
- ``trl``: TRL ``SFTTrainer`` as its docs show (``bench/peers/trl_sft.py``), ``trl_padding_free`` the same with
  ``padding_free=True`` (FlashAttention 2 on a GPU where installed);
- ``llamafactory`` (and ``llamafactory_neat_packing``, its contamination-free packing) and ``axolotl``, each in a
  venv of its own (``bench/peers/__init__.py``), skipped with the reason when they do not install or run.

Useful tokens are counted once, by this script, from the rows tokenised with the model's chat template (the
same for every system, not each one's counters): the supervised (assistant) tokens, which the figures and
ratios use, and all non-pad tokens (``total_tokens``, printed). A system's training loop runs from the
Trainer's train begin to its end (tuneyard: its "Training started" event to its last step's metrics event);
its CPU seconds are the training process's CPU time over that span (peers: ``time.process_time()`` in the
loop's callbacks; tuneyard: the trainer process's ``/proc`` CPU time sampled every 50 ms, interpolated at the
event times), so a busy machine, which stretches wall time, decides the ratio less. Ratios are the median of
the rounds' ratios (tuneyard / peer, the same round); spread is min-max over the rounds.

On a GPU (``--preset gpu``) MFU uses the LoRA formula of docs: (4N + 12*L*H*Q*T) FLOPs per trained token, N
the non-embedding parameters, T the length an average token's row has, against the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LORA = {"r": 16, "alpha": 32}
LEARNING_RATE = 2e-4
SEED = 0
# Dense bf16 peak FLOP/s per GPU, by the name torch reports.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

PRESETS: dict[str, dict[str, Any]] = {
    # The model: Llama-shaped, 4 layers, hidden 256 (intermediate 2x, as the demo's builder makes it).
    "cpu": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 4, "intermediate": 512, "vocab": None,
            "tie": False, "max_len": 512, "batch": 8, "rows": 2000, "rounds": 3, "device": "cpu"},
    # Seconds, for the test suite's smoke run: the figures mean nothing.
    "smoke": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 4, "intermediate": 128, "vocab": None,
              "tie": False, "max_len": 128, "batch": 4, "rows": 8, "rounds": 1, "device": "cpu"},
    # Llama-3.2-1B's shape (random weights): 16 layers, 2048 wide, GQA 32/8, 128k vocabulary, tied head.
    "gpu": {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "intermediate": 8192, "vocab": 128256,
            "tie": True, "max_len": 2048, "batch": 8, "rows": 2000, "rounds": 3, "device": "cuda"},
}
SYSTEMS = ["tuneyard", "trl", "trl_padding_free", "llamafactory", "llamafactory_neat_packing", "axolotl"]
DEFAULT_SYSTEMS = {"cpu": SYSTEMS, "smoke": ["tuneyard", "trl", "trl_padding_free"],
                   "gpu": ["tuneyard", "trl", "trl_padding_free"]}
# The bench's chat template: ChatML with {% generation %} around what the assistant is taught (its text and
# end-of-turn marker), which TRL's assistant_only_loss needs and this script's token count reads.
TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = ["the", "capital", "of", "France", "is", "Paris", "and", "Japan", "has", "Tokyo", "while", "Italy", "keeps",
         "Rome", "so", "Spain", "answers", "Madrid", "Germany", "Berlin", "Egypt", "Cairo", "Peru", "Lima", "Kenya",
         "Nairobi", "Chile", "Santiago", "Greece", "Athens", "Norway", "Oslo", "Cuba", "Havana", "what", "a", "city",
         "where", "does", "one", "live", "question", "answer", "because", "therefore"]


def _env() -> dict[str, str]:
    """This checkout importable in a child process, keeping any PYTHONPATH already set."""
    path = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------------- inputs


def build_model(out: Path, p: dict[str, Any]) -> Any:
    """Write the random Llama-shaped model and the demo tokenizer (with the bench's template); return the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneyard.demo.tiny import build_tokenizer, sample_rows

    tok = build_tokenizer([json.dumps(r) for r in sample_rows()], out)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(out))
    config = LlamaConfig(vocab_size=p["vocab"] or len(tok), hidden_size=p["hidden"],
                         intermediate_size=p["intermediate"], num_hidden_layers=p["layers"],
                         num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                         max_position_embeddings=max(2048, p["max_len"]), pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=p["tie"],
                         # As the demo's model: with 0.02 a random model this small barely moves under LoRA.
                         initializer_range=0.1 if p["device"] == "cpu" else 0.02)
    torch.manual_seed(0)
    with torch.device("cuda" if p["device"] == "cuda" else "cpu"):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16 if p["device"] == "cuda" else torch.float32).save_pretrained(str(out))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the training processes need the whole GPU
    return tok


def build_rows(tok: Any, n: int, max_len: int, seed: int = 0) -> tuple[list[dict], dict[str, int]]:
    """``n`` chat rows whose rendered lengths are skewed (log-normal, median max_len/8, at most max_len tokens),
    and their token counts: {"supervised_tokens", "total_tokens", "rows"}, from the template's assistant mask."""
    import random

    rng = random.Random(seed)
    rows, supervised, total = [], 0, 0
    for _ in range(n):
        target = int(min(max_len, max(24, rng.lognormvariate(math.log(max_len / 8), 0.9))))
        # About 4 tokens a word with this tokenizer; trimmed below until the row fits.
        words = max(2, target // 4)
        prompt_words = max(1, int(words * 0.3))  # the prompt part carries no loss, as with chat data
        text = [rng.choice(WORDS) for _ in range(words)]
        while True:
            row = {"messages": [{"role": "user", "content": " ".join(text[:prompt_words])},
                                {"role": "assistant", "content": " ".join(text[prompt_words:])}]}
            enc = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
            if len(enc["input_ids"]) <= target or len(text) <= prompt_words + 1:
                break
            text.pop()
        rows.append(row)
        supervised += sum(enc["assistant_masks"])
        total += len(enc["input_ids"])
    return rows, {"supervised_tokens": supervised, "total_tokens": total, "rows": n}


def write_jsonl(rows: list[dict], path: Path) -> Path:
    """The rows as OpenAI chat JSONL, the one file every system reads."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -------------------------------------------------------------------------------------------- tuneyard


def _proc_cpu(pid: int) -> tuple[float, float] | None:
    """(CPU seconds so far, start time as a Unix time) of ``pid`` from /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, _boot_time() + int(fields[19]) / tick


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime"):
            return float(line.split()[1])
    return 0.0


class _Sampler(threading.Thread):
    """Samples the CPU time of a job's processes (by their pid files) every 50 ms until stopped."""

    def __init__(self, jobs_dir: Path, job_id: str) -> None:
        super().__init__(daemon=True)
        self.jobs_dir, self.job_id = jobs_dir, job_id
        self.samples: dict[str, list[tuple[float, float]]] = {"prepare": [], "train": []}
        self.started: dict[str, float] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        root: Path | None = None
        pids: dict[str, int] = {}
        while not self._halt.is_set():
            if root is None:
                root = next(iter(self.jobs_dir.glob(f"*/{self.job_id}")), None)
            for phase in self.samples if root is not None else ():
                try:
                    pid = int((root / f"{phase}.pid").read_text().strip())
                except (OSError, ValueError):
                    continue
                if pids.get(phase) not in (None, pid):
                    self.samples[phase].clear()  # a retried phase: count the attempt that finished
                pids[phase] = pid
                got = _proc_cpu(pid)
                if got is not None:
                    self.samples[phase].append((time.time(), got[0]))
                    self.started.setdefault(phase, got[1])
            self._halt.wait(0.05)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def cpu_at(self, phase: str, t: float) -> float | None:
        """The phase's process CPU seconds at Unix time ``t``, interpolated between samples."""
        s = self.samples[phase]
        if not s:
            return None
        if t <= s[0][0]:
            return s[0][1]
        for (t0, c0), (t1, c1) in zip(s, s[1:], strict=False):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1
        return s[-1][1]

    def total(self, phase: str) -> float:
        """CPU seconds the phase's process used while sampled (the last sample less the first)."""
        s = self.samples[phase]
        return s[-1][1] - s[0][1] if len(s) > 1 else 0.0


def _log_time(path: Path, needle: str) -> float | None:
    """The Unix time of the first line of a trainer log containing ``needle`` (logging's local asctime)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if needle in line:
            parts = line.split()
            try:
                return datetime.strptime(f"{parts[1]} {parts[2]}", "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except (IndexError, ValueError):
                return None
    return None


class Tuneyard:
    """A running tuneyard server (worker on, CPU or GPU) that takes the bench's jobs through the OpenAI API."""

    def __init__(self, work: Path, model_dir: Path) -> None:
        from bench.api_load import _Server

        self.home = work / "tuneyard-home"
        self.home.mkdir()
        self.server = _Server(self.home, {"TUNEYARD_LOCAL_ROOTS": str(work)})
        self.headers = {"Authorization": f"Bearer {self.server.key('bench')}"}
        self.model_dir = model_dir

    def stop(self) -> None:
        self.server.stop()

    def run(self, rows: Path, p: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One job, upload to adapter on disk: marks, loop CPU seconds, losses."""
        import httpx

        from tuneyard.jobdir import iter_events

        url, h = self.server.url, self.headers
        t_upload = time.time()
        f = httpx.post(f"{url}/v1/files", headers=h, files={"file": ("rows.jsonl", rows.read_bytes())},
                       data={"purpose": "fine-tune"}, timeout=120).json()
        t_submit = time.time()
        hp = {"n_epochs": 1, "batch_size": p["batch"], "learning_rate": LEARNING_RATE, "lora": True,
              "lora_r": LORA["r"], "lora_alpha": LORA["alpha"], "context_length": p["max_len"]}
        job = httpx.post(f"{url}/v1/fine_tuning/jobs", headers=h, timeout=120,
                         json={"model": str(self.model_dir), "training_file": f["id"], "seed": SEED,
                               "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}).json()
        if "id" not in job:
            raise RuntimeError(f"tuneyard refused the job: {job}")
        sampler = _Sampler(self.home / "jobs", job["id"])
        sampler.start()
        seen: dict[str, float] = {}
        try:
            while True:
                j = httpx.get(f"{url}/v1/fine_tuning/jobs/{job['id']}", headers=h, timeout=120).json()
                now = time.time()
                if j["status"] in ("queued", "running", "succeeded"):
                    seen.setdefault("queued", now)
                if j["status"] == "succeeded":
                    seen["succeeded"] = now
                    break
                if j["status"] in ("failed", "cancelled") or now - t_submit > timeout:
                    raise RuntimeError(f"tuneyard job {job['id']} did not succeed: {j.get('status')} "
                                       f"{j.get('error')}")
                time.sleep(0.05)
        finally:
            sampler.stop()
        root = next(iter((self.home / "jobs").glob(f"*/{job['id']}")))
        events = list(iter_events(root / "events.jsonl"))
        begin = next(e.ts for e in events if e.type == "message" and e.message.startswith("Training started"))
        steps = [e for e in events if e.type == "metrics" and e.data.get("train_loss") is not None]
        finished = next(e.ts for e in events if e.type == "message" and e.message.startswith("Training finished"))
        log = root / "logs" / "train-1.log"
        # The prepare step's last event ends it (the worker may launch the trainer before a poll sees "queued").
        prepared_at = max((e.ts for e in events if e.source == "prepare" and e.ts), default=seen["queued"])
        marks = {"upload": t_upload, "submit": t_submit, "queued": prepared_at,
                 "spawn": sampler.started.get("train"), "rows_read": _log_time(log, "training rows"),
                 "train_begin": begin, "train_end": steps[-1].ts, "saved": finished, "exit": seen["succeeded"]}
        c0, c1 = sampler.cpu_at("train", begin), sampler.cpu_at("train", steps[-1].ts)
        prepared = json.loads((root / "prepared.json").read_text())
        return {"marks": marks, "cpu": {"train_begin": c0, "train_end": c1},
                "losses": {int(e.data["step"]): float(e.data["train_loss"]) for e in steps},
                "steps": int(steps[-1].data["step"]), "script_wall_s": seen["succeeded"] - t_upload,
                "script_cpu_s": sampler.total("prepare") + sampler.total("train"),
                "own_count": {"total_tokens": prepared.get("train_tokens"),
                              "supervised_tokens": prepared.get("trainable_tokens")}}


# ----------------------------------------------------------------------------------------------- report


def _phases(r: dict[str, Any]) -> dict[str, float | None]:
    """The whole run split into named spans (seconds), from its marks; None where a mark is missing."""
    m = r["marks"]

    def span(a: str, b: str) -> float | None:
        return None if m.get(a) is None or m.get(b) is None else round(m[b] - m[a], 2)

    if "submit" in m:  # tuneyard's job
        return {"upload": span("upload", "submit"), "prepare": span("submit", "queued"),
                "launch": span("queued", "spawn"), "start-up": span("spawn", "rows_read"),
                "model load": span("rows_read", "train_begin"), "training loop": span("train_begin", "train_end"),
                "save": span("train_end", "saved"), "finish": span("saved", "exit"),
                "whole": span("upload", "exit")}
    return {"upload": None, "prepare": span("imported", "data_loaded"), "launch": None,
            "start-up": span("spawn", "imported"), "model load": span("data_loaded", "train_begin"),
            "training loop": span("train_begin", "train_end"), "save": span("train_end", "saved"),
            "finish": span("saved", "exit"), "whole": span("spawn", "exit")}


def _rates(r: dict[str, Any], useful: int) -> dict[str, float]:
    loop = r["marks"]["train_end"] - r["marks"]["train_begin"]
    cpu = r["cpu"]["train_end"] - r["cpu"]["train_begin"]
    return {"per_s": useful / loop, "per_cpu_s": useful / cpu if cpu > 0 else float("nan"), "loop_s": loop,
            "loop_cpu_s": cpu, "cores_busy": cpu / loop}


def _spread(xs: list[float]) -> str:
    return f"{min(xs):,.4g}-{max(xs):,.4g}" if len(xs) > 1 else ""


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


def _final_loss(r: dict[str, Any]) -> float | None:
    losses = {int(k): v for k, v in r["losses"].items()}
    return losses[max(losses)] if losses else None


def bench(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every system over the rounds and return {"figures", "targets", ...} (also printed)."""
    from bench.common import print_table, write_result
    from bench.peers import PEERS, peer_python, run_peer

    ap = argparse.ArgumentParser(prog="python -m bench train_throughput")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="model/data size (default: gpu when CUDA is available, else cpu)")
    ap.add_argument("--rows", type=int, default=None, help="chat rows (default: the preset's)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds, each running every system once")
    ap.add_argument("--systems", default=None, help=f"comma-separated, of {', '.join(SYSTEMS)}")
    ap.add_argument("--rebuild-venvs", action="store_true", help="rebuild the peers' venvs (after a failure)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one system's run may take")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv or [])
    # Stopped with SIGTERM, the finally below still stops the server (and with it the job's trainer).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import torch

    preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    p = dict(PRESETS[preset])
    if p["device"] == "cuda" and not torch.cuda.is_available():
        sys.exit(f"the {preset} preset needs a CUDA GPU; torch {torch.__version__} sees none on this machine "
                 "(run it on a GPU machine, or use --preset cpu)")
    p["rows"] = args.rows or p["rows"]
    rounds = args.rounds or p["rounds"]
    systems = args.systems.split(",") if args.systems else DEFAULT_SYSTEMS[preset]
    if unknown := [s for s in systems if s not in SYSTEMS]:
        sys.exit(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")

    skipped: dict[str, str] = {}
    pythons: dict[str, str] = {}
    for name in systems:
        if name == "tuneyard":
            continue
        py, why = peer_python(PEERS[name], rebuild=args.rebuild_venvs)
        if py is None:
            skipped[name] = why
            print(f"skipping {name}: {why}", flush=True)
        else:
            pythons[name] = py
    running = [s for s in systems if s not in skipped]

    work = Path(tempfile.mkdtemp(prefix="tuneyard-bench-"))
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in running}
    load: list[float] = []
    tuneyard: Tuneyard | None = None
    try:
        model_dir = work / "model"
        tok = build_model(model_dir, p)
        rows, count = build_rows(tok, p["rows"], p["max_len"])
        rows_path = write_jsonl(rows, work / "rows.jsonl")
        useful = count["supervised_tokens"]
        config = {"model": str(model_dir), "rows": str(rows_path), "batch": p["batch"], "lr": LEARNING_RATE,
                  "epochs": 1, "seed": SEED, "max_len": p["max_len"], "lora_r": LORA["r"],
                  "lora_alpha": LORA["alpha"], "device": p["device"]}
        if "tuneyard" in running:
            tuneyard = Tuneyard(work, model_dir)
        for rnd in range(rounds):
            # Each round starts with a different system, so none always runs first (or last) under the load.
            order = running[rnd % len(running):] + running[:rnd % len(running)]
            for name in order:
                load.append(os.getloadavg()[0])
                print(f"round {rnd + 1}/{rounds}: {name} (load {load[-1]:.1f})", flush=True)
                try:
                    if name == "tuneyard":
                        assert tuneyard is not None
                        r = tuneyard.run(rows_path, p, args.timeout)
                    else:
                        r = run_peer(name, pythons[name], {**config, "output": str(work / f"{name}-{rnd}" / "out")},
                                     work / f"{name}-{rnd}", args.timeout)
                except RuntimeError as e:
                    if name == "tuneyard" or name.startswith("trl"):
                        raise  # the systems the targets are about: a failure is the bench's
                    skipped[name] = f"failed to run: {e}"
                    print(f"skipping {name}: {e}", flush=True)
                    running.remove(name)
                    results.pop(name, None)
                    break
                results[name].append({**r, **_rates(r, useful)})
                got = results[name][-1]
                # One line a run, so a long run's figures so far are on record if it is stopped.
                print(f"  {name} round {rnd + 1}: loop {got['loop_s']:.1f} s, {got['loop_cpu_s']:.1f} CPU-s, "
                      f"{got['per_s']:.0f} useful tok/s, {got['per_cpu_s']:.0f} per CPU-s, whole "
                      f"{got['script_wall_s']:.1f} s, final loss {_final_loss(got)}, phases {_phases(got)}",
                      flush=True)
                shutil.rmtree(work / f"{name}-{rnd}" / "out", ignore_errors=True)
    finally:
        if tuneyard is not None:
            tuneyard.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    figures: dict[str, Any] = {"preset": preset, "rows": p["rows"], "rounds": rounds,
                               "supervised_tokens": useful, "total_tokens": count["total_tokens"],
                               "load_median": round(statistics.median(load), 1) if load else None}
    spread: dict[str, str] = {}
    for name, rs in results.items():
        for key in ("per_s", "per_cpu_s", "cores_busy"):
            xs = [r[key] for r in rs]
            figures[f"{name}_tokens_{key}" if key != "cores_busy" else f"{name}_cores_busy"] = round(
                statistics.median(xs), 2)
            spread[f"{name}_{key}"] = _spread(xs)
        figures[f"{name}_final_loss"] = _final_loss(rs[0])
        figures[f"{name}_script_s"] = round(statistics.median(r["script_wall_s"] for r in rs), 2)
        spread[f"{name}_script_s"] = _spread([r["script_wall_s"] for r in rs])
    if "tuneyard" in results:
        own = results["tuneyard"][0]["own_count"]
        figures["tuneyard_own_supervised_tokens"] = own["supervised_tokens"]  # its prepare step's count
        for name in results:
            if name == "tuneyard":
                continue
            for key in ("per_s", "per_cpu_s"):
                xs = [a[key] / b[key] for a, b in zip(results["tuneyard"], results[name], strict=True)]
                figures[f"tuneyard_vs_{name}_{key}"] = round(statistics.median(xs), 3)
                spread[f"tuneyard_vs_{name}_{key}"] = _spread(xs)
            pairs = zip(results["tuneyard"], results[name], strict=True)
            xs = [b["script_wall_s"] / a["script_wall_s"] for a, b in pairs]
            figures[f"{name}_script_over_tuneyard_job"] = round(statistics.median(xs), 3)
        same = [n for n in ("trl", "trl_padding_free") if n in results]
        if same:
            ours = figures["tuneyard_final_loss"]
            figures["final_loss_max_rel_diff"] = round(max(abs(figures[f"{n}_final_loss"] - ours) / abs(ours)
                                                           for n in same), 5)
    lf = [n for n in ("llamafactory", "llamafactory_neat_packing") if n in results and "tuneyard" in results]
    if lf:
        figures["tuneyard_vs_llamafactory_best_per_cpu_s"] = min(figures[f"tuneyard_vs_{n}_per_cpu_s"] for n in lf)

    if p["device"] == "cpu":
        wanted = {"tuneyard_vs_trl_padding_free_per_cpu_s": ">= 1.2",
                  "tuneyard_vs_llamafactory_best_per_cpu_s": ">= 1.5",
                  "trl_padding_free_script_over_tuneyard_job": ">= 1.0"}
    else:
        wanted = {"tuneyard_vs_trl_padding_free_per_s": ">= 1.3", "tuneyard_mfu": ">= 0.40"}
        name = torch.cuda.get_device_name(0)
        figures["device"] = name
        lengths = [len(tok.apply_chat_template(r["messages"], tokenize=True)) for r in rows]
        token_mean_len = sum(x * x for x in lengths) / sum(lengths)  # the length an average token's row has
        for s in results:
            m = mfu(count["total_tokens"] / statistics.median(r["loop_s"] for r in results[s]), p,
                    token_mean_len, name)
            figures[f"{s}_mfu"] = None if m is None else round(m, 4)
    # A target whose peer was skipped (or not asked for) is listed as not measured, not counted as met or missed.
    targets = {k: v for k, v in wanted.items() if figures.get(k) is not None}
    notes = {"preset_config": p, "spread": spread, "skipped": skipped,
             "targets_not_measured": {k: v for k, v in wanted.items() if k not in targets},
             "phases": {s: [_phases(r) for r in rs] for s, rs in results.items()},
             "losses": {s: rs[0]["losses"] for s, rs in results.items()}}
    write_result("train_throughput", figures, targets, notes)
    print_table(f"train_throughput ({preset}, {rounds} round(s), {p['rows']} rows)",
                [(k, v, " ".join(x for x in (targets.get(k), spread.get(k) and f"[{spread[k]}]") if x))
                 for k, v in figures.items()]
                + [(k, "not measured", v) for k, v in notes["targets_not_measured"].items()]
                + [(k, f"skipped: {why}", "") for k, why in skipped.items()])
    _print_phases({s: rs for s, rs in results.items()})
    return {"figures": figures, "targets": targets}


def _print_phases(results: dict[str, list[dict[str, Any]]]) -> None:
    """The whole run of each system split into spans (median over the rounds)."""
    from rich.console import Console
    from rich.table import Table

    names = ["upload", "prepare", "launch", "start-up", "model load", "training loop", "save", "finish", "whole"]
    table = Table(title="whole run, seconds (median of rounds): tuneyard upload to adapter; peers spawn to exit")
    table.add_column("system")
    for n in names:
        table.add_column(n, justify="right")
    for s, rs in results.items():
        ph = [_phases(r) for r in rs]
        cells = []
        for n in names:
            xs = [x[n] for x in ph if x[n] is not None]
            cells.append(f"{statistics.median(xs):.2f}" if xs else "")
        table.add_row(s, *cells)
    Console().print(table)


if __name__ == "__main__":
    bench(sys.argv[1:])
