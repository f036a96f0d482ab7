"""Stored secrets (S3 credentials, hub tokens): encrypted at rest with Fernet, never returned by any API.

The key comes from ``TUNEYARD_SECRET_KEY`` or, when unset, a key file ``$TUNEYARD_HOME/secret.key`` created
on first use with mode 0600 (every server and worker of one installation must use the same key). Jobs name a
secret by its name or id (Simplismart's ``secret_id``); the worker hands the decrypted value to the job's
processes in their environment, never through a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError

from tuneyard.domain.errors import Conflict, InvalidRequest, NotFound, TuneyardError
from tuneyard.ids import new_id
from tuneyard.service.audit import record_by
from tuneyard.service.auth import Principal, require_admin
from tuneyard.settings import Settings
from tuneyard.store.db import Store
from tuneyard.store.models import Secret

if TYPE_CHECKING:
    from cryptography.fernet import Fernet

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# The fields each type of secret must (and may) hold.
TYPES: dict[str, tuple[set[str], set[str]]] = {
    "aws": ({"access_key_id", "secret_access_key"}, {"session_token", "region"}),
    "hf": ({"token"}, set()),
    "wandb": ({"api_key"}, {"host"}),
}


class SecretUnavailable(TuneyardError):
    """A secret a job names can no longer be used: deleted since submit, or not decryptable with this key."""

    default_code = "secret_not_found"


@dataclass(frozen=True)
class SecretInfo:
    """What may be shown about a secret: never its value, not even encrypted."""

    id: str
    name: str
    type: str
    created_at: float


def fernet(settings: Settings) -> Fernet:
    """The Fernet cipher of this installation (creating the key file on first use)."""
    from cryptography.fernet import Fernet

    if settings.secret_key:
        try:
            return Fernet(settings.secret_key.encode())
        except ValueError:
            raise ValueError("TUNEYARD_SECRET_KEY is not a Fernet key (32 url-safe base64-encoded bytes; make one "
                             "with: python -c 'from cryptography.fernet import Fernet; "
                             "print(Fernet.generate_key().decode())')") from None
    path = settings.home / "secret.key"
    if not path.exists():
        _create_key_file(path, Fernet.generate_key())
    try:
        return Fernet(path.read_bytes().strip())
    except ValueError:
        raise ValueError(f"{path} does not hold a Fernet key") from None


def _create_key_file(path: Path, key: bytes) -> None:
    """Publish ``key`` at ``path`` atomically: concurrent first uses agree on one key, none reads a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        # link() fails when another process published first; its key is then the one everyone uses.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class SecretService:
    """Create, list (names and types only), delete and resolve the secrets of an organisation."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def create(self, who: Principal, name: str, type_: str, value: dict[str, Any]) -> SecretInfo:
        """Encrypt and store ``value`` under ``name``; the fields are checked against the type. Admins only."""
        require_admin(who, "Creating a secret")
        if not isinstance(name, str) or not NAME.match(name):
            raise InvalidRequest("name must be 1-128 characters: letters, digits, '.', '_' or '-', starting with a "
                                 "letter or digit", param="name")
        if name.startswith("secret-"):
            # Jobs may name a secret by its id too; a name shaped like an id would make that ambiguous.
            raise InvalidRequest("name must not start with 'secret-' (the prefix of secret ids)", param="name")
        if type_ not in TYPES:
            raise InvalidRequest(f"type '{type_}' is not one of {sorted(TYPES)}", param="type")
        required, optional = TYPES[type_]
        if not isinstance(value, dict):
            raise InvalidRequest("value must be a JSON object", param="value")
        missing, extra = required - set(value), set(value) - required - optional
        if missing or extra:
            raise InvalidRequest(f"a '{type_}' secret needs {sorted(required)} (optional {sorted(optional)}); "
                                 f"missing {sorted(missing)}, unknown {sorted(extra)}", param="value")
        if any(not isinstance(v, str) or not v for v in value.values()):
            raise InvalidRequest("every field of a secret must be a non-empty string", param="value")
        token = fernet(self.settings).encrypt(json.dumps(value).encode()).decode()
        row = Secret(id=new_id("secret"), org_id=who.org_id, name=name, type=type_, ciphertext=token,
                     created_at=time.time())
        try:
            with self.store.session() as s:
                s.add(row)
                record_by(s, who, "secret.create", row.id, {"name": name, "type": type_})
        except IntegrityError as e:
            raise Conflict(f"a secret named '{name}' already exists", param="name", code="duplicate_secret") from e
        return _info(row)

    def list(self, who: Principal) -> list[SecretInfo]:
        """The organisation's secrets: names, types and ids, never values."""
        with self.store.session() as s:
            rows = s.scalars(select(Secret).where(Secret.org_id == who.org_id).order_by(Secret.pk))
            return [_info(r) for r in rows]

    def _find(self, org_id: str, name_or_id: str) -> Secret | None:
        with self.store.session() as s:
            rows = list(s.scalars(select(Secret).where(
                Secret.org_id == org_id, or_(Secret.name == name_or_id, Secret.id == name_or_id))))
        # Names cannot look like ids (see create), so at most one row matches; the id wins regardless.
        return next((r for r in rows if r.id == name_or_id), rows[0] if rows else None)

    def check(self, who: Principal, name_or_id: str, *, param: str) -> SecretInfo:
        """The secret a request names; a 400 naming ``param`` when the organisation has none by that name."""
        row = self._find(who.org_id, name_or_id)
        if row is None:
            raise InvalidRequest(f"secret '{name_or_id}' not found", param=param, code="secret_not_found")
        return _info(row)

    def delete(self, who: Principal, name_or_id: str) -> SecretInfo:
        """Delete one secret of the organisation (jobs already submitted with it then fail at their next start).
        Admins only."""
        require_admin(who, "Deleting a secret")
        row = self._find(who.org_id, name_or_id)
        if row is None:
            raise NotFound(f"secret '{name_or_id}' not found", param="name", code="secret_not_found")
        with self.store.session() as s:
            obj = s.get(Secret, row.pk)
            if obj is not None:
                s.delete(obj)
                record_by(s, who, "secret.delete", row.id, {"name": row.name})
        return _info(row)

    def resolve(self, org_id: str, name_or_id: str, *, param: str = "secret_id") -> tuple[str, dict[str, Any]]:
        """(type, decrypted value) of a secret, for handing to a job's process; SecretUnavailable otherwise."""
        from cryptography.fernet import InvalidToken

        row = self._find(org_id, name_or_id)
        if row is None:
            raise SecretUnavailable(f"secret '{name_or_id}' not found (deleted since the job was submitted?)",
                                    param=param)
        try:
            return row.type, json.loads(fernet(self.settings).decrypt(row.ciphertext.encode()))
        except InvalidToken:
            raise SecretUnavailable(f"secret '{name_or_id}' cannot be decrypted with this installation's key "
                                    "(TUNEYARD_SECRET_KEY or secret.key changed since it was stored)",
                                    param=param, code="secret_unreadable") from None


def _info(row: Secret) -> SecretInfo:
    return SecretInfo(id=row.id, name=row.name, type=row.type, created_at=row.created_at)
