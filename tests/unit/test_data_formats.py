"""Every supported row format converts to the same internal conversation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tuneyard.data.formats import (
    FORMATS,
    RowError,
    convert_row,
    detect_format,
    detect_row_format,
    normalize_format_name,
)

CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]}

# One row per format, all meaning CONVERSATION.
ROWS = {
    "openai": {"messages": CONVERSATION["messages"]},
    "sharegpt": {"system": "Be brief.", "conversations": [{"from": "human", "value": "Capital of France?"},
                                                          {"from": "gpt", "value": "Paris."}]},
    "sharegpt_pairs": {"system": "Be brief.", "conversation": [{"human": "Capital of France?",
                                                                "assistant": "Paris."}]},
    "alpaca": {"instruction": "Capital of France?", "input": "", "output": "Paris.", "system": "Be brief."},
    "query_response": {"query": "Capital of France?", "response": "Paris.", "system": "Be brief."},
    "question_answer": {"question": "Capital of France?", "answer": "Paris.", "system": "Be brief."},
    "input_output": {"input": "Capital of France?", "output": "Paris.", "system": "Be brief."},
    "instruct": {"chat_completion_input": json.dumps([{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": "Capital of France?"}]),
                 "expected_answer": "Paris."},
    "dialog": {"dialog": CONVERSATION["messages"]},
    "dialog_json": {"dialog": json.dumps(CONVERSATION["messages"])},
}
DETECTED = {"sharegpt_pairs": "sharegpt", "question_answer": "query_response",
            "input_output": "query_response", "dialog_json": "dialog"}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_every_format_converts_to_the_same_conversation(name):
    row = ROWS[name]
    fmt = DETECTED.get(name, name)
    assert detect_row_format(row) == fmt
    assert convert_row(row) == CONVERSATION
    assert convert_row(row, fmt) == CONVERSATION


def test_prompt_completion_has_no_system():
    row = {"prompt": "Capital of France?", "completion": "Paris."}
    assert detect_row_format(row) == "prompt_completion"
    assert convert_row(row) == {"messages": CONVERSATION["messages"][1:]}
    # The reference lists prompt/completion as a query/response alias too.
    assert convert_row(row, "query_response") == {"messages": CONVERSATION["messages"][1:]}


def test_text_rows_pass_through():
    assert detect_row_format({"text": "Once upon a time"}) == "text"
    assert convert_row({"text": "Once upon a time"}) == {"text": "Once upon a time"}


def test_content_parts_are_joined():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Capital "},
                                                     {"type": "text", "text": "of France?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "Paris."}]}]}
    assert convert_row(row)["messages"] == CONVERSATION["messages"][1:]


def test_openai_keeps_weight_name_tools_and_tool_calls():
    tools = [{"type": "function", "function": {"name": "capital", "parameters": {"type": "object"}}}]
    row = {"tools": tools, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "capital", "arguments": {"country": "FR"}}}]},
        {"role": "tool", "content": "Paris", "tool_call_id": "c1"},
        {"role": "assistant", "content": "Paris.", "weight": 0},
        {"role": "assistant", "content": "It is Paris.", "weight": 1},
    ]}
    out = convert_row(row)
    assert out["tools"] == tools
    m = out["messages"]
    assert m[0] == {"role": "system", "content": "Be brief."}
    assert m[1]["name"] == "ann"
    assert m[2] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "capital", "arguments": '{"country": "FR"}'}}]}
    assert m[3] == {"role": "tool", "content": "Paris", "tool_call_id": "c1"}
    assert m[4]["weight"] == 0 and m[5]["weight"] == 1


def test_sharegpt_function_call_and_observation():
    row = {"tools": json.dumps([{"name": "capital", "parameters": {}}]), "conversations": [
        {"from": "human", "value": "Capital of France?"},
        {"from": "function_call", "value": json.dumps({"name": "capital", "arguments": {"country": "FR"}})},
        {"from": "observation", "value": "Paris"},
        {"from": "gpt", "value": "Paris."},
    ]}
    out = convert_row(row)
    assert out["tools"] == [{"name": "capital", "parameters": {}}]
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "tool", "assistant"]
    call = out["messages"][1]["tool_calls"][0]["function"]
    assert call == {"name": "capital", "arguments": '{"country": "FR"}'}


def test_alpaca_history_and_input():
    row = {"instruction": "Translate", "input": "chat", "output": "cat", "history": [["Hi", "Hello"]]}
    assert convert_row(row)["messages"] == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Translate\nchat"}, {"role": "assistant", "content": "cat"}]


def test_instruct_plain_string_input():
    row = {"chat_completion_input": "Capital of France?", "expected_answer": "Paris."}
    assert convert_row(row) == {"messages": CONVERSATION["messages"][1:]}


def test_format_names_and_aliases():
    assert normalize_format_name(None) == "auto"
    for name, canonical in [("chat", "openai"), ("messages", "openai"), ("OpenAI", "openai"),
                            ("instruction", "instruction"), ("sharegpt", "sharegpt"), ("instruct", "instruct"),
                            ("preference", "dpo"),
                            ("dialog", "dialog"), ("text", "text"),
                            ("prompt_completion", "prompt_completion"), ("query_response", "query_response")]:
        assert normalize_format_name(name) == canonical
    assert set(FORMATS) == {normalize_format_name(n) for n in FORMATS}
    with pytest.raises(ValueError, match="unknown data format 'xml'"):
        normalize_format_name("xml")


def test_detect_format_takes_the_most_common():
    rows = [{"prompt": "a", "completion": "b"}] + [ROWS["openai"]] * 3 + [{"nothing": 1}, "not a row"]
    assert detect_format(rows) == "openai"
    assert detect_format([{"nothing": 1}]) is None


def test_explicit_format_reports_missing_keys():
    with pytest.raises(RowError) as e:
        convert_row({"instruction": " ", "system": 3}, "alpaca")
    assert [p.render(4) for p in e.value.problems] == ["Example 4: 'instruction' is empty",
                                                       "Example 4: 'output' is missing",
                                                       "Example 4: 'system' must be a string, got number"]


def test_explicit_format_names_the_rows_own_format():
    with pytest.raises(RowError, match="this row is in 'openai' format \\('messages'\\), not in the 'alpaca' "
                                       "format the data was declared with"):
        convert_row(ROWS["openai"], "alpaca")
    # Trusted (a CSV's columns fixed it): the named format's own complaints.
    with pytest.raises(RowError, match="'instruction' is missing"):
        convert_row(ROWS["openai"], "alpaca", trust_format=True)


def test_preference_rows_are_refused_for_supervised_formats():
    with pytest.raises(RowError, match="this row is in 'dpo' format"):
        convert_row({"prompt": "a", "chosen": "b", "rejected": "c"}, "openai")


def test_formats_and_validate_do_not_import_torch():
    code = ("import sys, tuneyard.data.formats, tuneyard.data.validate; "
            "bad = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
