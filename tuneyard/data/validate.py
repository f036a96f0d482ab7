"""Validate a training file row by row, OpenAI-style, without ever holding the whole file in memory.

Every problem names the example and the field: ``Example 12, message 2: unknown role 'bot'``. The
example number is the 1-based line number in JSONL (blank lines are skipped but still counted, so it is
the line an editor shows), the 1-based element number in a JSON array, and the 1-based data row in CSV
(header and blank lines not counted) and Parquet. A problem with the whole file has no number. This
module imports neither torch nor transformers: the API process uses it on uploads.

Containers: JSONL (streamed line by line), JSON array (read whole: a JSON document cannot be
streamed with the standard library), CSV (streamed; cells of list-valued fields such as
``messages`` hold JSON) and Parquet (streamed in record batches).
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any

from tuneyard import jsontext
from tuneyard.data.formats import (
    DPO,
    FAMILIES,
    REQUIRED_KEYS,
    ImageSite,
    Problem,
    RowError,
    ambiguous_row_message,
    candidate_formats,
    convert_row,
    detect_format,
    json_type,
    normalize_format_name,
    unrecognised_row_message,
)
from tuneyard.data.images import ImageChecker, ImageRules, base_of
from tuneyard.domain.capabilities import RECIPES
from tuneyard.filekind import special_kind

CONTAINERS = ("jsonl", "json", "csv", "parquet")
CODE_N_EXAMPLES = "invalid_n_examples"
CODE_FILE = "invalid_file"
# What a file may hold: supervised rows, preference rows, or either (an upload whose job is not known yet).
METHODS = ("sft", "dpo", None)
# Rows looked at to decide a file's format before the rest are checked against it.
DETECT_ROWS = 100
# CSV/Parquet string cells of these fields hold JSON (a list or an object), not text.
_JSON_FIELDS = ("messages", "conversations", "conversation", "history", "tools", "dialog",
                "chat_completion_input", "preferred_output", "non_preferred_output", "images")
# Cells of these fields are text or JSON: JSON only when it decodes to messages (a list of objects) or to
# an object with "messages" or "role" (an Alpaca input may well be a JSON snippet to work on).
_MAYBE_JSON_FIELDS = ("input", "prompt", "chosen", "rejected", "rejected_response")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
             ".parquet": "parquet", ".pq": "parquet"}
_BOM = b"\xef\xbb\xbf"
# A file whose first line is not a JSON value may be one pretty-printed document; up to this size it is read
# whole to tell (a larger one is taken as JSONL, and its lines are reported).
_WHOLE_FILE_LIMIT = 64 * 2**20
# Leading bytes of files people upload by mistake, and what they are.
_MAGIC = ((b"PAR1", "a Parquet file"), (b"PK\x03\x04", "a zip archive"), (b"\x1f\x8b", "gzip-compressed"),
          (b"BZh", "bzip2-compressed"), (b"\xfd7zXZ\x00", "xz-compressed"), (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
          (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"%PDF", "a PDF document"),
          (b"SQLite format 3", "an SQLite database"))
# Undecodable bytes, kept by the "surrogateescape" error handler as U+DC80..U+DCFF.
_ESCAPED = re.compile("[\udc80-\udcff]")

# (example number or None for the whole file, parsed row or None, problem or None)
RawItem = tuple[int | None, Any, Problem | None]


@dataclass
class ValidationReport:
    """What validating one file found: examples, detected format and the first ``max_errors`` problems."""

    path: str
    label: str = "Training file"
    format: str | None = None
    container: str | None = None
    n_examples: int = 0
    # Each: {"line": int | None, "message": str, "param": str | None, "code": str}
    errors: list[dict] = field(default_factory=list)
    # Every problem found, also those past max_errors that ``errors`` leaves out.
    n_errors: int = 0
    max_errors: int = 20
    # Examples that hold images, and the images they hold (tuneyard.data.images).
    n_image_examples: int = 0
    n_images: int = 0
    checker: ImageChecker | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.n_errors == 0

    @property
    def code(self) -> str | None:
        """``invalid_n_examples`` when too few examples is the only problem, ``invalid_file`` otherwise."""
        if self.ok:
            return None
        if self.errors and all(e["code"] == CODE_N_EXAMPLES for e in self.errors):
            return CODE_N_EXAMPLES
        return CODE_FILE

    def add(self, line: int | None, problem: Problem, code: str = CODE_FILE, *, keep: bool = False) -> None:
        """Record one problem (kept while fewer than ``max_errors`` are, or when ``keep``; always counted)."""
        self.n_errors += 1
        if keep or len(self.errors) < self.max_errors:
            self.errors.append({"line": line, "message": problem.render(line), "param": problem.param,
                                "code": code})

    def summary(self, limit: int | None = None) -> str:
        """One string for an API error message: the count of problems and up to ``limit`` of them."""
        if self.ok:
            return f"{self.label}: {self.n_examples} example(s) in {self.format or 'unknown'} format"
        shown = self.errors[: limit if limit is not None else len(self.errors)]
        if self.n_errors == 1:
            return shown[0]["message"]
        text = f"{self.label} has {self.n_errors} errors: " + "; ".join(e["message"] for e in shown)
        if self.n_errors > len(shown):
            text += f" (and {self.n_errors - len(shown)} more)"
        return text

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"path": self.path, "format": self.format, "container": self.container,
                "n_examples": self.n_examples, "n_image_examples": self.n_image_examples, "ok": self.ok,
                "code": self.code, "n_errors": self.n_errors,
                "errors": self.errors}


# ---------------------------------------------------------------------------------------------------------
# Containers


def container_of_name(name: str | None) -> str | None:
    """The container a file name's suffix says (``.jsonl``, ``.json``, ``.csv``, ``.parquet``...), or None."""
    return _SUFFIXES.get(Path(name or "").suffix.lower())


