"""What every recipe shares: device, precision, the batch split, model + tokenizer + PEFT (+ quantisation) loading,
resume, the training loop's start and end, saving, and the arguments every TRL config takes alike.

A recipe (``tuneyard.trainer.recipes``) adds only what is its own: how its data is loaded and which TRL trainer,
with which config, trains on it. Run a job directory, on one device, N devices or several nodes::

    python -m tuneyard.trainer /path/to/jobs/ftjob-abc
    torchrun --standalone --nproc_per_node N -m tuneyard.trainer /path/to/jobs/ftjob-abc
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank $NODE_RANK --rdzv_id ftjob-abc \\
        --rdzv_backend c10d --rdzv_endpoint $HEAD_NODE:29500 -m tuneyard.trainer /shared/jobs/ftjob-abc

The spec's ``batch_size`` is global: per_device_batch_size x gradient_accumulation_steps x processes.
When the number of processes differs from the spec's ``resources``, the accumulation is recomputed so
the global batch stays what was asked. Rank 0 alone writes events, checkpoint marks, output/ and
result.json. Checkpoints land in ``JOBDIR/checkpoints/checkpoint-<step>`` (adapter or weights,
optimizer, scheduler, RNG state per rank, trainer_state.json, and ``tuneyard_checkpoint.json`` written
last); a run started on a job directory holding a complete checkpoint resumes from the newest one.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PrinterCallback, set_seed
from transformers.utils import is_bitsandbytes_available

from tuneyard.domain import capabilities
from tuneyard.domain.errors import InvalidRequest
from tuneyard.domain.hparams import micro_batching
from tuneyard.domain.spec import TrainingSpec
from tuneyard.jobdir import JobDir, Stopped, Succeeded, read_checkpoint_marker
from tuneyard.trainer import fastpath, tracking, vision
from tuneyard.trainer.progress import (
    CHECKPOINT_MARKER,
    SAVING_STOPS,
    ProgressCallback,
    StopCallback,
    latest_complete_checkpoint,
)
from tuneyard.trainer.runtime import Ranks, Reporter, TrainerError, quiet_libraries
from tuneyard.trainer.strategies import strategy_args

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RecipeContext:
    """What a recipe is given to load its data and build its trainer."""

    spec: TrainingSpec
    job: JobDir
    ranks: Ranks
    device: str
    precision: dict[str, Any]
    per_device: int
    accum: int
    tokenizer: Any
    log: logging.Logger


def run(spec: TrainingSpec, job: JobDir, ranks: Ranks, reporter: Reporter, log: logging.Logger,
        recipe: Any) -> Succeeded | Stopped:
    """Train per ``spec`` with ``recipe`` in ``job``; return the result.json it ended with (succeeded/stopped)."""
    quiet_libraries()
    problems = capabilities.check(spec)
    if problems:
        raise TrainerError("unsupported", "; ".join(f"{p.param}: {p.message}" for p in problems))
    device = pick_device(spec)
    if spec.resources.distributed != "ddp" and device != "cuda":
        raise TrainerError("unsupported", f"resources.distributed: '{spec.resources.distributed}' needs CUDA GPUs; "
                                          "this trainer runs on CPU")
    precision = pick_precision(spec, device)
    per_device, accum = batch_split(spec, ranks.world_size)
    ctx = RecipeContext(spec, job, ranks, device, precision, per_device, accum, load_tokenizer(spec), log)
    train_ds, eval_ds = recipe.load_datasets(ctx)
    n_train = recipe.train_rows(ctx, train_ds)
    log.info("%s: %d training rows%s, %s validation set, device=%s, dtype=%s, %d process(es), "
             "micro-batch %d x accumulation %d", spec.method, n_train, " (streamed)" if spec.data.streaming else "",
             "a" if eval_ds is not None else "no", device, precision["load"], ranks.world_size, per_device, accum)
    model = load_model(spec, device, precision, ranks)
    progress = ProgressCallback(reporter, describe="", n_epochs=int(spec.hyperparameters.n_epochs),
                                spec_json=spec.model_dump(mode="json"))
    stop = StopCallback(job)
    trainer = recipe.build_trainer(ctx, model, train_ds, eval_ds,
                                   [progress, stop, *tracking.callbacks(spec, job, reporter, log)])
    # Our callback reports; the default printer would duplicate every log dict on stdout.
    trainer.remove_callback(PrinterCallback)
    check_strategy(spec, trainer)
    # From the rows as the trainer holds them (packing makes fewer, longer rows).
    total = finalise_schedule(trainer.args, spec, recipe.train_rows(ctx, trainer.train_dataset), per_device, accum,
                              ranks.world_size)
    progress.describe = describe(trainer.model, spec, ranks.world_size, device)
    # Same seed on every rank for the model and the sampler (data_seed); rank-offset for dropout & co.
    set_seed(spec.seed + ranks.rank)

    resume = prepare_resume(job, ranks, log)
    if resume is not None:
        # Until the resumed run logs anything, its latest metrics are the checkpoint's.
        marker = read_checkpoint_marker(resume)
        progress.latest.update(marker.metrics if marker is not None else {})
    early = stop.poll(trainer.args)
    if early is not None:
        step = _checkpoint_step(resume)
        reporter.emit("message", f"Training stopped ({early}) before it started",
                      {"reason": early, "step": step})
        return Stopped(reason=early, step=step, checkpoint=str(resume) if resume else None)

    log.info("training %d steps%s", total, f", resuming from {resume}" if resume else "")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    state = trainer.state

    if stop.reason is not None:
        ckpt = progress.last_checkpoint if stop.reason in SAVING_STOPS else None
        stopped = Stopped(reason=stop.reason, step=state.global_step, checkpoint=str(ckpt) if ckpt else None)
        reporter.emit("message", f"Training stopped ({stop.reason}) at step {state.global_step}",
                      stopped.model_dump(exclude={"status"}))
        return stopped

    save_output(trainer, job, ranks)
    metrics = dict(progress.latest)
    adapter = spec.adapter.type == "lora"
    reporter.emit("message", f"Training finished: {state.global_step} steps, " + ", ".join(
        f"{k}={v:.4g}" for k, v in metrics.items() if k in ("train_loss", "valid_loss") and v is not None),
        {"output_dir": str(job.output), "final_metrics": metrics})
    return Succeeded(output_dir=str(job.output), trained_tokens=int(state.num_input_tokens_seen),
                     trained_steps=state.global_step, final_metrics=metrics, adapter=adapter)


def check_strategy(spec: TrainingSpec, trainer: Any) -> None:
    """TrainerError when accelerate did not set up the strategy the spec asks for (it falls back to DDP
    silently, e.g. FSDP on CPU ranks): a job never trains with another strategy than it asked for."""
    want = spec.resources.distributed
    if want == "fsdp" and not getattr(trainer, "is_fsdp_enabled", False) or \
            want == "deepspeed" and not getattr(trainer, "is_deepspeed_enabled", False):
        raise TrainerError("unsupported", f"resources.distributed: '{want}' could not be set up on this machine "
                                          "(accelerate fell back to DDP)")


def pick_device(spec: TrainingSpec) -> str:
    """"cuda" when there is a GPU and the spec allows it, else "cpu"; demanding CUDA fails without one."""
    want = spec.resources.device
    if want == "cuda" and not torch.cuda.is_available():
        raise TrainerError("device_unavailable",
                           "resources.device is 'cuda' but this machine has no CUDA GPU")
    return "cuda" if want != "cpu" and torch.cuda.is_available() else "cpu"


def pick_precision(spec: TrainingSpec, device: str) -> dict[str, Any]:
    """The dtype to load weights in and the autocast flags: {"load": dtype, "bf16": bool, "fp16": bool}."""
    want = spec.model.torch_dtype
    quantised = spec.model.quant_bits in (4, 8)
    if quantised:
        # QLoRA never silently falls back to an unquantised base: that would need several times the memory.
        if device != "cuda":
            raise TrainerError("device_unavailable",
                               f"quant_bits={spec.model.quant_bits} (QLoRA) needs a CUDA GPU with "
                               "bitsandbytes; this run has none. Set quant_bits to null to train the base "
                               "model unquantised.")
        if not is_bitsandbytes_available():
            raise TrainerError("device_unavailable", f"quant_bits={spec.model.quant_bits} (QLoRA) needs the "
                                                     "bitsandbytes package, which is not installed")
    if want == "auto":
        want = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
        if quantised and want == "float32":
            want = "float16"  # the 4/8-bit matmuls compute in half precision
    if want == "float16" and device == "cpu":
        raise TrainerError("unsupported",
                           "torch_dtype 'float16' needs a CUDA GPU; use 'float32' or 'bfloat16' on CPU")
    load = DTYPES[want]
    if want == "float16" and spec.adapter.type == "full":
        # fp16 AMP cannot unscale fp16 gradients: keep fp32 master weights and autocast to fp16.
        load = torch.float32
    return {"load": load, "bf16": want == "bfloat16", "fp16": want == "float16"}


def batch_split(spec: TrainingSpec, world_size: int) -> tuple[int, int]:
    """(per-device micro batch, accumulation) for the actual number of processes, keeping the global batch."""
    hp = spec.hyperparameters
    assert isinstance(hp.batch_size, int) and hp.per_device_batch_size and hp.gradient_accumulation_steps
    if hp.per_device_batch_size * hp.gradient_accumulation_steps * world_size == hp.batch_size:
        return hp.per_device_batch_size, hp.gradient_accumulation_steps
    try:
        return micro_batching(hp.batch_size, world_size, hp.per_device_batch_size, None)
    except InvalidRequest as e:
        raise TrainerError("invalid_spec",
                           f"cannot run the spec on {world_size} process(es): {e.message}") from e


def load_tokenizer(spec: TrainingSpec):
    """The base model's tokenizer (from the same directory / repo and revision); a VLM's processor."""
    m = spec.model
    if m.model_type == "vlm":
        return vision.processor(spec)  # its tokenizer and image processor
    try:
        return AutoTokenizer.from_pretrained(m.name, revision=m.revision,
                                             trust_remote_code=m.trust_remote_code)
    except Exception as e:
        raise TrainerError("model_load_error", f"cannot load the tokenizer of {m.name}: {_short(e)}") from e


def load_model(spec: TrainingSpec, device: str, precision: dict[str, Any], ranks: Ranks) -> PreTrainedModel:
    """The base model in the chosen dtype, quantised with bitsandbytes for QLoRA, with the adapter it continues."""
    m = spec.model
    kwargs: dict[str, Any] = {"dtype": precision["load"], "revision": m.revision,
                              "trust_remote_code": m.trust_remote_code}
    vlm = m.model_type == "vlm"
    if not vlm and fastpath.flash_attention(device, spec.data.padding_free or spec.data.packing, precision["load"],
                                           spec.runtime.flash_attention):
        # Varlen kernels attend within each packed example without the dense block mask sdpa needs.
        kwargs["attn_implementation"] = "flash_attention_2"
    if m.quant_bits in (4, 8):
        from transformers import BitsAndBytesConfig

        compute = precision["load"]
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute)
            if m.quant_bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": ranks.local_rank}  # quantised weights are placed at load time
    try:
        model = (vision.model_class(m.name, kwargs) if vlm else AutoModelForCausalLM).from_pretrained(m.name, **kwargs)
    except (torch.OutOfMemoryError, TrainerError):
        raise
    except Exception as e:
        raise TrainerError("model_load_error", f"cannot load model {m.name}: {_short(e)}") from e
    if m.quant_bits in (4, 8):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.hyperparameters.gradient_checkpointing)
    if m.init_adapter:
        # Continued training: the parent's adapter, trained on (the recipes then add no adapter of their own).
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, m.init_adapter, is_trainable=True)
        except Exception as e:
            raise TrainerError("model_load_error", f"cannot load the adapter {m.parent or m.init_adapter} that the "
                                                   f"job continues: {_short(e)}") from e
    return model


def lora_config(spec: TrainingSpec):
    """The PEFT LoRA/DoRA config of ``spec.adapter``, or None for full fine-tuning."""
    a = spec.adapter
    if a.type == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=a.target_modules,
                      use_dora=a.use_dora, modules_to_save=list(a.modules_to_save) or None, bias="none",
                      task_type="CAUSAL_LM")


def optimizer_override(spec: TrainingSpec, device: str):
    """(class, kwargs) for optimizers the Trainer does not name itself (plain Adam), else None."""
    if spec.hyperparameters.optimizer != "adam":
        return None
    # Adam with L2 weight decay (the Trainer still puts no decay on biases and norms).
    kwargs: dict[str, Any] = {"lr": spec.hyperparameters.learning_rate, "betas": (0.9, 0.999), "eps": 1e-8}
    if device == "cuda":
        kwargs["fused"] = True
    return torch.optim.Adam, kwargs


def common_args(spec: TrainingSpec, job: JobDir, device: str, precision: dict[str, Any], per_device: int,
                accum: int, *, has_eval: bool, moe: bool = False) -> dict[str, Any]:
    """The TrainingArguments every recipe's TRL config takes alike (steps that depend on the data come later,
    in finalise_schedule)."""
    hp, sched = spec.hyperparameters, spec.schedule
    if spec.resources.torch_compile and (blocker := fastpath.compile_blocker(device)) is not None:
        raise TrainerError("unsupported", f"resources.torch_compile: {blocker}")
    optim = {"adamw": "adamw_torch_fused" if device == "cuda" else "adamw_torch", "adam": "adamw_torch",
             "sgd": "sgd"}[hp.optimizer]
    # An epoch capped by max_steps_per_epoch ends after `cap` steps: evaluate and save on that rhythm.
    epoch_steps = hp.max_steps_per_epoch if hp.max_steps_per_epoch and not hp.max_steps else None
    eval_steps = sched.eval_steps or epoch_steps
    save_steps = sched.save_steps or epoch_steps
    return dict(
        output_dir=str(job.checkpoints),
        num_train_epochs=float(hp.n_epochs),
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=hp.per_device_eval_batch_size or per_device,
        gradient_accumulation_steps=accum,
        learning_rate=hp.learning_rate,
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        lr_scheduler_type=hp.lr_scheduler,
        optim=optim,
        seed=spec.seed,
        data_seed=spec.seed,
        logging_strategy="steps",
        eval_strategy="no" if not has_eval else "steps" if eval_steps else "epoch",
        eval_steps=eval_steps if has_eval else None,
        save_strategy="steps" if save_steps else "epoch",
        save_steps=save_steps or 500,  # read only with the "steps" strategy; 500 is the Trainer's default
        # With keep_best_checkpoint the progress callback rotates (newest N and the best besides).
        save_total_limit=None if sched.keep_best_checkpoint and has_eval else sched.save_total_limit,
        # The Trainer tracks the best evaluation and spares that checkpoint when it rotates the others.
        metric_for_best_model="eval_loss" if sched.keep_best_checkpoint and has_eval else None,
        greater_is_better=False if sched.keep_best_checkpoint and has_eval else None,
        dataloader_num_workers=sched.dataloader_num_workers,
        bf16=precision["bf16"],
        fp16=precision["fp16"],
        use_cpu=device == "cpu",
        # Every parameter of a dense causal LM gets a gradient each step; MoE experts may sit a batch out.
        ddp_find_unused_parameters=moe,
        # The trackers' callbacks are added by tuneyard.trainer.tracking (configured from the spec), not by name.
        report_to="none",
        disable_tqdm=True,
        log_level="passive",
        use_liger_kernel=fastpath.liger(device, spec.runtime.liger_kernels),
        torch_compile=spec.resources.torch_compile,
        **strategy_args(spec, precision),
    )


def finalise_schedule(args: Any, spec: TrainingSpec, n_rows: int, per_device: int, accum: int,
                      world_size: int) -> int:
    """Set total steps, warmup and logging interval from the number of training rows; return total."""
    hp = spec.hyperparameters
    # Same arithmetic as the Trainer: batches per rank after sharding, then optimizer steps.
    batches_per_rank = math.ceil(math.ceil(n_rows / per_device) / world_size)
    per_epoch = math.ceil(batches_per_rank / accum)
    if hp.max_steps:
        total = hp.max_steps
    else:
        # A capped epoch: the stream of batches runs on across epoch boundaries, total steps as resolved.
        cap = hp.max_steps_per_epoch or per_epoch
        total = int(hp.n_epochs) * min(per_epoch, cap)
        if hp.max_steps_per_epoch:
            # build_config set the save/eval rhythm to the cap; an epoch shorter than the cap ends sooner.
            if spec.schedule.save_steps is None:
                args.save_steps = min(per_epoch, cap)
            if spec.schedule.eval_steps is None and args.eval_steps:
                args.eval_steps = min(per_epoch, cap)
    args.max_steps = total
    args.warmup_steps = hp.warmup_steps if hp.warmup_steps is not None else math.ceil(total * hp.warmup_ratio)
    args.logging_steps = spec.schedule.logging_steps or (1 if total < 100 else math.ceil(total / 100))
    return total


def describe(model: torch.nn.Module, spec: TrainingSpec, world_size: int, device: str) -> str:
    """What is trained, where: "LoRA r=8 on 7 modules, 1 process(es), cpu"."""
    a = spec.adapter
    if a.type == "lora":
        peft_cfg = model.peft_config["default"]
        names = sorted({str(t).rsplit(".", 1)[-1] for t in peft_cfg.target_modules})
        kind = "DoRA" if a.use_dora else "LoRA"
        if spec.model.quant_bits in (4, 8):
            kind = f"Q{kind} ({spec.model.quant_bits}-bit)"
        what = f"{kind} r={a.r} on {len(names)} modules"
    else:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        what = f"full fine-tuning of {n:,} parameters"
    return f"{what}, {world_size} process(es), {device}"


def prepare_resume(job: JobDir, ranks: Ranks, log: logging.Logger) -> Path | None:
    """The newest complete checkpoint; rank 0 first deletes the partial ones a crash left behind."""
    if ranks.is_main and job.checkpoints.is_dir():
        for d in job.checkpoints.glob("checkpoint-*"):
            if d.is_dir() and not (d / CHECKPOINT_MARKER).is_file():
                log.warning("removing incomplete checkpoint %s", d)
                shutil.rmtree(d, ignore_errors=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return latest_complete_checkpoint(job.checkpoints) if job.checkpoints.is_dir() else None


def save_output(trainer: Any, job: JobDir, ranks: Ranks) -> None:
    """Save the adapter (or the full model) and tokenizer to JOBDIR/output, swapped in whole at the end."""
    partial = job.root / ".output.partial"
    if ranks.is_main:
        shutil.rmtree(partial, ignore_errors=True)
    trainer.model.config.use_cache = True  # the saved config is for inference
    trainer.save_model(str(partial))  # every rank takes part (sharded states); rank 0 writes
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if ranks.is_main:
        (partial / "training_args.bin").unlink(missing_ok=True)  # a pickle; nothing downstream needs it
        # PEFT saves every adapter the model holds: DPO's frozen reference copy of a continued adapter ("ref")
        # is no part of the result, which stays the one trained adapter.
        for name in getattr(trainer.model, "peft_config", None) or {}:
            if name != "default":
                shutil.rmtree(partial / name, ignore_errors=True)
        tracking.copy_tensorboard(job, partial)
        shutil.rmtree(job.output, ignore_errors=True)
        partial.rename(job.output)


def _is_moe(model: PreTrainedModel) -> bool:
    cfg = model.config.get_text_config()
    return any(getattr(cfg, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts"))


def _checkpoint_step(path: Path | None) -> int:
    return int(path.name.removeprefix("checkpoint-")) if path else 0


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:400] if text else type(e).__name__
