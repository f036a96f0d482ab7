"""Turning errors into each dialect's error body; the dialect is chosen by the request path."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from tuneyard.api.jsonbody import MalformedBody
from tuneyard.domain.errors import InvalidRequest, Problem, TuneyardError, combine

log = logging.getLogger("tuneyard.api")


class Renderer(Protocol):
    """(request, status, message, type, param, code, problems) -> the dialect's error response.

    ``message`` already lists every problem and ``param``/``code`` are the first one's; ``problems`` (None: just
    the one in message/param) is for dialects whose body lists them one by one.
    """

    def __call__(self, request: Request, status: int, message: str, type_: str, param: str | None,
                 code: str | None, problems: list[Problem] | None = None) -> JSONResponse: ...


# A dialect's rewording of a service error (its own field names, ids and status words), applied before rendering.
Translator = Callable[[TuneyardError], TuneyardError]


def openai_error(request: Request, status: int, message: str, type_: str, param: str | None,
                 code: str | None, problems: list[Problem] | None = None) -> JSONResponse:
    """OpenAI's ``{"error": {message, type, param, code}}``: several problems are all in the message."""
    headers = {"x-should-retry": "false"} if 400 <= status < 500 and status not in (408, 429) else None
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


# Path prefix -> renderer (and translator); the longest matching prefix wins, OpenAI's format is the default.
RENDERERS: dict[str, Renderer] = {}
TRANSLATORS: dict[str, Translator] = {}


def register_renderer(prefix: str, renderer: Renderer, translate: Translator | None = None) -> None:
    """Errors on paths under ``prefix`` (whole segments: ``/job`` is not ``/jobs``) are rendered by ``renderer``,
    after ``translate`` has reworded them."""
    RENDERERS[prefix] = renderer
    if translate is not None:
        TRANSLATORS[prefix] = translate


def renderer_for(request: Request) -> Renderer:
    """The error renderer of the dialect that serves ``request``'s path."""
    return _renderer(request)


def _prefix(path: str) -> str | None:
    return max((p for p in RENDERERS if path == p or path.startswith(p.rstrip("/") + "/")), key=len, default=None)


def _renderer(request: Request) -> Renderer:
    best = _prefix(request.url.path)
    return RENDERERS[best] if best is not None else openai_error


def _translated(request: Request, exc: TuneyardError) -> TuneyardError:
    translate = TRANSLATORS.get(_prefix(request.url.path) or "")
    return translate(exc) if translate is not None else exc


METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at ``request``'s path (for a 405's ``Allow``, RFC 9110 15.5.6)."""
    # Asked of the router itself, method by method: included routers keep their routes to themselves.
    routes = request.app.router.routes
    return [m for m in METHODS
            if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes)]


def _loc_to_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    # pydantic adds the union member tried ("int", "literal['auto']", "function-after[...]"): not a field.
    parts = [p for p in parts if not (p.startswith(("literal[", "function-", "constrained-")) or p in
                                      ("int", "float", "str", "bool", "dict", "list", "none"))]
    return ".".join(parts) or None


def validation_error(errors: list[dict]) -> TuneyardError:
    """pydantic's errors (every one of them) as one 400 listing each field and what is wrong with it."""
    # A value tried against `"auto" | int` fails both; the literal's complaint only hides the real one.
    by_param: dict[str | None, list[dict]] = {}
    for e in errors:
        by_param.setdefault(_loc_to_param(tuple(e.get("loc", ()))), []).append(e)
    errors = [e for group in by_param.values() for e in
              ([x for x in group if x.get("type") != "literal_error"] or group)]
    found: list[TuneyardError] = []
    seen: set[str] = set()
    for e in errors or [{"loc": (), "msg": "invalid request"}]:
        p = _loc_to_param(tuple(e.get("loc", ())))
        if p is None:
            # The body as a whole: a form or text sent where a JSON object is expected.
            msg = f"The request body must be a JSON object (Content-Type: application/json): {e.get('msg')}."
        elif e.get("type") == "missing":
            msg = f"Missing required parameter: '{p}'."
        elif e.get("type") == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: '{p}'."
        else:
            msg = f"Invalid value for '{p}': {e.get('msg', 'invalid')}."
        if msg not in seen:
            seen.add(msg)
            found.append(InvalidRequest(msg, param=p))
    return combine(found)


def install(app: FastAPI) -> None:
    """Register the exception handlers on ``app``."""

    @app.exception_handler(TuneyardError)
    async def _tuneyard(request: Request, exc: TuneyardError):
        exc = _translated(request, exc)
        response = _renderer(request)(request, exc.status_code, exc.message, exc.type, exc.param, exc.code,
                                      exc.problems)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = list(exc.errors())
        if errors and errors[0].get("type") == "json_invalid":
            return _body_not_json(request, errors[0])
        return await _tuneyard(request, validation_error(errors))

    def _body_not_json(request: Request, error: dict) -> JSONResponse:
        # Only routes outside StrictJSONRoute get here: theirs raise MalformedBody.
        reason = str((error.get("ctx") or {}).get("error") or "JSON decode error")
        return _renderer(request)(request, 400, f"The request body is not valid JSON: {reason}.",
                                  "invalid_request_error", None, "invalid_json")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code)
        if isinstance(exc, MalformedBody):
            return _renderer(request)(request, 400, str(exc.detail), "invalid_request_error", exc.param,
                                      "invalid_request_body")
        message = str(exc.detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            message = f"Unknown endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            allow = allowed_methods(request) or [m.strip() for m in headers.get("Allow", "").split(",") if m.strip()]
            headers["Allow"] = ", ".join(allow)
            message = f"Method {request.method} is not allowed on {request.url.path}; allowed: {headers['Allow']}"
        response = _renderer(request)(request, exc.status_code, message, "invalid_request_error", None, code)
        response.headers.update(headers)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _renderer(request)(request, 500, "The server had an error while processing your request.",
                                  "server_error", None, "internal_error")
