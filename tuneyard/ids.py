"""Object ids in the shapes the OpenAI dialect uses (``ftjob-...``, ``file-...``)."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, n: int = 24) -> str:
    """A random id such as ``ftjob-AbC...``; ``n`` random characters after the prefix."""
    return f"{prefix}-" + "".join(secrets.choice(_ALPHABET) for _ in range(n))
