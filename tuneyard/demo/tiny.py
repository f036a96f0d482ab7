"""Build a tiny random Llama-shaped model and a byte-level BPE tokenizer with a ChatML template, on disk.

Used by ``tuneyard demo`` and the tests: no model hub is needed, and the result is loaded back with
the same ``from_pretrained`` code a real model goes through.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def build_tokenizer(corpus: list[str], out_dir: Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on ``corpus`` and save it (with a chat template) to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                 bos_token=None, unk_token=None)
    hf.chat_template = CHATML_TEMPLATE
    hf.save_pretrained(str(out_dir))
    return hf


def build_tiny_model(out_dir: str | Path, corpus: list[str] | None = None, *, hidden_size: int = 128,
                     num_layers: int = 2, num_heads: int = 4, vocab_size: int = 512, seed: int = 0,
                     initializer_range: float = 0.1, tie_word_embeddings: bool = False) -> Path:
    """Write a random Llama-shaped causal LM and its tokenizer to ``out_dir``; return the directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        corpus = [json.dumps(r) for r in sample_rows()]
    tok = build_tokenizer(corpus, out, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=None,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=tie_word_embeddings,
        # With the usual 0.02 init a random model this small is so close to uniform that LoRA alone
        # (which starts as a zero update) plateaus near log(vocab); 0.1 gives its layers enough signal
        # that a LoRA run learns the sample task to ~0 loss in about a hundred steps.
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(out))
    return out


CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"),
    ("Chile", "Santiago"), ("Greece", "Athens"), ("Norway", "Oslo"), ("Cuba", "Havana"),
]


def sample_rows() -> list[dict]:
    """The demo's training rows: OpenAI chat format, one question and its answer each."""
    rows = []
    for country, capital in CAPITALS:
        rows.append({"messages": [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": f"What is the capital of {country}?"},
            {"role": "assistant", "content": f"{capital}."},
        ]})
    return rows


def write_sample_jsonl(path: str | Path, repeat: int = 1) -> Path:
    """Write the demo rows (``repeat`` times over) as JSONL."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w") as f:
        for _ in range(repeat):
            for row in sample_rows():
                f.write(json.dumps(row) + "\n")
    return p
