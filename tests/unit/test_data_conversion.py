"""Every format, written in every container (JSONL, JSON array, CSV, Parquet), converts to the same rows.

Each case is one format's way of writing a conversation; the three rows of a file differ (so order is
checked too). CSV holds list- and object-valued fields as JSON text in their cells, as the readers expect.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tuneyard.data.formats import convert_row
from tuneyard.data.validate import detect_container, read_rows, validate_file

SYSTEM = "Be brief."
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome")]


def turns(i: int) -> tuple[str, str, str, str]:
    """(first question, first answer, second question, second answer) of conversation ``i``."""
    (c1, p1), (c2, p2) = CAPITALS[i], CAPITALS[(i + 1) % 3]
    return f"Capital of {c1}?", f"{p1}.", f"And of {c2}?", f"{p2}."


def conversation(i: int, system: bool = True) -> list[dict]:
    """Conversation ``i`` in the internal form: system, two questions and their answers."""
    q1, a1, q2, a2 = turns(i)
    head = [{"role": "system", "content": SYSTEM}] if system else []
    return [*head, {"role": "user", "content": q1}, {"role": "assistant", "content": a1},
            {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]


def sharegpt_turns(i: int) -> list[dict]:
    q1, a1, q2, a2 = turns(i)
    return [{"from": "human", "value": q1}, {"from": "gpt", "value": a1},
            {"from": "human", "value": q2}, {"from": "gpt", "value": a2}]


TOOLS = [{"type": "function", "function": {"name": "capital", "description": "The capital of a country",
                                           "parameters": {"type": "object"}}}]


def openai_rich(i: int) -> dict:
    """OpenAI chat with everything it may carry: tools, tool calls, a tool result, names and weights."""
    q1, a1, q2, a2 = turns(i)
    args = json.dumps({"country": CAPITALS[i][0]})
    return {"tools": TOOLS, "messages": [
        {"role": "developer", "content": SYSTEM},
        {"role": "user", "content": q1, "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {"name": "capital", "arguments": args}}]},
        {"role": "tool", "content": a1.rstrip("."), "tool_call_id": f"call_{i}"},
        {"role": "assistant", "content": a1, "weight": 0},
        {"role": "user", "content": q2},
        {"role": "assistant", "content": a2, "weight": 1},
    ]}


def openai_rich_expected(i: int) -> dict:
    q1, a1, q2, a2 = turns(i)
    args = json.dumps({"country": CAPITALS[i][0]})
    return {"tools": TOOLS, "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": q1, "name": "ann"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {"name": "capital", "arguments": args}}]},
        {"role": "tool", "content": a1.rstrip("."), "tool_call_id": f"call_{i}"},
        {"role": "assistant", "content": a1, "weight": 0},
        {"role": "user", "content": q2},
        {"role": "assistant", "content": a2, "weight": 1},
    ]}


def sharegpt_tools(i: int) -> dict:
    """ShareGPT (LLaMA-Factory) tool use: function_call and observation turns, tools as a JSON string."""
    q1, a1, _, _ = turns(i)
    return {"tools": json.dumps([{"name": "capital", "parameters": {"type": "object"}}]), "conversations": [
        {"from": "human", "value": q1},
        {"from": "function_call", "value": json.dumps({"name": "capital", "arguments": {"country": "X"}})},
        {"from": "observation", "value": a1.rstrip(".")},
        {"from": "gpt", "value": a1}]}


def sharegpt_tools_expected(i: int) -> dict:
    q1, a1, _, _ = turns(i)
    return {"tools": [{"name": "capital", "parameters": {"type": "object"}}], "messages": [
        {"role": "user", "content": q1},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "capital", "arguments": '{"country": "X"}'}}]},
        {"role": "tool", "content": a1.rstrip(".")},
        {"role": "assistant", "content": a1}]}


def preference(i: int) -> dict:
    """The internal preference pair every preference form of example ``i`` converts to."""
    q1, a1, _, _ = turns(i)
    return {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q1}],
            "chosen": [{"role": "assistant", "content": a1}],
            "rejected": [{"role": "assistant", "content": "I do not know."}]}


def _q(i: int) -> str:
    return turns(i)[0]


def _a(i: int) -> str:
    return turns(i)[1]


def _prompt_messages(i: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _q(i)}]


# name -> (row i in that format, the internal row it converts to, the detected format)
CASES: dict[str, tuple[Callable[[int], dict], Callable[[int], dict], str]] = {
    "openai": (lambda i: {"messages": conversation(i)}, lambda i: {"messages": conversation(i)}, "openai"),
    "openai_rich": (openai_rich, openai_rich_expected, "openai"),
    "sharegpt": (lambda i: {"system": SYSTEM, "conversations": sharegpt_turns(i)},
                 lambda i: {"messages": conversation(i)}, "sharegpt"),
    "sharegpt_role_content": (lambda i: {"system": SYSTEM, "conversations": conversation(i, system=False)},
                              lambda i: {"messages": conversation(i)}, "sharegpt"),
    "sharegpt_pairs": (lambda i: {"system": SYSTEM, "conversation": [
        {"human": turns(i)[0], "assistant": turns(i)[1]}, {"human": turns(i)[2], "assistant": turns(i)[3]}]},
        lambda i: {"messages": conversation(i)}, "sharegpt"),
    "sharegpt_tools": (sharegpt_tools, sharegpt_tools_expected, "sharegpt"),
    "alpaca": (lambda i: {"system": SYSTEM, "instruction": turns(i)[2], "input": "", "output": turns(i)[3],
                          "history": [[turns(i)[0], turns(i)[1]]]},
               lambda i: {"messages": conversation(i)}, "alpaca"),
    "alpaca_input": (lambda i: {"instruction": "Name the capital of", "input": CAPITALS[i][0],
                                "output": CAPITALS[i][1]},
                     lambda i: {"messages": [{"role": "user", "content": f"Name the capital of\n{CAPITALS[i][0]}"},
                                             {"role": "assistant", "content": CAPITALS[i][1]}]}, "alpaca"),
    "query_response": (lambda i: {"system": SYSTEM, "query": turns(i)[2], "response": turns(i)[3],
                                  "history": [[turns(i)[0], turns(i)[1]]]},
                       lambda i: {"messages": conversation(i)}, "query_response"),
    "question_answer": (lambda i: {"system": SYSTEM, "question": turns(i)[2], "answer": turns(i)[3],
                                   "history": [[turns(i)[0], turns(i)[1]]]},
                        lambda i: {"messages": conversation(i)}, "query_response"),
    "input_output": (lambda i: {"system": SYSTEM, "input": turns(i)[2], "output": turns(i)[3],
                                "history": [[turns(i)[0], turns(i)[1]]]},
                     lambda i: {"messages": conversation(i)}, "query_response"),
    "prompt_completion": (lambda i: {"prompt": turns(i)[0], "completion": turns(i)[1]},
                          lambda i: {"messages": conversation(i, system=False)[:2]}, "prompt_completion"),
    "text": (lambda i: {"text": f"The capital of {CAPITALS[i][0]} is {CAPITALS[i][1]}."},
             lambda i: {"text": f"The capital of {CAPITALS[i][0]} is {CAPITALS[i][1]}."}, "text"),
    "instruct": (lambda i: {"chat_completion_input": json.dumps(conversation(i)[:-1]),
                            "expected_answer": turns(i)[3]},
                 lambda i: {"messages": conversation(i)}, "instruct"),
    "instruct_list": (lambda i: {"chat_completion_input": conversation(i)[:-1], "expected_answer": turns(i)[3]},
                      lambda i: {"messages": conversation(i)}, "instruct"),
    "dialog": (lambda i: {"dialog": conversation(i)}, lambda i: {"messages": conversation(i)}, "dialog"),
    "dialog_json": (lambda i: {"dialog": json.dumps(conversation(i))}, lambda i: {"messages": conversation(i)},
                    "dialog"),
    "dpo_openai": (lambda i: {"input": {"messages": _prompt_messages(i)},
                              "preferred_output": [{"role": "assistant", "content": _a(i)}],
                              "non_preferred_output": [{"role": "assistant", "content": "I do not know."}]},
                   preference, "dpo"),
    "dpo_prompt_chosen_rejected": (lambda i: {"prompt": _prompt_messages(i), "chosen": _a(i),
                                              "rejected": "I do not know."}, preference, "dpo"),
    "dpo_implicit_prompt": (lambda i: {
        "chosen": [*_prompt_messages(i), {"role": "assistant", "content": _a(i)}],
        "rejected": [*_prompt_messages(i), {"role": "assistant", "content": "I do not know."}]}, preference, "dpo"),
    "dpo_messages_rejected_response": (lambda i: {
        "messages": [*_prompt_messages(i), {"role": "assistant", "content": _a(i)}],
        "rejected_response": "I do not know."}, preference, "dpo"),
}
CONTAINERS = ("jsonl", "json", "csv", "parquet")


def write(path: Path, rows: list[dict], container: str) -> Path:
    """Write ``rows`` to ``path`` in ``container``; CSV cells of lists and objects hold JSON."""
    if container == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif container == "json":
        path.write_text(json.dumps(rows, indent=2))
    elif container == "csv":
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            for r in rows:
                w.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_format_in_every_container_converts_to_the_same_rows(tmp_path, case, container):
    make, expected, fmt = CASES[case]
    rows = [make(i) for i in range(3)]
    want = [expected(i) for i in range(3)]
    assert [convert_row(r) for r in rows] == want
    path = write(tmp_path / f"train.{container}", rows, container)
    assert detect_container(path) == container
    report = validate_file(path, method=None)
    assert report.ok, report.errors
    assert (report.format, report.container, report.n_examples) == (fmt, container, 3)
    assert list(read_rows(path, report.format)) == want
    # Named explicitly (as a Simplismart or Llama Stack job does), the same rows come out.
    assert list(read_rows(path, fmt, container)) == want


@pytest.mark.parametrize("container", CONTAINERS)
def test_supervised_formats_agree_on_one_conversation(tmp_path, container):
    """The plain conversation written in each supervised format reads back as one and the same row."""
    same = [name for name, (_, expected, fmt) in CASES.items()
            if fmt not in ("dpo", "text") and expected(0) == {"messages": conversation(0)}]
    assert len(same) >= 10
    for name in same:
        path = write(tmp_path / f"{name}.{container}", [CASES[name][0](i) for i in range(3)], container)
        assert list(read_rows(path)) == [{"messages": conversation(i)} for i in range(3)], name


@pytest.mark.parametrize("case", ["alpaca", "alpaca_input", "query_response", "question_answer", "input_output",
                                  "prompt_completion"])
@pytest.mark.parametrize("container", CONTAINERS)
def test_simplismart_instruction_family(tmp_path, case, container):
    """dataset_format 'instruction' accepts the single-turn instruction formats, each detected by its keys."""
    make, expected, fmt = CASES[case]
    path = write(tmp_path / f"train.{container}", [make(i) for i in range(3)], container)
    report = validate_file(path, "instruction")
    assert report.ok, report.errors
    assert report.format == fmt
    assert list(read_rows(path, "instruction")) == [expected(i) for i in range(3)]


@pytest.mark.parametrize("container", CONTAINERS)
def test_instruction_family_refuses_chat_rows(tmp_path, container):
    path = write(tmp_path / f"train.{container}", [{"messages": conversation(i)} for i in range(3)], container)
    report = validate_file(path, "instruction")
    assert not report.ok
    assert "'openai'" in report.errors[0]["message"] and "'instruction'" in report.errors[0]["message"]


@pytest.mark.parametrize("container", CONTAINERS)
def test_preference_files_and_methods(tmp_path, container):
    """Preference rows validate for DPO (and for an upload), and are refused for supervised fine-tuning."""
    make = CASES["dpo_openai"][0]
    path = write(tmp_path / f"pref.{container}", [make(i) for i in range(3)], container)
    assert validate_file(path, method="dpo").ok
    assert validate_file(path, method=None).ok
    sft = validate_file(path)
    assert sft.summary() == ("Training file holds preference (DPO) rows: they train with the 'dpo' method, not "
                             "supervised fine-tuning")
    chat = write(tmp_path / f"chat.{container}", [{"messages": conversation(i)} for i in range(3)], container)
    assert validate_file(chat, method="dpo").summary().startswith(
        "Training file holds supervised rows ('openai' format); the 'dpo' method needs preference rows")


def test_parquet_nulls_from_struct_columns_are_absent_fields(tmp_path):
    """Parquet gives every message every field of the column (null where a message lacks it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [openai_rich(0), {"messages": conversation(1)}]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    first = pq.read_table(path).to_pylist()[1]["messages"][0]
    assert first["weight"] is None and first["tool_calls"] is None
    assert list(read_rows(path)) == [openai_rich_expected(0), {"messages": conversation(1)}]


def test_csv_text_that_looks_like_json_stays_text(tmp_path):
    """An Alpaca input or a completion that happens to be JSON is the text, not a parsed value."""
    path = tmp_path / "t.csv"
    write(path, [{"instruction": "Count the keys", "input": '{"a": 1, "b": 2}', "output": "2"},
                 {"instruction": "Sum", "input": "[1, 2, 3]", "output": "6"}], "csv")
    assert [r["messages"][0]["content"] for r in read_rows(path)] == ['Count the keys\n{"a": 1, "b": 2}',
                                                                      "Sum\n[1, 2, 3]"]


def test_text_column_beside_a_format_is_ignored_and_two_formats_are_ambiguous():
    row = {"instruction": "Q", "input": "", "output": "A", "text": "### Instruction: Q ### Response: A"}
    assert convert_row(row) == {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    both = {"messages": conversation(0), "conversations": sharegpt_turns(0)}
    with pytest.raises(ValueError, match="ambiguous row format: it has the keys of 'openai' \\('messages'\\) and "
                                         "'sharegpt' \\('conversations'\\)"):
        convert_row(both)
    # Naming the format settles it.
    assert convert_row(both, "sharegpt") == {"messages": conversation(0, system=False)}
