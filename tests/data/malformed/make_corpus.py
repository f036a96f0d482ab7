"""Write the malformed-data corpus next to this file: ``python tests/data/malformed/make_corpus.py``.

One file per problem class; ``expected.json`` (kept by hand) says what validating each must report.
Most files are plain text and could be edited directly; this script exists for the binary ones (Parquet,
UTF-16, non-UTF-8 bytes, an archive renamed .jsonl) and so that the whole corpus can be rebuilt.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def chat(q: str = "Capital of France?", a: str = "Paris.") -> dict:
    """A good OpenAI chat row."""
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


GOOD = json.dumps(chat())


def jsonl(*lines: str | dict) -> str:
    """JSONL text from raw lines (strings are written as they are) and row objects."""
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)


def msgs(*pairs: tuple[str, object], **extra: object) -> dict:
    """An OpenAI row from (role, content) pairs."""
    return {"messages": [{"role": r, "content": c} for r, c in pairs], **extra}


def tool_row(calls: object) -> dict:
    return {"messages": [{"role": "user", "content": "Capital of France?"},
                         {"role": "assistant", "content": None, "tool_calls": calls},
                         {"role": "tool", "content": "Paris"},
                         {"role": "assistant", "content": "Paris."}]}


TEXT_FILES: dict[str, str] = {
    # ----- JSONL syntax and encoding
    "bad_json_line3.jsonl": jsonl(GOOD, GOOD, '{"messages": [{"role": "user" "content": "hi"}]}', GOOD),
    "truncated_last_row.jsonl": jsonl(GOOD, GOOD, GOOD)
    + '{"messages": [{"role": "user", "content": "Capital of Peru?"}, {"role": "assis',
    "row_not_an_object.jsonl": jsonl(GOOD, "[1, 2, 3]", GOOD),
    "row_is_a_string.jsonl": jsonl(GOOD, GOOD, '"Capital of France? Paris."'),
    "pretty_printed_json.jsonl": json.dumps(chat(), indent=2) + "\n",
    "blank_lines_then_bad_row.jsonl": jsonl(GOOD, "", "   ", GOOD, "", "{oops}", GOOD),
    "only_blank_lines.jsonl": "\n\n   \n\t\n",
    # ----- OpenAI chat rows
    "unknown_role.jsonl": jsonl(GOOD, msgs(("user", "Capital of France?"), ("bot", "Paris."))),
    "missing_role.jsonl": jsonl(GOOD, GOOD, {"messages": [{"content": "Capital of France?"},
                                                          {"role": "assistant", "content": "Paris."}]}),
    "missing_assistant.jsonl": jsonl(GOOD, GOOD, msgs(("system", "Be brief."), ("user", "Capital of France?"))),
    "only_weight_zero_answers.jsonl": jsonl({"messages": [{"role": "user", "content": "Capital of France?"},
                                                          {"role": "assistant", "content": "Paris.", "weight": 0}]}),
    "empty_content.jsonl": jsonl(GOOD, msgs(("user", "   "), ("assistant", "Paris."))),
    "missing_content.jsonl": jsonl({"messages": [{"role": "user", "content": "Capital of France?"},
                                                 {"role": "assistant"}]}),
    "content_wrong_type.jsonl": jsonl(GOOD, msgs(("user", "Capital of France?"), ("assistant", 42))),
    "messages_not_a_list.jsonl": jsonl({"messages": "user: Capital of France? assistant: Paris."}, GOOD),
    "messages_empty.jsonl": jsonl(GOOD, {"messages": []}),
    "weight_not_0_or_1.jsonl": jsonl({"messages": [{"role": "user", "content": "Capital of France?"},
                                                   {"role": "assistant", "content": "Paris.", "weight": 0.5}]}),
    "weight_on_user.jsonl": jsonl({"messages": [{"role": "user", "content": "Capital of France?", "weight": 1},
                                                {"role": "assistant", "content": "Paris."}]}),
    "name_wrong_type.jsonl": jsonl({"messages": [{"role": "user", "content": "Capital of France?", "name": 7},
                                                 {"role": "assistant", "content": "Paris."}]}),
    "tool_calls_not_a_list.jsonl": jsonl(tool_row({"type": "function",
                                                   "function": {"name": "capital", "arguments": "{}"}})),
    "tool_call_arguments_not_json.jsonl": jsonl(GOOD, tool_row([{"type": "function", "function": {
        "name": "capital", "arguments": "{country: FR}"}}])),
    "tool_call_without_function.jsonl": jsonl(tool_row([{"id": "call_1", "type": "function"}])),
    "tool_calls_on_user.jsonl": jsonl({"messages": [
        {"role": "user", "content": "Capital of France?", "tool_calls": [
            {"type": "function", "function": {"name": "capital", "arguments": "{}"}}]},
        {"role": "assistant", "content": "Paris."}]}),
    "tools_without_name.jsonl": jsonl({**chat(), "tools": [{"type": "function", "function": {
        "description": "The capital of a country", "parameters": {"type": "object"}}}]}),
    # ----- format detection
    "ambiguous_format.jsonl": jsonl({**chat(), "conversations": [{"from": "human", "value": "Capital of Spain?"},
                                                                 {"from": "gpt", "value": "Madrid."}]}),
    "mixed_formats.jsonl": jsonl(GOOD, GOOD, {"instruction": "Capital of France?", "output": "Paris."}, GOOD),
    "unrecognised_format.jsonl": jsonl({"q": "Capital of France?", "a": "Paris."}),
    # ----- several problems in one file: every one is reported, each with its line
    "several_problems.jsonl": jsonl(GOOD, "not json", msgs(("user", "Capital of France?"), ("robot", "Paris.")),
                                    GOOD, msgs(("user", "Capital of Spain?")),
                                    msgs(("user", ""), ("assistant", "Madrid."))),
    "too_few_examples.jsonl": jsonl(GOOD, chat("Capital of Spain?", "Madrid."), chat("Capital of Peru?", "Lima.")),
    # ----- ShareGPT
    "sharegpt_unknown_from.jsonl": jsonl({"conversations": [{"from": "human", "value": "Capital of France?"},
                                                            {"from": "bard", "value": "Paris."}]}),
    "sharegpt_pairs_missing_assistant.jsonl": jsonl({"system": "Be brief.", "conversation": [
        {"human": "Capital of France?", "assistant": "Paris."}, {"human": "And of Spain?"}]}),
    "sharegpt_bad_function_call.jsonl": jsonl({"conversations": [
        {"from": "human", "value": "Capital of France?"},
        {"from": "function_call", "value": "capital(country=FR)"},
        {"from": "observation", "value": "Paris"}, {"from": "gpt", "value": "Paris."}]}),
    # ----- Alpaca, query/response, prompt/completion, text
    "alpaca_missing_output.jsonl": jsonl({"instruction": "Name the capital of France.", "output": "Paris."},
                                         {"instruction": "Name the capital of Spain.", "input": ""}),
    "alpaca_bad_history.jsonl": jsonl({"instruction": "And of Spain?", "output": "Madrid.",
                                       "history": [["Capital of France?"]]}),
    "query_response_empty_response.jsonl": jsonl({"query": "Capital of France?", "response": "Paris."},
                                                 {"query": "Capital of Spain?", "response": ""}),
    "prompt_completion_wrong_type.jsonl": jsonl({"prompt": "Capital of France?", "completion": {"text": "Paris."}}),
    "text_empty.jsonl": jsonl({"text": "The capital of France is Paris."}, {"text": "  "}),
    # ----- Llama Stack
    "instruct_input_not_json.jsonl": jsonl({"chat_completion_input": '[{"role": "user", "content": "Capital"',
                                            "expected_answer": "Paris."}),
    "instruct_missing_answer.jsonl": jsonl({"chat_completion_input": "Capital of France?"}),
    "dialog_not_a_list.jsonl": jsonl({"dialog": 42}),
    # ----- preference (DPO) rows
    "dpo_missing_rejected.jsonl": jsonl({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
                                        {"prompt": "Capital of Spain?", "chosen": "Madrid."}),
    "dpo_openai_missing_non_preferred.jsonl": jsonl({
        "input": {"messages": [{"role": "user", "content": "Capital of France?"}]},
        "preferred_output": [{"role": "assistant", "content": "Paris."}]}),
    "dpo_openai_preferred_not_assistant.jsonl": jsonl({
        "input": {"messages": [{"role": "user", "content": "Capital of France?"}]},
        "preferred_output": [{"role": "user", "content": "Paris."}],
        "non_preferred_output": [{"role": "assistant", "content": "Lyon."}]}),
    "dpo_same_answers.jsonl": jsonl({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Paris."}),
    "dpo_messages_rejected_last_not_assistant.jsonl": jsonl({
        "messages": [{"role": "user", "content": "Capital of France?"}], "rejected_response": "Lyon."}),
    # ----- JSON array
    "json_array_not_closed.json": "[\n" + GOOD + ",\n" + GOOD + ",\n",
    "json_not_an_array.json": json.dumps({"data": [chat()]}, indent=2),
    "json_array_bad_element.json": json.dumps([chat(), msgs(("user", "Capital of Spain?"), ("bot", "Madrid."))],
                                              indent=2),
    "json_trailing_comma.json": "[\n" + GOOD + ",\n" + GOOD + ",\n]\n",
}


def csv_text(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


TEXT_FILES.update({
    "csv_missing_column.csv": csv_text([["instruction", "input"], ["Name the capital of", "France"],
                                        ["Name the capital of", "Spain"]]),
    "csv_unknown_columns.csv": csv_text([["q", "a"], ["Capital of France?", "Paris."]]),
    "csv_ragged_row.csv": csv_text([["instruction", "input", "output"], ["Name the capital of", "France", "Paris"],
                                    ["Name the capital of", "Spain", "Madrid", "extra"]]),
    "csv_messages_not_json.csv": csv_text([["messages"], [json.dumps(chat()["messages"])],
                                           ["user: Capital of Spain? assistant: Madrid."]]),
    "csv_empty_output_cell.csv": csv_text([["instruction", "output"], ["Capital of France?", "Paris."],
                                           ["Capital of Spain?", ""]]),
    "csv_duplicate_column.csv": csv_text([["prompt", "completion", "prompt"], ["Capital of France?", "Paris.", "x"]]),
    # Without its repeat the header names no format: the repeat, not the format, is what is wrong.
    "csv_repeated_column_no_format.csv": csv_text([["prompt", "prompt", ""], ["Capital of France?", "Paris.", "x"]]),
})


def parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def parquet_columns(names: list[str], columns: list[list]) -> bytes:
    """A Parquet file from columns, so that two may share a name (from_pylist cannot write that)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_arrays([pa.array(c) for c in columns], names=names), buf)
    return buf.getvalue()


