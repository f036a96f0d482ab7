"""Job statuses and the one table of allowed transitions."""

from __future__ import annotations

from enum import StrEnum
from pathlib import PurePosixPath

from tuneyard.domain.errors import Conflict


class JobStatus(StrEnum):
    """The life of a job, named as the OpenAI dialect names it."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

S = JobStatus
ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    S.VALIDATING_FILES: frozenset({S.QUEUED, S.FAILED, S.CANCELLED}),
    # queued -> queued: a launch that could not start is put back.
    S.QUEUED: frozenset({S.RUNNING, S.FAILED, S.CANCELLED, S.PAUSED}),
    # running -> queued: the trainer died and the job is retried (or the worker lost it).
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.PAUSED, S.QUEUED}),
    S.PAUSED: frozenset({S.QUEUED, S.CANCELLED, S.FAILED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


def sources_of(target: JobStatus) -> frozenset[JobStatus]:
    """Statuses from which ``target`` may be reached (used in conditional UPDATE ... WHERE status IN)."""
    return frozenset(s for s, targets in ALLOWED.items() if target in targets)


def check_transition(current: JobStatus, target: JobStatus) -> None:
    """Raise Conflict unless ``current -> target`` is allowed."""
    if target not in ALLOWED[current]:
        raise Conflict(f"cannot move a job from '{current}' to '{target}'", code="invalid_state")


def fine_tuned_model_name(base_model: str, org_id: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's naming, ``ft:<base>:<org>:<suffix>:<id>``; a local base model is named by its directory.

    A job that continues a fine-tuned model (``base_model`` is an ``ft:...`` name, or a checkpoint's) keeps that
    model's original base, as OpenAI names a model fine-tuned from another: the name stays five fields, and the
    job's ``model`` says which model it continued.
    """
    base = original_base(base_model)
    if base.startswith(("/", ".", "~")):
        base = PurePosixPath(base).name
    # ':' separates the fields: a directory named with one would make the name unreadable.
    return f"ft:{base.replace(':', '-')}:{org_id}:{suffix or ''}:{job_id.removeprefix('ftjob-')}"


def is_fine_tuned_name(model: str) -> bool:
    """True for a fine-tuned model's name (``ft:...``, a checkpoint's included) rather than a base model."""
    return isinstance(model, str) and model.startswith("ft:")


def original_base(model: str) -> str:
    """The base model a fine-tuned model's name records (its second field); any other name as it is."""
    if not is_fine_tuned_name(model):
        return model.rstrip("/")
    return model.split(":", 2)[1]
