"""The malformed-data corpus (tests/data/malformed): each file yields exactly the messages its manifest names.

``expected.json`` maps each file to the problem it holds and the messages validation must report (all of
them, several where the file has several problems). The same files are uploaded through the API in
tests/api/test_malformed_uploads.py; here they also go through the prepare step, which is what keeps a
job whose data comes by path (not by upload) from ever reaching ``queued``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneyard.data.formats import SFT_FORMATS, candidate_formats
from tuneyard.data.validate import CONTAINERS, validate_file

CORPUS = Path(__file__).resolve().parents[1] / "data" / "malformed"
EXPECTED: dict[str, dict] = json.loads((CORPUS / "expected.json").read_text())


def test_the_manifest_names_every_file_and_the_corpus_is_large_enough():
    files = {p.name for p in CORPUS.iterdir() if p.suffix not in (".py",) and p.name != "expected.json"}
    assert files == set(EXPECTED)
    assert len(files) >= 40
    for entry in EXPECTED.values():
        assert entry["problem"] and entry["errors"]


def test_the_corpus_covers_every_container_and_format():
    containers, formats = set(), set()
    for name, entry in EXPECTED.items():
        report = validate_file(CORPUS / name, method=None, min_examples=entry.get("min_examples", 1))
        containers.add(report.container)
        formats.add(report.format)
    assert set(CONTAINERS) <= containers
    assert {*SFT_FORMATS, "dpo"} <= formats
    # Ambiguity, binary files, encodings and several problems at once are among the classes.
    assert any("ambiguous" in e for entry in EXPECTED.values() for e in entry["errors"])
    assert sum(len(entry["errors"]) > 1 for entry in EXPECTED.values()) >= 2


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_file_reports_exactly_its_problems(name):
    entry = EXPECTED[name]
    report = validate_file(CORPUS / name, method=None, min_examples=entry.get("min_examples", 1))
    assert not report.ok
    assert [e["message"] for e in report.errors] == entry["errors"]
    assert report.n_errors == len(entry["errors"])
    # A problem in a row names it (Example N ...); one with the whole file does not.
    for e in report.errors:
        assert (e["line"] is None) != e["message"].startswith("Example ")
    expected_code = "invalid_n_examples" if "min_examples" in entry else "invalid_file"
    assert report.code == expected_code


def test_several_problems_are_reported_at_once_with_their_lines():
    report = validate_file(CORPUS / "several_problems.jsonl")
    assert [e["line"] for e in report.errors] == [2, 3, 5, 6]
    assert report.summary().startswith("Training file has 4 errors: Example 2: invalid JSON")
    capped = validate_file(CORPUS / "several_problems.jsonl", max_errors=2)
    assert capped.n_errors == 4 and capped.summary().endswith("(and 2 more)")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_prepare_refuses_each_file_before_any_tokenising(tmp_path, name):
    """A job given the file by path (Simplismart, Llama Stack) fails in prepare: prepared.json says why."""
    from tuneyard.data.prepare import run
    from tuneyard.domain.spec import DataSource, DataSpec, ModelSpec, TrainingSpec
    from tuneyard.jobdir import JobDir, read_json

    entry = EXPECTED[name]
    # No model is needed: validation comes first, so a model that does not exist is never looked at.
    spec = TrainingSpec(model=ModelSpec(name=str(tmp_path / "no-model"), source="local"),
                        data=DataSpec(train=DataSource(path=str(CORPUS / name)),
                                      min_examples=entry.get("min_examples", 1)))
    job = JobDir(tmp_path / "job").create()
    job.spec.write_text(spec.model_dump_json())
    assert run(job.root) == 0
    prepared = read_json(job.prepared)
    assert prepared["ok"] is False
    error = prepared["error"]
    assert error["param"] == "training_file"
    assert error["code"] == ("invalid_n_examples" if "min_examples" in entry else "invalid_training_file")
    for message in entry["errors"]:
        assert message in error["message"]
    if any(candidate_formats(row) == ["dpo"] for row in _rows(CORPUS / name)):
        assert "holds preference (DPO) rows" in error["message"]


def _rows(path: Path) -> list:
    """The rows of a JSONL file that parse (for telling which corpus files hold preference rows)."""
    if path.suffix != ".jsonl":
        return []
    rows = []
    for line in path.read_bytes().splitlines():
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return rows
