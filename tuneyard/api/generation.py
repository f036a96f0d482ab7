"""What every dialect's completion endpoints share: the caller's model resolved to its weights, the request
handed to the inference process, and its events read back (streamed, or collected into whole choices)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from tuneyard.domain.generation import GenerationRequest
from tuneyard.inference.client import Unavailable
from tuneyard.service import Services
from tuneyard.service.auth import Principal


async def open_events(request: Request, svc: Services, who: Principal, model: str,
                      gen: GenerationRequest) -> AsyncIterator[dict]:
    """The inference events of ``gen`` on ``model``, once the inference process has accepted it (its refusal,
    an unknown model, a prompt too long, is raised here: before any response byte, so it gets its 4xx)."""
    target = await run_in_threadpool(svc.models.target, who, model)
    payload = gen.model_copy(update={"base": target.base, "adapter": target.adapter,
                                     "trust_remote_code": target.trust_remote_code})
    events = request.app.state.inference.events(payload.model_dump())
    await anext(events)  # "start"
    return events


async def collect(streams: list[AsyncIterator[dict]], n: int) -> tuple[dict[int, str], dict[int, str], dict]:
    """Each choice's whole text and finish reason (choice k*n+i for stream k's choice i), and the usage summed."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for k, events in enumerate(streams):
        async for ev in events:
            if ev["type"] == "delta":
                texts[k * n + ev["index"]] = texts.get(k * n + ev["index"], "") + ev["text"]
            elif ev["type"] == "end":
                reasons[k * n + ev["index"]] = ev["finish_reason"]
            elif ev["type"] == "usage":
                usage = {key: usage[key] + ev[key] for key in usage}
            elif ev["type"] == "error":
                raise Unavailable(f"Generation failed: {ev['message']}", code="generation_failed")
    return texts, reasons, usage
