"""A job that continues an adapter (``model.init_adapter``) trains that adapter, loaded as it was saved, with the
same batching choices as a fresh one."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.conftest import base_spec
from tuneyard.domain.spec import TrainingSpec
from tuneyard.trainer import fastpath
from tuneyard.trainer.plumbing import describe, load_model, lora_config, pick_precision
from tuneyard.trainer.runtime import Ranks


def test_the_continued_adapter_is_loaded_trainable_and_padding_free(tiny_model_dir, tmp_path):
    from peft import PeftModel, get_peft_model

    spec = TrainingSpec.model_validate(base_spec(tiny_model_dir))
    parent = get_peft_model(load_model(spec, "cpu", pick_precision(spec, "cpu"), Ranks()), lora_config(spec))
    with torch.no_grad():
        for name, p in parent.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)  # a trained adapter: not the zero update a fresh one starts with
    parent.save_pretrained(tmp_path / "adapter")

    cont = spec.model_copy(update={"model": spec.model.model_copy(update={
        "init_adapter": str(tmp_path / "adapter"), "parent": "ft:tiny-llama:acme::abc"})})
    model = load_model(cont, "cpu", pick_precision(cont, "cpu"), Ranks())
    assert isinstance(model, PeftModel) and list(model.peft_config) == ["default"]
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.requires_grad and torch.all(p == 0.01) for p in lora_b.values())
    # The wrapper passes position_ids on: padding-free batches stay available to a continued adapter.
    assert fastpath.padding_free_blocker(model) is None
    assert fastpath.choose_batching(cont, model).padding_free
    assert describe(model, cont, 1, "cpu").startswith("LoRA r=8")


def test_a_continued_adapter_cannot_be_full_fine_tuning(tiny_model_dir):
    raw = base_spec(tiny_model_dir)
    raw["model"]["init_adapter"] = "/x"
    raw["adapter"] = {"type": "full"}
    with pytest.raises(ValueError, match="cannot be full fine-tuning"):
        TrainingSpec.model_validate(raw)
