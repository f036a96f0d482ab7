"""One error type for the whole service; each dialect renders it in its own wire format."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request: the offending field (dotted path), what is wrong, a machine code."""

    param: str | None
    message: str
    code: str | None = None

    def text(self) -> str:
        """The message, prefixed with the field unless the message starts by naming it."""
        # "node_count 2: ..." names its field; "organisation ..." does not name "org".
        if not self.param or re.match(re.escape(self.param) + r"(?![\w.])", self.message):
            return self.message
        return f"{self.param}: {self.message}"


class TuneyardError(Exception):
    """A failure the caller can act on: an HTTP status, a machine code, a message and the offending field.

    One error may carry several ``problems`` (see ``Problems``): ``param`` and ``code`` are then the first
    problem's and ``message`` lists them all.
    """

    status_code = 400
    default_code = "invalid_request"
    default_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status_code: int | None = None, headers: dict[str, str] | None = None,
                 problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        if status_code is not None:
            self.status_code = status_code
        # Response headers every dialect must send with this error (e.g. retry-after on a 429).
        self.headers = headers or {}
        # None: the error is its own single problem (kept in step with param/message when a dialect renames).
        self._problems = problems

    @property
    def type(self) -> str:
        return self.default_type

    @property
    def problems(self) -> list[Problem]:
        """Every problem this error reports, the first one first (at least one)."""
        if self._problems is None:
            return [Problem(self.param, self.message, self.code)]
        return list(self._problems)

    def rename_params(self, names: Mapping[str, str]) -> TuneyardError:
        """Name the fields the way a dialect's callers know them (``names``: service name -> dialect name)."""
        self.param = names.get(self.param, self.param) if self.param else self.param
        if self._problems is not None:
            self._problems = [replace(p, param=names.get(p.param, p.param)) if p.param else p
                              for p in self._problems]
            self.message = combined_message(self._problems)
        return self


def combined_message(problems: list[Problem]) -> str:
    """One message that lists every problem (the message of a single problem is unchanged)."""
    if len(problems) == 1:
        return problems[0].message
    return f"{len(problems)} problems: " + "; ".join(p.text().rstrip(". ") for p in problems) + "."


def combine(errors: list[TuneyardError]) -> TuneyardError:
    """One error reporting every problem of ``errors``: a single error as it is, several as one 400."""
    if len(errors) == 1:
        return errors[0]
    problems = [p for e in errors for p in e.problems]
    # A status of their own (e.g. a 404 for an unknown organisation) holds only when that is all there is.
    return InvalidRequest(combined_message(problems), param=problems[0].param, code=problems[0].code,
                          problems=problems)


class Problems:
    """Collects the errors of independent checks, so that one error reports all of them.

    ``with problems.check(): ...`` records a TuneyardError raised inside instead of letting it through;
    ``raise_if_any()`` then raises them as one (``combine``). Checks that need an earlier one to have passed
    belong in the same ``check`` block.
    """

    def __init__(self) -> None:
        self.errors: list[TuneyardError] = []

    def __bool__(self) -> bool:
        return bool(self.errors)

    @contextmanager
    def check(self) -> Iterator[None]:
        """Run a block of checks; a TuneyardError it raises is recorded rather than raised."""
        try:
            yield
        except TuneyardError as e:
            self.errors.append(e)

    def add(self, error: TuneyardError) -> None:
        """Record a problem found without raising."""
        self.errors.append(error)

    def raise_if_any(self) -> None:
        """Raise every recorded problem as one error; nothing when there is none."""
        if self.errors:
            raise combine(self.errors)


class InvalidRequest(TuneyardError):
    """400: the request is malformed or asks for something impossible."""


class NotFound(TuneyardError):
    """404: no such object in the caller's organisation (never says whether it exists elsewhere)."""

    status_code = 404
    default_code = "not_found"
    default_type = "invalid_request_error"


class Conflict(TuneyardError):
    """409: the object is not in a state that allows this (e.g. cancel a finished job)."""

    status_code = 409
    default_code = "conflict"


class InvalidState(Conflict):
    """409: a job's status does not allow ``action``; carries the facts so that each dialect can word it with its
    own id for the job and its own status names (the message is tuneyard's, i.e. the OpenAI dialect's, wording)."""

    default_code = "invalid_state"

    def __init__(self, message: str, *, job_id: str, external_id: str | None, status: str, action: str,
                 **kw) -> None:
        super().__init__(message, **kw)
        self.job_id = job_id
        self.external_id = external_id
        self.status = status
        self.action = action


class Unauthorized(TuneyardError):
    """401: missing or invalid credentials."""

    status_code = 401
    default_code = "invalid_api_key"
    default_type = "authentication_error"


class Forbidden(TuneyardError):
    """403: the caller's role does not allow this (only about its own organisation: another's objects are 404)."""

    status_code = 403
    default_code = "permission_denied"
    default_type = "permission_error"


class PayloadTooLarge(TuneyardError):
    """413: an upload or body over the configured limit."""

    status_code = 413
    default_code = "payload_too_large"


class RateLimited(TuneyardError):
    """429: the caller's request rate is over its limit; ``retry-after`` says when to come back."""

    status_code = 429
    default_code = "rate_limit_exceeded"
    default_type = "requests"
