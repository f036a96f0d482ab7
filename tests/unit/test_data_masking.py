"""Loss masks token by token, for every built-in template, the tokenizer's own and a rewriting (Qwen3) one.

Each template's expected text is written out here as segments, the trained ones marked; the expected
``input_ids`` are the tokens of that text and the expected ``labels`` are exactly the tokens of the
trained segments at their positions (-100 everywhere else). Special tokens of each template are real
special tokens of the tokenizer used with it, so every segment boundary is a token boundary.
"""

from __future__ import annotations

import pytest

from tests.unit.test_data_tokenize import labelled_runs
from tuneyard.data.templates import resolve_template
from tuneyard.data.tokenize import IGNORE_INDEX, EncodeError, EncodeStats, encode_conversation

SYSTEM = "You answer in one word."
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.")

# Qwen3's published template (its no-tools part): an answer before the last user question loses its
# <think> block; the answers after it keep theirs (an empty one for the last answer that has none). It
# rewrites earlier turns, so it is not prefix-stable, and it has no {% generation %} markers.
QWEN3 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message.content %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' "
    "+ content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# template (None: the tokenizer's own) -> the key of the tokenizer it is used with
TEMPLATES = {"own": None, "chatml": "chatml", "qwen2.5": "qwen2.5", "llama3": "llama3", "mistral": "mistral",
             "alpaca": "alpaca", "qwen3": QWEN3}
EXTRA_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>",
                 "[INST]", "[/INST]", "<think>", "</think>"]


