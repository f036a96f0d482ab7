"""Untrusted JSON: too deep is a parse error, whether Python's parser or a later walk would choke on it."""

from __future__ import annotations

import json

import pytest

from tuneyard import jsontext
from tuneyard.data.validate import validate_file


@pytest.mark.parametrize("depth", [150, 5000])
def test_deep_nesting_is_a_parse_error(depth):
    with pytest.raises(json.JSONDecodeError, match="nested more than 100 levels deep"):
        jsontext.loads("[" * depth + "]" * depth)
    assert jsontext.loads('{"messages": [{"role": "user", "content": "[[[["}]}')["messages"][0]["content"] == "[[[["


def test_a_deep_row_is_reported_by_example_number(tmp_path):
    path = tmp_path / "t.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path.write_text(good + "\n" + '{"a":' * 3000 + "1" + "}" * 3000 + "\n")
    report = validate_file(path)
    assert not report.ok
    assert report.summary() == "Example 2: invalid JSON (nested more than 100 levels deep at column 1)"
