"""Exporting a trained model: the adapter merged into its base, saved as one plain transformers model."""

from __future__ import annotations

import shutil
from pathlib import Path


def merge(adapter_dir: str | Path, base: str, out_dir: str | Path, *, trust_remote_code: bool = False) -> Path:
    """Write ``base`` with the LoRA adapter at ``adapter_dir`` merged in (safetensors, with the tokenizer) to
    ``out_dir``: it loads with ``AutoModelForCausalLM.from_pretrained`` alone. A full fine-tune is copied."""
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        shutil.copytree(adapter_dir, out, dirs_exist_ok=True)
        return out
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    # The job's tokenizer (its chat template included) when it saved one, else the base's.
    source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code).save_pretrained(str(out))
    return out