def binary_files() -> dict[str, bytes]:
    """The files whose bytes matter: encodings, archives, Parquet."""
    good_line = (GOOD + "\n").encode()
    return {
        "non_utf8_bytes.jsonl": good_line + b'{"messages": [{"role": "user", "content": "Caf'
        + b"\xe9" + b'?"}, {"role": "assistant", "content": "Oui."}]}\n' + good_line,
        "utf16_encoded.jsonl": (GOOD + "\n" + GOOD + "\n").encode("utf-16"),
        "bom_in_the_middle.jsonl": b"\xef\xbb\xbf" + good_line + good_line + b"\xef\xbb\xbf" + good_line,
        "gzip_renamed.jsonl": gzip.compress(good_line * 3, mtime=0),
        "parquet_renamed.jsonl": parquet([chat()]),
        "csv_latin1.csv": "instruction,output\nCapital of France?,Paris.\nCapital of Peru?,Lima é\n".encode("latin-1"),
        "parquet_wrong_column_type.parquet": parquet([{"instruction": "Name the capital of France.", "output": 1},
                                                      {"instruction": "Name the capital of Spain.", "output": 2}]),
        "parquet_messages_as_text.parquet": parquet([{"messages": "user: Capital of France? assistant: Paris."}]),
        "parquet_missing_column.parquet": parquet([{"chat_completion_input": "Capital of France?"},
                                                   {"chat_completion_input": "Capital of Spain?"}]),
        "parquet_unknown_role.parquet": parquet([chat(), {"messages": [{"role": "user", "content": "Capital?"},
                                                                       {"role": "bot", "content": "Paris."}]}]),
        "parquet_truncated.parquet": parquet([chat()] * 20)[:-40],
        "dpo_parquet_missing_rejected.parquet": parquet([{"prompt": "Capital of France?", "chosen": "Paris."}]),
        "parquet_repeated_column.parquet": parquet_columns(["prompt", "completion", "prompt"],
                                                           [["Capital of France?"], ["Paris."], ["x"]]),
    }


