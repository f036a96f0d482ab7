"""Axolotl's LoRA SFT on the bench's rows, as its docs' YAML examples set it up: ``python axolotl_sft.py CONFIG
OUT`` in the axolotl venv.

The rows are a local JSON dataset of ``type: chat_template`` with the tokenizer's own template, trained on the
assistant's turns only (``roles_to_train: [assistant]``, ``train_on_inputs: false``), LoRA on every linear
layer (``lora_target_linear``), no sample packing (Axolotl's multipack wants FlashAttention). The run goes
through what ``axolotl train`` calls (``load_cfg``, ``load_datasets``, ``axolotl.train.train``); the marks'
callback is added to the Trainer Axolotl builds, which has no option for an outside callback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _marks import Marks, load_config  # noqa: E402


def main() -> None:
    """Train once as configured; write the marks."""
    marks = Marks()
    cfg, out = load_config(sys.argv)
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.train import train
    from axolotl.utils.dict import DictDefault
    from transformers import Trainer

    marks.mark("imported")
    callback = marks.callback()
    built = Trainer.__init__

    def with_marks(self, *args, **kwargs):
        built(self, *args, **kwargs)
        self.add_callback(callback)

    Trainer.__init__ = with_marks
    cuda = cfg["device"] == "cuda"
    ax = load_cfg(DictDefault({
        "base_model": cfg["model"], "tokenizer_config": cfg["model"],
        "datasets": [{"path": os.path.abspath(cfg["rows"]), "ds_type": "json", "type": "chat_template",
                      "field_messages": "messages", "roles_to_train": ["assistant"]}],
        "chat_template": "tokenizer_default", "dataset_prepared_path": str(Path(cfg["work"]) / "ax-prepared"),
        "val_set_size": 0.0, "sequence_len": cfg["max_len"], "sample_packing": False, "train_on_inputs": False,
        "adapter": "lora", "lora_r": cfg["lora_r"], "lora_alpha": cfg["lora_alpha"], "lora_dropout": 0.0,
        # Axolotl turns its Triton LoRA kernels on by default; they allocate on CUDA whatever the device.
        "lora_mlp_kernel": cuda, "lora_qkv_kernel": cuda, "lora_o_kernel": cuda, "lora_target_linear": True,
        "micro_batch_size": cfg["batch"], "gradient_accumulation_steps": 1,
        "num_epochs": cfg["epochs"], "learning_rate": cfg["lr"], "lr_scheduler": "linear", "warmup_steps": 0,
        "optimizer": "adamw_torch", "output_dir": cfg["output"], "logging_steps": 1, "save_strategy": "no",
        "seed": cfg["seed"], "bf16": cuda, "fp16": False, "tf32": False, "flash_attention": False,
    }))
    meta = load_datasets(cfg=ax)
    marks.mark("data_loaded")
    train(cfg=ax, dataset_meta=meta)
    marks.mark("saved")
    marks.write(out)


if __name__ == "__main__":
    main()
