"""Local paths given by callers: accepted only under the allowed roots, after resolving symlinks."""

from __future__ import annotations

import re
from pathlib import Path

from tuneyard.domain.errors import InvalidRequest
from tuneyard.filekind import special_kind

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def looks_like_path(value: str) -> bool:
    """True for values meant as local paths rather than hub ids (absolute, ./, ../, ~ or file://)."""
    return value.startswith(("/", "./", "../", "~", "file://")) or value in (".", "..")


def confine(value: str, roots: list[Path], *, param: str, want_dir: bool | None = None) -> Path:
    """Resolve a caller's local path and check it lies under one of ``roots`` and exists."""
    raw = value.removeprefix("file://")
    try:
        p = Path(raw).expanduser().resolve(strict=False)
    except (OSError, RuntimeError) as e:
        raise InvalidRequest(f"{param}: '{value}' is not a usable path ({e})", param=param) from e
    if not any(p == r or p.is_relative_to(r) for r in roots):
        allowed = ":".join(str(r) for r in roots)
        raise InvalidRequest(f"{param}: '{value}' is outside the allowed local roots ({allowed}); "
                             "set TUNEYARD_LOCAL_ROOTS to allow it", param=param, code="path_not_allowed")
    if not p.exists():
        raise InvalidRequest(f"{param}: '{value}' does not exist", param=param, code="path_not_found")
    special = special_kind(p)
    if special is not None:
        # Opening one would block (a FIFO) or read for ever (a device): refused before anything reads it.
        raise InvalidRequest(f"{param}: '{value}' is not a regular file or directory: it is {special}", param=param)
    if want_dir is True and not p.is_dir():
        raise InvalidRequest(f"{param}: '{value}' is not a directory", param=param)
    if want_dir is False and not p.is_file():
        raise InvalidRequest(f"{param}: '{value}' is not a file", param=param)
    return p


def check_model_name(value: str, roots: list[Path], *, param: str = "model") -> tuple[str, str]:
    """Return ``(name, source)``: a confined local directory or a well-formed hub id, else InvalidRequest."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest("model must be a non-empty string", param=param)
    if looks_like_path(value):
        return str(confine(value, roots, param=param, want_dir=True)), "local"
    if HUB_ID.match(value) and ".." not in value:
        return value, "hf"
    raise InvalidRequest(f"model '{value}' is neither a Hugging Face hub id (owner/name) nor a local "
                         "directory path", param=param, code="model_not_found")