def upload_suffix(filename: str | None) -> str:
    """The suffix to store an upload under so that its container is known later ("" when the name says none)."""
    suffix = Path(filename or "").suffix.lower()
    return suffix if suffix in _SUFFIXES else ""


def detect_container(path: str | Path) -> str:
    """The container of ``path`` from its suffix, else from its first bytes (uploads may have no suffix)."""
    p = Path(path)
    by_name = container_of_name(p.name)
    if by_name is not None and by_name != "json":
        return by_name
    # ".json" is often JSONL in practice: the bytes decide between them.
    with p.open("rb") as f:
        if f.read(4) == b"PAR1":
            return "parquet"
        f.seek(0)
        first = b""
        for line in f:
            if line.strip():
                first = line.lstrip(_BOM).strip()
                break
        if first.startswith(b"{"):
            # One object per line is JSONL; one pretty-printed object over several lines is a JSON document.
            return "json" if not _parses(first) and _whole_file_parses(p) else "jsonl"
        if not first.startswith(b"["):
            return "jsonl"
        # A line that is a whole JSON value and is followed by more lines is JSONL (with a bad row);
        # anything else that opens with "[" is one JSON array.
        try:
            jsontext.loads(first)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "json"
        return "jsonl" if any(line.strip() for line in f) else "json"


def _parses(data: bytes) -> bool:
    try:
        jsontext.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True


def _whole_file_parses(path: Path) -> bool:
    """Whether the whole file is one JSON document (only asked of files small enough to read whole)."""
    return path.stat().st_size <= _WHOLE_FILE_LIMIT and _parses(path.read_bytes().removeprefix(_BOM))


