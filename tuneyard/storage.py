"""Storage every node can reach (``TUNEYARD_STORAGE_URL``): a shared filesystem path or ``s3://bucket/prefix``.

A job's inputs (spec, prepared data, the event log so far), its checkpoints and its outputs live under
``<storage>/jobs/<org>/<job>/`` with the job directory's own layout, so that a trainer rank on any node can
download what it needs and rank 0 can upload what it writes. A directory is uploaded file by file with its
marker file (``tuneyard_checkpoint.json`` for a checkpoint) last, and is complete only once that marker is
there: a reader never takes a half-uploaded checkpoint for a whole one.

S3 credentials: the ``aws`` secret shape datasets use (``access_key_id``, ``secret_access_key``,
``session_token``, ``region``), or, without one, boto3's own chain (environment, ~/.aws, instance role): the
storage is the installation's, not a tenant's. ``TUNEYARD_S3_ENDPOINT_URL`` points boto3 at MinIO, moto...
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

S3_URL = re.compile(r"^s3://([^/]+)/?(.*)$")


class StorageError(RuntimeError):
    """Shared storage that cannot be read or written (names the location)."""


class Storage(Protocol):
    """Keys are ``/``-separated paths relative to the storage's root."""

    url: str

    def put_file(self, local: Path, key: str) -> None: ...
    def get_file(self, key: str, local: Path) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...


def open_storage(url: str, *, credentials: dict[str, Any] | None = None, endpoint_url: str | None = None) -> Storage:
    """The storage ``url`` names: ``s3://bucket/prefix`` or a directory path (``file://`` optional)."""
    m = S3_URL.match(url)
    if m is not None:
        return S3Storage(url=url, bucket=m.group(1), prefix=m.group(2).strip("/"), credentials=credentials or {},
                         endpoint_url=endpoint_url)
    path = url.removeprefix("file://")
    if not os.path.isabs(path):
        raise StorageError(f"TUNEYARD_STORAGE_URL '{url}' is neither s3://bucket/prefix nor an absolute path")
    return LocalStorage(url=url, root=Path(path))


@dataclass
class LocalStorage:
    """A directory every node mounts at the same path (NFS, EFS, a Kubernetes ReadWriteMany volume)."""

    url: str
    root: Path

    def _path(self, key: str) -> Path:
        return self.root / PurePosixPath(key)

    def put_file(self, local: Path, key: str) -> None:
        """Copy ``local`` to ``key`` (written beside it, then renamed: readers see all of it or nothing)."""
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.partial")
        shutil.copyfile(local, tmp)
        tmp.replace(dest)

    def get_file(self, key: str, local: Path) -> bool:
        """Copy ``key`` to ``local``; False when there is no such key."""
        src = self._path(key)
        if not src.is_file():
            return False
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, local)
        return True

    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (a directory-like prefix, without the trailing slash)."""
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(str(PurePosixPath(prefix) / p.relative_to(base).as_posix()) for p in base.rglob("*")
                      if p.is_file() and not p.name.endswith(".partial"))

    def delete(self, key: str) -> None:
        """Remove ``key`` (nothing when it is not there)."""
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        """Remove every key under ``prefix``."""
        shutil.rmtree(self._path(prefix), ignore_errors=True)


@dataclass
class S3Storage:
    """A bucket and key prefix on S3 or an S3-compatible server."""

    url: str
    bucket: str
    prefix: str
    credentials: dict[str, Any] = field(default_factory=dict)
    endpoint_url: str | None = None
    _client: Any = None

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            c = self.credentials
            session = boto3.session.Session(aws_access_key_id=c.get("access_key_id"),
                                            aws_secret_access_key=c.get("secret_access_key"),
                                            aws_session_token=c.get("session_token"), region_name=c.get("region"))
            self._client = session.client("s3", endpoint_url=self.endpoint_url,
                                          config=Config(retries={"max_attempts": 5, "mode": "standard"}))
        return self._client

    def _fail(self, what: str, key: str, e: Exception) -> StorageError:
        return StorageError(f"could not {what} s3://{self.bucket}/{self._key(key)}: {e}")

    def put_file(self, local: Path, key: str) -> None:
        """Upload ``local`` to ``key`` (an S3 object appears whole or not at all)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.upload_file(str(local), self.bucket, self._key(key))
        except (BotoCoreError, ClientError) as e:
            raise self._fail("write", key, e) from e

    def get_file(self, key: str, local: Path) -> bool:
        """Download ``key`` to ``local``; False when there is no such key."""
        from botocore.exceptions import BotoCoreError, ClientError

        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.partial")
        try:
            self.client.download_file(self.bucket, self._key(key), str(tmp))
        except ClientError as e:
            tmp.unlink(missing_ok=True)
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
                return False
            raise self._fail("read", key, e) from e
        except BotoCoreError as e:
            tmp.unlink(missing_ok=True)
            raise self._fail("read", key, e) from e
        tmp.replace(local)
        return True

    def _objects(self, prefix: str) -> Iterator[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(prefix).rstrip("/") + "/"
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    yield obj["Key"]
        except (BotoCoreError, ClientError) as e:
            raise self._fail("list", prefix, e) from e

    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix``."""
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[cut:] for k in self._objects(prefix))

    def delete(self, key: str) -> None:
        """Remove ``key`` (nothing when it is not there)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as e:
            raise self._fail("delete", key, e) from e

    def delete_prefix(self, prefix: str) -> None:
        """Remove every key under ``prefix``."""
        keys = list(self._objects(prefix))
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})


def put_dir(storage: Storage, local: Path, prefix: str, *, last: str | None = None) -> None:
    """Upload the files under ``local`` to ``prefix``, the one named ``last`` (a completeness marker) after all."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)
    for p in files:
        storage.put_file(p, f"{prefix}/{p.relative_to(local).as_posix()}")


def get_dir(storage: Storage, prefix: str, local: Path) -> int:
    """Download every key under ``prefix`` into ``local``; the number of files."""
    keys = storage.list(prefix)
    for key in keys:
        storage.get_file(key, local / key[len(prefix) + 1:])
    return len(keys)


def complete_checkpoints(storage: Storage, prefix: str, marker: str) -> list[tuple[int, str]]:
    """(step, key prefix) of every checkpoint under ``prefix`` whose marker is uploaded, oldest first."""
    found = []
    for key in storage.list(prefix):
        rel = key[len(prefix) + 1:].split("/")
        if len(rel) == 2 and rel[1] == marker and rel[0].startswith("checkpoint-") and rel[0][11:].isdigit():
            found.append((int(rel[0][11:]), f"{prefix}/{rel[0]}"))
    return sorted(found)
