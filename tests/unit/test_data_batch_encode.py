"""The batched encoder gives exactly what the one-row path gives, and span-end marking equals per-token offsets."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from tuneyard.data.tokenize import (
    ConversationEncoder,
    EncodeError,
    EncodeStats,
    _mark_tokens,
    _span_marks,
    encode_conversation,
)

PIECES = ["hello", " world", "é", "日本語", "🙂", " ", "\n", "<|im_start|>", "<|im_end|>", "naïve", "ß", "x" * 7,
          "  ", "\t", "ümlaut", "Ωmega"]


def metaspace_tokenizer():
    """A small SentencePiece-style (Metaspace, BPE) fast tokenizer: offsets there skip the ▁ space marker."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"])
    rng = random.Random(1)
    tok.train_from_iterator([" ".join(rng.choices(PIECES, k=30)) for _ in range(300)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def random_case(rng: random.Random) -> tuple[str, list[tuple[int, int, int]]]:
    text = "".join(rng.choices(PIECES, k=rng.randint(3, 40)))
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 2 * rng.randint(1, 4))))
    spans = [(cuts[k], cuts[k + 1], rng.choice([1, 2])) for k in range(0, len(cuts) - 1, 2) if cuts[k + 1] > cuts[k]]
    return text, spans


@pytest.mark.parametrize("which", ["tiny", "metaspace"])
def test_span_marks_equal_per_token_offsets(which, tiny_tokenizer):
    tok = tiny_tokenizer if which == "tiny" else metaspace_tokenizer()
    rng = random.Random(7)
    compared = fallback = 0
    for _ in range(600):
        text, spans = random_case(rng)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        want = _mark_tokens(enc["offset_mapping"], spans)
        got = _span_marks(enc.encodings[0], len(enc["input_ids"]), spans)
        if got is None:  # a span end on a character no token covers: the caller uses the offsets
            fallback += 1
            continue
        compared += 1
        assert got.tolist() == want.tolist(), (text, spans)
    assert compared > 400


def rows() -> list[dict]:
    rng = random.Random(3)
    out = []
    for k in range(40):
        turns = [{"role": "system", "content": "Be brief."}] if k % 3 else []
        for t in range(rng.randint(1, 3)):
            turns.append({"role": "user", "content": " ".join(rng.choices(PIECES, k=rng.randint(1, 12)))})
            answer = {"role": "assistant", "content": " ".join(rng.choices(PIECES, k=rng.randint(1, 12)))}
            if t == 0 and k % 4 == 0:
                answer["weight"] = 0
            turns.append(answer)
        out.append({"messages": turns})
    out.append({"text": "plain text row ünïcode"})
    out.append({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]})
    out.append({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "assistant", "content": "Sunny."},
    ], "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]})
    return out


@pytest.mark.parametrize("options", [
    {"template": None}, {}, {"train_on_input": True}, {"last_turn_only": True},
    {"max_length": 24, "truncation": "truncate"}, {"max_length": 24, "truncation": "drop"},
    {"system_prompt": "Default system."}, {"template": "llama3"},
])
def test_batch_equals_one_row_at_a_time(options, tiny_tokenizer):
    options = {"template": "chatml", **options}  # the tiny tokenizer's own template has no tool support
    data = [r for r in rows() if options["template"] or "tools" not in r]
    one_stats, batch_stats = EncodeStats(), EncodeStats()
    want = [encode_conversation(tiny_tokenizer, r, stats=one_stats, **options) for r in data]
    got = ConversationEncoder(tiny_tokenizer, **options).encode(data, batch_stats)
    assert len(got) == len(want)
    for w, g in zip(want, got, strict=True):
        if w is None:
            assert g is None
            continue
        assert g.input_ids.dtype == np.int32 and g.labels.dtype == np.int32
        assert g.input_ids.tolist() == w["input_ids"] and g.labels.tolist() == w["labels"]
    assert dataclasses.asdict(one_stats) == dataclasses.asdict(batch_stats)
    assert batch_stats.examples == sum(1 for w in want if w is not None) > 0


def test_batch_error_names_the_row(tiny_tokenizer):
    preference = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
                  "rejected": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(EncodeError) as e:
        ConversationEncoder(tiny_tokenizer).encode([*rows()[:2], preference])
    assert e.value.index == 2 and "preference" in str(e.value)
    with pytest.raises(EncodeError) as e:
        ConversationEncoder(tiny_tokenizer, template="{{ raise_exception('no') }}").encode(rows()[1:2])
    assert e.value.index == 0 and "chat template failed" in str(e.value)
