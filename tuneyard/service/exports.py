"""ExportService: a trained model (the final one or a checkpoint) made into an export under the job's directory,
merged or as the adapter, optionally pushed to a Hub repository with the organisation's ``hf`` secret. The work
itself runs in the inference process (``inference/export.py``); this module resolves and records it."""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneyard.domain.errors import InvalidRequest, NotFound
from tuneyard.ids import new_id
from tuneyard.jobdir import JobDir, write_json_atomic
from tuneyard.service.audit import record_by
from tuneyard.service.auth import Principal
from tuneyard.service.jobs import JobService
from tuneyard.service.models import weights_of
from tuneyard.service.secrets import SecretService, SecretUnavailable
from tuneyard.settings import Settings
from tuneyard.store.db import Store

EXPORT_ID = re.compile(r"^ftexp-[A-Za-z0-9]{1,64}$")


@dataclass(frozen=True)
class Export:
    """One export as recorded in ``exports/<id>/export.json``."""

    id: str
    job_id: str
    created_at: float
    merged: bool
    checkpoint_id: str | None
    bytes: int
    hub_repo_id: str | None = None
    hub_url: str | None = None


@dataclass(frozen=True)
class Planned:
    """An export resolved and checked, ready for the inference process (``payload``, which may hold a token)."""

    export: Export
    payload: dict[str, Any]
    root: Path


class ExportService:
    """Plan, record, find and read back the caller's exports."""

    def __init__(self, store: Store, settings: Settings, jobs: JobService, secrets: SecretService) -> None:
        self.store, self.settings, self.jobs, self.secrets = store, settings, jobs, secrets

    def plan(self, who: Principal, job_id: str, *, merged: bool, checkpoint_id: str | None = None,
             repo_id: str | None = None, secret: str | None = None, private: bool = True) -> Planned:
        """Resolve what to export and with which token (an unusable secret is a 400 naming it); nothing is written."""
        job = self.jobs.get(who, job_id)
        source = (self.jobs.checkpoint_dir(who, job_id, checkpoint_id) if checkpoint_id
                  else Path(self.jobs.output_dir(who, job_id)))
        target = weights_of(job, source)
        if target is None:
            raise NotFound(f"Fine-tuning job {job_id} has no model files to export", param="checkpoint"
                           if checkpoint_id else "fine_tuning_job_id", code="model_not_found")
        push: dict[str, Any] | None = None
        if repo_id is not None:
            name = secret or "hf"
            try:
                kind, value = self.secrets.resolve(who.org_id, name, param="push_to_hub.secret_id")
            except SecretUnavailable as e:
                raise InvalidRequest(f"secret '{name}' not found: pushing to the Hub takes an 'hf' secret of the "
                                     "organisation (POST /v1/secrets, or `tuneyard secrets add`)",
                                     param="push_to_hub.secret_id", code=e.code or "secret_not_found") from None
            if kind != "hf":
                raise InvalidRequest(f"secret '{name}' is of type '{kind}'; pushing to the Hub takes an 'hf' secret",
                                     param="push_to_hub.secret_id", code="secret_wrong_type")
            push = {"repo_id": repo_id, "token": value["token"], "private": private}
        export = Export(id=new_id("ftexp"), job_id=job.id, created_at=time.time(), merged=merged,
                        checkpoint_id=checkpoint_id, bytes=0, hub_repo_id=repo_id)
        root = JobDir(Path(job.output_dir)).exports / export.id
        base = target.base if target.adapter else str(source)
        payload = {"source": str(source), "base": base, "out": str(root / "model"), "merged": merged,
                   "trust_remote_code": target.trust_remote_code, "max_bytes": self.settings.export_max_bytes,
                   "push": push}
        return Planned(export, payload, root)

    def record(self, who: Principal, planned: Planned, result: dict[str, Any]) -> Export:
        """Keep a finished export (its export.json last: an export without one is not listed)."""
        e = planned.export
        done = Export(**{**e.__dict__, "bytes": int(result.get("bytes") or 0), "hub_url": result.get("hub_url")})
        write_json_atomic(planned.root / "export.json", done.__dict__)
        with self.store.session(write=True) as s:
            record_by(s, who, "model.export", e.job_id, {"export": e.id, "merged": e.merged,
                                                          "checkpoint": e.checkpoint_id, "hub_repo_id": e.hub_repo_id})
        return done

    @staticmethod
    def discard(planned: Planned) -> None:
        """Remove what a failed export left."""
        shutil.rmtree(planned.root, ignore_errors=True)

    def get(self, who: Principal, job_id: str, export_id: str) -> tuple[Export, Path]:
        """One export of one job and its model directory, or NotFound."""
        job = self.jobs.get(who, job_id)
        root = JobDir(Path(job.output_dir)).exports / export_id if job.output_dir and EXPORT_ID.match(export_id) \
            else None
        try:
            data = json.loads((root / "export.json").read_text()) if root is not None else None
        except (OSError, ValueError):
            data = None
        if data is None:
            raise NotFound(f"Export {export_id} of fine-tuning job {job_id} not found", param="export_id",
                           code="export_not_found")
        return Export(**data), root / "model"

