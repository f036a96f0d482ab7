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


@pytest.mark.parametrize(("text", "path", "says"), [
    ('{"a": {"b": [1, ' + "9" * 5000 + "]}}", "a.b[1]", "5000 digits"),
    ('{"a": -' + "9" * 309 + "}", "a", "309 digits"),
    ('{"m": {"k": "x\\ud800"}}', "m.k", "surrogate \\ud800"),
    ('{"m": {"k": "\\udfff"}}', "m.k", "surrogate \\udfff"),
    ('{"\\udc00": 1}', "\\udc00", "surrogate"),
    ('{"x": 1e999}', "x", "too large"),
    ('{"x": [-Infinity]}', "x[0]", "not a JSON number"),
    ("[NaN]", "[0]", "not a JSON number"),
    (b'{"a": {"b": "x\xffy"}}', "a.b", "invalid UTF-8 (byte 0xff"),
    ('{"m": {"k": ' + "[" * 150 + "]" * 150 + "}}", "m.k[0]", "nested more than 100"),
])
def test_values_that_cannot_be_kept_are_refused_with_their_path(text, path, says):
    with pytest.raises(jsontext.JSONValueError) as e:
        jsontext.loads(text)
    assert e.value.path == path
    assert says in e.value.msg
    e.value.msg.encode("utf-8")  # the message itself can always be sent


@pytest.mark.parametrize("text", ['"\\ud83d\\ude00"', '{"ok": "\\\\ud800"}', '{"n": ' + "9" * 308 + "}",
                                  '{"f": 1.5e308, "g": -2.5e-300}', '"caf\u00e9"', b'"caf\xc3\xa9"'])
def test_what_can_be_kept_still_parses(text):
    value = jsontext.loads(text)
    json.dumps(value, ensure_ascii=False).encode("utf-8")


def test_a_refused_number_overwritten_by_a_repeated_key_is_still_refused():
    with pytest.raises(jsontext.JSONValueError):
        jsontext.loads('{"a": 1e999, "a": 2}')


def test_storable_keeps_what_it_can_and_replaces_the_rest():
    out = jsontext.storable({"loss": float("nan"), "k\ud800": ["x\udcffy", float("inf"), 1.5, 3, None, True]})
    assert out == {"loss": None, "k\ufffd": ["x\ufffdy", None, 1.5, 3, None, True]}
    json.dumps(out, allow_nan=False, ensure_ascii=False).encode("utf-8")
