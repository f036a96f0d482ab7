"""Turn internal-form rows into ``input_ids`` + ``labels`` (-100 where no loss is taken).

Which characters of a rendered conversation belong to assistant message i is found without
``{% generation %}`` markers: it is the text between ``render(messages[:i], add_generation_prompt=True)``
and ``render(messages[:i + 1])`` (less trailing whitespace, which is turn glue, not the answer), located
in ``render(messages)``. That needs the template to be *prefix-stable*, which is checked for every row;
the characters are then mapped to tokens with the fast tokenizer's offsets (a token that overlaps the
span carries loss). The span includes the end-of-turn marker the template puts after the content, so the
model learns to stop.

``ConversationEncoder`` does this a batch of rows at a time: renders go through transformers' template
renderer in two batched calls per row, the tokenizer runs once per batch, and only the tokens at each
span's ends are looked up (``char_to_token``), with the per-token offsets as the fallback.

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
from typing import Any, NamedTuple

import numpy as np

from tuneyard import jsontext
from tuneyard.data.formats import is_preference_row
from tuneyard.data.templates import resolve_template

IGNORE_INDEX = -100
# Stands in for one message's content to see where the template puts it. Private-use characters: no
# real text or template holds them, so the first and last differences of the two renders bound it.
_PLACEHOLDER = "\ue000tuneyard\ue001"

# Token marks: outside every assistant span, in a span that is trained, in one that is not.
_OUTSIDE, _TRAINED, _EXCLUDED = 0, 1, 2


class EncodeError(ValueError):
    """A row the chat template cannot render; ``index`` is its position in the batch given to the encoder."""

    index: int | None = None


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
                        parsed = jsontext.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        parsed = None
                    if isinstance(parsed, dict):
                        fn["arguments"] = parsed
                calls.append({**call, "function": fn})
            msg["tool_calls"] = calls
        out.append(msg)
    return out


try:  # the renderer behind apply_chat_template, without its per-call overhead; absent in older releases
    from transformers.utils.chat_template_utils import render_jinja_template as _render_jinja
except ImportError:  # pragma: no cover
    _render_jinja = None


class _Renderer:
    """Renders conversations with one template, as ``apply_chat_template(tokenize=False)`` does, many at a time."""

    def __init__(self, tokenizer: Any, template: str, tools: list[dict] | None,
                 special_tokens: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.tools = tools
        self.special_tokens = special_tokens if special_tokens is not None else dict(tokenizer.special_tokens_map)

    def __call__(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.many([messages], generation_prompt)[0]

    def many(self, conversations: list[list[dict]], generation_prompt: bool = False) -> list[str]:
        """The renders of ``conversations``; EncodeError when the template fails on one."""
        if not conversations:
            return []
        try:
            if _render_jinja is None:
                return [self.tokenizer.apply_chat_template(c, chat_template=self.template, tools=self.tools,
                                                           tokenize=False, add_generation_prompt=generation_prompt)
                        for c in conversations]
            # apply_chat_template drops None-valued keys before rendering; the rest is this call.
            plain = [[{k: v for k, v in m.items() if v is not None} for m in c] for c in conversations]
            rendered, _ = _render_jinja(conversations=plain, tools=self.tools, chat_template=self.template,
                                        add_generation_prompt=generation_prompt, **self.special_tokens)
            return rendered
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
    last = len(messages) - 1
    # Every render the check needs, in two batched calls: the full text and each answer with and without it.
    with_answer = render.many([messages] + [messages[: i + 1] for i in wanted if i != last])
    prompts = dict(zip([i for i in wanted if i > 0], render.many([messages[:i] for i in wanted if i > 0], True),
                       strict=True))
    full, uptos = with_answer[0], iter(with_answer[1:])
    spans = []
    for i in wanted:
        upto = full if i == last else next(uptos)
        if not full.startswith(upto):
            return None
        if i == 0:
            start = _answer_start(render, messages, 0, upto)
        else:
            start = len(prompts[i]) if upto.startswith(prompts[i]) else None
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


def _mark_tokens(offsets: list[tuple[int, int]], spans: list[tuple[int, int, int]]) -> np.ndarray:
    """Per token: the mark of the first span it overlaps (spans sorted, disjoint), else _OUTSIDE."""
    marks = np.zeros(len(offsets), dtype=np.int8)
    j = 0
    for t, (s, e) in enumerate(offsets):
        e = max(e, s + 1)  # zero-width tokens still sit at a position
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j < len(spans) and s < spans[j][1] and e > spans[j][0]:
            marks[t] = spans[j][2]
    return marks


def _token_end(encoding: Any, t: int) -> int:
    start, end = encoding.token_to_chars(t)  # None (a TypeError here) for a token outside the text
    return max(end, start + 1)  # zero-width tokens still sit at a position


def _span_marks(encoding: Any, n: int, spans: list[tuple[int, int, int]]) -> np.ndarray | None:
    """``_mark_tokens`` from the few tokens at each span's ends instead of every token's offsets (which cost
    a Python tuple per token); None when a span end falls on a character no token covers."""
    try:
        return _span_marks_or_fail(encoding, n, spans)
    except TypeError:
        return None


def _span_marks_or_fail(encoding: Any, n: int, spans: list[tuple[int, int, int]]) -> np.ndarray | None:
    marks = np.zeros(n, dtype=np.int8)
    done = 0  # tokens below this already belong to an earlier span (or to none)
    for a, b, mark in spans:
        first, last = encoding.char_to_token(a), encoding.char_to_token(b - 1)
        if first is None or last is None:
            return None
        # Several tokens can share a character (byte-level pieces of one code point): take them all.
        while first > 0 and _token_end(encoding, first - 1) > a:
            first -= 1
        while last + 1 < n and encoding.token_to_chars(last + 1)[0] < b:
            last += 1
        first = max(first, done)
        if last >= first:
            marks[first:last + 1] = mark
        done = max(done, last + 1)
    return marks


def _tokenise_pieces(tokenizer: Any, text: str, spans: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and marks of ``text`` tokenised piece by piece, so that span ends fall on token boundaries."""
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
    return np.asarray(ids, dtype=np.int32), np.asarray(marks, dtype=np.int8)


