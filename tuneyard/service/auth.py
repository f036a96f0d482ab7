"""API keys: created per organisation, shown once, stored as a salted hash, checked per request."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import and_, select

from tuneyard.domain.errors import Forbidden, InvalidRequest, Unauthorized
from tuneyard.settings import Settings
from tuneyard.store.db import Store
from tuneyard.store.models import ApiKey, Organization

ORG_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
KEY_PATTERN = re.compile(r"^ty-([A-Za-z0-9]{12})-([A-Za-z0-9_-]{32,64})$")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the organisation every query is scoped to, and the key's role."""

    org_id: str
    key_id: str
    role: str

    @property
    def is_admin(self) -> bool:
        """Admins see and manage everything of their organisation; members what they created."""
        return self.role == "admin"


def visible(model: Any, who: Principal) -> Any:
    """The condition every query of ``model`` (Job, File, Dataset) carries: the caller's organisation, and
    for a member only what it created. One place, so no handler can forget it."""
    cond = model.org_id == who.org_id
    if not who.is_admin:
        cond = and_(cond, model.created_by == who.key_id)
    return cond


def require_admin(who: Principal, what: str) -> None:
    """Forbidden unless ``who`` holds an admin key (or an admin JWT) of its organisation."""
    if not who.is_admin:
        raise Forbidden(f"{what} needs an admin key of the organisation; this key is a member's")


def _hash(salt: str, secret: str) -> str:
    # The secret is 256 random bits, so one salted SHA-256 is enough (no password stretching needed)
    # and keeps each request's check in microseconds.
    return hashlib.sha256((salt + secret).encode()).hexdigest()


def ensure_org(store: Store, org_id: str) -> None:
    """Create the organisation ``org_id`` if it does not exist yet."""
    if not ORG_SLUG.match(org_id):
        raise InvalidRequest(f"organisation '{org_id}' must be a slug: lowercase letters, digits, '-' or '_'",
                             param="org")
    with store.session() as s:
        if s.get(Organization, org_id) is None:
            s.add(Organization(id=org_id, created_at=time.time()))


def create_key(store: Store, org_id: str, *, name: str | None = None, role: str = "admin") -> str:
    """Create an API key for ``org_id`` (creating the organisation too) and return it; it is not stored."""
    ensure_org(store, org_id)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    key_id = "".join(secrets.choice(alphabet) for _ in range(12))
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    from tuneyard.service.audit import CLI, record

    with store.session() as s:
        s.add(ApiKey(id=key_id, org_id=org_id, name=name, role=role, salt=salt, secret_hash=_hash(salt, secret),
                     created_at=time.time()))
        record(s, org_id, CLI, "key.create", key_id, {"role": role})
    return f"ty-{key_id}-{secret}"


def list_keys(store: Store, org_id: str) -> list[ApiKey]:
    """The keys of one organisation (ids and metadata only)."""
    with store.session() as s:
        return list(s.scalars(select(ApiKey).where(ApiKey.org_id == org_id).order_by(ApiKey.created_at)))


def revoke_key(store: Store, org_id: str, key_id: str) -> bool:
    """Revoke one key of ``org_id``; False when there is no such live key."""
    with store.session() as s:
        key = s.get(ApiKey, key_id)
        if key is None or key.org_id != org_id or key.revoked_at is not None:
            return False
        key.revoked_at = time.time()
        from tuneyard.service.audit import CLI, record

        record(s, org_id, CLI, "key.revoke", key_id)
        return True


class KeyCache:
    """API keys verified in the last ``ttl`` seconds, so a client polling a job does not cost a key lookup a
    request. A revoked key (revoked by the CLI, maybe in another process) stops working within ``ttl``;
    only successes are kept, so a new key works at once. Entries are keyed by a hash of the whole token."""

    MAX_ENTRIES = 10_000

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[bytes, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def get(self, token: str) -> Principal | None:
        """The principal the token was verified as, if that was less than ``ttl`` seconds ago."""
        if self.ttl <= 0:
            return None
        hit = self._entries.get(self._key(token))
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def put(self, token: str, who: Principal) -> None:
        """Remember a successful verification for ``ttl`` seconds."""
        if self.ttl <= 0:
            return
        now = time.monotonic()
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries = {k: v for k, v in self._entries.items() if v[1] >= now}
                if len(self._entries) >= self.MAX_ENTRIES:
                    self._entries.clear()
            self._entries[self._key(token)] = (who, now + self.ttl)


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, or Unauthorized."""
    if not authorization:
        raise Unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
    return token


def authenticate(store: Store, authorization: str | None, settings: Settings | None = None,
                 cache: KeyCache | None = None) -> Principal:
    """The principal for an ``Authorization: Bearer <key or JWT>`` header, or Unauthorized."""
    token = bearer_token(authorization)
    if cache is not None:
        who = cache.get(token)
        if who is not None:
            return who
    m = KEY_PATTERN.match(token)
    if m is None:
        if settings is not None and jwt_configured(settings) and token.count(".") == 2:
            return _from_jwt(store, token, settings)
        raise Unauthorized("Incorrect API key provided.")
    key_id, secret = m.groups()
    with store.session() as s:
        key = s.get(ApiKey, key_id)
        if key is None or key.revoked_at is not None or not hmac.compare_digest(
                key.secret_hash, _hash(key.salt, secret)):
            raise Unauthorized("Incorrect API key provided.")
        who = Principal(org_id=key.org_id, key_id=key.id, role=key.role)
    if cache is not None:
        cache.put(token, who)
    return who


ROLES = ("admin", "member")


def jwt_configured(settings: Settings) -> bool:
    """True when the server accepts JWT bearer tokens (a secret or a public key is set)."""
    return bool(settings.jwt_secret or settings.jwt_public_key)


def _jwt_key(settings: Settings) -> str:
    if settings.jwt_secret:
        return settings.jwt_secret
    key = settings.jwt_public_key or ""
    # A path to a PEM file, or the PEM text itself.
    return key if key.lstrip().startswith("-----BEGIN") else Path(key).expanduser().read_text()


def _from_jwt(store: Store, token: str, settings: Settings) -> Principal:
    """Verify a JWT (signature, expiry, audience, issuer) and map its claims to an organisation and role."""
    import jwt

    algorithms = [a.strip() for a in settings.jwt_algorithms.split(",") if a.strip()]
    try:
        claims = jwt.decode(token, _jwt_key(settings), algorithms=algorithms, audience=settings.jwt_audience,
                            issuer=settings.jwt_issuer, options={"require": ["exp"]})
    except jwt.ExpiredSignatureError:
        raise Unauthorized("The bearer token has expired.") from None
    except jwt.PyJWTError as e:
        # The library's reason (bad signature, wrong audience, missing claim) helps the caller and leaks nothing.
        raise Unauthorized(f"Invalid bearer token: {e}.") from None
    org = claims.get(settings.jwt_org_claim)
    if not isinstance(org, str) or not ORG_SLUG.match(org):
        raise Unauthorized(f"The bearer token has no usable '{settings.jwt_org_claim}' claim (an organisation slug).")
    role = claims.get(settings.jwt_role_claim)
    ensure_org(store, org)
    subject = str(claims.get("sub") or "anonymous")[:96]
    return Principal(org_id=org, key_id=f"jwt:{subject}", role=role if role in ROLES else "member")
