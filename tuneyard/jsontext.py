"""JSON from untrusted text: one parser entry point for request bodies, uploads, form fields and rows.

Python's ``json`` accepts more than can be kept: lone UTF-16 surrogates (``"\\ud800"``) that no UTF-8 store or
encoder takes back, ``NaN``/``Infinity`` that are not JSON at all, floats that overflow to ``inf`` and integers
too long to convert (the interpreter's 4,300-digit limit raises ``ValueError``, not a decode error). Each is a
:class:`JSONValueError` here, a ``JSONDecodeError`` that names where in the document the value is, so every
caller that reports bad JSON reports these too, and nothing that is parsed here fails later on the way out.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Deeper than this is no legitimate training row or request, and Python's recursive code would choke on it.
MAX_DEPTH = 100
# An integer of more digits is no count, size or id anyone means; it could not even be made a float.
MAX_INT_DIGITS = 308

# Only texts matching these can hold what the hooks refuse; the rest take the C parser's fast path.
_NUMBER_SUSPECT = re.compile(rf"\d{{{MAX_INT_DIGITS + 1}}}|[eE][+-]?\d{{3}}|NaN|Infinity")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class JSONValueError(json.JSONDecodeError):
    """Parsed, but holds a value that cannot be kept; ``path`` says where (``a.b[2].c``, "" for the top)."""

    def __init__(self, msg: str, doc: str, pos: int, path: str) -> None:
        super().__init__(msg, doc, pos)
        self.path = path


class _Refused:
    """Stands in for a refused number during the parse, so the walk afterwards can say where it was."""

    __slots__ = ("text", "why")

    def __init__(self, text: str, why: str) -> None:
        self.text = text
        self.why = why


def loads(text: str | bytes) -> Any:
    """``json.loads`` that refuses too-deep nesting, lone surrogates, non-finite and overlong numbers."""
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _invalid_utf8(bytes(text), e) from None
        if text.startswith("\ufeff"):
            text = text[1:]
    refused: list[_Refused] = []
    hooks: dict[str, Any] = {}
    if _NUMBER_SUSPECT.search(text):
        hooks = _number_hooks(refused)
    try:
        value = json.loads(text, **hooks)
    except RecursionError:
        raise json.JSONDecodeError(f"nested more than {MAX_DEPTH} levels deep", text, 0) from None
    # Nesting needs an opening bracket per level: most texts cannot be too deep, and counting is cheap.
    if text.count("{") + text.count("[") > MAX_DEPTH and (deep := _too_deep(value, MAX_DEPTH)) is not None:
        deep = deep.replace("\0", "")
        raise JSONValueError(f"{_where(deep)}: nested more than {MAX_DEPTH} levels deep", text, 0, deep)
    if refused:
        # A refused value overwritten by a repeated key is in no path; it was sent all the same.
        path, bad = _find(value, lambda v: isinstance(v, _Refused)) or ("", refused[0])
        pos = max(text.find(bad.text), 0)
        raise JSONValueError(f"{_where(path)}: {bad.why}", text, pos, path)
    # A lone surrogate arrives as a \ud8xx escape, or (in text decoded by someone else) as the code point itself.
    if _SURROGATE_ESCAPE.search(text) or not (text.isascii() or _encodes(text)):
        found = _find(value, _has_surrogate, keys=True)
        if found is not None:
            path, bad = found
            m = _SURROGATE_ESCAPE.search(text)
            raise JSONValueError(f"{_where(path)}: text is not valid Unicode (a lone UTF-16 surrogate "
                                 f"{_first_surrogate(bad)}); send UTF-8 text", text, m.start() if m else 0, path)
    return value


def storable(value: Any) -> Any:
    """``value`` with what no UTF-8 store keeps made keepable: lone surrogates as U+FFFD, NaN and infinities None.

    For values we produce ourselves (a trainer's metrics, an error text holding a file name that was not UTF-8),
    which must be recorded, not refused.
    """
    if isinstance(value, str):
        return value if value.isascii() or _encodes(value) else "".join(
            "\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value


def _number_hooks(refused: list[_Refused]) -> dict[str, Any]:
    def parse_int(s: str) -> Any:
        digits = len(s.lstrip("-"))
        if digits > MAX_INT_DIGITS:
            refused.append(r := _Refused(s, f"a number of {digits} digits is too large (at most {MAX_INT_DIGITS} "
                                            "digits are accepted)"))
            return r
        return int(s)

    def parse_float(s: str) -> Any:
        f = float(s)
        if math.isinf(f):
            refused.append(r := _Refused(s, f"the number {s[:40]} is too large to represent"))
            return r
        return f

    def parse_constant(s: str) -> Any:
        refused.append(r := _Refused(s, f"{s} is not a JSON number"))
        return r

    return {"parse_int": parse_int, "parse_float": parse_float, "parse_constant": parse_constant}


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _has_surrogate(v: Any) -> bool:
    return isinstance(v, str) and not v.isascii() and not _encodes(v)


def _first_surrogate(s: str) -> str:
    for ch in s:
        if 0xD800 <= ord(ch) <= 0xDFFF:
            return f"\\u{ord(ch):04x}"
    return "?"


def _where(path: str) -> str:
    return path or "the top-level value"


def _find(value: Any, bad, *, keys: bool = False) -> tuple[str, Any] | None:
    """The first (path, item) for which ``bad(item)``, depth first in document order; iterative."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        v, path = stack.pop()
        if bad(v):
            return path, v
        if isinstance(v, dict):
            items = []
            for k, x in v.items():
                # The path goes into an error message: it must itself be sendable.
                shown = str(k).encode("utf-8", "backslashreplace").decode("utf-8")
                sub = f"{path}.{shown}" if path else shown
                if keys and bad(k):
                    return sub, k
                items.append((x, sub))
            stack.extend(reversed(items))
        elif isinstance(v, list):
            stack.extend(reversed([(x, f"{path}[{i}]") for i, x in enumerate(v)]))
    return None


def _invalid_utf8(raw: bytes, e: UnicodeDecodeError) -> json.JSONDecodeError:
    """The error for bytes that are not UTF-8, naming the field they are in when the rest parses."""
    why = f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start + 1})"
    # surrogateescape turns each bad byte into a lone surrogate, which the walk then finds with its path.
    try:
        found = _find(json.loads(raw.decode("utf-8", "surrogateescape")), _has_surrogate, keys=True)
    except (ValueError, RecursionError):
        found = None
    if found is None or not found[0]:
        return json.JSONDecodeError(why, "", 0)
    return JSONValueError(f"{found[0]}: {why}", "", 0, found[0])


def _too_deep(value: Any, budget: int) -> str | None:
    """Where the value first nests deeper than ``budget`` (its path, shortened), or None."""
    # Iterative: the check itself must not recurse on what it is checking.
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        v, depth, path = stack.pop()
        if depth > budget:
            return path
        # The field is named down to where lists start nesting in lists: "[0][0][0]..." a hundred times says
        # nothing, and the path stops growing there ("\0" marks it stopped).
        if isinstance(v, dict):
            stack.extend((x, depth + 1, path if path.endswith("\0") else f"{path}.{k}" if path else str(k))
                         for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((x, depth + 1, path if path.endswith("\0") else
                          path + "\0" if path.endswith("]") else f"{path}[{i}]") for i, x in enumerate(v))
    return None
