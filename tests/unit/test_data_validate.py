"""Malformed JSONL gives OpenAI-style, line-numbered messages; containers are read row by row."""

from __future__ import annotations

import csv
import json

import pytest

from tuneyard.data.validate import detect_container, read_rows, validate_file, validate_jsonl

ROWS = [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
        for i in range(3)]
GOOD = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}


def msgs(*pairs, **extra) -> str:
    """A chat row as JSON from (role, content) pairs."""
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs], **extra})


# (bad line, expected message for it when it is line 2 of a chat file)
CASES = [
    ("not json", "Example 2: invalid JSON (Expecting value at column 1)"),
    ('{"messages": [', "Example 2: invalid JSON (Expecting value at column 15)"),
    ("[1, 2]", "Example 2: expected a JSON object, got array"),
    ('"a string"', "Example 2: expected a JSON object, got string"),
    ('{"messages": "hi"}', "Example 2: 'messages' must be a list, got string"),
    ('{"messages": []}', "Example 2: 'messages' is empty"),
    (msgs(("user", "Q"), ("bot", "A")), "Example 2, message 2: unknown role 'bot'"),
    ('{"messages": [{"content": "Q"}, {"role": "assistant", "content": "A"}]}',
     "Example 2, message 1: 'role' is missing"),
    ('{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant"}]}',
     "Example 2, message 2: 'content' is missing"),
    ('{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": 42}]}',
     "Example 2, message 2: 'content' must be a string or a list of text parts, got number"),
    (msgs(("user", "  "), ("assistant", "A")), "Example 2, message 1: 'content' is empty"),
    ('{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "weight": 2}]}',
     "Example 2, message 2: 'weight' must be 0 or 1, got 2"),
    ('{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "weight": "1"}]}',
     "Example 2, message 2: 'weight' must be 0 or 1, got \"1\""),
    ('{"messages": [{"role": "user", "content": "Q", "weight": 1}, {"role": "assistant", "content": "A"}]}',
     "Example 2, message 1: 'weight' is only allowed on assistant messages"),
    (msgs(("system", "S"), ("user", "Q")),
     "Example 2: no assistant message to train on (at least one assistant message without 'weight': 0 "
     "is needed)"),
    ('{"messages": [{"role": "user", "content": [{"type": "audio", "audio": {"url": "x"}}]}, '
     '{"role": "assistant", "content": "A"}]}',
     "Example 2, message 1, content part 1: unsupported type 'audio' (only text parts are supported)"),
    ('{"messages": [{"role": "user", "content": "Q", "tool_calls": []}, '
     '{"role": "assistant", "content": "A"}]}',
     "Example 2, message 1: 'tool_calls' is only allowed on assistant messages"),
    ('{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "name": 3}]}',
     "Example 2, message 2: 'name' must be a string, got number"),
    ('{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "tools": {}}',
     "Example 2: 'tools' must be a list of objects"),
    ('{"prompt": "Q", "completion": "A"}',
     "Example 2: mixed formats: this row is in 'prompt_completion' format but the file's rows are in "
     "'openai' format"),
    ('{"foo": 1}', "Example 2: unrecognised row format (keys: 'foo'); expected 'messages', 'conversations', "
                   "'instruction', 'prompt'+'completion', 'query'+'response', 'text', "
                   "'chat_completion_input'+'expected_answer' or 'dialog'"),
]


@pytest.mark.parametrize(("line", "expected"), CASES, ids=[c[1][:60] for c in CASES])
def test_malformed_line_is_named(tmp_path, line, expected):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n" + json.dumps(GOOD) + "\n")
    report = validate_jsonl(path)
    assert not report.ok
    assert report.code == "invalid_file"
    assert [e["message"] for e in report.errors] == [expected]
    assert report.errors[0]["line"] == 2
    assert report.n_examples == 3
    assert report.summary() == expected


def test_field_path_is_reported(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(msgs(("user", "Q"), ("bot", "A")) + "\n")
    assert validate_jsonl(path).errors[0]["param"] == "messages[1].role"


def test_invalid_utf8(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"messages": "\xff"}\n')
    assert [e["message"] for e in validate_jsonl(path).errors] == [
        "Example 2: invalid UTF-8 (byte 0xff at position 15)"]


def test_utf16_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode("utf-16"))
    assert validate_jsonl(path).summary() == "the file is UTF-16 encoded; training files must be UTF-8"