def _json_error(e: json.JSONDecodeError, text: str, *, lines: bool) -> str:
    """An OpenAI-style message for a JSON syntax error, naming the column (and the line in a whole document)."""
    where = f"line {e.lineno} column {e.colno}" if lines else f"column {e.colno}"
    if isinstance(e, jsontext.JSONValueError):
        # Well-formed JSON holding a value that cannot be kept: the message already names the field; in an
        # array of examples, "[4].messages" is example 5's "messages".
        m = re.match(r"\[(\d+)\]\.?", e.path) if lines else None
        if m:
            return f"Example {int(m.group(1)) + 1}: {e.msg.removeprefix(m.group(0))} (at {where})"
        return f"{e.msg} (at {where})"
    before = text[: e.pos].rstrip()
    if e.msg == "Expecting value" and text[e.pos: e.pos + 1] in ("]", "}") and before.endswith(","):
        return f"invalid JSON (a trailing comma before '{text[e.pos]}' at {where})"
    # Python words some errors "... starting at" and leaves the position to us.
    return f"invalid JSON ({e.msg} {where})" if e.msg.endswith(" at") else f"invalid JSON ({e.msg} at {where})"


def _sniff_text(path: Path, what: str) -> Problem | None:
    """A whole-file problem when a text container's bytes are not UTF-8 text at all, else None."""
    with path.open("rb") as f:
        head = f.read(8192)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return Problem("the file is UTF-16 encoded; training files must be UTF-8")
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return Problem(f"the file is {kind}, not {what} text")
    if b"\x00" in head:
        return Problem(f"the file is binary (it holds NUL bytes), not {what} text")
    return None


def _iter_jsonl(path: Path) -> Iterator[RawItem]:
    problem = _sniff_text(path, "JSONL")
    if problem is not None:
        yield None, None, problem
        return
    first = True
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.startswith(_BOM):
                if lineno > 1:
                    # Files joined with cat keep each one's byte order mark.
                    yield lineno, None, Problem("a UTF-8 byte order mark (BOM) starts this line; only the first "
                                                "line may have one (were files joined together?)")
                    continue
                raw = raw[len(_BOM):]
            if not raw.strip():
                continue
            try:
                # Without its line break, so that a cut-off row's error points into the row.
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                bad = f"0x{raw[e.start]:02x}"
                yield lineno, None, Problem(f"invalid UTF-8 (byte {bad} at position {e.start + 1})")
                continue
            try:
                obj = jsontext.loads(text)
            except json.JSONDecodeError as e:
                if first and _whole_file_parses(path):
                    # Every line would be "invalid JSON": say what the file is instead.
                    yield None, None, Problem("the file is one JSON document spread over several lines, not JSONL "
                                              "(one example per line)")
                    return
                yield lineno, None, Problem(_json_error(e, text, lines=False))
                continue
            finally:
                first = False
            yield lineno, obj, None