def picture(fmt: str = "PNG", size: tuple[int, int] = (4, 4), colour: str = "red") -> bytes:
    """A tiny solid-colour image in ``fmt``, made with Pillow."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds one tiny IDAT: only its header is ever read."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64," + base64.b64encode(data).decode()


def vision(*images: str, question: str = "What colour is this?", answer: str = "Red.") -> dict:
    """An OpenAI vision row: the question and ``images`` as image_url parts, a text answer."""
    parts = [{"type": "text", "text": question}] + [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]}


def image_files() -> dict[str, str]:
    """The malformed image rows (issue 15): every image inline or absolute, so an upload reports the same."""
    good = vision(data_uri(picture()))
    tagged = {"messages": [{"role": "user", "content": "<image><image>Which colours?"},
                           {"role": "assistant", "content": "Red and blue."}], "images": [data_uri(picture())]}
    untagged = {"conversations": [{"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "Red."}],
                "images": [data_uri(picture())]}
    in_answer = {"messages": [{"role": "user", "content": "Draw a red square."},
                              {"role": "assistant", "content": [{"type": "image_url",
                                                                 "image_url": {"url": data_uri(picture())}}]}]}
    return {
        "image_undecodable.jsonl": jsonl(good, vision(data_uri(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8))),
        "image_truncated_png.jsonl": jsonl(good, good, vision(data_uri(picture("PNG", (64, 64))[:-30]))),
        "image_truncated_jpeg.jsonl": jsonl(vision(data_uri(picture("JPEG", (64, 64))[:-40], "image/jpeg"))),
        "image_truncated_gif_and_webp.jsonl": jsonl(vision(data_uri(picture("GIF")[:-1], "image/gif")), good,
                                                    vision(data_uri(picture("WEBP", (64, 64))[:-20], "image/webp"))),
        "image_unsupported_type.jsonl": jsonl(good, vision(data_uri(picture("BMP"), "image/bmp"))),
        "image_not_an_image_uri.jsonl": jsonl(vision("data:text/plain;base64,aGVsbG8=")),
        "image_bad_base64.jsonl": jsonl(vision("data:image/png;base64,iVBORw0K!!!")),
        "image_over_pixel_limit.jsonl": jsonl(vision(data_uri(png_header(9000, 9000)))),
        "image_decompression_bomb.jsonl": jsonl(good, vision(data_uri(png_header(20000, 20000)))),
        "image_path_outside_roots.jsonl": jsonl(vision("/etc/tuneyard-corpus/red.png")),
        "image_unsupported_scheme.jsonl": jsonl(vision("ftp://example.com/red.png")),
        "image_more_tags_than_images.jsonl": jsonl(good, tagged),
        "image_more_images_than_tags.jsonl": jsonl(untagged),
        "image_in_assistant_message.jsonl": jsonl(in_answer),
        "image_too_many_in_one_example.jsonl": jsonl(vision(*[data_uri(picture())] * 11)),
        "image_video_key.jsonl": jsonl({**tagged, "images": [data_uri(picture())] * 2, "videos": ["clip.mp4"]}),
    }


def main() -> None:
    """(Re)write every corpus file."""
    for name, text in {**TEXT_FILES, **image_files()}.items():
        (HERE / name).write_text(text, encoding="utf-8")
    for name, data in binary_files().items():
        (HERE / name).write_bytes(data)


if __name__ == "__main__":
    main()
