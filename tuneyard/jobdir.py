"""The job directory: its layout, and the typed files through which the worker and the job's processes talk.

A job directory is the durable hand-off between the control plane and the processes it starts
(prepare step, trainer). Those processes never talk to the database: they append events to
``events.jsonl`` (one JSON object a line, numbered by ``seq``) and write ``result.json`` /
``prepared.json`` atomically when they finish. The scheduler tails the event file and records each
event once (idempotent on ``(job_id, seq)``), so a server restart loses nothing: it resumes reading
at the last recorded ``seq``.

Every file passed between the processes is a pydantic model defined here, read and written only through the
functions here (nothing else parses them; ``tuneyard.domain.metrics`` names the metrics they carry):

- ``prepared.json``: ``PreparedOk`` | ``PreparedFailed`` (on ``ok``); prepare -> worker, trainer (the row count
  of a streamed set).
- ``events.jsonl``: one ``Event`` a line; prepare, trainer rank 0 -> worker (``Event.progress()``,
  ``Event.checkpoint()``, ``Event.start_step()`` are what the worker takes from their data).
- ``checkpoints/checkpoint-N/tuneyard_checkpoint.json``: ``CheckpointMarker``; trainer rank 0 -> trainer
  (resume), worker (pause).
- ``result.json``: ``Succeeded`` | ``Stopped`` | ``Failed`` (on ``status``); trainer -> worker.
- ``control/stop``: ``StopRequest``; service, worker -> trainer.

Compatibility: a worker adopts the processes a previous version started, and a trainer resumes from the
checkpoints an earlier one wrote, so a file in the shape an earlier version wrote must still read: fields may
be added (with a default) but never renamed or retyped, and unknown fields are ignored. ``control/stop`` stays
the bare reason as text (not JSON), which is what a trainer of any version reads; one that holds anything
else (or cannot be read) is a cancel.

A file that exists but is not its model (corrupt, truncated, hand-edited, or no readable file) raises
``ProtocolError`` naming the file and each field at fault; the worker treats it as it treats the file missing
(a prepare step or trainer that left no result), so one bad file never stops the worker loop. An event line
that is not an ``Event`` is skipped, like a torn last line.

Layout::

    <jobs_dir>/<org_id>/<job_id>/
        spec.json            the TrainingSpec as submitted ("auto" left in)
        resolved_spec.json   the TrainingSpec with every "auto" resolved (written by prepare)
        prepared.json        outcome of the prepare step (counts, tokens, steps, or the error)
        data/train, data/validation   tokenised splits (data.arrow each: tuneyard.data.splits)
        events.jsonl         append-only event log of every process of the job
        checkpoints/checkpoint-<step>/   adapter/model + optimizer + trainer state; complete only once it
                             holds tuneyard_checkpoint.json (written last), so a half-written one is ignored
        output/              the final adapter or model + tokenizer (written to .output.partial, then renamed)
        exports/<ftexp-id>/  an API export (service/exports.py): model/ (merged or adapter) + export.json
        result.json          trainer outcome: succeeded, stopped (cancel, pause, drain) or failed
        logs/<phase>-<attempt>.log  stdout/stderr of each process
        tracking/tensorboard/ TensorBoard event files of every attempt (copied into output/tensorboard at the end)
        tracking/wandb/      W&B's run files (offline runs stay here); tracking/runs.json: tracker run ids, so
                             that a resumed job continues the same runs
        control/stop         the scheduler's request that the trainer stop, and why
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
)

from tuneyard import jsontext

log = logging.getLogger("tuneyard.jobdir")

EventType = Literal["message", "metrics", "checkpoint", "progress"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
EventLevel = Literal["info", "warn", "error"]
# Why the trainer is asked to stop: "cancel" at once; "pause" (resumed by the user) and "drain" (the worker
# shutting down; the job is queued again) after saving the step's checkpoint.
StopReason = Literal["cancel", "pause", "drain"]
STOP_REASONS: tuple[str, ...] = get_args(StopReason)
# Written last into a checkpoint directory by the trainer: its presence is what makes the checkpoint resumable.
CHECKPOINT_MARKER = "tuneyard_checkpoint.json"
STOP_FILE = "stop"


class ProtocolError(ValueError):
    """A job file that exists but does not read as what its writer writes (malformed, or not a readable file)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path} is unreadable: {problem}")
        self.path = path
        self.problem = problem


