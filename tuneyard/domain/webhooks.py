"""Webhook events: which job changes are announced, their OpenAI-shaped bodies, and Standard Webhooks signing.

The bodies are OpenAI's fine-tuning webhook events (``{"object": "event", "id", "type", "created_at", "data":
{"id": job id}}``) so that the ``openai`` SDK's ``client.webhooks.unwrap(body, headers, secret=...)`` verifies and
parses them; ``fine_tuning.job.paused`` is a tuneyard extension. Signatures follow Standard Webhooks
(https://www.standardwebhooks.com): ``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` keyed by
the base64 part of the ``whsec_`` secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets

from tuneyard.domain.jobs import JobStatus

EVENT_OF_STATUS = {
    JobStatus.SUCCEEDED: "fine_tuning.job.succeeded",
    JobStatus.FAILED: "fine_tuning.job.failed",
    JobStatus.CANCELLED: "fine_tuning.job.cancelled",
    JobStatus.PAUSED: "fine_tuning.job.paused",  # tuneyard extension
}
OPENAI_EVENTS = ("fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled")
EVENTS = tuple(EVENT_OF_STATUS.values())
SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A fresh signing secret, ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def body(event_id: str, event_type: str, job_id: str, created_at: float) -> str:
    """The event's JSON body, exactly as signed and sent on every try."""
    return json.dumps({"object": "event", "id": event_id, "type": event_type, "created_at": int(created_at),
                       "data": {"id": job_id}}, separators=(",", ":"))


def sign(secret: str, msg_id: str, timestamp: int, payload: str) -> str:
    """The ``webhook-signature`` header value of one try."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.{payload}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()
