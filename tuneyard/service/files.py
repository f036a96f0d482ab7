"""Uploaded files: stored under the org's area with a server-chosen name, validated on upload."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneyard.domain.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from tuneyard.ids import new_id
from tuneyard.service.audit import record_by
from tuneyard.service.auth import Principal, visible
from tuneyard.settings import Settings
from tuneyard.store.db import Store
from tuneyard.store.models import File, Job
from tuneyard.store.repo import page

PURPOSES = {"fine-tune", "assistants", "batch", "vision", "user_data", "evals"}
# Result files are made by tuneyard, never uploaded.
SYSTEM_PURPOSES = {"fine-tune-results"}
CHUNK = 1024 * 1024


class FileService:
    """Create, list, read and delete files of the caller's organisation."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def path_of(self, f: File) -> Path:
        return self.settings.files_dir / f.storage_path

    def create(self, who: Principal, stream: BinaryIO, filename: str | None, purpose: str | None,
               expires_after_seconds: int | None = None) -> File:
        """Store an upload; a ``fine-tune`` file must pass format validation or nothing is kept."""
        if not purpose:
            raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose")
        if purpose not in PURPOSES:
            raise InvalidRequest(f"'{purpose}' is not a valid purpose; expected one of {sorted(PURPOSES)}",
                                 param="purpose")
        if expires_after_seconds is not None and not 3600 <= expires_after_seconds <= 2592000:
            raise InvalidRequest("expires_after[seconds] must be between 3600 and 2592000",
                                 param="expires_after[seconds]")
        name = os.path.basename((filename or "upload").replace("\\", "/"))[:255] or "upload"
        file_id = new_id("file")
        from tuneyard.data.validate import upload_suffix

        # Kept with its container suffix: the bytes of a CSV do not say it is one, and prepare reads it later.
        rel = Path(who.org_id) / (file_id + upload_suffix(name))
        dest = self.settings.files_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        size, digest = self._copy_limited(stream, dest)
        try:
            status, details, n_examples, fmt = "processed", None, None, None
            if size == 0:
                raise InvalidRequest("The uploaded file is empty.", param="file", code="invalid_file")
            if purpose == "fine-tune":
                n_examples, fmt = self.check_training_file(dest, name)
            now = time.time()
            f = File(id=file_id, org_id=who.org_id, filename=name, purpose=purpose, bytes=size, created_at=now,
                     expires_at=now + expires_after_seconds if expires_after_seconds else None, status=status,
                     status_details=details, storage_path=str(rel), sha256=digest, n_examples=n_examples,
                     data_format=fmt, created_by=who.key_id)
            with self.store.session() as s:
                s.add(f)
                record_by(s, who, "file.create", file_id, {"purpose": purpose, "bytes": size})
            return f
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    def _copy_limited(self, stream: BinaryIO, dest: Path) -> tuple[int, str]:
        limit = self.settings.max_upload_bytes
        h = hashlib.sha256()
        size = 0
        with dest.open("wb") as out:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    out.close()
                    dest.unlink(missing_ok=True)
                    raise PayloadTooLarge(f"File is larger than the {limit} byte limit.", param="file")
                h.update(chunk)
                out.write(chunk)
        return size, h.hexdigest()

    def check_training_file(self, path: Path, name: str) -> tuple[int, str]:
        """(examples, format) of a file that passes the ``fine-tune`` upload validation, else a 400 naming
        every problem it found (up to the configured number)."""
        from tuneyard.data.images import ImageRules
        from tuneyard.data.validate import validate_file

        # JSONL, a JSON array, CSV or Parquet; supervised or preference rows (the job's method is not known yet).
        # Images are checked by header only, and an upload's relative image paths have no directory to start from.
        report = validate_file(path, max_errors=self.settings.max_error_report, min_examples=1, method=None,
                               images=ImageRules.from_settings(None, self.settings))
        if not report.ok:
            raise InvalidRequest(f"Invalid file format for fine-tuning ('{name}'): {report.summary()}",
                                 param="file", code="invalid_file_format")
        return report.n_examples, report.format

    def get(self, who: Principal, file_id: str) -> File:
        """One file of the caller's organisation, or NotFound."""
        with self.store.session() as s:
            f = s.scalar(select(File).where(File.id == file_id, visible(File, who)))
        if f is None or (f.expires_at is not None and f.expires_at < time.time()):
            raise NotFound(f"No such File object: {file_id}", param="id", code="file_not_found")
        return f

    def list(self, who: Principal, *, after: str | None, limit: int, order: str, purpose: str | None
             ) -> tuple[list[File], bool]:
        """A page of the organisation's files."""
        if order not in ("asc", "desc"):
            raise InvalidRequest("order must be 'asc' or 'desc'", param="order")
        if not 1 <= limit <= 10000:
            raise InvalidRequest("limit must be between 1 and 10000", param="limit")
        q = select(File).where(visible(File, who))
        if purpose:
            q = q.where(File.purpose == purpose)
        with self.store.session() as s:
            return page(s, q, File, after=after, limit=limit, descending=order == "desc")

    def delete(self, who: Principal, file_id: str) -> None:
        """Delete a file and its bytes; refused while an unfinished job still needs it."""
        f = self.get(who, file_id)
        with self.store.session() as s:
            busy = s.scalar(select(Job.id).where(
                Job.org_id == who.org_id, Job.status.in_(["validating_files", "queued", "running", "paused"]),
                (Job.training_file == file_id) | (Job.validation_file == file_id)).limit(1))
            if busy:
                raise Conflict(f"File {file_id} is in use by fine-tuning job {busy}", param="file_id",
                               code="file_in_use")
            row = s.scalar(select(File).where(File.id == f.id))
            if row is not None:
                s.delete(row)
                record_by(s, who, "file.delete", f.id)
        self.path_of(f).unlink(missing_ok=True)

    def add_result_file(self, s: Session, org_id: str, filename: str, content: bytes,
                        created_by: str | None = None) -> File:
        """Store a file tuneyard made for a job (purpose ``fine-tune-results``; ``created_by``: whoever created
        the job, so that it sees the file), in the caller's transaction."""
        file_id = new_id("file")
        rel = Path(org_id) / file_id
        dest = self.settings.files_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(content)
        f = File(id=file_id, org_id=org_id, filename=filename, purpose="fine-tune-results", bytes=len(content),
                 created_at=time.time(), expires_at=None, status="processed", status_details=None,
                 storage_path=str(rel), sha256=hashlib.sha256(content).hexdigest(), created_by=created_by)
        s.add(f)
        return f
