"""Queries shared by the service and the scheduler: conditional status changes, events, pagination."""

from __future__ import annotations

import time
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tuneyard.domain.jobs import JobStatus, sources_of
from tuneyard.domain.webhooks import EVENT_OF_STATUS
from tuneyard.domain.webhooks import body as webhook_body
from tuneyard.ids import new_id
from tuneyard.store.models import Job, JobEvent, WebhookDelivery, WebhookEndpoint

T = TypeVar("T")


def transition(s: Session, job_id: str, target: JobStatus, *, expect: set[JobStatus] | None = None,
               **fields: Any) -> bool:
    """Move a job to ``target`` if its current status allows it; True when this call won.

    The check and the write are one ``UPDATE ... WHERE status IN (...)``, so of two workers (or a
    worker and a cancelling client) racing on one job exactly one succeeds.
    """
    allowed = sources_of(target) if expect is None else (expect & sources_of(target))
    now = time.time()
    values: dict[str, Any] = {"status": target.value, "updated_at": now, **fields}
    if target.terminal and "finished_at" not in fields:
        values["finished_at"] = now
    res = s.execute(update(Job).where(Job.id == job_id, Job.status.in_([a.value for a in allowed]))
                    .values(**values))
    if res.rowcount != 1:
        return False
    if target in EVENT_OF_STATUS:
        # In the change's own transaction: the status and its webhook deliveries are recorded together or not at all.
        queue_webhooks(s, job_id, EVENT_OF_STATUS[target], now)
    return True


def queue_webhooks(s: Session, job_id: str, event_type: str, now: float) -> None:
    """Queue ``event_type`` of a job for each endpoint of its organisation that subscribed to it."""
    org_id = s.scalar(select(Job.org_id).where(Job.id == job_id))
    endpoints = s.scalars(select(WebhookEndpoint).where(WebhookEndpoint.org_id == org_id)).all()
    # A job is paused (and resumed) any number of times; it ends once.
    key = f"{job_id}:{event_type}" + (f":{int(now * 1000)}" if event_type == EVENT_OF_STATUS[JobStatus.PAUSED] else "")
    for ep in endpoints:
        if event_type not in (ep.events or []):
            continue
        msg_id = new_id("msg")
        s.add(WebhookDelivery(id=msg_id, endpoint_id=ep.id, org_id=org_id, event_key=key, event_type=event_type,
                              payload=webhook_body(new_id("evt"), event_type, job_id, now), status="pending",
                              attempts=0, next_attempt_at=now, created_at=now))


def add_event(s: Session, job_id: str, message: str, *, type: str = "message", level: str = "info",
              data: dict | None = None, file_seq: int | None = None, created_at: float | None = None) -> bool:
    """Record one event; an event from the job's event file that is already recorded is skipped."""
    ev = JobEvent(id=new_id("ftevent"), job_id=job_id, file_seq=file_seq, created_at=created_at or time.time(),
                  level=level, type=type, message=message, data=data or None)
    if file_seq is None:
        s.add(ev)
        return True
    try:
        with s.begin_nested():
            s.add(ev)
        return True
    except IntegrityError:
        return False


