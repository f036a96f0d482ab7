"""Exact loss masks: which tokens carry labels, for the tiny ChatML tokenizer and other built-in templates."""

from __future__ import annotations

import pytest

from tuneyard.data.templates import BUILTIN_TEMPLATES, DEFAULT_TEMPLATE, resolve_template, template_label
from tuneyard.data.tokenize import IGNORE_INDEX, EncodeStats, encode_conversation

SINGLE = {"messages": [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]}
MULTI = {"messages": [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan?"},
    {"role": "assistant", "content": "Tokyo.", "weight": 0},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]}


def labelled_runs(tok, enc: dict) -> list[str]:
    """The decoded text of each maximal run of labelled tokens."""
    runs, cur = [], []
    for t, label in zip(enc["input_ids"], enc["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == t
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chatml_labels_token_by_token(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_conversation(tok, SINGLE)
    prompt = ("<|im_start|>system\nYou answer in one word.<|im_end|>\n<|im_start|>user\n"
              "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    answer = "Paris.<|im_end|>"
    p, a, tail = ids(tok, prompt), ids(tok, answer), ids(tok, "\n")
    assert enc["input_ids"] == p + a + tail
    assert enc["labels"] == [IGNORE_INDEX] * len(p) + a + [IGNORE_INDEX] * len(tail)
    assert a[-1] == tok.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize(("template", "answer"), [
    (None, "Paris.<|im_end|>"), ("chatml", "Paris.<|im_end|>"), ("qwen2.5", "Paris.<|im_end|>"),
    ("llama3", "Paris.<|eot_id|>"), ("mistral", "Paris.<|im_end|>"), ("alpaca", "Paris.<|im_end|>"),
])
def test_labelled_tokens_are_answer_and_end_of_turn(tiny_tokenizer, template, answer):
    enc = encode_conversation(tiny_tokenizer, SINGLE, template=template)
    assert labelled_runs(tiny_tokenizer, enc) == [answer]
    # No BOS is added twice and the text is exactly the template's render.
    rendered = tiny_tokenizer.apply_chat_template(SINGLE["messages"], chat_template=resolve_template(
        tiny_tokenizer, template), tokenize=False)
    assert enc["input_ids"] == ids(tiny_tokenizer, rendered)


def test_llama3_labels_token_by_token(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_conversation(tok, SINGLE, template="llama3")
    prompt = ("<|start_header_id|>system<|end_header_id|>\n\nYou answer in one word.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    full = ids(tok, prompt + "Paris.<|eot_id|>")
    # The answer's tokens: what tokenising the whole adds after the prompt's tokens.
    n_prompt = len(ids(tok, prompt))
    assert full[:n_prompt] == ids(tok, prompt)
    assert enc["input_ids"] == full
    assert enc["labels"] == [IGNORE_INDEX] * n_prompt + full[n_prompt:]


def test_mistral_labels(tiny_tokenizer):
    enc = encode_conversation(tiny_tokenizer, SINGLE, template="mistral")
    assert tiny_tokenizer.decode(enc["input_ids"]) == (
        "[INST] You answer in one word.\n\nWhat is the capital of France? [/INST]Paris.<|im_end|>")
    assert labelled_runs(tiny_tokenizer, enc) == ["Paris.<|im_end|>"]


@pytest.mark.parametrize("template", [None, "llama3", "qwen2.5", "mistral", "alpaca"])
def test_weight_zero_is_not_trained(tiny_tokenizer, template):
    eot = "<|eot_id|>" if template == "llama3" else "<|im_end|>"
    enc = encode_conversation(tiny_tokenizer, MULTI, template=template)
    assert labelled_runs(tiny_tokenizer, enc) == ["Paris." + eot, "Rome." + eot]


def test_last_turn_only(tiny_tokenizer):
    enc = encode_conversation(tiny_tokenizer, MULTI, last_turn_only=True)
    assert labelled_runs(tiny_tokenizer, enc) == ["Rome.<|im_end|>"]


def test_train_on_input_trains_all_but_weight_zero(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_conversation(tok, MULTI, train_on_input=True)
    text = tok.decode(enc["input_ids"])
    before, after = text.split("Tokyo.<|im_end|>")
    assert labelled_runs(tok, enc) == [before, after]
    single = encode_conversation(tok, SINGLE, train_on_input=True)
    assert single["labels"] == single["input_ids"]


def test_system_prompt_only_when_the_row_has_none(tiny_tokenizer):
    tok = tiny_tokenizer
    no_system = {"messages": SINGLE["messages"][1:]}
    enc = encode_conversation(tok, no_system, system_prompt="Be terse.")
    assert tok.decode(enc["input_ids"]).startswith("<|im_start|>system\nBe terse.<|im_end|>\n"
                                                   "<|im_start|>user")
    enc = encode_conversation(tok, SINGLE, system_prompt="Be terse.")
    assert "Be terse." not in tok.decode(enc["input_ids"])
    assert labelled_runs(tok, enc) == ["Paris.<|im_end|>"]


def test_truncation_keeps_a_prefix_and_counts_it(tiny_tokenizer):
    tok = tiny_tokenizer
    full = encode_conversation(tok, MULTI)
    stats = EncodeStats()
    # Cut inside "Rome.<|im_end|>": the first answer still trains.
    cut = len(full["input_ids"]) - 3
    enc = encode_conversation(tok, MULTI, max_length=cut, stats=stats)
    assert enc == {"input_ids": full["input_ids"][:cut], "labels": full["labels"][:cut]}
    assert (stats.truncated, stats.dropped, stats.examples) == (1, 0, 1)
    assert stats.tokens == cut and stats.trainable_tokens == sum(x != IGNORE_INDEX for x in enc["labels"])


def test_truncation_that_leaves_no_label_drops_the_row(tiny_tokenizer):
    stats = EncodeStats()
    assert encode_conversation(tiny_tokenizer, SINGLE, max_length=8, stats=stats) is None
    assert (stats.truncated, stats.dropped_too_long, stats.examples) == (0, 1, 0)


def test_drop_policy(tiny_tokenizer):
    stats = EncodeStats()
    assert encode_conversation(tiny_tokenizer, MULTI, max_length=10, truncation="drop", stats=stats) is None
    assert encode_conversation(tiny_tokenizer, SINGLE, max_length=1000, truncation="drop", stats=stats)
    assert (stats.dropped_too_long, stats.examples, stats.truncated) == (1, 1, 0)


def test_no_trainable_turn_is_dropped(tiny_tokenizer):
    stats = EncodeStats()
    row = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "weight": 0}]}
    assert encode_conversation(tiny_tokenizer, row, stats=stats) is None
    assert stats.dropped_no_labels == 1


def test_text_rows_train_every_token_and_end_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_conversation(tok, {"text": "The capital of Peru is Lima."})
    assert enc["input_ids"] == ids(tok, "The capital of Peru is Lima.") + [tok.eos_token_id]
    assert enc["labels"] == enc["input_ids"]


def test_tool_calls_with_qwen(tiny_tokenizer):
    row = {"tools": [{"type": "function", "function": {"name": "capital", "parameters": {}}}], "messages": [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "capital", "arguments": '{"country": "FR"}'}}]},
        {"role": "tool", "content": "Paris"},
        {"role": "assistant", "content": "Paris."},
    ]}
    enc = encode_conversation(tiny_tokenizer, row, template="qwen2.5")
    assert labelled_runs(tiny_tokenizer, enc) == [
        '<tool_call>\n{"name": "capital", "arguments": {"country": "FR"}}\n</tool_call><|im_end|>',
        "Paris.<|im_end|>"]