class _File(BaseModel):
    # Unknown fields are ignored, not refused: a file of a newer or older version must still read.
    model_config = ConfigDict(extra="ignore")


class JobError(_File):
    """A failure as the job's ``error`` shows it: a machine code, a message for people, the field at fault."""

    code: str
    message: str
    param: str | None = None
    # The trainer rank that wrote it, when not rank 0 (torchrun tore rank 0 down before it could).
    rank: int | None = None

    @model_serializer(mode="wrap")
    def _without_rank_unless_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Only a trainer's replica rank names itself: every other error keeps the shape it always had.
        out = handler(self)
        if out.get("rank") is None:
            out.pop("rank", None)
        return out


class PreparedOk(_File):
    """``prepared.json`` of a prepare step that succeeded: the data's counts and the resolved schedule."""

    ok: Literal[True] = True
    n_train: int
    n_validation: int = 0
    # None when the trainer tokenises (lazy_tokenize, streaming): the counts come from it then.
    train_tokens: int | None = None
    trainable_tokens: int | None = None
    validation_tokens: int | None = None
    truncated: int = 0
    dropped: int = 0
    total_steps: int
    format: str | None = None
    template: str | None = None
    # A copy for the job row; resolved_spec.json is the authority. Kept as JSON: a field the spec drops later
    # must not make a prepared job of this version unreadable.
    hyperparameters: dict[str, Any]


class PreparedFailed(_File):
    """``prepared.json`` of a prepare step that refused the job (the data, the model or a setting)."""

    ok: Literal[False] = False
    error: JobError


Prepared = Annotated[PreparedOk | PreparedFailed, Field(discriminator="ok")]


class Succeeded(_File):
    """``result.json`` of a run that trained every step and saved ``output/``."""

    status: Literal["succeeded"] = "succeeded"
    output_dir: str
    trained_tokens: int | None = None
    trained_steps: int | None = None
    # Named as in tuneyard.domain.metrics; a diverged (NaN) value reads back as None.
    final_metrics: dict[str, float | None] = Field(default_factory=dict)
    adapter: bool = False


class Stopped(_File):
    """``result.json`` of a run stopped on request at a step boundary (with its checkpoint, unless cancelled)."""

    status: Literal["stopped"] = "stopped"
    reason: StopReason
    step: int = 0
    checkpoint: str | None = None


class Failed(_File):
    """``result.json`` of a run that failed; ``error.code`` is one of tuneyard.trainer.runtime.ERROR_CODES."""

    status: Literal["failed"] = "failed"
    error: JobError


Result = Annotated[Succeeded | Stopped | Failed, Field(discriminator="status")]


class CheckpointMarker(_File):
    """``tuneyard_checkpoint.json``: written last into a checkpoint, so its presence means the checkpoint is whole."""

    step: int
    trained_tokens: int | None = None
    # The latest value of each metric when it was saved (tuneyard.domain.metrics names): a resumed run starts
    # its reporting from them.
    metrics: dict[str, float | None] = Field(default_factory=dict)
    spec: dict[str, Any] | None = None


class StopRequest(_File):
    """``control/stop``: the scheduler asks the trainer to stop; on disk the bare reason, as text."""

    reason: StopReason

    @classmethod
    def from_text(cls, text: str, path: Path | None = None) -> StopRequest:
        """The request ``text`` makes; anything but a known reason is a cancel (stopping is the safe side)."""
        reason = text.strip()
        if reason not in STOP_REASONS:
            log.warning("unknown stop request %r in %s: treating it as cancel", reason, path)
            reason = "cancel"
        return cls(reason=reason)


