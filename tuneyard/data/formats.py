"""Row formats users bring, detected per row and converted to one internal form.

The internal form of a supervised row is one of:

* a conversation: ``{"messages": [message, ...], "tools"?: [...]}``. A message is
  ``{"role", "content", "weight"?, "name"?, "tool_calls"?, "tool_call_id"?}`` with role ``system``,
  ``user``, ``assistant`` or ``tool``; ``content`` is a string (``""`` for an assistant message that
  only calls tools) or, in a message that holds an image, a list of parts ``{"type": "text", "text": str}`` and
  ``{"type": "image", "image": REF}`` (an *image row*; text-only rows never use the list form). REF is the
  source as the row gives it (a ``data:image/...;base64,`` URI, ``https://``, ``s3://`` or a path); the prepare
  step replaces it with ``images/<sha256>.<ext>`` under the job's ``data/`` (``tuneyard.data.images``). Images
  come as OpenAI ``image_url`` parts, Llama Stack ``image`` parts, or an ``images`` list whose entries go where
  the ``<image>`` tags of the messages are (ms-swift, LLaMA-Factory, ShareGPT); they are refused in assistant
  messages. ``weight`` (0 or 1, assistant messages only) is kept only when the row gave it;
  ``tool_calls`` follow OpenAI: ``{"id"?, "type": "function", "function": {"name", "arguments": str}}``.
* a plain text sample: ``{"text": "..."}`` (continued pre-training: every token of it is trained).

A preference row (for DPO) becomes ``{"prompt": [message, ...], "chosen": [assistant message, ...],
"rejected": [assistant message, ...], "tools"?: [...]}`` (TRL's conversational preference form).

Formats (``FORMATS``) and the keys that identify a row of each (``SIGNATURES``):

* ``openai``: ``messages`` (+ ``tools``); roles system/user/assistant/tool (``developer`` = system).
* ``sharegpt``: ``conversations`` of ``{from, value}`` (+ ``system``, ``tools``), or the pair style
  ``conversation: [{human, assistant}]`` (+ ``system``).
* ``alpaca``: ``instruction`` (+ ``input``, ``output``, ``system``, ``history: [[q, a], ...]``).
* ``prompt_completion``: ``prompt`` + ``completion``.
* ``query_response``: ``query``/``response``, ``question``/``answer`` or ``input``/``output``
  (+ ``system``, ``history``).
* ``text``: ``text``.
* ``instruct`` (Llama Stack): ``chat_completion_input`` (messages, their JSON, or a user string) +
  ``expected_answer``.
* ``dialog`` (Llama Stack): ``dialog`` (messages or their JSON).
* ``dpo``: OpenAI's ``input.messages`` + ``preferred_output`` + ``non_preferred_output``; the common
  ``prompt`` + ``chosen`` + ``rejected``; Simplismart's ``messages`` + ``rejected_response``.

A row that has the keys of two formats (``messages`` and ``conversations``, say) is ambiguous and refused
unless the format is named. A ``text`` column beside another format's keys is a rendered copy and is
ignored, and preference keys win over the rest (preference datasets often carry ``messages`` too).
``instruction`` (Simplismart's name) is a family: Alpaca, query/response or prompt/completion rows,
detected within the family. Images in rows are read by ``tuneyard.data.image_rows``; what every converter
shares (a row's problems, text fields) is ``tuneyard.data.rowbase``. None of these import torch or
transformers: the API process uses them to validate uploads.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

from tuneyard import jsontext
from tuneyard.data.image_rows import (  # noqa: F401  (has_images, image_refs, IMAGE_TAG: re-exported)
    IMAGE_TAG,
    has_images,
    image_refs,
    message_content,
    place_images,
)
from tuneyard.data.rowbase import (  # noqa: F401  (Problem, RowError, ImageSite: re-exported)
    Collector,
    ImageSite,
    Problem,
    RowError,
    json_type,
    text_content,
)

DPO = "dpo"
SFT_FORMATS = ("openai", "sharegpt", "alpaca", "prompt_completion", "query_response", "text", "instruct",
               "dialog")
FORMATS = (*SFT_FORMATS, DPO)
# Names that stand for several formats: rows are detected among these only.
FAMILIES = {"instruction": ("alpaca", "query_response", "prompt_completion")}

# Names a caller may give for a format. Simplismart's dataset_format enum is sharegpt/alpaca/instruction;
# Llama Stack's data_format is instruct/dialog; OpenAI-style callers say chat/messages.
FORMAT_ALIASES = {
    "openai": "openai", "chat": "openai", "messages": "openai", "chatml": "openai",
    "sharegpt": "sharegpt", "conversations": "sharegpt", "conversation": "sharegpt",
    "alpaca": "alpaca", "instruction": "instruction",
    "prompt_completion": "prompt_completion", "prompt-completion": "prompt_completion",
    "completion": "prompt_completion",
    "query_response": "query_response", "query-response": "query_response",
    "text": "text", "instruct": "instruct", "dialog": "dialog",
    "dpo": DPO, "preference": DPO,
}

ROLES = ("system", "user", "assistant", "tool")
# Role names other tools use for the same four roles.
ROLE_ALIASES = {"developer": "system"}
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system",
    "function_call": "function_call",
    "observation": "tool", "tool": "tool", "function": "tool",
}
QUERY_RESPONSE_KEYS = (("query", "response"), ("question", "answer"), ("input", "output"),
                       ("prompt", "completion"))
# The key sets that identify a row of each supervised format (any one set suffices), in priority order.
SIGNATURES: dict[str, tuple[tuple[str, ...], ...]] = {
    "openai": (("messages",),),
    "sharegpt": (("conversations",), ("conversation",)),
    "dialog": (("dialog",),),
    "instruct": (("chat_completion_input",), ("expected_answer",)),
    "alpaca": (("instruction",),),
    "prompt_completion": (("prompt", "completion"),),
    "query_response": QUERY_RESPONSE_KEYS[:3],
    "text": (("text",),),
}
# A named format also accepts these keys (query_response lists prompt/completion as an alias).
_ALSO_ACCEPTS = {"query_response": (("prompt", "completion"),)}
PREFERENCE_KEYS = ("preferred_output", "non_preferred_output", "rejected_response", "chosen", "rejected")
# The fields a row of each format must have (any one tuple): a CSV or Parquet file needs them as columns.
REQUIRED_KEYS: dict[str, tuple[tuple[str, ...], ...]] = {
    "openai": (("messages",),),
    "sharegpt": (("conversations",), ("conversation",)),
    "alpaca": (("instruction", "output"),),
    "prompt_completion": (("prompt", "completion"),),
    "query_response": QUERY_RESPONSE_KEYS,
    "text": (("text",),),
    "instruct": (("chat_completion_input", "expected_answer"),),
    "dialog": (("dialog",),),
    DPO: (("chosen", "rejected"), ("input", "preferred_output", "non_preferred_output"),
          ("messages", "rejected_response")),
}


def normalize_format_name(name: str | None) -> str:
    """The canonical format (or family) for a caller-given name ("auto" stays "auto"); ValueError if unknown."""
    if name is None:
        return "auto"
    key = name.strip().lower()
    if key in ("", "auto"):
        return "auto"
    if key in FORMAT_ALIASES:
        return FORMAT_ALIASES[key]
    names = ", ".join(sorted(FORMAT_ALIASES))
    raise ValueError(f"unknown data format '{name}'; expected 'auto' or one of: {names}")


def is_preference_row(row: dict) -> bool:
    """Whether an internal-form row is a preference pair (``prompt``/``chosen``/``rejected``)."""
    return "chosen" in row and "rejected" in row


def _has_keys(row: dict, sets: tuple[tuple[str, ...], ...]) -> bool:
    return any(all(k in row for k in keys) for keys in sets)


def candidate_formats(row: Any) -> list[str]:
    """Every format whose identifying keys ``row`` has, in priority order ([] when none; >1: ambiguous)."""
    if not isinstance(row, dict):
        return []
    if any(k in row for k in PREFERENCE_KEYS):
        return [DPO]
    found = [fmt for fmt, sets in SIGNATURES.items() if _has_keys(row, sets)]
    if len(found) > 1 and "text" in found:
        # Many datasets keep a rendered "text" column beside the structured one (tatsu-lab/alpaca does).
        found.remove("text")
    if "alpaca" in found and "query_response" in found and not _has_keys(row, QUERY_RESPONSE_KEYS[:2]):
        # Alpaca's own input/output keys, not a second format.
        found.remove("query_response")
    return found


def detect_row_format(row: Any) -> str | None:
    """The format of one row from its keys (``"dpo"`` for a preference row); None if unrecognised or ambiguous."""
    found = candidate_formats(row)
    return found[0] if len(found) == 1 else None


def detect_format(rows: Iterable[Any], max_rows: int = 100, within: Iterable[str] | None = None) -> str | None:
    """The most common format among the first ``max_rows`` rows (first seen wins a tie); None if none.

    ``within`` restricts detection to those formats (a family such as ``instruction``).
    """
    allowed = set(within) if within is not None else None
    counts: Counter[str] = Counter()
    first_seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        if i >= max_rows:
            break
        found = candidate_formats(row)
        if allowed is not None:
            found = [f for f in found if f in allowed]
        if len(found) == 1:
            counts[found[0]] += 1
            first_seen.setdefault(found[0], i)
    if not counts:
        return None
    return max(counts, key=lambda f: (counts[f], -first_seen[f]))


def _format_keys(fmt: str, row: dict) -> str:
    """The identifying keys of ``fmt`` that ``row`` has, quoted, for messages."""
    if fmt == DPO:
        keys = [k for k in PREFERENCE_KEYS if k in row]
    else:
        keys = next((list(ks) for ks in SIGNATURES[fmt] if all(k in row for k in ks)), [])
    return "+".join(f"'{k}'" for k in keys)


def ambiguous_row_message(row: dict, formats: list[str], subject: str = "row") -> str:
    """Why a row (or a file's columns, with ``subject``) that has the keys of several formats is refused."""
    named = [f"'{f}' ({_format_keys(f, row)})" for f in formats]
    listed = ", ".join(named[:-1]) + f" and {named[-1]}"
    return (f"ambiguous {subject} format: it has the keys of {listed}; keep the keys of one format or name the "
            "format explicitly")


def unrecognised_row_message(row: Any, within: tuple[str, ...] | None = None) -> str:
    """Why a row matches no format, listing its keys and the keys each format needs."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {json_type(row)}"
    keys = ", ".join(repr(k) for k in list(row)[:8]) or "none"
    if within is not None:
        sets = list(dict.fromkeys(ks for f in within for ks in REQUIRED_KEYS[f]))
        needs = ", ".join("+".join(f"'{k}'" for k in ks) for ks in sets[:-1])
        needs += " or " + "+".join(f"'{k}'" for k in sets[-1])
        return f"unrecognised row format (keys: {keys}); expected {needs}"
    return (f"unrecognised row format (keys: {keys}); expected 'messages', 'conversations', 'instruction', "
            "'prompt'+'completion', 'query'+'response', 'text', 'chat_completion_input'+'expected_answer' "
            "or 'dialog'")


def _foreign_row_message(row: dict, found: str, named: str) -> str:
    return (f"this row is in '{found}' format ({_format_keys(found, row)}), not in the '{named}' format the "
            "data was declared with")


def convert_row(row: Any, format: str = "auto", *, trust_format: bool = False,
                sites: list[ImageSite] | None = None) -> dict:
    """Convert one row to the internal form; raise RowError naming every problem found.

    Each image the row holds is appended to ``sites`` (when given) with where the row has it, so that the
    image checks (``tuneyard.data.images``) can name the example, message and part.

    A named format is checked against the row's keys (a row plainly in another format says so) unless
    ``trust_format``: a CSV or Parquet file's columns fixed the format, and a row lacks a key only because
    its cell is empty.
    """
    fmt = normalize_format_name(format)
    if not isinstance(row, dict):
        raise RowError([Problem(f"expected a JSON object, got {json_type(row)}")])
    found = candidate_formats(row)
    if fmt == "auto" or fmt in FAMILIES:
        within = FAMILIES.get(fmt)
        mine = found if within is None else [f for f in found if f in within]
        if len(mine) > 1:
            raise RowError([Problem(ambiguous_row_message(row, mine))])
        if not mine:
            if within is not None and len(found) == 1:
                raise RowError([Problem(_foreign_row_message(row, found[0], fmt))])
            raise RowError([Problem(unrecognised_row_message(row, within))])
        fmt = mine[0]
    elif not trust_format and fmt not in found and len(found) == 1 and not (
            fmt != DPO and _has_keys(row, (*SIGNATURES[fmt], *_ALSO_ACCEPTS.get(fmt, ())))):
        # The row is plainly another format: saying so beats listing the named format's missing keys.
        raise RowError([Problem(_foreign_row_message(row, found[0], fmt))])
    c = Collector()
    out = _CONVERTERS[fmt](row, c)
    place_images(row, out, c)
    if sites is not None:
        sites.extend(c.sites)
    return out


# ----------------------------------------------------------------------------------------------------
# Field helpers


def _string_field(row: dict, key: str, c: Collector, *, required: bool, allow_empty: bool = False,
                  where: str | None = None, param: str | None = None) -> str | None:
    param = param or key
    if key not in row or row[key] is None:
        if required:
            c.add(f"'{key}' is missing", where, param)
        return None
    value = text_content(row[key], c, where, param, key) if isinstance(row[key], list) else row[key]
    if value is None:
        return None
    if not isinstance(value, str):
        c.add(f"'{key}' must be a string, got {json_type(value)}", where, param)
        return None
    if not allow_empty and not value.strip():
        if required:
            c.add(f"'{key}' is empty", where, param)
        return None
    return value


def _arguments(args: Any) -> tuple[str | None, str | None]:
    """(arguments as a JSON string, None) or (None, why not): they must encode a JSON object."""
    if isinstance(args, dict):
        return json.dumps(args, ensure_ascii=False), None
    if not isinstance(args, str):
        return None, f"must be a JSON string or an object, got {json_type(args)}"
    if not args.strip():
        # Some exports write "" for a call without arguments.
        return "{}", None
    try:
        parsed = jsontext.loads(args)
    except json.JSONDecodeError as e:
        return None, f"is not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(parsed, dict):
        return None, f"must encode a JSON object, got {json_type(parsed)}"
    return args, None


def _tool_calls(value: Any, c: Collector, where: str, param: str) -> list[dict] | None:
    if not isinstance(value, list):
        c.add(f"'tool_calls' must be a list, got {json_type(value)}", where, param)
        return None
    calls = []
    for j, call in enumerate(value):
        cparam = f"{param}[{j}]"
        cwhere = f"{where}, tool call {j + 1}"
        if not isinstance(call, dict):
            c.add(f"must be an object, got {json_type(call)}", cwhere, cparam)
            return None
        fn = call.get("function")
        if not isinstance(fn, dict):
            c.add("'function' is missing or not an object", cwhere, f"{cparam}.function")
            return None
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            c.add("'function.name' must be a non-empty string", cwhere, f"{cparam}.function.name")
            return None
        args, why = _arguments(fn.get("arguments", "{}"))
        if args is None:
            c.add(f"'function.arguments' {why}", cwhere, f"{cparam}.function.arguments")
            return None
        out = {"type": "function", "function": {"name": name, "arguments": args}}
        if isinstance(call.get("id"), str):
            out = {"id": call["id"], **out}
        calls.append(out)
    return calls


def _tools(value: Any, c: Collector, param: str = "tools") -> list[dict] | None:
    # Some ShareGPT exports store the tool list as a JSON string.
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = jsontext.loads(value)
        except json.JSONDecodeError as e:
            c.add(f"'{param}' is a string but not valid JSON ({e.msg})", None, param)
            return None
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        c.add(f"'{param}' must be a list of objects", None, param)
        return None
    for j, tool in enumerate(value):
        # OpenAI nests the schema under "function"; ShareGPT/Hermes exports give it directly.
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        if not isinstance(fn.get("name"), str) or not fn["name"].strip():
            c.add("a tool needs a name ('function.name')", f"tool {j + 1}", f"{param}[{j}].function.name")
            return None
    return value or None


# An assistant message's reasoning (chain of thought), as DeepSeek/Qwen3 (reasoning_content), OpenAI-style
# exports (reasoning) and gpt-oss (thinking) name it; templates that show reasoning render it in the answer.
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def _message(raw: Any, idx: int, c: Collector, *, param: str, role_map: dict[str, str] | None = None,
             role_key: str = "role", content_key: str = "content", label: str = "message") -> dict | None:
    """Check and normalise one message (``idx`` is 0-based; messages are named 1-based)."""
    where = f"{label} {idx + 1}"
    if not isinstance(raw, dict):
        c.add(f"must be an object, got {json_type(raw)}", where, param)
        return None
    n_before = len(c.problems)
    role = raw.get(role_key)
    if role is None:
        c.add(f"'{role_key}' is missing", where, f"{param}.{role_key}")
        return None
    if not isinstance(role, str):
        c.add(f"'{role_key}' must be a string, got {json_type(role)}", where, f"{param}.{role_key}")
        return None
    mapped = role_map.get(role.lower()) if role_map is not None else ROLE_ALIASES.get(role, role)
    if mapped is None or (role_map is None and mapped not in ROLES):
        c.add(f"unknown role '{role}'", where, f"{param}.{role_key}")
        return None
    msg: dict[str, Any] = {"role": mapped}

    if mapped == "function_call":
        # ShareGPT's function_call turn: the assistant calling a tool, its value a JSON {name, arguments}.
        value = raw.get(content_key)
        call = None
        if isinstance(value, str):
            try:
                call = jsontext.loads(value)
            except json.JSONDecodeError:
                call = None
        elif isinstance(value, dict):
            call = value
        calls = call if isinstance(call, list) else [call]
        tool_calls = []
        for one in calls:
            args, _ = _arguments(one.get("arguments", {})) if isinstance(one, dict) else (None, None)
            if not (isinstance(one, dict) and isinstance(one.get("name"), str) and args is not None):
                c.add("a function_call value must be JSON with 'name' and 'arguments' (a JSON object)", where,
                      f"{param}.{content_key}")
                return None
            tool_calls.append({"type": "function", "function": {"name": one["name"], "arguments": args}})
        return {"role": "assistant", "content": "", "tool_calls": tool_calls}

    tool_calls = None
    if raw.get("tool_calls") is not None:
        if mapped != "assistant":
            c.add("'tool_calls' is only allowed on assistant messages", where, f"{param}.tool_calls")
        else:
            tool_calls = _tool_calls(raw["tool_calls"], c, where, f"{param}.tool_calls")

    content_raw = raw.get(content_key)
    if content_raw is None:
        if tool_calls or (mapped == "assistant" and raw.get("tool_calls") is not None):
            # A call-only answer has no content (bad calls are reported on their own).
            content = ""
        else:
            c.add(f"'{content_key}' is missing", where, f"{param}.{content_key}")
            content = None
    else:
        content = message_content(content_raw, c, where, f"{param}.{content_key}", content_key, mapped)
        if isinstance(content, str) and not content.strip() and not tool_calls:
            c.add(f"'{content_key}' is empty", where, f"{param}.{content_key}")
    msg["content"] = content

    # A null field is an absent one: Parquet and datasets give every message every field of the column.
    if raw.get("weight") is not None:
        weight = raw["weight"]
        if isinstance(weight, bool) or weight not in (0, 1):
            c.add(f"'weight' must be 0 or 1, got {json.dumps(weight)}", where, f"{param}.weight")
        elif mapped != "assistant":
            c.add("'weight' is only allowed on assistant messages", where, f"{param}.weight")
        else:
            msg["weight"] = int(weight)
    if raw.get("name") is not None:
        if isinstance(raw["name"], str):
            msg["name"] = raw["name"]
        else:
            c.add(f"'name' must be a string, got {json_type(raw['name'])}", where, f"{param}.name")
    if tool_calls:
        msg["tool_calls"] = tool_calls
    for key in REASONING_KEYS:
        value = raw.get(key)
        if value is None:
            continue
        if mapped != "assistant":
            c.add(f"'{key}' is only allowed on assistant messages", where, f"{param}.{key}")
        elif not isinstance(value, str):
            c.add(f"'{key}' must be a string, got {json_type(value)}", where, f"{param}.{key}")
        else:
            # One name for the chat templates (transformers also shows it as "thinking" to those that read that).
            msg["reasoning_content"] = value
        break
    if mapped == "tool" and isinstance(raw.get("tool_call_id"), str):
        msg["tool_call_id"] = raw["tool_call_id"]
    return msg if len(c.problems) == n_before else None


def _messages(value: Any, c: Collector, *, key: str, role_map: dict[str, str] | None = None,
              role_key: str = "role", content_key: str = "content", label: str = "message") -> list[dict]:
    if value is None:
        c.add(f"'{key}' is missing", None, key)
        return []
    if not isinstance(value, list):
        c.add(f"'{key}' must be a list, got {json_type(value)}", None, key)
        return []
    if not value:
        c.add(f"'{key}' is empty", None, key)
        return []
    out = []
    for i, raw in enumerate(value):
        msg = _message(raw, i, c, param=f"{key}[{i}]", role_map=role_map, role_key=role_key,
                       content_key=content_key, label=label)
        if msg is not None:
            out.append(msg)
    return out


def _history(value: Any, c: Collector, key: str = "history") -> list[dict]:
    """``[[query, response], ...]`` (or ``{query, response}`` objects) as user/assistant messages."""
    if value is None:
        return []
    if not isinstance(value, list):
        c.add(f"'{key}' must be a list of [query, response] pairs, got {json_type(value)}", None, key)
        return []
    out = []
    for i, pair in enumerate(value):
        if isinstance(pair, dict):
            q = next((pair[k] for k in ("query", "human", "user", "instruction") if k in pair), None)
            a = next((pair[k] for k in ("response", "assistant", "gpt", "output") if k in pair), None)
            pair = [q, a]
        if not (isinstance(pair, list | tuple) and len(pair) == 2
                and all(isinstance(x, str) and x.strip() for x in pair)):
            c.add("must be a [query, response] pair of non-empty strings", f"history item {i + 1}",
                  f"{key}[{i}]")
            continue
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def _finish(messages: list[dict], c: Collector, tools: list[dict] | None = None) -> dict:
    c.raise_if_any()
    if not any(m["role"] == "assistant" and m.get("weight", 1) != 0 for m in messages):
        c.add("no assistant message to train on (at least one assistant message without 'weight': 0 "
              "is needed)")
        c.raise_if_any()
    out: dict[str, Any] = {"messages": messages}
    if tools:
        out["tools"] = tools
    return out


def _with_system(system: str | None, messages: list[dict]) -> list[dict]:
    if system is not None and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def _maybe_json_list(value: Any, key: str, c: Collector) -> Any:
    # Llama Stack stores message lists as JSON strings in its dataset rows.
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return jsontext.loads(value)
        except json.JSONDecodeError as e:
            c.add(f"'{key}' is a string but not valid JSON ({e.msg})", None, key)
            return None
    return value


# ----------------------------------------------------------------------------------------------------
# Converters, one per format


def _from_openai(row: dict, c: Collector) -> dict:
    messages = _messages(row.get("messages"), c, key="messages")
    tools = _tools(row.get("tools"), c)
    return _finish(messages, c, tools)


def _from_sharegpt(row: dict, c: Collector) -> dict:
    system = _string_field(row, "system", c, required=False)
    tools = _tools(row.get("tools"), c)
    if "conversations" in row:
        convs = row["conversations"]
        # Most exports use from/value; some use role/content inside "conversations".
        first = convs[0] if isinstance(convs, list) and convs and isinstance(convs[0], dict) else {}
        use_role = "from" not in first and "role" in first
        role_key, content_key = ("role", "content") if use_role else ("from", "value")
        messages = _messages(convs, c, key="conversations", role_map=SHAREGPT_ROLES, role_key=role_key,
                             content_key=content_key)
    elif "conversation" in row:
        messages = _pairs(row["conversation"], c)
    else:
        c.add("'conversations' is missing", None, "conversations")
        messages = []
    return _finish(_with_system(system, messages), c, tools)


def _pairs(value: Any, c: Collector) -> list[dict]:
    """ShareGPT pair style: ``[{"human": q, "assistant": a}, ...]``."""
    if not isinstance(value, list):
        c.add(f"'conversation' must be a list, got {json_type(value)}", None, "conversation")
        return []
    if not value:
        c.add("'conversation' is empty", None, "conversation")
        return []
    out = []
    for i, turn in enumerate(value):
        where, param = f"turn {i + 1}", f"conversation[{i}]"
        if not isinstance(turn, dict):
            c.add(f"must be an object, got {json_type(turn)}", where, param)
            continue
        q_key = next((k for k in ("human", "user") if k in turn), None)
        a_key = next((k for k in ("assistant", "gpt") if k in turn), None)
        if q_key is None or a_key is None:
            c.add("must have 'human' and 'assistant'", where, param)
            continue
        q = _string_field(turn, q_key, c, required=True, where=where, param=f"{param}.{q_key}")
        a = _string_field(turn, a_key, c, required=True, where=where, param=f"{param}.{a_key}")
        if q is not None and a is not None:
            out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out


def _from_alpaca(row: dict, c: Collector) -> dict:
    instruction = _string_field(row, "instruction", c, required=True, allow_empty=True)
    extra = _string_field(row, "input", c, required=False)
    if instruction is not None and not instruction.strip() and not extra:
        c.add("'instruction' is empty", None, "instruction")
    output = _string_field(row, "output", c, required=True)
    system = _string_field(row, "system", c, required=False)
    history = _history(row.get("history"), c)
    # LLaMA-Factory's join: the input follows the instruction on a new line.
    query = "\n".join(p for p in (instruction, extra) if p and p.strip())
    messages = [*history, {"role": "user", "content": query}, {"role": "assistant", "content": output}]
    return _finish(_with_system(system, messages), c)


def _from_prompt_completion(row: dict, c: Collector) -> dict:
    prompt = _string_field(row, "prompt", c, required=True)
    completion = _string_field(row, "completion", c, required=True)
    return _finish([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], c)


def _from_query_response(row: dict, c: Collector) -> dict:
    q_key, r_key = next(((q, r) for q, r in QUERY_RESPONSE_KEYS if q in row and r in row),
                        ("query", "response"))
    query = _string_field(row, q_key, c, required=True)
    response = _string_field(row, r_key, c, required=True)
    system = _string_field(row, "system", c, required=False)
    history = _history(row.get("history"), c)
    messages = [*history, {"role": "user", "content": query}, {"role": "assistant", "content": response}]
    return _finish(_with_system(system, messages), c)


def _from_text(row: dict, c: Collector) -> dict:
    text = _string_field(row, "text", c, required=True)
    c.raise_if_any()
    return {"text": text}


def _from_instruct(row: dict, c: Collector) -> dict:
    value = _maybe_json_list(row.get("chat_completion_input"), "chat_completion_input", c)
    if value is None and not c.problems:
        c.add("'chat_completion_input' is missing", None, "chat_completion_input")
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}] if value.strip() else []
        if not messages:
            c.add("'chat_completion_input' is empty", None, "chat_completion_input")
    elif value is not None:
        messages = _messages(value, c, key="chat_completion_input")
    else:
        messages = []
    answer = _string_field(row, "expected_answer", c, required=True)
    return _finish([*messages, {"role": "assistant", "content": answer}], c)


def _from_dialog(row: dict, c: Collector) -> dict:
    value = _maybe_json_list(row.get("dialog"), "dialog", c)
    messages = _messages(value, c, key="dialog") if not c.problems else []
    return _finish(messages, c)


# ----------------------------------------------------------------------------------------------------
# Preference rows


def _answers(row: dict, key: str, c: Collector) -> list[dict] | None:
    """A preference answer: a string (one assistant message), one message, or a list of messages."""
    value = _maybe_json_list(row.get(key), key, c)
    if value is None:
        if key not in row or row[key] is None:
            c.add(f"'{key}' is missing", None, key)
        return None
    if isinstance(value, str):
        if not value.strip():
            c.add(f"'{key}' is empty", None, key)
            return None
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    n_before = len(c.problems)
    messages = _messages(value, c, key=key, label=f"{key} message")
    return messages if len(c.problems) == n_before else None


def _prompt(row: dict, key: str, c: Collector) -> list[dict] | None:
    value = _maybe_json_list(row.get(key), key, c)
    if isinstance(value, str):
        if not value.strip():
            c.add(f"'{key}' is empty", None, key)
            return None
        return [{"role": "user", "content": value}]
    n_before = len(c.problems)
    messages = _messages(value, c, key=key, label=f"{key} message")
    return messages if len(c.problems) == n_before else None


def _finish_preference(prompt: list[dict], chosen: list[dict], rejected: list[dict], c: Collector,
                       tools: list[dict] | None, *, names: tuple[str, str], prompt_param: str,
                       offsets: tuple[int, int] = (0, 0)) -> dict:
    c.raise_if_any()
    if not prompt:
        c.add("the prompt is empty: a preference row needs the conversation the answers reply to", None,
              prompt_param)
    elif prompt[-1]["role"] not in ("user", "tool"):
        c.add(f"the prompt must end with a user or tool message, not a {prompt[-1]['role']} message", None,
              prompt_param)
    for key, answer, offset in zip(names, (chosen, rejected), offsets, strict=True):
        if not answer:
            c.add(f"'{key}' has no answer after the prompt", None, key)
        for i, m in enumerate(answer):
            if m["role"] != "assistant":
                c.add(f"must be an assistant message, got role '{m['role']}'", f"{key} message {offset + i + 1}",
                      f"{key}[{offset + i}].role")
                break
    if chosen and chosen == rejected:
        c.add(f"'{names[0]}' and '{names[1]}' are the same answer; a preference pair needs two different ones",
              None, names[1])
    c.raise_if_any()

    def plain(messages: list[dict]) -> list[dict]:
        # weight selects SFT targets; a preference pair always trains on both answers.
        return [{k: v for k, v in m.items() if k != "weight"} for m in messages]

    out: dict[str, Any] = {"prompt": plain(prompt), "chosen": plain(chosen), "rejected": plain(rejected)}
    if tools:
        out["tools"] = tools
    return out


def _from_dpo(row: dict, c: Collector) -> dict:
    if "rejected_response" in row:
        return _from_messages_rejected(row, c)
    if "preferred_output" in row or "non_preferred_output" in row:
        return _from_openai_dpo(row, c)
    return _from_chosen_rejected(row, c)


def _from_openai_dpo(row: dict, c: Collector) -> dict:
    """OpenAI: ``{"input": {"messages", "tools"?}, "preferred_output": [...], "non_preferred_output": [...]}``."""
    inp = row.get("input")
    prompt: list[dict] = []
    tools = _tools(row.get("tools"), c)
    if inp is None:
        c.add("'input' is missing", None, "input")
    elif not isinstance(inp, dict):
        c.add(f"'input' must be an object with 'messages', got {json_type(inp)}", None, "input")
    else:
        prompt = _messages(inp.get("messages"), c, key="input.messages", label="input message")
        tools = _tools(inp.get("tools"), c, "input.tools") or tools
    chosen = _answers(row, "preferred_output", c) or []
    rejected = _answers(row, "non_preferred_output", c) or []
    return _finish_preference(prompt, chosen, rejected, c, tools, names=("preferred_output", "non_preferred_output"),
                              prompt_param="input.messages")


def _from_messages_rejected(row: dict, c: Collector) -> dict:
    """Simplismart: ``messages`` ending with the preferred answer, ``rejected_response`` the other one."""
    tools = _tools(row.get("tools"), c)
    messages = _messages(row.get("messages"), c, key="messages")
    rejected = _answers(row, "rejected_response", c) or []
    c.raise_if_any()
    if messages[-1]["role"] != "assistant":
        c.add("the last message must be the preferred assistant answer ('rejected_response' is the other one)",
              f"message {len(messages)}", f"messages[{len(messages) - 1}].role")
        c.raise_if_any()
    return _finish_preference(messages[:-1], messages[-1:], rejected, c, tools,
                              names=("messages", "rejected_response"), prompt_param="messages",
                              offsets=(len(messages) - 1, 0))


def _from_chosen_rejected(row: dict, c: Collector) -> dict:
    """``prompt`` + ``chosen`` + ``rejected``; answers that repeat the conversation have it taken out as the prompt."""
    tools = _tools(row.get("tools"), c)
    prompt = _prompt(row, "prompt", c) if row.get("prompt") is not None else None
    chosen = _answers(row, "chosen", c)
    rejected = _answers(row, "rejected", c)
    c.raise_if_any()
    chosen, rejected = chosen or [], rejected or []
    # TRL's implicit prompt: both answers start with the same conversation, which is the prompt.
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k and chosen[k - 1]["role"] == "assistant":
        k -= 1
    shared = chosen[:k]
    if prompt is None:
        if not shared:
            c.add("'prompt' is missing", None, "prompt")
        prompt = shared
    elif shared and shared != prompt:
        # A prompt string restating the last user turn of the shared conversation (UltraFeedback does) is fine.
        same_text = len(prompt) == 1 and shared[-1]["role"] == "user" and shared[-1]["content"] == prompt[0]["content"]
        if not same_text:
            c.add("'prompt' differs from the conversation that 'chosen' and 'rejected' start with", None, "prompt")
        prompt = shared
    return _finish_preference(prompt, chosen[k:], rejected[k:], c, tools, names=("chosen", "rejected"),
                              prompt_param="prompt", offsets=(k, k))


_CONVERTERS = {
    "openai": _from_openai,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
    "query_response": _from_query_response,
    "text": _from_text,
    "instruct": _from_instruct,
    "dialog": _from_dialog,
    DPO: _from_dpo,
}
