"""tuneyard's own endpoints beside the dialects: an organisation's secrets, webhook endpoints and audit log (/v1).

Errors are in the OpenAI format. Secrets are written by admins and listed to everyone of the organisation,
by name and type only; the audit log is for admins.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from tuneyard.api.deps import Caller, Svc
from tuneyard.api.jsonbody import StrictJSONRoute
from tuneyard.domain.webhooks import EVENTS as WEBHOOK_EVENTS
from tuneyard.service.secrets import SecretInfo
from tuneyard.service.webhooks import EndpointInfo

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


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)
    events: list[str] | None = Field(None, max_length=16, description=f"any of {list(WEBHOOK_EVENTS)}; default the "
                                                                      "three fine_tuning.job.* end events")


class WebhookOut(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    created_at: int
    # Only in the answer to its creation.
    secret: str | None = None


class WebhookListOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookOut]
    has_more: bool = False


class WebhookDeletedOut(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    deleted: bool = True


class DeliveryOut(BaseModel):
    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    event_type: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: int
    next_attempt_at: int | None
    delivered_at: int | None


class DeliveryListOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryOut]
    has_more: bool = False


def _webhook(info: EndpointInfo) -> WebhookOut:
    return WebhookOut(id=info.id, url=info.url, events=info.events, created_at=int(info.created_at),
                      secret=info.secret)


@router.post("/webhooks", response_model=WebhookOut, response_model_exclude_none=True)
def create_webhook(svc: Svc, who: Caller, body: WebhookIn) -> WebhookOut:
    """Register an endpoint; the answer's ``secret`` signs every delivery and is never shown again."""
    return _webhook(svc.webhooks.create(who, body.url, body.events))


@router.get("/webhooks", response_model=WebhookListOut, response_model_exclude_none=True)
def list_webhooks(svc: Svc, who: Caller) -> WebhookListOut:
    """The organisation's endpoints (no secrets)."""
    return WebhookListOut(data=[_webhook(i) for i in svc.webhooks.list(who)])


@router.delete("/webhooks/{webhook_id}", response_model=WebhookDeletedOut)
def delete_webhook(svc: Svc, who: Caller, webhook_id: str) -> WebhookDeletedOut:
    """Delete an endpoint and its queued deliveries."""
    return WebhookDeletedOut(id=svc.webhooks.delete(who, webhook_id).id)


@router.get("/webhooks/{webhook_id}/deliveries", response_model=DeliveryListOut)
def list_deliveries(svc: Svc, who: Caller, webhook_id: str,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> DeliveryListOut:
    """An endpoint's delivery log, newest first: each event, its tries and the last answer."""
    rows = svc.webhooks.deliveries(who, webhook_id, limit)
    return DeliveryListOut(data=[DeliveryOut(
        id=d.id, event_type=d.event_type, status=d.status, attempts=d.attempts, last_status_code=d.last_status_code,
        last_error=d.last_error, created_at=int(d.created_at),
        next_attempt_at=int(d.next_attempt_at) if d.status == "pending" else None,
        delivered_at=int(d.delivered_at) if d.delivered_at else None) for d in rows])
