"""The SFT recipe: TRL's ``SFTTrainer`` on an already tokenised set (``input_ids`` + ``labels``), a lazily tokenised
one (rows tokenised as batches are drawn) or a stream read from the source file.

The shared plumbing (device, model, resume, save, the loop) is ``tuneyard.trainer.plumbing``; the commands that run
a job are in its docstring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
from trl import SFTConfig, SFTTrainer

from tuneyard.data.splits import LAZY_COLUMN, load_split
from tuneyard.domain.spec import TrainingSpec
from tuneyard.jobdir import JobDir, PreparedOk, ProtocolError, read_json
from tuneyard.trainer import fastpath
from tuneyard.trainer.fastpath import Batching
from tuneyard.trainer.plumbing import (
    RecipeContext,
    _is_moe,
    common_args,
    finalise_schedule,
    lora_config,
    optimizer_override,
)
from tuneyard.trainer.runtime import TrainerError

AnyDataset = datasets.Dataset | datasets.IterableDataset


def load_datasets(ctx: RecipeContext) -> tuple[AnyDataset, AnyDataset | None]:
    """The training and validation sets of ``ctx``'s job, as the trainer reads them."""
    train, valid = load_token_splits(ctx.job, ctx.spec, ctx.ranks.world_size, ctx.tokenizer)
    if ctx.spec.data.lazy_tokenize and not ctx.spec.data.streaming:
        encode = lazy_encoder(ctx.spec, ctx.tokenizer)
        for ds in (train, valid):
            if ds is not None:
                ds.set_transform(encode)
    return train, valid


def build_trainer(ctx: RecipeContext, model: Any, train: AnyDataset, valid: AnyDataset | None,
                  callbacks: list) -> SFTTrainer:
    """TRL's SFTTrainer over ``model`` and the sets, with tuneyard's batching choices."""
    spec = ctx.spec
    if spec.model.model_type == "vlm":
        from tuneyard.trainer import vision

        return vision.build_trainer(ctx, model, train, valid, callbacks)
    # A KV cache would switch off transformers' packed-sequence mask (padding-free needs it).
    model.config.use_cache = False
    batching = fastpath.choose_batching(spec, model)
    config = build_config(spec, ctx.job, ctx.device, ctx.precision, ctx.per_device, ctx.accum,
                          has_eval=valid is not None, moe=_is_moe(model), world_size=ctx.ranks.world_size,
                          batching=batching)
    if spec.data.streaming:
        # The Trainer refuses a dataset without a length unless max_steps is set before it is built.
        finalise_schedule(config, spec, train_rows(ctx, train), ctx.per_device, ctx.accum, ctx.ranks.world_size)
    # A model that already carries an adapter (continued training) trains that adapter: no new config.
    peft_config = None if hasattr(model, "peft_config") else lora_config(spec)
    trainer = Trainer(model=model, args=config, train_dataset=train, eval_dataset=valid,
                      processing_class=ctx.tokenizer, peft_config=peft_config, callbacks=callbacks,
                      optimizer_cls_and_kwargs=optimizer_override(spec, ctx.device),
                      dense_head=spec.runtime.dense_lm_head)
    ctx.log.info("sft: batches %s, attention %s, LM head %s%s%s", batching.why, model.config._attn_implementation,
                 "dense" if getattr(_inner(trainer.model), "tuneyard_dense_head", False) else "chunked (TRL)",
                 ", Liger kernels" if config.use_liger_kernel else "",
                 ", torch.compile" if config.torch_compile else "")
    return trainer


