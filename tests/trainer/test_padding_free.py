"""Padding-free batches give each example the loss it has in a padded batch, with the CPU attention in use.

TRL's padding-free collator flattens a batch into one row with ``position_ids`` restarting at 0 per
example and no attention mask. transformers 5 turns such position_ids into a block-diagonal causal mask
for sdpa and eager attention (``masking_utils.find_packed_sequence_indices``), so examples must not see
each other -- but only when no KV cache is passed, i.e. with ``use_cache=False``, which SFTTrainer sets on
every training and evaluation forward. These tests hold the trainer to that: per example, per token, the
same numbers as in a padded batch (observed: within 2e-7), and visibly different numbers when the packed
mask is off.
"""

from __future__ import annotations

import pytest
import torch

from tuneyard.domain.spec import TrainingSpec
from tuneyard.trainer.plumbing import load_model, pick_precision
from tuneyard.trainer.runtime import Ranks


def _model(model_dir, attn: str | None = None):
    spec = TrainingSpec.model_validate({"model": {"name": str(model_dir)}, "data": {"train": {"path": "x"}},
                                        "resources": {"device": "cpu"}})
    model = load_model(spec, "cpu", pick_precision(spec, "cpu"), Ranks())
    if attn is not None:
        model.set_attn_implementation(attn)
    return model.eval()


def varied(rows: list[dict]) -> list[dict]:
    """Examples of different lengths from the equal-length demo rows: multi-turn joins, a cut system turn."""

    def cat(*rs: dict) -> dict:
        return {k: [x for r in rs for x in r[k]] for k in ("input_ids", "labels")}

    system_turn = rows[0]["input_ids"].index(rows[0]["input_ids"][0], 1)  # the second <|im_start|>
    cut = {k: v[system_turn:] for k, v in rows[3].items()}
    return [rows[0], cat(rows[1], rows[2]), cut, cat(rows[4], rows[5], rows[6])]


def _per_example_losses(logits: torch.Tensor, labels: torch.Tensor, spans: list[tuple[int, int, int]]):
    """Token losses of each example: spans are (row, start, end) of the example in the batch tensors."""
    out = []
    for row, start, end in spans:
        lg, lb = logits[row, start:end - 1], labels[row, start + 1:end]
        keep = lb != -100
        out.append(torch.nn.functional.cross_entropy(lg[keep], lb[keep], reduction="none"))
    return out


@pytest.mark.parametrize("attn", [None, "eager"], ids=["default-sdpa", "eager"])
def test_per_example_loss_equals_padded(tiny_model_dir, tiny_tokenizer, tokenised_rows, attn):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = _model(tiny_model_dir, attn)
    if attn is None:
        assert model.config._attn_implementation == "sdpa"  # what the trainer uses on CPU
    rows = varied(tokenised_rows)
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(set(lengths)) == 4  # so the padded batch really pads
    pad_id = tiny_tokenizer.pad_token_id

    padded = DataCollatorForLanguageModeling(pad_token_id=pad_id)(rows)
    flat = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)(rows)
    assert flat["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in flat

    inputs = {k: v for k, v in flat.items() if k != "labels"}  # as the trainer passes them (cu_seq_lens too)
    with torch.no_grad():
        logits_padded = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                              use_cache=False).logits
        # SFTTrainer.compute_loss always passes use_cache=False; the packed-sequence mask depends on it.
        logits_flat = model(**inputs, use_cache=False).logits
        # Controls, so this test can tell right from wrong: the flat row read as ONE sequence
        # (positions 0..N-1) lets examples attend to each other ...
        leaky = model(input_ids=flat["input_ids"], position_ids=torch.arange(sum(lengths))[None],
                      use_cache=False).logits
        # ... and so does a KV cache: transformers only looks for packed sequences without one.
        leaky_cached = model(**inputs, use_cache=True).logits

    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    padded_spans = [(i, 0, n) for i, n in enumerate(lengths)]
    flat_spans = [(0, offsets[i], offsets[i + 1]) for i in range(len(rows))]
    expect = _per_example_losses(logits_padded, padded["labels"], padded_spans)
    got = _per_example_losses(logits_flat, flat["labels"], flat_spans)
    for e, g in zip(expect, got, strict=True):
        assert e.numel() > 0 and e.shape == g.shape
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    for control in (leaky, leaky_cached):
        wrong = _per_example_losses(control, flat["labels"], flat_spans)
        assert max((w - e).abs().max().item() for w, e in zip(wrong[1:], expect[1:], strict=True)) > 1e-3


def test_trainer_eval_loss_same_with_and_without_padding_free(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                              tokenised_rows):
    """Through SFTTrainer itself (its collator, fused LM head, token-level mean): same validation loss."""
    from datasets import Dataset
    from trl import SFTTrainer

    from tests.trainer.conftest import base_spec
    from tuneyard.jobdir import JobDir
    from tuneyard.trainer.plumbing import lora_config
    from tuneyard.trainer.recipes.sft import build_config

    ds = Dataset.from_list(varied(tokenised_rows) + tokenised_rows[7:])
    losses = {}
    for padding_free in (True, False):
        spec = TrainingSpec.model_validate({**base_spec(tiny_model_dir), "data": {
            "train": {"path": "x"}, "padding_free": padding_free, "max_length": 128}})
        precision = pick_precision(spec, "cpu")
        job = JobDir(tmp_path / str(padding_free))
        config = build_config(spec, job, "cpu", precision, 2, 2, has_eval=True)
        trainer = SFTTrainer(model=load_model(spec, "cpu", precision, Ranks()), args=config, train_dataset=ds,
                             eval_dataset=ds, processing_class=tiny_tokenizer,
                             peft_config=lora_config(spec))
        assert trainer.padding_free is padding_free
        losses[padding_free] = trainer.evaluate()["eval_loss"]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)

