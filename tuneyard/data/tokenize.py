"""Turn internal-form rows into ``input_ids`` + ``labels`` (-100 where no loss is taken).

Which characters of a rendered conversation belong to assistant message i is found without
``{% generation %}`` markers: it is the text between ``render(messages[:i], add_generation_prompt=True)``
and ``render(messages[:i + 1])`` (less trailing whitespace, which is turn glue, not the answer), located
in ``render(messages)``. That needs the template to be *prefix-stable*, which is checked for every row;
the characters are then mapped to tokens with the fast tokenizer's offsets (a token that overlaps the
span carries loss). The span includes the end-of-turn marker the template puts after the content, so the
model learns to stop.

When the template is not prefix-stable (it rewrites earlier turns, e.g. moves the system prompt into the
last user message or strips reasoning from past answers), or the tokenizer has no offsets, the row is
built from segments instead: the text is ``render(messages[:j + 1])`` for the last assistant message j
that is looked at, and the answer of j is what that render adds to ``render(messages[:j],
add_generation_prompt=True)``. An earlier answer is trained as the template shows it in that text (for
Qwen3, without its reasoning): its content is located by rendering the conversation once more with a
placeholder in place of that content, and its end-of-turn text is what follows the content when the
answer is rendered last. Every segment is tokenised separately and concatenated, so label boundaries
fall on token boundaries. An earlier answer that cannot be located this way (its content is rendered
away, or the template uses it in several places) is context, not a target, and is counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tuneyard.data.formats import is_preference_row
from tuneyard.data.templates import resolve_template

IGNORE_INDEX = -100
# Stands in for one message's content to see where the template puts it. Private-use characters: no
# real text or template holds them, so the first and last differences of the two renders bound it.
_PLACEHOLDER = "\ue000tuneyard\ue001"

# Token marks: outside every assistant span, in a span that is trained, in one that is not.
_OUTSIDE, _TRAINED, _EXCLUDED = 0, 1, 2


class EncodeError(ValueError):
    """A row the chat template cannot render."""


@dataclass
class EncodeStats:
    """Counts over the rows given to ``encode_conversation`` (kept rows, tokens, truncations, drops)."""

    examples: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_labels: int = 0
    # Rows built from segments because the template was not prefix-stable for them.
    segmented: int = 0
    # Assistant turns meant to be trained that a rewriting template left unrecognisable (context instead).
    unlocated_turns: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_too_long + self.dropped_no_labels


def _template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them: no ``weight``, tool-call arguments as objects."""
    out = []
    for m in messages:
        msg = {k: v for k, v in m.items() if k != "weight"}
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = dict(call.get("function", {}))
                if isinstance(fn.get("arguments"), str):
                    try:
                        parsed = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        parsed = None
                    if isinstance(parsed, dict):
                        fn["arguments"] = parsed
                calls.append({**call, "function": fn})
            msg["tool_calls"] = calls
        out.append(msg)
    return out