def _inner(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def train_rows(ctx: RecipeContext, train: AnyDataset) -> int:
    """Rows in the training set: its length, or for a stream the count the prepare step made."""
    if isinstance(train, datasets.Dataset):
        return len(train)
    try:
        prepared = ctx.job.read_prepared()
    except ProtocolError as e:
        raise TrainerError("data_error", str(e)) from None
    if not isinstance(prepared, PreparedOk) or not prepared.n_train:
        raise TrainerError("data_error", f"{ctx.job.prepared} gives no training row count for the streamed set")
    return prepared.n_train


def load_token_splits(job: JobDir, spec: TrainingSpec, world_size: int,
                  tokenizer: Any = None) -> tuple[AnyDataset, AnyDataset | None]:
    """The tokenised train and (optional) validation sets, checked for the columns the trainer needs.

    A streaming job has none on disk: its sets read the source rows and tokenise them as training goes.
    """
    if spec.data.streaming:
        return _streamed_datasets(job, spec, world_size, tokenizer)
    found = []
    for split in ("train", "validation"):
        path = job.data / split
        if not path.exists():
            if split == "train":
                raise TrainerError("data_error",
                                   f"no tokenised training set at {path}: the prepare step has not run")
            found.append(None)
            continue
        try:
            ds = load_split(path)
        except Exception as e:
            raise TrainerError("data_error", f"cannot read the tokenised {split} set at {path}: {e}") from e
        missing = ({LAZY_COLUMN} if spec.data.lazy_tokenize else {"input_ids", "labels"}) - set(ds.column_names)
        if missing:
            raise TrainerError("data_error", f"the {split} set at {path} lacks column(s) {sorted(missing)}")
        if len(ds) == 0:
            if split == "train":
                raise TrainerError("data_error", f"the training set at {path} is empty")
            ds = None
        found.append(ds)
    train, valid = found
    cap = _validation_rows(spec, world_size)
    if valid is not None and cap:
        valid = valid.select(range(min(len(valid), cap)))
    return train, valid


def _validation_rows(spec: TrainingSpec, world_size: int) -> int | None:
    """Rows evaluated per evaluation when max_validation_steps caps it."""
    cap = spec.schedule.max_validation_steps
    if not cap:
        return None
    hp = spec.hyperparameters
    return cap * (hp.per_device_eval_batch_size or hp.per_device_batch_size) * world_size


def _streamed_datasets(job: JobDir, spec: TrainingSpec, world_size: int, tokenizer: Any
                       ) -> tuple[datasets.IterableDataset, datasets.IterableDataset | None]:
    from functools import partial

    from tuneyard.data.pipeline import streamed_examples
    from tuneyard.data.splits import STREAM_FILE, token_features

    manifest = read_json(job.data / STREAM_FILE)
    if manifest is None:
        raise TrainerError("data_error", f"no {STREAM_FILE} in {job.data}: the prepare step has not run")
    for part in ("train", "validation"):
        src = manifest.get(part)
        if src is not None and not Path(src["path"]).is_file():
            raise TrainerError("data_error", f"the {part} source of this streaming job is gone: {src['path']}")
    data = spec.data
    options = {"template": data.template, "system_prompt": data.system_prompt, "max_length": data.max_length,
               "truncation": data.truncation, "train_on_input": data.train_on_input,
               "last_turn_only": data.last_turn_only}

    def stream(split: str) -> datasets.IterableDataset:
        return datasets.IterableDataset.from_generator(
            partial(streamed_examples, manifest, split, tokenizer, options), features=token_features())

    train = stream("train")
    if data.shuffle:
        # A stream cannot be shuffled whole: a seeded buffer, reshuffled each epoch (the Trainer sets it).
        train = train.shuffle(seed=spec.seed, buffer_size=STREAM_SHUFFLE_BUFFER)
    valid = None
    if manifest.get("validation") or manifest.get("held_out"):
        valid = stream("validation")
        cap = _validation_rows(spec, world_size)
        if cap:
            valid = valid.take(cap)
    return train, valid


STREAM_SHUFFLE_BUFFER = 10_000


def lazy_encoder(spec: TrainingSpec, tokenizer) -> Any:
    """A ``set_transform`` function that tokenises stored rows batch by batch, exactly as the prepare step would.

    A row whose answer does not fit in ``max_length`` keeps its (truncated) tokens with no loss on them:
    a lazily tokenised set cannot drop rows, and the answer is never trained on half.
    """
    from tuneyard.data.tokenize import IGNORE_INDEX, ConversationEncoder, EncodeError

    data = spec.data
    options = {"template": data.template, "system_prompt": data.system_prompt, "max_length": data.max_length,
               "truncation": "truncate"}
    encoder = ConversationEncoder(tokenizer, **options, train_on_input=data.train_on_input,
                                  last_turn_only=data.last_turn_only)
    # For rows the encoder drops: every token as input, none as a target.
    context = ConversationEncoder(tokenizer, **options, train_on_input=True)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        rows = [json.loads(raw) for raw in batch[LAZY_COLUMN]]
        try:
            encoded = encoder.encode(rows)
        except EncodeError as e:
            raise TrainerError("data_error", f"a training row cannot be tokenised: {e}") from e
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for row, enc in zip(rows, encoded, strict=True):
            if enc is not None:
                ids, labels = enc.input_ids.tolist(), enc.labels.tolist()
            else:
                kept = context.encode([row])[0]
                ids = kept.input_ids.tolist() if kept is not None else [tokenizer.eos_token_id]
                labels = [IGNORE_INDEX] * len(ids)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
        return out

    return encode


def build_config(spec: TrainingSpec, job: JobDir, device: str, precision: dict[str, Any], per_device: int,
                 accum: int, *, has_eval: bool, moe: bool = False, world_size: int = 1,
                 batching: Batching | None = None) -> SFTConfig:
    """Map the spec onto SFTConfig (steps that depend on the prepared data are set in finalise_schedule)."""
    data = spec.data
    if batching is None:  # as the spec asks, for a model that is safe with padding-free batches
        batching = Batching(data.padding_free and not data.packing, "random" if data.shuffle else "sequential",
                            "as the spec asks")
    padding_free = batching.padding_free
    return SFTConfig(
        **common_args(spec, job, device, precision, per_device, accum, has_eval=has_eval, moe=moe),
        activation_checkpointing=spec.hyperparameters.gradient_checkpointing,
        train_sampling_strategy=batching.sampling,
        # Padding-free batches hold no pad at all, so every id counts (a pad id equal to eos would
        # otherwise be skipped); padded batches count their attention mask.
        include_num_input_tokens_seen="all" if padding_free or data.packing else "non_padding",
        padding_free=padding_free,
        packing=data.packing,
        # Lazily tokenised rows arrive through a transform, streamed ones from a generator: TRL must not
        # re-process them, and the Trainer must not drop the raw column a transform reads.
        dataset_kwargs={"skip_prepare_dataset": True} if data.lazy_tokenize or data.streaming else None,
        remove_unused_columns=not (data.lazy_tokenize or data.streaming),
        # With several processes, each reads the stream and keeps its share of every batch: dispatching
        # collated (padding-free, single-row) batches from rank 0 cannot split them.
        accelerator_config={"dispatch_batches": False} if data.streaming and world_size > 1 else None,
        packing_strategy="bfd",
        # The prepare step already truncated to max_length: without it TRL skips a per-row truncation pass over
        # the whole set at start-up. Packing needs it (the length of a pack).
        max_length=data.max_length if data.packing else None,
    )


class Trainer(SFTTrainer):
    """TRL's SFTTrainer, with length-grouped sampling that reads row lengths from Arrow, and on CPU the dense LM head
    (``fastpath.use_dense_head``) in front of TRL's chunked one."""

    def __init__(self, *args: Any, dense_head: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        inner = _inner(self.model)
        if dense_head and fastpath.dense_head_blocker(inner, self.args.device.type) is None:
            fastpath.use_dense_head(inner)

    def _get_train_sampler(self, train_dataset=None):
        ds = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy == "group_by_length":
            sampler = fastpath.length_grouped_sampler(
                ds, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                self.args.data_seed if self.args.data_seed is not None else self.args.seed)
            if sampler is not None:
                return sampler
        return super()._get_train_sampler(train_dataset)
