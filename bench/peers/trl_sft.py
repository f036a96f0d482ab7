"""TRL ``SFTTrainer`` as its documentation shows it, on the bench's rows: ``python trl_sft.py CONFIG OUT``.

What a user would write instead of submitting a job: load the JSONL chat rows with ``datasets``, give the
model's path, an ``SFTConfig`` and a PEFT ``LoraConfig``, train, save the adapter. TRL's defaults stay,
except what the bench's job fixes for every system alike: learning rate, batch, epochs, seed, maximum
length (None with padding_free: TRL's requirement; every row fits), loss on the assistant's tokens
(``assistant_only_loss``), the precision tuneyard uses on the device
(fp32 on CPU: TRL's bf16 default would be a different computation), no activation checkpointing (TRL's
default is on; tuneyard's job has it off), a loss logged every step (to compare the losses) and no
checkpoint during the loop. ``padding_free`` in the config: TRL's ``padding_free=True``, with
FlashAttention 2 on a GPU where it is installed.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _marks import Marks, load_config  # noqa: E402


def main() -> None:
    """Train once as configured; write the marks."""
    marks = Marks()
    cfg, out = load_config(sys.argv)
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    marks.mark("imported")
    cuda = cfg["device"] == "cuda"
    init: dict = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if cfg.get("padding_free") and cuda:
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            init["attn_implementation"] = "flash_attention_2"
    dataset = load_dataset("json", data_files=cfg["rows"], split="train")
    marks.mark("data_loaded")
    args = SFTConfig(output_dir=cfg["output"], per_device_train_batch_size=cfg["batch"],
                     num_train_epochs=cfg["epochs"], learning_rate=cfg["lr"], seed=cfg["seed"],
                     # TRL refuses a max_length with padding_free and no packing (it would not enforce it);
                     # the bench's rows all fit in max_len, so None is the same truncation.
                     max_length=None if cfg.get("padding_free") else cfg["max_len"], assistant_only_loss=True,
                     padding_free=bool(cfg.get("padding_free")),
                     bf16=cuda, use_cpu=not cuda, gradient_checkpointing=False, logging_steps=1,
                     save_strategy="no", report_to="none", disable_tqdm=True, model_init_kwargs=init)
    trainer = SFTTrainer(model=cfg["model"], args=args, train_dataset=dataset,
                         peft_config=LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"],
                                                target_modules="all-linear", task_type="CAUSAL_LM"),
                         callbacks=[marks.callback()])
    marks.mark("trainer_built")  # the model loaded, the rows tokenised, LoRA applied
    trainer.train()
    trainer.save_model(cfg["output"])
    marks.mark("saved")
    marks.write(out, attn=trainer.model.config._attn_implementation)


if __name__ == "__main__":
    main()
