"""The DPO recipe: TRL's ``DPOTrainer`` on preference pairs the prepare step tokenised (``prompt_ids``,
``chosen_ids``, ``rejected_ids``; see ``tuneyard.data.preference``).

The reference model: with LoRA it is the base with the adapter switched off, so no second copy is held (when
training continues an adapter, TRL keeps a frozen copy of that adapter as the reference instead, so the
reference is the model the job started from); with full fine-tuning it is a frozen copy of the starting weights,
loaded once more. ``beta`` and the loss (``sigmoid``, ``hinge`` or ``ipo``) come from the spec. Each logged step
reports the loss and TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` and
``rewards/accuracies`` (``tuneyard.domain.metrics`` names them for the dialects).

The shared plumbing (device, model, resume, save, the loop) is ``tuneyard.trainer.plumbing``; the commands that run
a job are in its docstring.
"""

from __future__ import annotations

from typing import Any

import datasets
from trl import DPOConfig, DPOTrainer

from tuneyard.data.preference import COLUMNS
from tuneyard.data.splits import load_split
from tuneyard.trainer.plumbing import RecipeContext, _is_moe, common_args, lora_config, optimizer_override
from tuneyard.trainer.runtime import TrainerError


def load_datasets(ctx: RecipeContext) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The tokenised preference pairs of the job (validation capped by max_validation_steps)."""
    found: list[datasets.Dataset | None] = []
    for split in ("train", "validation"):
        path = ctx.job.data / split
        if not path.exists():
            if split == "train":
                raise TrainerError("data_error", f"no tokenised preference set at {path}: the prepare step has "
                                                 "not run")
            found.append(None)
            continue
        try:
            ds = load_split(path)
        except Exception as e:
            raise TrainerError("data_error", f"cannot read the tokenised {split} set at {path}: {e}") from e
        missing = set(COLUMNS) - set(ds.column_names)
        if missing:
            raise TrainerError("data_error", f"the {split} set at {path} lacks column(s) {sorted(missing)}: it "
                                             "was not tokenised for preference training")
        found.append(ds if len(ds) else None)
    train, valid = found
    if train is None:
        raise TrainerError("data_error", f"the training set at {ctx.job.data / 'train'} is empty")
    cap = ctx.spec.schedule.max_validation_steps
    if valid is not None and cap:
        hp = ctx.spec.hyperparameters
        rows = cap * (hp.per_device_eval_batch_size or hp.per_device_batch_size or 1) * ctx.ranks.world_size
        valid = valid.select(range(min(len(valid), rows)))
    return train, valid


def train_rows(ctx: RecipeContext, train: datasets.Dataset) -> int:
    """Pairs in the training set."""
    return len(train)


def build_trainer(ctx: RecipeContext, model: Any, train: datasets.Dataset, valid: datasets.Dataset | None,
                  callbacks: list) -> DPOTrainer:
    """TRL's DPOTrainer over ``model`` and the pairs."""
    spec = ctx.spec
    hp = spec.hyperparameters
    model.config.use_cache = False
    args = common_args(spec, ctx.job, ctx.device, ctx.precision, ctx.per_device, ctx.accum,
                       has_eval=valid is not None, moe=_is_moe(model))
    config = DPOConfig(
        **args,
        beta=float(hp.beta) if isinstance(hp.beta, int | float) else 0.1,
        loss_type=[hp.dpo_loss or "sigmoid"],
        label_smoothing=hp.label_smoothing or 0.0,
        gradient_checkpointing=hp.gradient_checkpointing,
        # The prepare step cut every pair to max_length already (prompt kept, answers shortened).
        max_length=None,
        # The collator pads each pair to its batch: count the real tokens, as the SFT recipe does for padded sets.
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
    )
    # A model that already carries an adapter (continued training) trains that adapter: no new config.
    peft_config = None if hasattr(model, "peft_config") else lora_config(spec)
    trainer = _PreTokenisedDPOTrainer(model=model, ref_model=None, args=config, train_dataset=train,
                                      eval_dataset=valid, processing_class=ctx.tokenizer, peft_config=peft_config,
                                      callbacks=callbacks)
    # DPOTrainer does not pass the Trainer's optimizer_cls_and_kwargs on; the Trainer reads it when it builds one.
    trainer.optimizer_cls_and_kwargs = optimizer_override(spec, ctx.device)
    return trainer


class _PreTokenisedDPOTrainer(DPOTrainer):
    """DPOTrainer that takes sets already in its tokenised form.

    TRL tokenises every set it is given unless it holds images; ours were tokenised (and checked, counted and
    cached) by the prepare step, in exactly the form its tokeniser produces, so that pass is skipped.
    """

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if set(COLUMNS) <= set(dataset.column_names):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