@pytest.fixture(scope="module")
def toks(tiny_model_dir) -> dict:
    """A tokenizer per template: the tiny ChatML one, with that template's BOS/EOS and markers as specials."""
    from transformers import AutoTokenizer

    def make(**special: str):
        tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
        tok.add_special_tokens({"additional_special_tokens": EXTRA_SPECIAL, **special})
        return tok

    chatml = make()
    return {"own": chatml, "chatml": chatml, "qwen2.5": chatml, "qwen3": chatml,
            "llama3": make(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
            "mistral": make(bos_token="<s>", eos_token="</s>"), "alpaca": make(eos_token="</s>")}


def msgs(*pairs: tuple[str, str], weights: dict[int, int] | None = None) -> list[dict]:
    """Messages from (role, content) pairs; ``weights`` maps a message index to its weight."""
    out = [{"role": r, "content": c} for r, c in pairs]
    for i, w in (weights or {}).items():
        out[i]["weight"] = w
    return out


MULTI = msgs(("system", SYSTEM), ("user", "Capital of France?"), ("assistant", "Paris."),
             ("user", "And of Japan?"), ("assistant", "Tokyo."), ("user", "And of Italy?"), ("assistant", "Rome."))
NO_SYSTEM = MULTI[1:]
WEIGHT0 = msgs(*((m["role"], m["content"]) for m in MULTI), weights={4: 0})


# ---------------------------------------------------------------------------------------------------------
# The expected renders: (text, mark) segments; mark "T" trained, "X" an answer not trained, "" the prompt.


def expected_segments(name: str, messages: list[dict], *, trained: set[int]) -> list[tuple[str, str]]:
    """What template ``name`` renders for ``messages``, in segments marking the answers in ``trained``."""
    segs: list[tuple[str, str]] = []
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]

    def answer(i: int) -> str:
        return "T" if i in trained else "X"

    if name == "llama3":
        segs.append(("<|begin_of_text|>", ""))
    if name == "mistral":
        segs.append(("<s>", ""))
    if name == "qwen2.5" and system is None:
        segs.append((f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n", ""))
    if name == "alpaca":
        segs.append((system if system is not None else ALPACA_SYSTEM, ""))
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if name in ("own", "chatml", "qwen2.5", "qwen3"):
            if role != "assistant":
                segs.append((f"<|im_start|>{role}\n{content}<|im_end|>\n", ""))
                continue
            segs.append(("<|im_start|>assistant\n", ""))
            if name == "qwen3":
                reasoning, _, content = content.rpartition("</think>")
                reasoning = reasoning.split("<think>")[-1].strip("\n")
                content = content.lstrip("\n")
                if i > users[-1] and (i == len(messages) - 1 or reasoning):
                    content = f"<think>\n{reasoning}\n</think>\n\n{content}"
            segs += [(f"{content}<|im_end|>", answer(i)), ("\n", "")]
        elif name == "llama3":
            if role != "assistant":
                segs.append((f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>", ""))
                continue
            segs += [("<|start_header_id|>assistant<|end_header_id|>\n\n", ""), (f"{content}<|eot_id|>", answer(i))]
        elif name == "mistral":
            if role == "user":
                head = f"{system}\n\n" if system is not None and i == 1 else ""
                segs.append((f"[INST] {head}{content} [/INST]", ""))
            elif role == "assistant":
                segs.append((f"{content}</s>", answer(i)))
        elif name == "alpaca":
            if role == "user":
                segs.append((f"\n\n### Instruction:\n{content}", ""))
            elif role == "assistant":
                segs += [("\n\n### Response:\n", ""), (f"{content}</s>", answer(i))]
    return segs


def expected_encoding(tok, segs: list[tuple[str, str]], *, train_on_input: bool = False) -> dict:
    """input_ids of the joined text and labels set exactly on the tokens of the trained segments."""
    text = "".join(s for s, _ in segs)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    labels = []
    pos = 0
    for seg, mark in segs:
        seg_ids = tok(seg, add_special_tokens=False)["input_ids"]
        # Segment boundaries are token boundaries: the segments' tokens are the text's tokens.
        assert ids[pos:pos + len(seg_ids)] == seg_ids, (seg, text)
        pos += len(seg_ids)
        trained = mark == "T" or (train_on_input and mark != "X")
        labels += seg_ids if trained else [IGNORE_INDEX] * len(seg_ids)
    assert pos == len(ids)
    return {"input_ids": ids, "labels": labels}


def assistants(messages: list[dict]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def eot(name: str) -> str:
    return {"llama3": "<|eot_id|>", "mistral": "</s>", "alpaca": "</s>"}.get(name, "<|im_end|>")


def trained_text(name: str, content: str, *, last: bool = False) -> str:
    """The labelled text of an answer: its content and end-of-turn (Qwen3 adds a think block to the last)."""
    think = "<think>\n\n</think>\n\n" if name == "qwen3" and last else ""
    return f"{think}{content}{eot(name)}"


# ---------------------------------------------------------------------------------------------------------
# Every template


@pytest.mark.parametrize("name", TEMPLATES)
def test_all_assistant_turns_are_labelled_token_by_token(toks, name):
    tok = toks[name]
    enc = encode_conversation(tok, {"messages": MULTI}, template=TEMPLATES[name])
    assert enc == expected_encoding(tok, expected_segments(name, MULTI, trained=set(assistants(MULTI))))
    assert labelled_runs(tok, enc) == [trained_text(name, "Paris."), trained_text(name, "Tokyo."),
                                       trained_text(name, "Rome.", last=True)]
    # The text is exactly the template's render: no BOS added twice, nothing dropped.
    rendered = tok.apply_chat_template(MULTI, chat_template=resolve_template(tok, TEMPLATES[name]), tokenize=False)
    assert enc["input_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_weight_zero_turn_is_not_trained(toks, name):
    tok = toks[name]
    enc = encode_conversation(tok, {"messages": WEIGHT0}, template=TEMPLATES[name])
    assert enc == expected_encoding(tok, expected_segments(name, MULTI, trained={2, 6}))
    assert labelled_runs(tok, enc) == [trained_text(name, "Paris."), trained_text(name, "Rome.", last=True)]


@pytest.mark.parametrize("name", TEMPLATES)
def test_train_on_input_trains_everything_but_weight_zero_answers(toks, name):
    tok = toks[name]
    enc = encode_conversation(tok, {"messages": WEIGHT0}, template=TEMPLATES[name], train_on_input=True)
    assert enc == expected_encoding(tok, expected_segments(name, MULTI, trained={2, 6}), train_on_input=True)
    everything = encode_conversation(tok, {"messages": MULTI}, template=TEMPLATES[name], train_on_input=True)
    assert everything["labels"] == everything["input_ids"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_last_turn_only(toks, name):
    tok = toks[name]
    enc = encode_conversation(tok, {"messages": MULTI}, template=TEMPLATES[name], last_turn_only=True)
    assert enc == expected_encoding(tok, expected_segments(name, MULTI, trained={6}))
    assert labelled_runs(tok, enc) == [trained_text(name, "Rome.", last=True)]
    # The last trained turn: a weight-0 last answer leaves the one before it (the text ends there).
    last_off = msgs(*((m["role"], m["content"]) for m in MULTI), weights={6: 0})
    enc = encode_conversation(tok, {"messages": last_off}, template=TEMPLATES[name], last_turn_only=True)
    assert labelled_runs(tok, enc) == [trained_text(name, "Tokyo.", last=True)]


@pytest.mark.parametrize("name", TEMPLATES)
def test_default_system_prompt_and_the_rows_own(toks, name):
    tok = toks[name]
    with_default = [{"role": "system", "content": "Be terse."}, *NO_SYSTEM]
    enc = encode_conversation(tok, {"messages": NO_SYSTEM}, template=TEMPLATES[name], system_prompt="Be terse.")
    assert enc == expected_encoding(tok, expected_segments(name, with_default, trained={2, 4, 6}))
    # The row's own system message wins over the default.
    enc = encode_conversation(tok, {"messages": MULTI}, template=TEMPLATES[name], system_prompt="Be terse.")
    assert enc == expected_encoding(tok, expected_segments(name, MULTI, trained={2, 4, 6}))
    assert "Be terse." not in tok.decode(enc["input_ids"])
    # Without either, the template's own default (Qwen's, Alpaca's preamble) or none.
    enc = encode_conversation(tok, {"messages": NO_SYSTEM}, template=TEMPLATES[name])
    assert enc == expected_encoding(tok, expected_segments(name, NO_SYSTEM, trained={1, 3, 5}))


@pytest.mark.parametrize("name", TEMPLATES)
def test_truncation_keeps_a_prefix_and_never_silently_drops_the_answer(toks, name):
    tok = toks[name]
    row = {"messages": MULTI}
    full = encode_conversation(tok, row, template=TEMPLATES[name])
    labels = full["labels"]
    starts = [i for i, label in enumerate(labels) if label != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX]
    first_answer, last_answer = starts[0], starts[-1]
    assert len(starts) == 3

    # Cut inside the last answer (after its first token): the earlier answers still train, the cut is counted.
    stats = EncodeStats()
    cut = last_answer + 1
    enc = encode_conversation(tok, row, template=TEMPLATES[name], max_length=cut, stats=stats)
    assert enc == {"input_ids": full["input_ids"][:cut], "labels": full["labels"][:cut]}
    assert (stats.truncated, stats.dropped_too_long, stats.examples) == (1, 0, 1)

    # Cut before the first answer: nothing left to learn, so the row is dropped and counted, not kept empty.
    stats = EncodeStats()
    assert encode_conversation(tok, row, template=TEMPLATES[name], max_length=first_answer, stats=stats) is None
    assert (stats.truncated, stats.dropped_too_long, stats.examples) == (0, 1, 0)

    # The drop policy drops any row longer than max_length, and counts it; a row that fits is kept whole.
    stats = EncodeStats()
    too_short = len(full["input_ids"]) - 1
    assert encode_conversation(tok, row, template=TEMPLATES[name], max_length=too_short, truncation="drop",
                               stats=stats) is None
    assert encode_conversation(tok, row, template=TEMPLATES[name], max_length=len(full["input_ids"]),
                               truncation="drop", stats=stats) == full
    assert (stats.dropped_too_long, stats.truncated, stats.examples) == (1, 0, 1)


# ---------------------------------------------------------------------------------------------------------
# A template that rewrites earlier turns (Qwen3) and tool calls


THINKING = msgs(("system", SYSTEM), ("user", "Capital of France?"),
                ("assistant", "<think>\nEasy one.\n</think>\n\nParis."),
                ("user", "And of Japan?"), ("assistant", "Tokyo."),
                ("user", "And of Italy?"), ("assistant", "<think>\nAlso easy.\n</think>\n\nRome."))


def test_qwen3_trains_earlier_answers_as_shown_and_the_last_with_its_reasoning(toks):
    tok = toks["qwen3"]
    stats = EncodeStats()
    enc = encode_conversation(tok, {"messages": THINKING}, template=QWEN3, stats=stats)
    assert stats.segmented == 1 and stats.unlocated_turns == 0
    assert enc == expected_encoding(tok, expected_segments("qwen3", THINKING, trained={2, 4, 6}))
    # Earlier answers without their reasoning (as the template shows them in context); the last one with it.
    assert labelled_runs(tok, enc) == ["Paris.<|im_end|>", "Tokyo.<|im_end|>",
                                       "<think>\nAlso easy.\n</think>\n\nRome.<|im_end|>"]
    # The last answer without reasoning gets the empty think block the model generates.
    enc = encode_conversation(tok, {"messages": MULTI}, template=QWEN3, last_turn_only=True)
    assert labelled_runs(tok, enc) == ["<think>\n\n</think>\n\nRome.<|im_end|>"]


def test_qwen3_weight_zero_and_train_on_input(toks):
    tok = toks["qwen3"]
    row = {"messages": msgs(*((m["role"], m["content"]) for m in THINKING), weights={2: 0})}
    enc = encode_conversation(tok, row, template=QWEN3)
    assert enc == expected_encoding(tok, expected_segments("qwen3", THINKING, trained={4, 6}))
    enc = encode_conversation(tok, row, template=QWEN3, train_on_input=True)
    assert enc == expected_encoding(tok, expected_segments("qwen3", THINKING, trained={4, 6}), train_on_input=True)


def test_an_answer_a_template_renders_away_is_context_and_counted(toks):
    tok = toks["qwen3"]
    row = {"messages": msgs(("user", "Capital of France?"), ("assistant", "<think>\nOnly thinking.\n</think>"),
                            ("user", "And of Italy?"), ("assistant", "Rome."))}
    stats = EncodeStats()
    enc = encode_conversation(tok, row, template=QWEN3, stats=stats)
    assert labelled_runs(tok, enc) == ["<think>\n\n</think>\n\nRome.<|im_end|>"]
    assert stats.unlocated_turns == 1


TOOL_ROW = {"tools": [{"type": "function", "function": {"name": "capital", "parameters": {"type": "object"}}}],
            "messages": [
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "capital", "arguments": '{"country": "FR"}'}}]},
                {"role": "tool", "content": "Paris"},
                {"role": "assistant", "content": "Paris."}]}


@pytest.mark.parametrize(("name", "call"), [
    ("chatml", '<tool_call>\n{"name": "capital", "arguments": {"country": "FR"}}\n</tool_call><|im_end|>'),
    ("qwen2.5", '<tool_call>\n{"name": "capital", "arguments": {"country": "FR"}}\n</tool_call><|im_end|>'),
    ("llama3", '{"name": "capital", "parameters": {"country": "FR"}}<|eot_id|>'),
])
def test_tool_calls_are_trained_and_results_are_not(toks, name, call):
    tok = toks[name]
    enc = encode_conversation(tok, TOOL_ROW, template=name)
    assert labelled_runs(tok, enc) == [call, trained_text(name, "Paris.")]
    text = tok.decode(enc["input_ids"])
    assert '"name": "capital"' in text.split(call)[0]  # the tool list is in the prompt, untrained


@pytest.mark.parametrize("name", ["mistral", "alpaca"])
def test_templates_without_tools_refuse_tool_calls(toks, name):
    with pytest.raises(EncodeError, match="chat template failed"):
        encode_conversation(toks[name], TOOL_ROW, template=name)


def test_preference_rows_are_not_tokenised_for_sft(toks):
    pair = {"prompt": NO_SYSTEM[:1], "chosen": NO_SYSTEM[1:2], "rejected": [{"role": "assistant", "content": "?"}]}
    with pytest.raises(EncodeError, match="preference"):
        encode_conversation(toks["chatml"], pair)


def test_a_template_that_drops_tool_calls_is_refused(toks):
    """The tiny tokenizer's own template renders only content: a call-only answer would train as empty."""
    with pytest.raises(EncodeError, match="the chat template does not show the tool calls of message 2"):
        encode_conversation(toks["own"], TOOL_ROW)
    # Untrained (weight 0), the call is context and the row is fine.
    row = {**TOOL_ROW, "messages": [dict(m) for m in TOOL_ROW["messages"]]}
    row["messages"][1]["weight"] = 0
    assert labelled_runs(toks["own"], encode_conversation(toks["own"], row)) == ["Paris.<|im_end|>"]


def test_template_names(toks):
    from tuneyard.data.templates import BUILTIN_TEMPLATES, template_label, template_problem

    tok = toks["own"]
    for own in (None, "", "default", "Auto", "tokenizer"):
        assert template_problem(own) is None
        assert resolve_template(tok, own) == tok.chat_template
        assert template_label(tok, own) == "tokenizer"
    for name, key in [("ChatML", "chatml"), ("llama-3.1", "llama3"), ("qwen2_5", "qwen2.5"), ("Mistral", "mistral"),
                      ("alpaca", "alpaca")]:
        assert template_problem(name) is None and resolve_template(tok, name) == BUILTIN_TEMPLATES[key]
    assert template_problem(QWEN3) is None and resolve_template(tok, QWEN3) == QWEN3
    assert template_problem("vicuna").startswith("unknown chat template 'vicuna': give a built-in name (chatml, ")
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        resolve_template(tok, "vicuna")


def test_templates_module_needs_no_torch():
    """A submit can check a template name in the API process, which never imports torch."""
    import subprocess
    import sys

    code = ("import sys, tuneyard.data.templates; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# Qwen3's template as published reads an answer's reasoning from reasoning_content first.
QWEN3_REASONING = QWEN3.replace(
    "{%- set reasoning_content = '' %}",
    "{%- set reasoning_content = message.reasoning_content if message.reasoning_content is string else '' %}")


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning", "thinking"])
def test_reasoning_is_kept_and_trained_where_the_template_shows_it(key, tiny_tokenizer):
    from tests.unit.test_data_tokenize import labelled_runs
    from tuneyard.data.formats import convert_row

    raw = {"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4.", key: "Add two and two."},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6.", key: "Add three and three."},
    ]}
    row = convert_row(raw, "auto")
    assert [m.get("reasoning_content") for m in row["messages"]] == [None, "Add two and two.", None,
                                                                      "Add three and three."]
    enc = encode_conversation(tiny_tokenizer, row, template=QWEN3_REASONING, max_length=512)
    # The last answer is trained with its reasoning; the earlier one as the template shows it there: without.
    assert labelled_runs(tiny_tokenizer, enc) == [
        "4.<|im_end|>", "<think>\nAdd three and three.\n</think>\n\n6.<|im_end|>"]


def test_reasoning_only_on_assistant_messages_and_a_string():
    from tuneyard.data.formats import RowError, convert_row

    with pytest.raises(RowError) as e:
        convert_row({"messages": [{"role": "user", "content": "q", "reasoning_content": "x"},
                                  {"role": "assistant", "content": "a", "reasoning": 3}]}, "auto")
    text = "; ".join(p.render(1) for p in e.value.problems)
    assert "'reasoning_content' is only allowed on assistant messages" in text
    assert "'reasoning' must be a string, got number" in text
