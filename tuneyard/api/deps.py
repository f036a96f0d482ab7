"""Request dependencies: the process's services and the authenticated caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from tuneyard.service import Services
from tuneyard.service.auth import Principal, authenticate, bearer_token


# Both are async so that FastAPI calls them on the event loop: a sync dependency costs a hop to the
# thread pool on every request.
async def get_services(request: Request) -> Services:
    """The services of this process."""
    return request.app.state.services


async def get_caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    """The organisation behind the request's API key or JWT (401 in the dialect's format), rate-limited."""
    services: Services = request.app.state.services
    who = services.keys.get(bearer_token(authorization))
    if who is None:
        # A database lookup (or a JWT check): off the event loop.
        who = await run_in_threadpool(authenticate, services.store, authorization, services.settings,
                                      services.keys)
    request.app.state.limiter.check(who.key_id)
    return who


Svc = Annotated[Services, Depends(get_services)]
Caller = Annotated[Principal, Depends(get_caller)]
