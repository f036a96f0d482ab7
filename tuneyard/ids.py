"""Object ids in the shapes the OpenAI dialect uses (``ftjob-...``, ``file-...``)."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, n: int = 24) -> str:
    """A random id such as ``ftjob-AbC...``; ``n`` random characters after the prefix."""
    # One draw below 62**n, written in base 62: every string equally likely, as with a choice per character,
    # for one read of the system's randomness instead of n (a submit makes four ids).
    x = secrets.randbelow(len(_ALPHABET) ** n)
    chars = []
    for _ in range(n):
        x, r = divmod(x, len(_ALPHABET))
        chars.append(_ALPHABET[r])
    return f"{prefix}-" + "".join(chars)
