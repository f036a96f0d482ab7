"""ModelService: the models an organisation can call (configured bases, its succeeded fine-tuned models and their
checkpoints), where each one's weights are, and deleting a fine-tuned model (its files go, its job stays)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from tuneyard.domain.errors import Forbidden, NotFound
from tuneyard.domain.jobs import JobStatus
from tuneyard.jobdir import JobDir
from tuneyard.service.audit import record_by
from tuneyard.service.auth import Principal, visible
from tuneyard.settings import Settings
from tuneyard.store.db import Store
from tuneyard.store.models import Checkpoint, Job

CHECKPOINT_MARK = ":ckpt-step-"


@dataclass(frozen=True)
class Target:
    """Where a callable model's weights are: a base (hub id or directory) and, for a LoRA job, its adapter."""

    name: str
    base: str
    adapter: str | None = None
    trust_remote_code: bool = False


def weights_of(job: Job, path: Path) -> Target | None:
    """The target for a job's output or checkpoint directory: an adapter over the job's base, or a full model."""
    if (path / "adapter_config.json").is_file():
        model = job.spec.get("model", {})
        return Target(job.fine_tuned_model or "", model.get("name", ""), str(path),
                      bool(model.get("trust_remote_code")))
    if (path / "config.json").is_file():
        return Target(job.fine_tuned_model or "", str(path),
                      trust_remote_code=bool(job.spec.get("model", {}).get("trust_remote_code")))
    return None


def _not_found(model_id: str) -> NotFound:
    return NotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")


class ModelService:
    """List, retrieve, locate and delete the caller's models."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def _live(self, who: Principal):
        return (visible(Job, who), Job.status == JobStatus.SUCCEEDED.value, Job.fine_tuned_model.is_not(None),
                Job.model_deleted_at.is_(None))

    def models(self, who: Principal) -> list[tuple[str, float, str]]:
        """(id, created_at, owner) of the configured base models and the organisation's fine-tuned models.

        Only models that exist: a model a job merely named (one that failed with model_not_found, say) is not one,
        nor is a deleted one.
        """
        out: dict[str, tuple[str, float, str]] = {m: (m, 0.0, "tuneyard") for m in self.settings.base_model_list}
        with self.store.session() as s:
            for name, finished in s.execute(select(Job.fine_tuned_model, Job.finished_at)
                                            .where(*self._live(who)).order_by(Job.finished_at)):
                out[name] = (name, finished or 0.0, who.org_id)
        return list(out.values())

    def model(self, who: Principal, model_id: str) -> tuple[str, float, str]:
        """One model of ``models``, or NotFound."""
        if model_id in self.settings.base_model_list:
            return model_id, 0.0, "tuneyard"
        job = self._job(who, model_id)
        return model_id, job.finished_at or 0.0, who.org_id

    def _job(self, who: Principal, name: str) -> Job:
        with self.store.session() as s:
            job = s.scalar(select(Job).where(*self._live(who), Job.fine_tuned_model == name).limit(1))
        if job is None:
            raise _not_found(name)
        return job

    def target(self, who: Principal, model_id: str) -> Target:
        """Where the weights of ``model_id`` (a base, a fine-tuned model or one of its checkpoints) are."""
        if model_id in self.settings.base_model_list:
            return Target(model_id, model_id)
        name, mark, step = model_id.rpartition(CHECKPOINT_MARK)
        if mark and step.isdigit():
            job = self._job(who, name)
            with self.store.session() as s:
                ck = s.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == int(step)))
            found = weights_of(job, Path(ck.path)) if ck is not None else None
        else:
            job = self._job(who, model_id)
            found = weights_of(job, JobDir(Path(job.output_dir)).output) if job.output_dir else None
        if found is None:
            raise _not_found(model_id)
        return Target(model_id, found.base, found.adapter, found.trust_remote_code)

    def checkpoint_model(self, who: Principal, checkpoint_id: str) -> str:
        """The callable name (``<fine_tuned_model>:ckpt-step-N``) of a checkpoint given by its id, or NotFound."""
        with self.store.session() as s:
            row = s.execute(select(Job.fine_tuned_model, Checkpoint.step).join(Checkpoint, Checkpoint.job_id == Job.id)
                            .where(*self._live(who), Checkpoint.id == checkpoint_id).limit(1)).first()
        if row is None:
            raise _not_found(checkpoint_id)
        return f"{row[0]}{CHECKPOINT_MARK}{row[1]}"

    def delete(self, who: Principal, model_id: str) -> list[Path]:
        """Delete a fine-tuned model: it is no longer listed or callable, its weights and checkpoints are removed,
        its job stays. Returns the directories removed (for the inference process to drop)."""
        if model_id in self.settings.base_model_list:
            raise Forbidden(f"The model '{model_id}' is a base model of this server and cannot be deleted",
                            param="model", code="model_not_deletable")
        job = self._job(who, model_id)
        with self.store.session(write=True) as s:
            row = s.get(Job, job.pk)
            if row is None or row.model_deleted_at is not None:
                raise _not_found(model_id)
            row.model_deleted_at = time.time()
            record_by(s, who, "model.delete", job.id, {"model": model_id})
        jd = JobDir(Path(job.output_dir)) if job.output_dir else None
        gone = [p for p in ((jd.output, jd.checkpoints, jd.exports) if jd else ()) if p.exists()]
        for p in gone:
            # Renamed first, so a reader never sees half a model; then removed.
            trash = p.with_name(f".{p.name}.deleted")
            p.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        return gone
