"""Request limits: body size on every endpoint, and a token-bucket rate limit per caller.

Both answer in the error format of the dialect that serves the path (``api.errors``).
"""

from __future__ import annotations

import math
import threading
import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuneyard.api.errors import renderer_for
from tuneyard.domain.errors import PayloadTooLarge, RateLimited
from tuneyard.settings import Settings

# Room for the multipart framing and the other form fields around an upload of max_upload_bytes.
MULTIPART_OVERHEAD = 1024 * 1024


class BodyLimitMiddleware:
    """413 for bodies over the limit: at once when Content-Length says so, else as soon as the count passes it."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit_for(self, scope: Scope) -> int:
        """The byte limit of this request: uploads (multipart) get the upload limit, all else the request limit."""
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"")
        if content_type.startswith(b"multipart/form-data"):
            return self.settings.max_upload_bytes + MULTIPART_OVERHEAD
        return self.settings.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                too_big = False  # the server's HTTP parser rejects a malformed length itself
            if too_big:
                await self._reject(scope, receive, send, limit)
                return
        seen = 0
        answered = False

        async def counted() -> Message:
            nonlocal seen, answered
            message = await receive()
            if message["type"] == "http.request" and not answered:
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Answer now, then tell the app the client went away: whatever it does next is not sent.
                    answered = True
                    await self._reject(scope, receive, send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not answered:
                await send(message)

        await self.app(scope, counted, guarded_send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        request = Request(scope, receive)
        response = renderer_for(request)(request, 413, _message(limit), "invalid_request_error", "body",
                                         PayloadTooLarge.default_code)
        # The client may still be sending: tell it this connection will not read the rest.
        response.headers["connection"] = "close"
        await response(scope, receive, send)


def _message(limit: int) -> str:
    return f"Request body is larger than the {limit:,} byte limit."


class RateLimiter:
    """Token buckets per caller: ``rate`` tokens a second up to ``burst``; one token per request."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, who: str) -> None:
        """Take a token for ``who`` or raise RateLimited with the seconds until one is available."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(who, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                wait = (1.0 - tokens) / self.rate
                self._buckets[who] = (tokens, now)
                raise RateLimited(f"Rate limit reached: {self.rate:g} requests/s (burst {self.burst}) per API key. "
                                  f"Retry in {wait:.2f} s.", headers={"retry-after": str(max(1, math.ceil(wait)))})
            self._buckets[who] = (tokens - 1.0, now)
            if len(self._buckets) > 100_000:
                self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        # A bucket that has refilled completely carries no state: drop those to bound memory.
        full = [k for k, (t, last) in self._buckets.items() if t + (now - last) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