class Event(_File):
    """One line of ``events.jsonl``; ``data`` is recorded as is (its metric names: tuneyard.domain.metrics)."""

    seq: int
    ts: float | None = None
    source: str = ""
    type: EventType = "message"
    level: EventLevel = "info"
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)

    def progress(self) -> Progress:
        """What a metrics or progress event says about the job's progress (empty for the other types)."""
        return Progress.model_validate(self.data if self.type in ("metrics", "progress") else {})

    def checkpoint(self) -> CheckpointSaved | None:
        """What a checkpoint event announces; None for other events (or one that names no step)."""
        if self.type != "checkpoint":
            return None
        try:
            return CheckpointSaved.model_validate(self.data)
        except ValidationError:
            return None

    def start_step(self) -> int | None:
        """The step a (re)started trainer begins at, from its "Training started/resumed" message."""
        step = self.data.get("start_step") if self.type == "message" else None
        return step if isinstance(step, int) and not isinstance(step, bool) else None


def _number(value: Any) -> float | int | None:
    """``value`` when it is a finite number (not a bool), else None: progress is best effort, never a failure."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


_Count = Annotated[int | None, BeforeValidator(lambda v: None if (n := _number(v)) is None else int(n))]
_Seconds = Annotated[float | None, BeforeValidator(_number)]


class Progress(_File):
    """The progress fields of a metrics or progress event, each None when absent or not a number."""

    step: _Count = None
    total_steps: _Count = None
    trained_tokens: _Count = None
    eta_s: _Seconds = None


class CheckpointSaved(_File):
    """The data of a ``checkpoint`` event: a complete checkpoint (marker written) and its metrics."""

    step: int
    path: str = ""
    metrics: dict[str, float | None] = Field(default_factory=dict)


@dataclass(frozen=True)
class JobDir:
    """Paths inside one job's directory, and the typed reads and writes of its files."""

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
    def exports(self) -> Path:
        return self.root / "exports"

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

    # ----- prepared.json ---------------------------------------------------------------------
    def write_prepared(self, prepared: PreparedOk | PreparedFailed) -> None:
        """Write the prepare step's outcome (last: its presence means the step finished)."""
        _write_model(self.prepared, prepared)

    def read_prepared(self) -> PreparedOk | PreparedFailed | None:
        """The prepare step's outcome; None when it wrote none, ProtocolError when it is malformed."""
        return _read_model(self.prepared, _PREPARED)

    # ----- result.json -----------------------------------------------------------------------
    def write_result(self, result: Succeeded | Stopped | Failed) -> None:
        """Write the trainer's outcome."""
        _write_model(self.result, result)

    def read_result(self) -> Succeeded | Stopped | Failed | None:
        """The trainer's outcome; None when it wrote none, ProtocolError when it is malformed."""
        return _read_model(self.result, _RESULT)

    # ----- control/stop ----------------------------------------------------------------------
    def request_stop(self, reason: StopReason) -> None:
        """Ask the trainer to stop at its next step; replaces an earlier request (a cancel replaces a pause)."""
        request = StopRequest(reason=reason)
        self.control.mkdir(parents=True, exist_ok=True)
        # Atomic: a trainer reading half a write would see an empty request, which means cancel.
        _write_atomic(self.control / STOP_FILE, request.reason)

    def stop_requested(self) -> StopRequest | None:
        """The scheduler's request that the trainer stop, if it made one."""
        p = self.control / STOP_FILE
        try:
            text = p.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return None
        except OSError as e:
            # It is there, so a stop was asked for: which one cannot be told, and stopping is the safe side.
            text = f"<{e.strerror or type(e).__name__}>"
        return StopRequest.from_text(text, p)

    def clear_stop(self) -> None:
        """Remove a stop request left by an earlier pause, before the job runs again."""
        (self.control / STOP_FILE).unlink(missing_ok=True)