# A template that is not prefix-stable: it marks the last user message, so earlier turns render differently.
SHIFTY = (
    "{% for m in messages %}{% if m.role == 'user' %}{{ '<|im_start|>user\\n' }}"
    "{% if loop.index0 >= messages|length - 2 %}{{ 'LAST ' }}{% endif %}{{ m.content + '<|im_end|>\\n' }}"
    "{% elif m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' + m.content + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_template_that_is_not_prefix_stable_falls_back_to_segments(tiny_tokenizer):
    tok = tiny_tokenizer
    stats = EncodeStats()
    enc = encode_conversation(tok, MULTI, template=SHIFTY, stats=stats)
    assert stats.segmented == 1
    assert labelled_runs(tok, enc) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    # The text is what the template renders for the last answer's turn.
    assert tok.decode(enc["input_ids"]).endswith("<|im_start|>user\nLAST And of Italy?<|im_end|>\n"
                                                 "<|im_start|>assistant\nRome.<|im_end|>\n")


class _SlowTokenizer:
    """The tiny tokenizer without offsets, as a slow (Python) tokenizer is."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kwargs):
        assert not kwargs.get("return_offsets_mapping")
        return self._tok(text, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        return self._tok.apply_chat_template(*args, **kwargs)


def test_tokenizer_without_offsets_tokenises_by_segment(tiny_tokenizer):
    fast = encode_conversation(tiny_tokenizer, MULTI)
    slow = encode_conversation(_SlowTokenizer(tiny_tokenizer), MULTI)
    assert slow == fast


def test_builtin_templates_are_prefix_stable(tiny_tokenizer):
    messages = [{k: v for k, v in m.items() if k != "weight"} for m in MULTI["messages"]]
    for name, source in BUILTIN_TEMPLATES.items():
        def render(msgs, gen=False, source=source):
            return tiny_tokenizer.apply_chat_template(msgs, chat_template=source, tokenize=False,
                                                      add_generation_prompt=gen)
        full = render(messages)
        for i in range(1, len(messages)):
            upto = render(messages[: i + 1])
            assert full.startswith(upto), name
            if messages[i]["role"] == "assistant":
                assert upto.startswith(render(messages[:i], True)), name


def test_resolve_template(tiny_tokenizer):
    assert resolve_template(tiny_tokenizer, None) == tiny_tokenizer.chat_template
    assert template_label(tiny_tokenizer, None) == "tokenizer"
    assert resolve_template(tiny_tokenizer, "Llama3") == BUILTIN_TEMPLATES["llama3"]
    assert resolve_template(tiny_tokenizer, "qwen") == BUILTIN_TEMPLATES["qwen2.5"]
    assert resolve_template(tiny_tokenizer, SHIFTY) == SHIFTY
    assert template_label(tiny_tokenizer, SHIFTY) == "custom"
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        resolve_template(tiny_tokenizer, "vicuna")

    class NoTemplate:
        chat_template = None

    assert resolve_template(NoTemplate(), None) == BUILTIN_TEMPLATES[DEFAULT_TEMPLATE]
    assert template_label(NoTemplate(), None) == DEFAULT_TEMPLATE
