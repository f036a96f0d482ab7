"""JSON from untrusted text: one parser entry point for uploads, form fields and rows."""

from __future__ import annotations

import json
from typing import Any

# Deeper than this is no legitimate training row or request, and Python's recursive code would choke on it.
MAX_DEPTH = 100


def loads(text: str | bytes) -> Any:
    """``json.loads``, where nesting deeper than MAX_DEPTH is a JSONDecodeError like any other bad input."""
    if isinstance(text, bytes | bytearray):
        text = text.decode("utf-8")
    try:
        value = json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError(f"nested more than {MAX_DEPTH} levels deep", text, 0) from None
    # Nesting needs an opening bracket per level: most texts cannot be too deep, and counting is cheap.
    if text.count("{") + text.count("[") > MAX_DEPTH and _too_deep(value, MAX_DEPTH):
        raise json.JSONDecodeError(f"nested more than {MAX_DEPTH} levels deep", text, 0)
    return value


def _too_deep(value: Any, budget: int) -> bool:
    # Iterative: the check itself must not recurse on what it is checking.
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if depth > budget:
            return True
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
    return False