def _labels(ids: np.ndarray, marks: np.ndarray, train_on_input: bool) -> np.ndarray:
    if train_on_input:
        return np.where(marks == _EXCLUDED, IGNORE_INDEX, ids).astype(np.int32)
    return np.where(marks == _TRAINED, ids, IGNORE_INDEX).astype(np.int32)


def encode_text(tokenizer: Any, text: str) -> dict:
    """A plain text sample: its tokens (with the tokenizer's own special tokens) + EOS, every one trained."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return {"input_ids": ids, "labels": list(ids)}


class Encoded(NamedTuple):
    """One tokenised example: int32 ``input_ids`` and ``labels`` (IGNORE_INDEX where no loss is taken)."""

    input_ids: np.ndarray
    labels: np.ndarray


@dataclass
class _Plan:
    """A messages row rendered and located, waiting for the batched tokenizer call."""

    text: str
    spans: list[tuple[int, int, int]]
    train_on_input: bool


class ConversationEncoder:
    """Tokenises internal-form rows into masked examples, a batch at a time (see the module docstring).

    Rendering and span finding are per row; the tokenizer runs once per batch (in Rust, on every core)
    and the masks come from the tokens at span ends, so the per-token work is numpy's.
    """

    def __init__(self, tokenizer: Any, *, template: str | None = None, system_prompt: str | None = None,
                 max_length: int = 2048, truncation: str = "truncate", train_on_input: bool = False,
                 last_turn_only: bool = False, text_only: bool = True) -> None:
        self.tokenizer = tokenizer
        # False: content parts (images) are the caller's to handle (tuneyard.data.vision).
        self.text_only = text_only
        self.template_name = template
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.truncation = truncation
        self.train_on_input = train_on_input
        self.last_turn_only = last_turn_only
        # Offsets come only from fast (Rust) tokenizers; slow ones are tokenised segment by segment.
        self.fast = bool(getattr(tokenizer, "is_fast", False))
        self._template: str | None = None
        self._special_tokens = dict(tokenizer.special_tokens_map)

    @property
    def template(self) -> str:
        """The Jinja source in use, resolved on first need (a text-only dataset never needs one)."""
        if self._template is None:
            self._template = resolve_template(self.tokenizer, self.template_name)
        return self._template

    def encode(self, rows: list[dict], stats: EncodeStats | None = None) -> list[Encoded | None]:
        """The examples of ``rows`` (None where dropped; see ``stats``); EncodeError (with ``index``) on a bad row."""
        stats = stats if stats is not None else EncodeStats()
        built: list[Encoded | _Plan | None] = []
        for j, row in enumerate(rows):
            try:
                built.append(self._build(row, stats))
            except EncodeError as e:
                e.index = j
                raise
        plans = [(j, b) for j, b in enumerate(built) if isinstance(b, _Plan)]
        if plans:
            batch = self.tokenizer([p.text for _, p in plans], add_special_tokens=False, return_attention_mask=False)
            encodings = batch.encodings or [None] * len(plans)
            for k, (j, plan) in enumerate(plans):
                ids = np.asarray(batch["input_ids"][k], dtype=np.int32)
                enc = encodings[k]
                marks = _span_marks(enc, len(ids), plan.spans) if enc is not None else None
                if marks is None:
                    offsets = enc.offsets if enc is not None else self.tokenizer(
                        plan.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
                    marks = _mark_tokens(offsets, plan.spans)
                built[j] = Encoded(ids, _labels(ids, marks, plan.train_on_input))
        return [self._finish(b, stats) if isinstance(b, Encoded) else None for b in built]

    def _build(self, row: dict, stats: EncodeStats) -> Encoded | _Plan | None:
        if is_preference_row(row):
            raise EncodeError("a preference (DPO) row cannot be tokenised for supervised fine-tuning")
        if "text" in row and "messages" not in row:
            ids = np.asarray(encode_text(self.tokenizer, row["text"])["input_ids"], dtype=np.int32)
            return Encoded(ids, ids.copy())
        built = self._plan_messages(row, stats)
        if built is None:
            stats.dropped_no_labels += 1
        return built

    def _plan_messages(self, row: dict, stats: EncodeStats) -> Encoded | _Plan | None:
        messages = list(row["messages"])
        if self.text_only and any(isinstance(m.get("content"), list) for m in messages):
            raise EncodeError("this row has image content, but the model is a text-only model that takes no images "
                              "(use a vision-language model)")
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        trained = [i for i in assistants if messages[i].get("weight", 1) != 0]
        if self.last_turn_only:
            trained = trained[-1:]
        if not trained:
            return None
        trained_set = set(trained)
        train_on_input = self.train_on_input
        # Spans of untrained answers matter only when everything else is trained.
        wanted = assistants if train_on_input else trained

        render = _Renderer(self.tokenizer, self.template, row.get("tools"), self._special_tokens)
        plain = _template_messages(messages)
        found = _prefix_stable_spans(render, plain, wanted)
        if found is None:
            stats.segmented += 1
            text, raw_spans, missed = _segmented_spans(render, plain, wanted)
            if train_on_input and any(i not in trained_set for i in missed):
                # An untrained answer that cannot be located must not be trained as input: assistant turns only.
                train_on_input = False
            if not train_on_input:
                stats.unlocated_turns += sum(1 for i in missed if i in trained_set)
        else:
            text, raw_spans = found
        _check_tool_calls(text, raw_spans, messages, trained_set, offset=len(messages) - len(row["messages"]))
        spans = sorted((s, e, _TRAINED if i in trained_set else _EXCLUDED) for s, e, i in raw_spans if e > s)
        if found is not None and self.fast:
            return _Plan(text, spans, train_on_input)
        ids, marks = _tokenise_pieces(self.tokenizer, text, spans)
        return Encoded(ids, _labels(ids, marks, train_on_input))

    def _finish(self, enc: Encoded, stats: EncodeStats) -> Encoded | None:
        """Apply the length policy and count the example."""
        if not (enc.labels != IGNORE_INDEX).any():
            stats.dropped_no_labels += 1
            return None
        if len(enc.input_ids) > self.max_length:
            if self.truncation == "drop":
                stats.dropped_too_long += 1
                return None
            enc = Encoded(enc.input_ids[: self.max_length], enc.labels[: self.max_length])
            if not (enc.labels != IGNORE_INDEX).any():
                # Cutting left nothing to learn from: say so rather than train on an empty target.
                stats.dropped_too_long += 1
                return None
            stats.truncated += 1
        stats.examples += 1
        stats.tokens += len(enc.input_ids)
        stats.trainable_tokens += int(np.count_nonzero(enc.labels != IGNORE_INDEX))
        return enc


def encode_conversation(tokenizer: Any, row: dict, *, template: str | None = None,
                        system_prompt: str | None = None, max_length: int = 2048,
                        truncation: str = "truncate", train_on_input: bool = False,
                        last_turn_only: bool = False, stats: EncodeStats | None = None) -> dict | None:
    """Tokenise one internal-form row into ``{"input_ids", "labels"}`` (lists); None when dropped (see ``stats``).

    ``template`` is a built-in name, a Jinja source, or None for the tokenizer's own (see templates.py).
    Loss is taken on assistant messages without ``weight: 0`` (only the last of them with
    ``last_turn_only``), or with ``train_on_input`` on every token except the other assistant messages.
    ``system_prompt`` is added as a first system message when the row has no system message.
    For many rows, ``ConversationEncoder.encode`` does the same a batch at a time.
    """
    encoder = ConversationEncoder(tokenizer, template=template, system_prompt=system_prompt, max_length=max_length,
                                  truncation=truncation, train_on_input=train_on_input,
                                  last_turn_only=last_turn_only)
    enc = encoder.encode([row], stats)[0]
    return None if enc is None else {"input_ids": enc.input_ids.tolist(), "labels": enc.labels.tolist()}


def _check_tool_calls(text: str, spans: list[tuple[int, int, int]], messages: list[dict], trained: set[int],
                      offset: int) -> None:
    """EncodeError when the template left out a trained answer's tool calls (it would train an empty answer)."""
    for start, end, i in spans:
        calls = messages[i].get("tool_calls") or []
        if i in trained and any(c["function"]["name"] not in text[start:end] for c in calls):
            raise EncodeError(f"the chat template does not show the tool calls of message {i + 1 - offset}; use a "
                              "template with tool support (e.g. 'chatml', 'qwen2.5' or 'llama3')")