class _Renderer:
    def __init__(self, tokenizer: Any, template: str, tools: list[dict] | None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.tools = tools

    def __call__(self, messages: list[dict], generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tools=self.tools,
                                                      tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja2 TemplateError, UndefinedError, TypeError from template code
            raise EncodeError(f"chat template failed: {e}") from e


def _answer_start(render: _Renderer, messages: list[dict], i: int, upto: str) -> int | None:
    """Where message i's rendered text starts in ``upto`` (= render of messages[:i + 1]), or None."""
    if i == 0:
        # An empty conversation cannot be rendered: find the content in the one-message render.
        content = messages[0]["content"]
        pos = upto.find(content) if content else -1
        return pos if pos >= 0 else None
    prefix = render(messages[:i], True)
    return len(prefix) if upto.startswith(prefix) else None


def _span_end(text: str, start: int, end: int) -> int:
    # Trailing whitespace after the end-of-turn marker separates turns; it is not part of the answer.
    return max(start, len(text[start:end].rstrip()) + start)


def _prefix_stable_spans(render: _Renderer, messages: list[dict],
                         wanted: list[int]) -> tuple[str, list] | None:
    """The full render and (start, end, index) of each wanted assistant message; None if not prefix-stable."""
    full = render(messages)
    spans = []
    for i in wanted:
        upto = full if i == len(messages) - 1 else render(messages[: i + 1])
        if not full.startswith(upto):
            return None
        start = _answer_start(render, messages, i, upto)
        if start is None:
            return None
        spans.append((start, _span_end(upto, start, len(upto)), i))
    return full, spans


def _segmented_spans(render: _Renderer, messages: list[dict], wanted: list[int]) -> tuple[str, list, list[int]]:
    """The render up to the last wanted message, the spans found in it and the wanted messages not found."""
    last = wanted[-1]
    context = messages[: last + 1]
    text = render(context)
    start = _answer_start(render, messages, last, text)
    if start is None:
        # The generation prompt is not a prefix of the answer's render: the answer starts where they part.
        prefix = render(messages[:last], True) if last else ""
        start = next((k for k, (a, b) in enumerate(zip(prefix, text, strict=False)) if a != b),
                     min(len(prefix), len(text)))
    spans = []
    missed = []
    cursor = 0
    for i in wanted[:-1]:
        span = _earlier_span(render, context, i, text)
        if span is None or span[0] < cursor or span[1] > start:
            missed.append(i)
            continue
        spans.append((*span, i))
        cursor = span[1]
    spans.append((start, _span_end(text, start, len(text)), last))
    return text, spans, missed


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def _earlier_span(render: _Renderer, context: list[dict], i: int, text: str) -> tuple[int, int] | None:
    """Where assistant message i (not the last) is in ``text`` = render(context), as the template shows it there."""
    probe = [*context[:i], {**context[i], "content": _PLACEHOLDER}, *context[i + 1:]]
    other = render(probe)
    p = _common_prefix(text, other)
    s = _common_prefix(text[p:][::-1], other[p:][::-1])
    if other[p: len(other) - s] != _PLACEHOLDER:
        return None  # the template uses the content more than once, or not at all
    q = len(text) - s
    if p == q and not context[i].get("tool_calls"):
        return None  # rendered away entirely (e.g. an answer that was only reasoning)
    # What follows the content when this answer is the last one rendered: tool calls, the end-of-turn marker.
    own_probe = render(probe[: i + 1])
    at = own_probe.rfind(_PLACEHOLDER)
    if at < 0:
        return None
    tail = own_probe[at + len(_PLACEHOLDER):].rstrip()
    if not text.startswith(tail, q):
        return None
    end = q + len(tail)
    # The answer rendered last, when it stands verbatim here (e.g. with a prefix the model generates), wins.
    own = render(context[: i + 1])
    own_start = _answer_start(render, context, i, own)
    if own_start is not None:
        answer = own[own_start:_span_end(own, own_start, len(own))]
        if len(answer) >= end - p and text[end - len(answer):end] == answer:
            return end - len(answer), end
    return p, end


def _mark_tokens(offsets: list[tuple[int, int]], spans: list[tuple[int, int, int]]) -> list[int]:
    """Per token: the mark of the first span it overlaps (spans sorted, disjoint), else _OUTSIDE."""
    marks = [_OUTSIDE] * len(offsets)
    j = 0
    for t, (s, e) in enumerate(offsets):
        e = max(e, s + 1)  # zero-width tokens still sit at a position
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j < len(spans) and s < spans[j][1] and e > spans[j][0]:
            marks[t] = spans[j][2]
    return marks


def _tokenise_marked(tokenizer: Any, text: str, spans: list[tuple[int, int, int]],
                     use_offsets: bool) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and the mark of each token; ``spans`` are (start, end, mark)."""
    if use_offsets:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), _mark_tokens(enc["offset_mapping"], spans)
    ids: list[int] = []
    marks: list[int] = []
    pos = 0
    for start, end, mark in [*spans, (len(text), len(text), _OUTSIDE)]:
        for piece, m in ((text[pos:start], _OUTSIDE), (text[start:end], mark)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                marks += [m] * len(piece_ids)
        pos = end
    return ids, marks


def encode_text(tokenizer: Any, text: str) -> dict:
    """A plain text sample: its tokens (with the tokenizer's own special tokens) + EOS, every one trained."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return {"input_ids": ids, "labels": list(ids)}


def encode_conversation(tokenizer: Any, row: dict, *, template: str | None = None,
                        system_prompt: str | None = None, max_length: int = 2048,
                        truncation: str = "truncate", train_on_input: bool = False,
                        last_turn_only: bool = False, stats: EncodeStats | None = None) -> dict | None:
    """Tokenise one internal-form row into ``{"input_ids", "labels"}``; None when dropped (see ``stats``).

    ``template`` is a built-in name, a Jinja source, or None for the tokenizer's own (see templates.py).
    Loss is taken on assistant messages without ``weight: 0`` (only the last of them with
    ``last_turn_only``), or with ``train_on_input`` on every token except the other assistant messages.
    ``system_prompt`` is added as a first system message when the row has no system message.
    """
    stats = stats if stats is not None else EncodeStats()
    if is_preference_row(row):
        raise EncodeError("a preference (DPO) row cannot be tokenised for supervised fine-tuning")
    if "text" in row and "messages" not in row:
        enc = encode_text(tokenizer, row["text"])
    else:
        enc = _encode_messages(tokenizer, row, resolve_template(tokenizer, template), system_prompt,
                               train_on_input, last_turn_only, stats)
        if enc is None:
            stats.dropped_no_labels += 1
            return None
    if len(enc["input_ids"]) > max_length:
        if truncation == "drop":
            stats.dropped_too_long += 1
            return None
        enc = {"input_ids": enc["input_ids"][:max_length], "labels": enc["labels"][:max_length]}
        if all(label == IGNORE_INDEX for label in enc["labels"]):
            # Cutting left nothing to learn from: say so rather than train on an empty target.
            stats.dropped_too_long += 1
            return None
        stats.truncated += 1
    stats.examples += 1
    stats.tokens += len(enc["input_ids"])
    stats.trainable_tokens += sum(1 for label in enc["labels"] if label != IGNORE_INDEX)
    return enc


def _check_tool_calls(text: str, spans: list[tuple[int, int, int]], messages: list[dict], trained: set[int],
                      offset: int) -> None:
    """EncodeError when the template left out a trained answer's tool calls (it would train an empty answer)."""
    for start, end, i in spans:
        calls = messages[i].get("tool_calls") or []
        if i in trained and any(c["function"]["name"] not in text[start:end] for c in calls):
            raise EncodeError(f"the chat template does not show the tool calls of message {i + 1 - offset}; use a "
                              "template with tool support (e.g. 'chatml', 'qwen2.5' or 'llama3')")


def _encode_messages(tokenizer: Any, row: dict, template: str, system_prompt: str | None,
                     train_on_input: bool, last_turn_only: bool, stats: EncodeStats) -> dict | None:
    messages = list(row["messages"])
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = [i for i in assistants if messages[i].get("weight", 1) != 0]
    if last_turn_only:
        trained = trained[-1:]
    if not trained:
        return None
    trained_set = set(trained)
    # Spans of untrained answers matter only when everything else is trained.
    wanted = assistants if train_on_input else trained

    render = _Renderer(tokenizer, template, row.get("tools"))
    plain = _template_messages(messages)
    # Offsets come only from fast (Rust) tokenizers; slow ones are tokenised segment by segment.
    use_offsets = bool(getattr(tokenizer, "is_fast", False))
    found = _prefix_stable_spans(render, plain, wanted)
    if found is None:
        stats.segmented += 1
        text, raw_spans, missed = _segmented_spans(render, plain, wanted)
        use_offsets = False
        if train_on_input and any(i not in trained_set for i in missed):
            # An untrained answer that cannot be located must not be trained as input: assistant turns only.
            train_on_input = False
        if not train_on_input:
            stats.unlocated_turns += sum(1 for i in missed if i in trained_set)
    else:
        text, raw_spans = found
    _check_tool_calls(text, raw_spans, messages, trained_set, offset=len(messages) - len(row["messages"]))
    spans = sorted((s, e, _TRAINED if i in trained_set else _EXCLUDED) for s, e, i in raw_spans if e > s)
    ids, marks = _tokenise_marked(tokenizer, text, spans, use_offsets)
    if train_on_input:
        labels = [IGNORE_INDEX if m == _EXCLUDED else t for t, m in zip(ids, marks, strict=True)]
    else:
        labels = [t if m == _TRAINED else IGNORE_INDEX for t, m in zip(ids, marks, strict=True)]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}
