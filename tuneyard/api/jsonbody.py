"""Request bodies read strictly: the route class every dialect's router uses.

FastAPI reads a JSON body with ``json.loads``, which takes lone surrogates, ``NaN`` and numbers too long to
convert, and Starlette decodes a form field that is not UTF-8 as Latin-1; what either took could then not be
stored, or was not what the client sent. Here a JSON body goes through :func:`tuneyard.jsontext.loads` and a
multipart text field must be UTF-8, and each refusal is a 400 that names the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import parse_options_header

from tuneyard import jsontext


class MalformedBody(HTTPException):
    """400 for a body that cannot be read as sent; ``param`` names the field when one is to blame."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(status_code=400, detail=message)
        self.param = param


class _StrictMultiPartParser(MultiPartParser):
    """Starlette's parser, but a text field that is not UTF-8 is recorded instead of read as Latin-1."""

    not_utf8: list[tuple[str, UnicodeDecodeError]]

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None and self._charset in ("utf-8", "utf8", ""):
            try:
                bytes(part.data).decode("utf-8")
            except UnicodeDecodeError as e:
                self.__dict__.setdefault("not_utf8", []).append((part.field_name, e))
        super().on_part_end()


class StrictJSONRequest(Request):
    """A request whose ``json()`` is ``jsontext.loads`` and whose multipart text fields must be UTF-8."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = jsontext.loads(body)
            except jsontext.JSONValueError as e:
                reason = e.msg.removeprefix(f"{e.path}: ") if e.path else e.msg
                raise MalformedBody(f"Invalid value for '{e.path}': {reason}." if e.path else
                                    f"The request body holds a value that cannot be accepted: {reason}.",
                                    e.path or None) from None
            except json.JSONDecodeError as e:
                at = f" (at character {e.pos})" if e.doc else ""
                raise MalformedBody(f"The request body is not valid JSON: {e.msg}{at}.") from None
        return self._json

    async def _get_form(self, *, max_files: int | float = 1000, max_fields: int | float = 1000,
                        max_part_size: int = 1024 * 1024) -> FormData:
        content_type, _ = parse_options_header(self.headers.get("Content-Type"))
        if self._form is not None or content_type != b"multipart/form-data":
            return await super()._get_form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)
        # Starlette's own multipart branch, with the strict parser.
        try:
            async with aclosing(self.stream()) as stream:
                parser = _StrictMultiPartParser(self.headers, stream, max_files=max_files, max_fields=max_fields,
                                                max_part_size=max_part_size)
                self._form = await parser.parse()
        except MultiPartException as exc:
            raise HTTPException(status_code=400, detail=exc.message) from None
        bad = getattr(parser, "not_utf8", [])
        if bad:
            problems = "; ".join(f"'{name}': invalid UTF-8 (byte 0x{e.object[e.start]:02x} at position {e.start + 1})"
                                 for name, e in bad)
            raise MalformedBody(f"Form fields must be UTF-8 text: {problems}.", bad[0][0])
        return self._form


class StrictJSONRoute(APIRoute):
    """An APIRoute whose handler sees a :class:`StrictJSONRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
