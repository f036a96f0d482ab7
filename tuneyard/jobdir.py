"""The on-disk layout of one job and the event-file protocol between its processes and the scheduler.

A job directory is the durable hand-off between the control plane and the processes it starts
(prepare step, trainer). Those processes never talk to the database: they append events to
``events.jsonl`` (one JSON object a line, numbered by ``seq``) and write ``result.json`` /
``prepared.json`` atomically when they finish. The scheduler tails the event file and records each
event once (idempotent on ``(job_id, seq)``), so a server restart loses nothing: it resumes reading
at the last recorded ``seq``.

Layout::

    <jobs_dir>/<org_id>/<job_id>/
        spec.json            the TrainingSpec as submitted ("auto" left in)
        resolved_spec.json   the TrainingSpec with every "auto" resolved (written by prepare)
        prepared.json        outcome of the prepare step (counts, tokens, steps, or errors)
        data/train, data/validation   tokenised splits (data.arrow each: tuneyard.data.splits)
        events.jsonl         append-only event log of every process of the job
        checkpoints/checkpoint-<step>/   adapter/model + optimizer + trainer state; complete only once it
                             holds tuneyard_checkpoint.json (written last), so a half-written one is ignored
        output/              the final adapter or model + tokenizer (written to .output.partial, then renamed)
        result.json          trainer outcome: {"status": "succeeded"|"stopped"|"failed", ...}
        logs/<phase>-<attempt>.log  stdout/stderr of each process
        tracking/tensorboard/ TensorBoard event files of every attempt (copied into output/tensorboard at the end)
        tracking/wandb/      W&B's run files (offline runs stay here); tracking/runs.json: tracker run ids, so
                             that a resumed job continues the same runs
        control/             files the scheduler drops to ask the trainer something (e.g. "stop")
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneyard import jsontext

EVENT_TYPES = ("message", "metrics", "checkpoint", "progress")
# Written last into a checkpoint directory by the trainer: its presence is what makes the checkpoint resumable.
CHECKPOINT_MARKER = "tuneyard_checkpoint.json"


@dataclass(frozen=True)
class JobDir:
    """Paths inside one job's directory."""

    root: Path

    @property
    def spec(self) -> Path:
        return self.root / "spec.json"

    @property
    def resolved_spec(self) -> Path:
        return self.root / "resolved_spec.json"

    @property
    def prepared(self) -> Path:
        return self.root / "prepared.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def control(self) -> Path:
        return self.root / "control"

    @property
    def tracking(self) -> Path:
        return self.root / "tracking"

    def create(self) -> JobDir:
        for p in (self.root, self.logs, self.control):
            p.mkdir(parents=True, exist_ok=True)
        return self

    def stop_requested(self) -> str | None:
        """The reason the scheduler asked the trainer to stop ("cancel", "pause"), if it did."""
        p = self.control / "stop"
        try:
            return p.read_text().strip() or "stop"
        except FileNotFoundError:
            return None


def latest_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint with the highest step that carries the completion marker, if any."""
    found = []
    for d in checkpoints.glob("checkpoint-*"):
        step = d.name.removeprefix("checkpoint-")
        if step.isdigit() and (d / CHECKPOINT_MARKER).is_file():
            found.append((int(step), d))
    return max(found)[1] if found else None


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Compact: json only uses its C encoder without indentation, and every submit writes spec.json.
    text = json.dumps(obj, default=str)
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    """Parsed JSON at ``path``, or None when it does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class EventWriter:
    """Appends numbered events to a job's event log; continues the numbering of an existing file."""

    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        self.source = source
        self.seq = _last_seq(path)

    def emit(self, type: str, message: str, data: dict | None = None, level: str = "info") -> None:
        """Append one event (flushed and fsynced: it must survive a crash of this process)."""
        assert type in EVENT_TYPES, type
        self.seq += 1
        # A diverging loss (NaN) or an error naming a file whose name is not UTF-8 must still be recordable
        # by every store: PostgreSQL's json takes no NaN, and no UTF-8 text holds a lone surrogate.
        rec = {"seq": self.seq, "ts": time.time(), "source": self.source, "type": type, "level": level,
               "message": jsontext.storable(message), "data": jsontext.storable(data or {})}
        line = json.dumps(rec, default=_json_default) + "\n"
        with self.path.open("a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _json_default(o: Any) -> Any:
    try:
        return jsontext.storable(float(o))
    except (TypeError, ValueError):
        return str(o)


def _last_seq(path: Path) -> int:
    last = 0
    for rec in iter_events(path):
        last = max(last, rec["seq"])
    return last


def iter_events(path: Path, after_seq: int = 0):
    """Yield complete events with ``seq > after_seq``; a torn last line (crash mid-write) is skipped."""
    try:
        f = path.open()
    except FileNotFoundError:
        return
    with f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("seq", 0) > after_seq:
                yield rec
