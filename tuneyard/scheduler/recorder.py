"""Recording what a job's processes report: its event file into job_events, progress and checkpoint rows.

Each event is recorded once (idempotent on the job and the event's seq), in one transaction per job and call,
so a worker that restarts (or another that takes the job over) reads on where the database left off.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from tuneyard.ids import new_id
from tuneyard.jobdir import CheckpointSaved, JobDir, Progress, iter_events
from tuneyard.store.db import Store
from tuneyard.store.models import Checkpoint, Job, JobEvent
from tuneyard.store.repo import add_event


def ingest(store: Store, job: Job, jd: JobDir) -> int:
    """Record the job's new events (each once, by seq) and the progress they carry; returns how many."""
    new = list(iter_events(jd.events, after_seq=job.events_seq))
    if not new:
        return 0
    updates: dict[str, Any] = {}
    with store.session(write=True) as s:
        saved = False
        for ev in new:
            if ev.type == "progress":
                _progress_fields(ev.progress(), updates)
                continue
            start = ev.start_step()
            if start is not None and start > 0:
                supersede_metrics(s, job.id, start)
            add_event(s, job.id, ev.message, type=ev.type, level=ev.level, data=ev.data, file_seq=ev.seq,
                      created_at=ev.ts)
            if ev.type == "metrics":
                _progress_fields(ev.progress(), updates)
            elif (saved_ckpt := ev.checkpoint()) is not None:
                _add_checkpoint(s, job.id, saved_ckpt, ev.ts)
                saved = True
        if saved:
            _prune_checkpoints(s, job.id)
        updates["events_seq"] = max(ev.seq for ev in new)
        s.execute(update(Job).where(Job.id == job.id, Job.events_seq < updates["events_seq"]).values(**updates))
    job.events_seq = updates["events_seq"]
    return len(new)


def _progress_fields(p: Progress, updates: dict[str, Any]) -> None:
    if p.step is not None:
        updates["trained_steps"] = p.step
    if p.total_steps is not None:
        updates["total_steps"] = p.total_steps
    if p.trained_tokens is not None:
        updates["trained_tokens"] = p.trained_tokens
    if p.eta_s is not None:
        updates["estimated_finish"] = time.time() + p.eta_s


def supersede_metrics(s, job_id: str, start_step: int) -> None:
    """A trainer resumed at ``start_step``: the metrics an interrupted attempt logged after that step
    describe work that was rolled back and is done again; the resumed run's own replace them."""
    for ev in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "metrics")):
        step = (ev.data or {}).get("step")
        if isinstance(step, int) and step > start_step:
            s.delete(ev)


def _prune_checkpoints(s, job_id: str) -> None:
    """Forget checkpoints the trainer rotated away (save_total_limit): the API lists what can be used."""
    for ck in s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)):
        if ck.path and not Path(ck.path).exists():
            s.delete(ck)


def _add_checkpoint(s, job_id: str, saved: CheckpointSaved, ts: float | None) -> None:
    ck = Checkpoint(id=new_id("ftckpt"), job_id=job_id, step=saved.step, created_at=ts or time.time(),
                    path=saved.path, metrics={"step": saved.step, **saved.metrics})
    try:
        with s.begin_nested():
            s.add(ck)
    except IntegrityError:
        pass