def test_blank_lines_are_skipped_but_counted_in_line_numbers(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\ufeff" + json.dumps(GOOD) + "\n\n   \n" + msgs(("user", "Q"), ("bot", "A")) + "\n\n")
    report = validate_jsonl(path)
    assert report.n_examples == 2
    assert report.errors[0]["message"] == "Example 4, message 2: unknown role 'bot'"


def test_too_few_examples_uses_openai_wording(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text((json.dumps(GOOD) + "\n") * 7)
    report = validate_jsonl(path, min_examples=10)
    assert not report.ok and report.code == "invalid_n_examples"
    assert report.summary() == "Training file has 7 example(s), but must have at least 10 examples"
    assert validate_jsonl(path, min_examples=7).ok


def test_empty_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n \n")
    report = validate_jsonl(path)
    assert report.n_examples == 0
    assert report.summary() == "Training file is empty: it has no examples"
    assert validate_jsonl(tmp_path / "missing.jsonl", label="Validation file").summary() == (
        "Validation file does not exist")


def test_max_errors_caps_the_list_not_the_count(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(["oops"] * 30 + [json.dumps(GOOD)] * 3) + "\n")
    report = validate_jsonl(path, max_errors=5, min_examples=40)
    assert report.n_errors == 31
    # The example count is always kept, past the cap.
    assert len(report.errors) == 6
    assert report.errors[-1]["code"] == "invalid_n_examples"
    text = report.summary(limit=2)
    assert text.startswith("Training file has 31 errors: Example 1: invalid JSON (Expecting value at "
                           "column 1); Example 2: invalid JSON")
    assert text.endswith("(and 29 more)")


def test_explicit_format(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"instruction": "Q", "output": "A"}) + "\n" + json.dumps(GOOD) + "\n")
    report = validate_jsonl(path, format="alpaca")
    assert report.format == "alpaca"
    assert [e["message"] for e in report.errors] == [
        "Example 2: this row is in 'openai' format ('messages'), not in the 'alpaca' format the data was declared "
        "with"]
    assert "unknown data format 'yaml'" in validate_jsonl(path, format="yaml").summary()


def test_valid_file_and_read_rows(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"query": f"Q{i}", "response": f"A{i}"}) for i in range(3)) + "\n")
    report = validate_jsonl(path)
    assert report.ok and report.code is None and report.n_examples == 3 and report.format == "query_response"
    assert list(read_rows(path)) == ROWS


def test_json_array_container(tmp_path):
    path = tmp_path / "upload"  # uploads have no suffix: sniffed
    path.write_text(json.dumps(ROWS, indent=2))
    assert detect_container(path) == "json"
    assert validate_file(path).ok
    assert list(read_rows(path)) == ROWS


def test_jsonl_without_suffix_is_sniffed(tmp_path):
    path = tmp_path / "upload"
    path.write_text("[1]\n" + json.dumps(ROWS[0]) + "\n")
    assert detect_container(path) == "jsonl"
    assert validate_file(path).errors[0]["message"] == "Example 1: expected a JSON object, got array"


def test_csv_container(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('instruction,input,output\nTranslate,chat,cat\n"Say hi",,Hi\n')
    assert validate_file(path).ok
    assert [r["messages"][0]["content"] for r in read_rows(path)] == ["Translate\nchat", "Say hi"]
    chat = tmp_path / "chat.csv"
    with chat.open("w", newline="") as f:
        csv.writer(f).writerows([["messages"], [json.dumps(ROWS[0]["messages"])]])
    assert list(read_rows(chat)) == [ROWS[0]]


def test_parquet_container(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert detect_container(path) == "parquet"
    report = validate_file(path)
    assert report.ok and report.n_examples == 3
    assert list(read_rows(path)) == ROWS


def test_json_suffix_is_sniffed_and_upload_suffixes(tmp_path):
    from tuneyard.data.validate import container_of_name, upload_suffix

    lines = tmp_path / "train.json"  # JSONL under a .json name, as exports often are
    lines.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert detect_container(lines) == "jsonl" and list(read_rows(lines)) == ROWS
    one = tmp_path / "one.json"  # one row, pretty-printed: a JSON document, not an array
    one.write_text(json.dumps(ROWS[0], indent=2))
    assert detect_container(one) == "json"
    assert validate_file(one).summary() == "a JSON file must hold an array of examples, not a JSON object"
    assert [upload_suffix(n) for n in ("a.JSONL", "b.csv", "c.parquet", "d.json", "e.txt", None, "f")] == [
        ".jsonl", ".csv", ".parquet", ".json", "", "", ""]
    assert [container_of_name(n) for n in ("a.tsv", "b.ndjson", "c.pq", "d.txt")] == ["csv", "jsonl", "parquet", None]


def test_tsv_and_csv_header_problems(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text("prompt\tcompletion\nCapital of France?\tParis.\n")
    assert validate_file(tsv).ok and validate_file(tsv).format == "prompt_completion"
    empty_name = tmp_path / "e.csv"
    empty_name.write_text("prompt,,completion\nQ,x,A\n")
    assert validate_file(empty_name).summary() == "the CSV header has an empty column name (column 2)"
    header_only = tmp_path / "h.csv"
    header_only.write_text("messages\n")
    assert validate_file(header_only).summary() == "Training file is empty: it has no examples"
