"""One error type for the whole service; each dialect renders it in its own wire format."""

from __future__ import annotations


class TuneyardError(Exception):
    """A failure the caller can act on: an HTTP status, a machine code, a message and the offending field."""

    status_code = 400
    default_code = "invalid_request"
    default_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status_code: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        if status_code is not None:
            self.status_code = status_code
        # Response headers every dialect must send with this error (e.g. retry-after on a 429).
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return self.default_type


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
