"""Registered datasets (Llama Stack ``/datasets``): rows stored as a validated file, or a URI kept as given.

A dataset is turned into a training ``DataSource`` at submit time (``source_for``); rows go through the
same validation as an uploaded file, so a bad row is refused at registration, naming the row.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import itertools
import json
import os
import re
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from tuneyard.domain.errors import Conflict, InvalidRequest, NotFound
from tuneyard.domain.spec import DataSource
from tuneyard.ids import new_id
from tuneyard.service.audit import record_by
from tuneyard.service.auth import Principal, visible
from tuneyard.service.files import FileService
from tuneyard.service.paths import confine, looks_like_path
from tuneyard.settings import Settings
from tuneyard.store.db import Store
from tuneyard.store.models import Dataset
from tuneyard.store.repo import page

PURPOSES = ("post-training/messages", "eval/question-answer", "eval/messages-answer")
TRAINING_PURPOSE = "post-training/messages"
DATASET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,255}$")
# URI schemes a dataset may name; the data pipeline fetches remote ones when the job is prepared.
REMOTE_SCHEMES = ("https://", "http://", "s3://", "hf://", "huggingface://")


class DatasetService:
    """Register, list, read and unregister the datasets of the caller's organisation."""

    def __init__(self, store: Store, settings: Settings, files: FileService) -> None:
        self.store = store
        self.settings = settings
        self.files = files

    def register(self, who: Principal, *, purpose: str, source: dict[str, Any], dataset_id: str | None,
                 metadata: dict[str, Any] | None) -> Dataset:
        """Store a dataset; rows are validated like an upload, a URI is checked for its form."""
        if purpose not in PURPOSES:
            raise InvalidRequest(f"purpose '{purpose}' is not one of {list(PURPOSES)}", param="purpose")
        if dataset_id is not None and not DATASET_ID.match(dataset_id):
            raise InvalidRequest("dataset_id must be 1-256 characters: letters, digits and . _ : / -",
                                 param="dataset_id")
        ident = dataset_id or new_id("dataset")
        if self._find(who, ident) is not None:
            raise Conflict(f"a dataset '{ident}' is already registered", param="dataset_id", code="duplicate_dataset")
        kind = source.get("type")
        file_id, n_rows, stored = None, None, dict(source)
        if kind == "rows":
            rows = source.get("rows")
            body = _rows_body(rows, "source.rows")
            file_id = self._store_rows(who, body, f"dataset-{_safe(ident)}.jsonl", purpose, "source.rows")
            n_rows, stored = len(rows), {"type": "rows"}
        elif kind == "uri":
            uri = source.get("uri")
            if not isinstance(uri, str) or not uri.strip():
                raise InvalidRequest("source.uri must be a non-empty string", param="source.uri")
            uri = uri.strip()
            if uri.startswith("data:"):
                file_id = self._store_rows(who, _decode_data_uri(uri), f"dataset-{_safe(ident)}", purpose,
                                           "source.uri")
            elif looks_like_path(uri):
                confine(uri, self.settings.allowed_roots, param="source.uri", want_dir=None)
            elif not uri.startswith(REMOTE_SCHEMES):
                raise InvalidRequest(f"source.uri '{uri[:200]}': the scheme is not supported; use https://, s3://, "
                                     "hf:// (or huggingface://), a data: URI or a local path", param="source.uri")
            stored = {"type": "uri", "uri": uri}
        else:
            raise InvalidRequest("source.type must be 'uri' or 'rows'", param="source.type")
        ds = Dataset(id=new_id("ds"), org_id=who.org_id, dataset_id=ident, purpose=purpose, source=stored,
                     file_id=file_id, n_rows=n_rows, metadata_=metadata or {}, created_at=time.time(),
                     created_by=who.key_id)
        try:
            with self.store.session() as s:
                s.add(ds)
                record_by(s, who, "dataset.register", ident)
        except IntegrityError as e:
            raise Conflict(f"a dataset '{ident}' is already registered", param="dataset_id",
                           code="duplicate_dataset") from e
        return ds

    def _store_rows(self, who: Principal, body: bytes, filename: str, purpose: str, param: str) -> str:
        # Training rows are checked like an OpenAI upload (line-numbered errors); eval rows are kept as given.
        file_purpose = "fine-tune" if purpose == TRAINING_PURPOSE else "evals"
        try:
            return self.files.create(who, io.BytesIO(body), filename, file_purpose).id
        except InvalidRequest as e:
            raise InvalidRequest(e.message.replace("Example ", "Row "), param=param, code=e.code) from None

    def rows(self, who: Principal, dataset_id: str, *, start_index: int = 0, limit: int | None = None
             ) -> tuple[list[dict], bool]:
        """A page of a dataset's rows (``limit`` None: all from ``start_index``) and whether more follow."""
        if start_index < 0:
            raise InvalidRequest("start_index must be 0 or more", param="start_index")
        if limit is not None and limit < 1:
            raise InvalidRequest("limit must be 1 or more (or -1: every row)", param="limit")
        ds = self.get(who, dataset_id)
        items = self._iter_rows(who, ds)
        page_ = list(itertools.islice(items, start_index, None if limit is None else start_index + limit + 1))
        if limit is not None and len(page_) > limit:
            return page_[:limit], True
        return page_, False

    def stored_rows(self, who: Principal, ds: Dataset) -> list[dict]:
        """Every row of a dataset registered from rows (what its ``rows`` source reads back as)."""
        return list(self._iter_rows(who, ds))

    def _iter_rows(self, who: Principal, ds: Dataset) -> Iterator[dict]:
        from tuneyard.data.validate import iter_raw

        if ds.file_id:
            path = self.files.path_of(self.files.get(who, ds.file_id))
        else:
            uri = ds.source.get("uri", "")
            if not looks_like_path(uri):
                raise InvalidRequest(f"dataset '{ds.dataset_id}' is read from {uri.split('://')[0]}:// when a job "
                                     "is prepared; its rows are not stored on this server", param="dataset_id",
                                     code="rows_not_stored")
            path = confine(uri, self.settings.allowed_roots, param="dataset_id", want_dir=False)
        try:
            for n, obj, problem in iter_raw(path):
                if problem is not None or not isinstance(obj, dict):
                    why = problem.render(n) if problem is not None else f"Row {n} is not an object"
                    raise InvalidRequest(f"dataset '{ds.dataset_id}': {why.replace('Example ', 'Row ')}",
                                         param="dataset_id", code="unreadable_dataset")
                yield obj
        except OSError as e:
            raise InvalidRequest(f"dataset '{ds.dataset_id}' could not be read ({e.strerror or e})",
                                 param="dataset_id", code="unreadable_dataset") from None

    def append_rows(self, who: Principal, dataset_id: str, rows: Any) -> Dataset:
        """Add rows to a dataset registered from rows; they are validated like registered rows (a 400 numbers
        them as in the request) and nothing changes unless all of them pass."""
        ds = self.get(who, dataset_id)
        if ds.source.get("type") != "rows" or not ds.file_id:
            raise InvalidRequest(f"dataset '{dataset_id}' was registered from a URI; rows can be appended only to a "
                                 "dataset registered from rows", param="dataset_id", code="not_a_rows_dataset")
        body = _rows_body(rows, "rows")
        old = self.files.get(who, ds.file_id)
        if ds.purpose == TRAINING_PURPOSE:
            self._check_appended(body, old.data_format)
        combined = self.files.path_of(old).read_bytes() + body
        new_id_ = self._store_rows(who, combined, old.filename, ds.purpose, "rows")
        with self.store.session() as s:
            # Only if no other append got there first: each starts from the file it read.
            done = s.execute(update(Dataset).where(Dataset.pk == ds.pk, Dataset.file_id == old.id)
                             .values(file_id=new_id_, n_rows=(ds.n_rows or 0) + len(rows))).rowcount
            if done:
                record_by(s, who, "dataset.append_rows", dataset_id, {"rows": len(rows)})
        if not done:
            with contextlib.suppress(NotFound, Conflict):
                self.files.delete(who, new_id_)
            raise Conflict(f"dataset '{dataset_id}' changed while the rows were appended; send them again",
                           param="dataset_id", code="concurrent_append")
        # Still used by an unfinished job (which read the old rows at submit): it keeps the file until it ends.
        with contextlib.suppress(NotFound, Conflict):
            self.files.delete(who, old.id)
        return self.get(who, dataset_id)

    def _check_appended(self, body: bytes, stored_format: str | None) -> None:
        # The new rows alone, so that errors number them as the request does; then their format against the rest.
        fd, tmp = tempfile.mkstemp(suffix=".jsonl", dir=self.settings.home)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
            try:
                _, fmt = self.files.check_training_file(Path(tmp), "rows")
            except InvalidRequest as e:
                raise InvalidRequest(e.message.replace("Example ", "Row "), param="rows", code=e.code) from None
        finally:
            os.unlink(tmp)
        if stored_format and fmt != stored_format:
            raise InvalidRequest(f"rows are in {fmt} format, but the dataset's rows are in {stored_format} format",
                                 param="rows", code="invalid_file_format")

    def _find(self, who: Principal, dataset_id: str) -> Dataset | None:
        with self.store.session() as s:
            return s.scalar(select(Dataset).where(visible(Dataset, who), Dataset.dataset_id == dataset_id))

    def get(self, who: Principal, dataset_id: str) -> Dataset:
        """One dataset of the caller's organisation, or NotFound."""
        ds = self._find(who, dataset_id)
        if ds is None:
            raise NotFound(f"dataset '{dataset_id}' not found", param="dataset_id", code="dataset_not_found")
        return ds

    def list(self, who: Principal, *, limit: int = 1000) -> list[Dataset]:
        """The organisation's datasets, oldest first."""
        with self.store.session() as s:
            rows, _ = page(s, select(Dataset).where(visible(Dataset, who)), Dataset, after=None,
                           limit=limit, descending=False)
        return rows

    def unregister(self, who: Principal, dataset_id: str) -> None:
        """Forget a dataset (and the file holding its rows)."""
        ds = self.get(who, dataset_id)
        with self.store.session() as s:
            row = s.get(Dataset, ds.pk)
            if row is not None:
                s.delete(row)
                record_by(s, who, "dataset.unregister", dataset_id)
        if ds.file_id:
            # Already gone, or still used by an unfinished job (which keeps it until it ends).
            with contextlib.suppress(NotFound, Conflict):
                self.files.delete(who, ds.file_id)

    def source_for(self, who: Principal, dataset_id: str, *, data_format: str, param: str) -> DataSource:
        """The training source a dataset stands for; a 400 naming ``param`` when it cannot be trained on."""
        try:
            ds = self.get(who, dataset_id)
        except NotFound:
            raise InvalidRequest(f"dataset '{dataset_id}' is not registered", param=param,
                                 code="dataset_not_found") from None
        if ds.purpose != TRAINING_PURPOSE:
            raise InvalidRequest(f"dataset '{dataset_id}' has purpose '{ds.purpose}'; training needs "
                                 f"'{TRAINING_PURPOSE}'", param=param)
        if ds.file_id:
            return DataSource(file_id=ds.file_id, format=data_format, param=param)
        uri = ds.source.get("uri", "")
        if uri.startswith("huggingface://"):
            uri = "hf://" + uri.removeprefix("huggingface://")
        return DataSource(path=uri, format=data_format, param=param)


def _rows_body(rows: Any, param: str) -> bytes:
    """Rows as JSONL; a 400 naming every entry that is not an object."""
    if not isinstance(rows, list) or not rows:
        raise InvalidRequest(f"{param} must be a non-empty list of row objects", param=param)
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    if bad:
        shown = ", ".join(f"{param}[{i}]" for i in bad[:20]) + (f" (and {len(bad) - 20} more)" if len(bad) > 20 else "")
        raise InvalidRequest(f"each row must be an object: {shown} is not", param=f"{param}[{bad[0]}]")
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100]


def _decode_data_uri(uri: str) -> bytes:
    """The bytes of a ``data:[<type>][;base64],<payload>`` URI."""
    head, sep, payload = uri[5:].partition(",")
    if not sep:
        raise InvalidRequest("source.uri: a data: URI needs a ',' before its payload", param="source.uri")
    try:
        if head.endswith(";base64"):
            return base64.b64decode(payload, validate=True)
        return urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(f"source.uri: the data: URI payload does not decode ({e})", param="source.uri") from None
