"""Wire details every dialect shares: optional fields left out while unknown, numbers echoed as they were sent."""

from __future__ import annotations

from typing import Any

from pydantic import Field


def omitted_if_none(**kw: Any) -> Any:
    """A response field that is left out of the body while it is None.

    For fields a spec types as optional but not nullable: its clients expect an unknown value to be absent,
    and some (the generated SDKs) refuse a ``null``.
    """
    return Field(None, exclude_if=lambda v: v is None, **kw)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def echo_as_sent(out: Any, sent: Any) -> Any:
    """``out`` with every number that equals the one the client sent at the same place replaced by the sent one.

    The spec stores numbers in its own types (an alpha of 16 becomes 16.0); a client reading its job back
    should see what it wrote.
    """
    if isinstance(out, dict) and isinstance(sent, dict):
        return {k: echo_as_sent(v, sent[k]) if k in sent else v for k, v in out.items()}
    if isinstance(out, list) and isinstance(sent, list) and len(out) == len(sent):
        return [echo_as_sent(o, s) for o, s in zip(out, sent, strict=True)]
    if _number(out) and _number(sent) and out == sent:
        return sent
    return out
