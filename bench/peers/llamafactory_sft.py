"""LLaMA-Factory's LoRA SFT on the bench's rows, as its README's YAML examples set it up: ``python
llamafactory_sft.py CONFIG OUT`` in the llamafactory venv.

The rows are registered in a ``dataset_info.json`` (sharegpt formatting with OpenAI-style role/content tags),
the template is LLaMA-Factory's ``chatml``, the loss is on the assistant's turns (its default
``train_on_prompt: false``), LoRA on ``all`` linear layers. ``neat_packing`` in the config: LLaMA-Factory's
contamination-free packing (``packing`` + ``neat_packing``), its fastest setting for short rows. The run goes
through ``llamafactory.train.tuner.run_exp`` (what ``llamafactory-cli train`` calls) so the marks' callback
can be passed in.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _marks import Marks, load_config  # noqa: E402


def main() -> None:
    """Train once as configured; write the marks."""
    marks = Marks()
    cfg, out = load_config(sys.argv)
    from llamafactory.train.tuner import run_exp

    marks.mark("imported")
    data_dir = Path(cfg["work"]) / "lf-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "dataset_info.json").write_text(json.dumps({"bench": {
        "file_name": os.path.abspath(cfg["rows"]), "formatting": "sharegpt", "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}}}))
    cuda = cfg["device"] == "cuda"
    args = {
        "stage": "sft", "do_train": True, "model_name_or_path": cfg["model"], "dataset": "bench",
        "dataset_dir": str(data_dir), "template": "chatml", "cutoff_len": cfg["max_len"], "overwrite_cache": True,
        "finetuning_type": "lora", "lora_rank": cfg["lora_r"], "lora_alpha": cfg["lora_alpha"],
        "lora_dropout": 0.0, "lora_target": "all", "output_dir": cfg["output"], "overwrite_output_dir": True,
        "per_device_train_batch_size": cfg["batch"], "gradient_accumulation_steps": 1,
        "learning_rate": cfg["lr"], "num_train_epochs": float(cfg["epochs"]), "lr_scheduler_type": "linear",
        "warmup_ratio": 0.0, "logging_steps": 1, "save_strategy": "no", "report_to": "none", "seed": cfg["seed"],
        "bf16": cuda, "plot_loss": False, "disable_tqdm": True,
    }
    if cfg.get("neat_packing"):
        args.update(packing=True, neat_packing=True)
    marks.mark("data_loaded")  # LLaMA-Factory reads and tokenises the rows inside run_exp, with the model
    run_exp(args=args, callbacks=[marks.callback()])
    marks.mark("saved")
    marks.write(out)


if __name__ == "__main__":
    main()
