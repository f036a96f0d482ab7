"""tuneyard's own endpoints beside the dialects: an organisation's secrets and its audit log (under /v1).

Errors are in the OpenAI format. Secrets are written by admins and listed to everyone of the organisation,
by name and type only; the audit log is for admins.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from tuneyard.api.deps import Caller, Svc
from tuneyard.api.jsonbody import StrictJSONRoute
from tuneyard.service.secrets import SecretInfo

router = APIRouter(tags=["tuneyard"], route_class=StrictJSONRoute)


class SecretIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    type: str = Field(min_length=1, max_length=16,
                      description="aws ({access_key_id, secret_access_key[, session_token, region]}), hf ({token}) "
                                  "or wandb ({api_key[, host]})")
    value: dict[str, str] = Field(description="the credential's fields, e.g. {access_key_id, secret_access_key}")


class SecretOut(BaseModel):
    id: str
    object: Literal["secret"] = "secret"
    name: str
    type: str
    created_at: int


class SecretDeletedOut(BaseModel):
    id: str
    object: Literal["secret"] = "secret"
    name: str
    deleted: bool = True


class SecretListOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[SecretOut]
    has_more: bool = False


class AuditOut(BaseModel):
    id: str
    object: Literal["audit_event"] = "audit_event"
    created_at: int
    actor: str
    action: str
    object_id: str | None
    details: dict[str, Any] | None


class AuditListOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditOut]
    has_more: bool
    first_id: str | None
    last_id: str | None


def _secret(info: SecretInfo) -> SecretOut:
    return SecretOut(id=info.id, name=info.name, type=info.type, created_at=int(info.created_at))


@router.post("/secrets", response_model=SecretOut)
def create_secret(svc: Svc, who: Caller, body: SecretIn) -> SecretOut:
    """Store a credential, encrypted; the value is never shown again."""
    return _secret(svc.secrets.create(who, body.name, body.type, body.value))


@router.get("/secrets", response_model=SecretListOut)
def list_secrets(svc: Svc, who: Caller) -> SecretListOut:
    """The organisation's secrets: names, types and ids."""
    return SecretListOut(data=[_secret(i) for i in svc.secrets.list(who)])


@router.delete("/secrets/{name}", response_model=SecretDeletedOut)
def delete_secret(svc: Svc, who: Caller, name: str) -> SecretDeletedOut:
    """Delete a secret by name or id."""
    info = svc.secrets.delete(who, name)
    return SecretDeletedOut(id=info.id, name=info.name)


@router.get("/audit", response_model=AuditListOut)
def list_audit(svc: Svc, who: Caller, after: str | None = None,
               limit: Annotated[int, Query()] = 20) -> AuditListOut:
    """The organisation's audit log, newest first (admins)."""
    rows, more = svc.audit.list(who, after=after, limit=limit)
    items = [AuditOut(id=r.id, created_at=int(r.created_at), actor=r.actor, action=r.action, object_id=r.object_id,
                      details=r.details) for r in rows]
    return AuditListOut(data=items, has_more=more, first_id=items[0].id if items else None,
                        last_id=items[-1].id if items else None)
