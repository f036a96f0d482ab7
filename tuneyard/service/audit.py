"""The audit log: who created, cancelled, paused, resumed or deleted what. Append-only; admins read it."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneyard.domain.errors import InvalidRequest
from tuneyard.ids import new_id
from tuneyard.service.auth import Principal, require_admin
from tuneyard.store.db import Store
from tuneyard.store.models import AuditEvent
from tuneyard.store.repo import page

# The command-line tool on the server machine: whoever runs it holds the server's own access.
CLI = "cli"


def record(s: Session, org_id: str, actor: str, action: str, object_id: str | None,
           details: dict[str, Any] | None = None) -> None:
    """Append one entry, in the caller's transaction: the change and its record commit together."""
    s.add(AuditEvent(id=new_id("audit"), org_id=org_id, actor=actor, action=action, object_id=object_id,
                     created_at=time.time(), details=details or None))


def record_by(s: Session, who: Principal, action: str, object_id: str | None,
              details: dict[str, Any] | None = None) -> None:
    """``record`` for a caller of the API."""
    record(s, who.org_id, who.key_id, action, object_id, details)


class AuditService:
    """Reading the log (there is no way to change it through tuneyard)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def list(self, who: Principal, *, after: str | None, limit: int) -> tuple[list[AuditEvent], bool]:
        """A page of the organisation's audit entries, newest first; admins only."""
        require_admin(who, "Reading the audit log")
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be between 1 and 1000", param="limit")
        with self.store.session() as s:
            return page(s, select(AuditEvent).where(AuditEvent.org_id == who.org_id), AuditEvent, after=after,
                        limit=limit)