def page(s: Session, query: Select, model: type[T], *, after: str | None, limit: int,
         descending: bool = True) -> tuple[list[T], bool]:
    """One page of ``query`` ordered by ``pk``, starting after the object whose id is ``after``."""
    if after is not None:
        after_pk = s.scalar(select(model.pk).where(model.id == after))  # type: ignore[attr-defined]
        if after_pk is None:
            return [], False
        cond = model.pk < after_pk if descending else model.pk > after_pk  # type: ignore[attr-defined]
        query = query.where(cond)
    order = model.pk.desc() if descending else model.pk.asc()  # type: ignore[attr-defined]
    rows = list(s.scalars(query.order_by(order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def json_value_is(column: Any, key: str, value: str, dialect: str) -> ColumnElement[bool]:
    """``column[key] == value`` for a JSON object column, for any key text.

    SQLite's JSON path (``'$."key"'``, what SQLAlchemy renders) cannot hold every key: one with a quote, a
    backslash or some non-ASCII text matches nothing. ``json_each`` compares the key as a value instead.
    PostgreSQL binds the key as a parameter of ``->>`` and needs nothing more.
    """
    if dialect == "sqlite":
        pairs = func.json_each(column).table_valued("key", "value")
        return exists().select_from(pairs).where(pairs.c.key == key, pairs.c.value == value)
    return column[key].as_string() == value


# ----- claims and leases (the worker's; each a conditional UPDATE, so of racing workers exactly one wins) ----------
def prepare_candidates(s: Session, now: float, limit: int) -> list[str]:
    """Jobs waiting for a prepare step that no worker holds a live lease on, oldest first."""
    return list(s.scalars(select(Job.id).where(
        Job.status == JobStatus.VALIDATING_FILES,
        or_(Job.worker_id.is_(None), Job.lease_expires_at < now)).order_by(Job.pk).limit(limit)))


def claim_for_prepare(s: Session, job_id: str, worker_id: str, now: float, lease_seconds: float) -> Job | None:
    """Take a job's prepare step for ``worker_id`` (a lease until ``now + lease_seconds``); the job if won."""
    won = s.execute(update(Job).where(
        Job.id == job_id, Job.status == JobStatus.VALIDATING_FILES,
        or_(Job.worker_id.is_(None), Job.lease_expires_at < now)).values(
        worker_id=worker_id, lease_expires_at=now + lease_seconds, updated_at=now)).rowcount == 1
    return s.scalar(select(Job).where(Job.id == job_id)) if won else None


def queued_jobs(s: Session, limit: int = 50) -> list[Job]:
    """Jobs waiting for a trainer, oldest first."""
    return list(s.scalars(select(Job).where(Job.status == JobStatus.QUEUED).order_by(Job.pk).limit(limit)))


def claim_for_training(s: Session, job: Job, worker_id: str, now: float, lease_seconds: float) -> bool:
    """Move a queued job to running under ``worker_id``'s lease as its next attempt; True when this call won."""
    return transition(s, job.id, JobStatus.RUNNING, expect={JobStatus.QUEUED}, worker_id=worker_id,
                      lease_expires_at=now + lease_seconds, attempt=job.attempt + 1,
                      started_at=job.started_at or now, pause_requested_at=None)


def unclaim_training(s: Session, job: Job) -> bool:
    """Put a job claimed by ``claim_for_training`` back in the queue as it was (its trainer could not start)."""
    return transition(s, job.id, JobStatus.QUEUED, expect={JobStatus.RUNNING}, worker_id=None, lease_expires_at=None,
                      attempt=job.attempt, started_at=job.started_at, pid=None)


def jobs_held_by(s: Session, worker_id: str) -> list[Job]:
    """Jobs ``worker_id`` had started a process for, in the states where that process may still run."""
    return list(s.scalars(select(Job).where(
        Job.worker_id == worker_id,
        Job.status.in_([JobStatus.VALIDATING_FILES, JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.PAUSED]),
        # A running job has had its trainer started (or is about to); elsewhere the pid says a process was.
        or_(Job.pid.is_not(None), Job.status == JobStatus.RUNNING))))


def lapsed_running(s: Session, worker_id: str, now: float, limit: int = 20) -> list[Job]:
    """Running jobs of other workers whose lease lapsed (the worker crashed, or its machine died)."""
    return list(s.scalars(select(Job).where(
        Job.status == JobStatus.RUNNING, Job.lease_expires_at.is_not(None), Job.lease_expires_at < now,
        or_(Job.worker_id.is_(None), Job.worker_id != worker_id)).limit(limit)))


def take_over(s: Session, job: Job, worker_id: str, now: float, lease_seconds: float) -> bool:
    """Move a lapsed lease of a running job to ``worker_id``; True when this call won.

    The lapsed lease value is the token: a renewal by the old worker or another taker changes it.
    """
    return s.execute(update(Job).where(
        Job.id == job.id, Job.status == JobStatus.RUNNING, Job.lease_expires_at == job.lease_expires_at
    ).values(worker_id=worker_id, lease_expires_at=now + lease_seconds)).rowcount == 1


def renew_leases(s: Session, job_ids: list[str], worker_id: str, until: float) -> None:
    """Extend ``worker_id``'s leases on ``job_ids`` (those it still holds) to ``until``."""
    s.execute(update(Job).where(Job.id.in_(job_ids), Job.worker_id == worker_id).values(lease_expires_at=until))


def record_process(s: Session, job_id: str, pid: int | None) -> None:
    """Note the process a launcher started for the job (None: a launcher without local processes)."""
    s.execute(update(Job).where(Job.id == job_id).values(pid=pid))


def release_prepare(s: Session, job_id: str) -> None:
    """Let go of a job whose prepare step this worker stopped (shutting down): the next worker prepares it."""
    s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.VALIDATING_FILES)
              .values(worker_id=None, lease_expires_at=None, pid=None))
