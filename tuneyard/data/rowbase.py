"""What every row converter shares: the problems of a row, the images it names, and text fields.

``tuneyard.data.formats`` (text and preference rows) and ``tuneyard.data.image_rows`` (images in rows) build
on it; like them it imports neither torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One problem in a row: where (e.g. "message 2"), what, and the field path (e.g. "messages[1].role")."""

    message: str
    where: str | None = None
    param: str | None = None

    def render(self, example: int | None) -> str:
        """The OpenAI-style text: ``Example 12, message 2: unknown role 'bot'``."""
        head = f"Example {example}" if example is not None else ""
        if self.where:
            head = f"{head}, {self.where}" if head else self.where
        return f"{head}: {self.message}" if head else self.message


class RowError(ValueError):
    """A row that cannot be converted; carries every problem found in it."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(p.render(None) for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class ImageSite:
    """One image of a row: its REF as the row gives it, where (``message 2, content part 3``) and the field path."""

    ref: str
    where: str
    param: str


class Collector:
    """The problems (and image sites) found while converting one row."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.sites: list[ImageSite] = []

    def add(self, message: str, where: str | None = None, param: str | None = None) -> None:
        self.problems.append(Problem(message, where, param))

    def raise_if_any(self) -> None:
        if self.problems:
            raise RowError(self.problems)


def json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def text_content(value: Any, c: Collector, where: str | None, param: str,
                  key: str = "content") -> str | None:
    """A string, or the joined texts of OpenAI text parts; None (after recording why) otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            pwhere = f"{where}, content part {j + 1}" if where else f"content part {j + 1}"
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict):
                c.add(f"must be an object, got {json_type(part)}", pwhere, f"{param}[{j}]")
                return None
            # Parquet gives every part every field of the column's struct, null where a part lacks it.
            ptype = part.get("type") or "text"
            if ptype != "text":
                c.add(f"unsupported type '{ptype}' (only text parts are supported)", pwhere,
                      f"{param}[{j}].type")
                return None
            if not isinstance(part.get("text"), str):
                c.add(f"'text' must be a string, got {json_type(part.get('text'))}", pwhere,
                      f"{param}[{j}].text")
                return None
            texts.append(part["text"])
        # Parts are pieces of one text: they are joined as they are, with nothing in between.
        return "".join(texts)
    c.add(f"'{key}' must be a string or a list of text parts, got {json_type(value)}", where, param)
    return None
