"""Request dependencies: the process's services and the authenticated caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from tuneyard.service import Services
from tuneyard.service.auth import Principal, authenticate


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    """The organisation behind the request's API key or JWT (401 in the dialect's format), rate-limited."""
    services: Services = request.app.state.services
    who = authenticate(services.store, authorization, services.settings)
    request.app.state.limiter.check(who.key_id)
    return who


Svc = Annotated[Services, Depends(get_services)]
Caller = Annotated[Principal, Depends(get_caller)]