def _iter_json_array(path: Path) -> Iterator[RawItem]:
    problem = _sniff_text(path, "JSON")
    if problem is not None:
        yield None, None, problem
        return
    data = path.read_bytes().removeprefix(_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        yield None, None, Problem(f"invalid UTF-8 (byte 0x{data[e.start]:02x} at line {line})")
        return
    try:
        doc = jsontext.loads(text)
    except json.JSONDecodeError as e:
        if e.pos >= len(text.rstrip()):
            yield None, None, Problem(f"invalid JSON: the file ends at line {e.lineno} column {e.colno} before the "
                                      "JSON array is closed")
        else:
            yield None, None, Problem(_json_error(e, text, lines=True))
        return
    if not isinstance(doc, list):
        yield None, None, Problem(f"a JSON file must hold an array of examples, not a JSON {json_type(doc)}")
        return
    for i, obj in enumerate(doc, 1):
        yield i, obj, None


def _cell(key: str, value: Any) -> Any:
    if not (isinstance(value, str) and value.lstrip()[:1] in ("[", "{")):
        return value
    if key not in _JSON_FIELDS and key not in _MAYBE_JSON_FIELDS:
        return value
    try:
        parsed = jsontext.loads(value)
    except json.JSONDecodeError:
        return value
    if key in _JSON_FIELDS:
        return parsed
    if isinstance(parsed, list) and parsed and all(isinstance(x, dict) for x in parsed):
        return parsed
    if isinstance(parsed, dict) and ("messages" in parsed or "role" in parsed):
        return parsed
    return value


def column_problems(names: list[str], where: str) -> list[Problem]:
    """Every empty and every repeated column name of a CSV header or Parquet schema (``where`` says which)."""
    problems = [Problem(f"the {where} has an empty column name (column {i + 1})") for i, n in enumerate(names)
                if not n]
    repeated = [n for n, count in Counter(n for n in names if n).items() if count > 1]
    problems += [Problem(f"the {where} repeats column '{n}'") for n in repeated]
    return problems


def _iter_csv(path: Path, columns: list[str] | None = None) -> Iterator[RawItem]:
    problem = _sniff_text(path, "CSV")
    if problem is not None:
        yield None, None, problem
        return
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # A cell holding a whole conversation easily passes the 128 KiB default.
    csv.field_size_limit(2**31 - 1)
    n = 0
    try:
        # Undecodable bytes are kept (as escapes) so that the row holding them can be named.
        with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            problems = column_problems(header, "CSV header")
            if problems:
                # Before the columns are handed on: a bad header is the file's problem, not its format's.
                for problem in problems:
                    yield None, None, problem
                return
            if columns is not None:
                columns.extend(header)
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue
                n += 1
                if len(cells) != len(header):
                    yield n, None, Problem(f"the row has {len(cells)} cells but the CSV header has {len(header)} "
                                           "columns")
                    continue
                escaped = next(((k, m) for k, v in zip(header, cells, strict=True) if (m := _ESCAPED.search(v))),
                               None)
                if escaped is not None:
                    column, match = escaped
                    byte = ord(match.group()) - 0xDC00
                    yield n, None, Problem(f"invalid UTF-8 (byte 0x{byte:02x}) in column '{column}'", param=column)
                    continue
                # Empty cells are absent fields (a CSV has every column on every row).
                yield n, {k: _cell(k, v) for k, v in zip(header, cells, strict=True) if v != ""}, None
    except csv.Error as e:
        yield None, None, Problem(f"invalid CSV after data row {n} ({e})")


def _iter_parquet(path: Path, columns: list[str] | None = None) -> Iterator[RawItem]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        yield None, None, Problem(f"invalid Parquet file ({e})")
        return
    names = pf.schema_arrow.names
    problems = column_problems(names, "Parquet schema")
    if problems:
        # A row would keep only the last of two same-named columns: the data would change without a word.
        for problem in problems:
            yield None, None, problem
        return
    if columns is not None:
        columns.extend(names)
    i = 0
    try:
        for batch in pf.iter_batches(batch_size=1000):
            for rec in batch.to_pylist():
                i += 1
                # Parquet fills fields a row lacks with null.
                yield i, {k: _cell(k, v) for k, v in rec.items() if v is not None}, None
    except Exception as e:  # a damaged page shows only when it is read
        yield None, None, Problem(f"invalid Parquet file after row {i} ({e})")


def iter_raw(path: str | Path, container: str = "auto", *, columns: list[str] | None = None) -> Iterator[RawItem]:
    """Yield ``(example number, parsed row, None)`` or ``(number or None, None, problem)``, streaming.

    For CSV and Parquet the column names are appended to ``columns`` when it is given.
    """
    p = Path(path)
    kind = detect_container(p) if container == "auto" else container
    if kind == "jsonl":
        yield from _iter_jsonl(p)
    elif kind == "json":
        yield from _iter_json_array(p)
    elif kind == "csv":
        yield from _iter_csv(p, columns)
    elif kind == "parquet":
        yield from _iter_parquet(p, columns)
    else:
        names = ", ".join(CONTAINERS)
        raise ValueError(f"unknown container '{container}'; expected 'auto' or one of {names}")


# ---------------------------------------------------------------------------------------------------------
# Validation


def validate_file(path: str | Path, format: str = "auto", container: str = "auto", *, max_errors: int = 20,
                  min_examples: int = 1, label: str = "Training file", method: str | None = "sft",
                  images: ImageRules | None = None) -> ValidationReport:
    """Check every row of a data file (any container), count its examples, and report every problem.

    ``format`` is "auto", a format or a family (``tuneyard.data.formats``); ``method`` says what rows the
    file must hold: "sft" supervised rows, "dpo" preference rows, None either (an upload). The images of image
    rows are checked by ``images`` (default: the installation's limits, relative paths from the file's
    directory) without being downloaded or decoded.
    """
    p = Path(path)
    checker = ImageChecker(images or ImageRules.from_settings(base_of(str(p))))
    report = ValidationReport(path=str(p), label=label, max_errors=max_errors, checker=checker)
    try:
        fmt = normalize_format_name(format)
    except ValueError as e:
        report.add(None, Problem(str(e), param="format"))
        return report
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; expected one of {METHODS}")
    if not p.is_file():
        special = special_kind(p)
        what = (f"is not a regular file: '{p}' is {special}" if special else
                f"is a directory, not a file ('{p}')" if p.is_dir() else "does not exist")
        report.add(None, Problem(f"{label} {what}"))
        return report
    try:
        report.container = detect_container(p) if container == "auto" else container
        columns: list[str] = []
        items = iter_raw(p, report.container, columns=columns)
        # Reading the first rows also reads a CSV header or a Parquet schema into ``columns``.
        head = list(islice(items, DETECT_ROWS))
        columnar = report.container in ("csv", "parquet") and bool(columns)
        if columnar:
            detected, usable = _columns_format(report, columns, fmt)
        else:
            usable = True
            detected = fmt
            if fmt == "auto" or fmt in FAMILIES:
                # The file's format is the most common among its first rows; the rest must match it.
                detected = detect_format((obj for _, obj, prob in head if prob is None), within=FAMILIES.get(fmt))
        report.format = detected
        if not usable:
            # Every row would repeat the file's problem: count the rows, report the file once.
            report.n_examples = sum(1 for n, _, _ in chain(head, items) if n is not None)
        else:
            if detected is not None:
                _check_method(report, detected, method)
            for n, obj, problem in chain(head, items):
                if n is None:
                    report.add(None, problem or Problem("unreadable file"))
                    continue
                report.n_examples += 1
                if problem is not None:
                    report.add(n, problem)
                elif columnar:
                    _convert(report, n, obj, detected, trust_format=True)
                else:
                    _check_row(report, n, obj, fmt, detected)
    except OSError as e:
        report.add(None, Problem(f"{label} could not be read ({e.strerror or e})"))
        return report
    report.n_image_examples, report.n_images = checker.n_rows, checker.n_images
    if report.n_examples == 0:
        if report.ok:
            report.add(None, Problem(f"{label} is empty: it has no examples"))
    elif report.n_examples < min_examples:
        report.add(None, Problem(f"{label} has {report.n_examples} example(s), but must have at least "
                                 f"{min_examples} examples"), code=CODE_N_EXAMPLES, keep=True)
    return report


def _columns_format(report: ValidationReport, columns: list[str], fmt: str) -> tuple[str | None, bool]:
    """The format a CSV/Parquet file's columns say, and whether its rows can be checked (else one problem)."""
    kind = "CSV" if report.container == "csv" else "Parquet"
    have = ", ".join(f"'{c}'" for c in columns[:12])
    header = dict.fromkeys(columns, "")
    detected = fmt
    if fmt == "auto" or fmt in FAMILIES:
        within = FAMILIES.get(fmt)
        found = candidate_formats(header)
        mine = found if within is None else [f for f in found if f in within]
        if len(mine) > 1:
            report.add(None, Problem(ambiguous_row_message(header, mine, subject=f"{kind} column")))
            return None, False
        if not mine:
            if within is not None and found:
                report.add(None, Problem(f"the {kind} file has the columns of '{found[0]}' rows, not of the "
                                         f"'{fmt}' format it was declared with (its columns: {have})"))
            else:
                why = unrecognised_row_message(header, within).split("; ", 1)[1]
                report.add(None, Problem(f"the {kind} file's columns match no known format (its columns: {have}); "
                                         f"{why}"))
            return None, False
        detected = mine[0]
    options = REQUIRED_KEYS[detected]
    if any(all(k in columns for k in keys) for keys in options):
        return detected, True
    closest = max(options, key=lambda keys: sum(k in columns for k in keys))
    missing = [k for k in closest if k not in columns]
    names = " and ".join(f"'{k}'" for k in missing)
    plural = "columns" if len(missing) > 1 else "column"
    report.add(None, Problem(f"the {kind} file has no {names} {plural}, which '{detected}' rows need "
                             f"(its columns: {have})", param=missing[0]))
    return detected, False


def _check_method(report: ValidationReport, detected: str, method: str | None) -> None:
    # Which rows a recipe trains on is the capabilities table's to say; here the file is held to it.
    if method is None:
        return
    recipe = RECIPES[method]
    if recipe.rows == "supervised" and detected == DPO:
        report.add(None, Problem(f"{report.label} holds preference (DPO) rows: they train with the 'dpo' method, "
                                 f"not {recipe.title}"))
    elif recipe.rows == "preference" and detected != DPO:
        report.add(None, Problem(f"{report.label} holds supervised rows ('{detected}' format); the '{method}' method "
                                 "needs preference rows: 'prompt'+'chosen'+'rejected', "
                                 "'input'+'preferred_output'+'non_preferred_output' or 'messages'+'rejected_response'"))


def _check_row(report: ValidationReport, n: int, obj: Any, fmt: str, detected: str | None) -> None:
    row_fmt = fmt
    if fmt == "auto" or fmt in FAMILIES:
        within = FAMILIES.get(fmt)
        found = candidate_formats(obj)
        mine = found if within is None else [f for f in found if f in within]
        if len(mine) > 1:
            report.add(n, Problem(ambiguous_row_message(obj, mine)))
            return
        if not mine:
            # convert_row words it: not an object, another format than the family, or no format at all.
            row_fmt = fmt
        elif detected is not None and mine[0] != detected:
            report.add(n, Problem(f"mixed formats: this row is in '{mine[0]}' format but the file's rows are "
                                  f"in '{detected}' format"))
            return
        else:
            row_fmt = mine[0]
    _convert(report, n, obj, row_fmt)


def _convert(report: ValidationReport, n: int, obj: Any, fmt: str, *, trust_format: bool = False) -> None:
    sites: list[ImageSite] = []
    try:
        convert_row(obj, fmt, trust_format=trust_format, sites=sites)
    except RowError as e:
        for problem in e.problems:
            report.add(n, problem)
        return
    if report.checker is not None:
        for problem in report.checker.check(sites):
            report.add(n, problem)


def validate_jsonl(path: str | Path, format: str = "auto", max_errors: int = 20, min_examples: int = 1,
                   *, label: str = "Training file", method: str | None = "sft") -> ValidationReport:
    """Stream a JSONL file line by line and report every problem (up to ``max_errors`` kept) with its line."""
    return validate_file(path, format, "jsonl", max_errors=max_errors, min_examples=min_examples, label=label,
                         method=method)


# ---------------------------------------------------------------------------------------------------------
# Reading


def iter_examples(path: str | Path, format: str = "auto",
                  container: str = "auto") -> Iterator[tuple[int, dict]]:
    """Yield ``(example number, converted row)``; a bad row raises ValueError naming it (validate first)."""
    fmt = normalize_format_name(format)
    for n, obj, problem in iter_raw(path, container):
        if problem is not None:
            raise ValueError(problem.render(n))
        try:
            yield n, convert_row(obj, fmt)
        except RowError as e:
            raise ValueError("; ".join(p.render(n) for p in e.problems)) from None


def read_rows(path: str | Path, format: str = "auto", container: str = "auto") -> Iterator[dict]:
    """Yield the rows of a data file in the internal form (see ``tuneyard.data.formats``), streaming."""
    for _, row in iter_examples(path, format, container):
        yield row