_PREPARED: TypeAdapter[PreparedOk | PreparedFailed] = TypeAdapter(Prepared)
_RESULT: TypeAdapter[Succeeded | Stopped | Failed] = TypeAdapter(Result)
_MARKER: TypeAdapter[CheckpointMarker] = TypeAdapter(CheckpointMarker)


# ----- checkpoints ---------------------------------------------------------------------------
def write_checkpoint_marker(checkpoint: Path, marker: CheckpointMarker) -> None:
    """Mark ``checkpoint`` complete (call it once every file of it is on disk)."""
    _write_model(checkpoint / CHECKPOINT_MARKER, marker)


def read_checkpoint_marker(checkpoint: Path) -> CheckpointMarker | None:
    """The marker of ``checkpoint``; None when it has none (incomplete), ProtocolError when it is malformed."""
    return _read_model(checkpoint / CHECKPOINT_MARKER, _MARKER)


def latest_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint with the highest step whose completion marker reads, if any (a malformed one is skipped)."""
    found = []
    for d in checkpoints.glob("checkpoint-*"):
        step = d.name.removeprefix("checkpoint-")
        if step.isdigit() and (d / CHECKPOINT_MARKER).is_file():
            found.append((int(step), d))
    for _, d in sorted(found, reverse=True):
        try:
            if read_checkpoint_marker(d) is not None:
                return d
        except ProtocolError as e:
            log.warning("skipping checkpoint %s: %s", d, e)
    return None


# ----- events.jsonl --------------------------------------------------------------------------
class EventWriter:
    """Appends numbered events to a job's event log; continues the numbering of an existing file."""

    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        self.source = source
        self.seq = _last_seq(path)

    def emit(self, type: EventType, message: str, data: dict | None = None, level: EventLevel = "info") -> None:
        """Append one event (flushed and fsynced: it must survive a crash of this process)."""
        # A diverging loss (NaN) or an error naming a file whose name is not UTF-8 must still be recordable
        # by every store: PostgreSQL's json takes no NaN, and no UTF-8 text holds a lone surrogate.
        event = Event(seq=self.seq + 1, ts=time.time(), source=self.source, type=type, level=level,
                      message=jsontext.storable(message), data=jsontext.storable(data or {}))
        line = event.model_dump_json(fallback=_json_default) + "\n"
        with self.path.open("a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.seq = event.seq


def _json_default(o: Any) -> Any:
    try:
        return jsontext.storable(float(o))
    except (TypeError, ValueError):
        return str(o)


def _last_seq(path: Path) -> int:
    last = 0
    for ev in iter_events(path):
        last = max(last, ev.seq)
    return last


def iter_events(path: Path, after_seq: int = 0) -> Iterator[Event]:
    """Yield complete events with ``seq > after_seq``; a torn last line (crash mid-write) or a line that is no
    ``Event`` is skipped."""
    try:
        f = path.open()
    except FileNotFoundError:
        return
    with f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                ev = Event.model_validate_json(line)
            except ValidationError:
                continue
            if ev.seq > after_seq:
                yield ev


# ----- JSON files ----------------------------------------------------------------------------
def _write_model(path: Path, model: BaseModel) -> None:
    _write_atomic(path, model.model_dump_json())


def _read_model(path: Path, adapter: TypeAdapter[Any]) -> Any | None:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:  # a directory, no permission: as unusable as a malformed file
        raise ProtocolError(path, e.strerror or type(e).__name__) from None
    try:
        return adapter.validate_json(text)
    except ValidationError as e:
        raise ProtocolError(path, _problems(e)) from None


def _problems(e: ValidationError) -> str:
    """Each problem as ``field.path: message``, in one line."""
    out = []
    for err in e.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"])
        out.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(out)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that readers see the old file or the whole new one, never a part (for the files that are
    no model of this module: spec.json and resolved_spec.json are TrainingSpec's, data/stream.json the data's)."""
    # Compact: json only uses its C encoder without indentation, and every submit writes spec.json.
    _write_atomic(path, json.dumps(obj, default=str))


def read_json(path: Path) -> Any | None:
    """Parsed JSON at ``path``, or None when it does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
