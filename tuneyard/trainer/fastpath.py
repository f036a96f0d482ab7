"""The trainer's speed choices in one place, each made only where it leaves the loss unchanged.

- Batches: padding-free (examples concatenated, positions restart per example, no pad computed) when the
  model is attention-only and takes ``position_ids``; otherwise padded batches of similar lengths
  (``group_by_length``), which waste little padding without changing any example's loss.
- The LM head: TRL's fused, chunked head never builds the (tokens x vocabulary) logits, and on GPU scores
  only the positions with a label (always on in ``SFTTrainer``). On CPU it scores every position and recomputes
  each tile's projection in the backward pass; there, while the labelled positions' logits fit in
  ``DENSE_HEAD_MAX_BYTES`` (a small vocabulary), ``dense_head`` scores only those positions, once, with plain
  autograd: the same loss, gradients and metrics for about half the head's work.
- On a GPU: FlashAttention varlen kernels for packed half-precision batches when ``flash_attn`` is
  installed, Liger's fused RMSNorm/SwiGLU/RoPE kernels when ``liger_kernel`` is installed (an operator
  turns either off with TUNEYARD_FLASH_ATTENTION / TUNEYARD_LIGER_KERNELS=false), bf16 and fused AdamW
  (see ``sft.pick_precision`` and ``sft.build_config``).
- ``torch.compile`` of the model when the spec's ``resources.torch_compile`` asks for it.

``tests/trainer/test_fastpath.py`` holds each of them to the loss of the plain path.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import shutil
import types
from dataclasses import dataclass
from typing import Any

import datasets
import pyarrow.compute as pc
import torch
from transformers import PreTrainedModel
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.utils import is_flash_attn_2_available

from tuneyard.data.splits import LAZY_COLUMN
from tuneyard.domain.spec import TrainingSpec

# Per-layer kinds in a config's ``layer_types`` that are plain (masked) attention: a packed row's block mask
# or varlen kernel keeps its examples apart. Anything else (mamba, conv, linear attention...) carries a state
# along the row, from one example into the next.
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention", "attention",
                                   "global_attention", "local_attention"})
# Families with recurrent or state-space layers that do not list them in ``layer_types``.
RECURRENT_MODEL_TYPES = frozenset({"mamba", "mamba2", "falcon_mamba", "falcon_h1", "jamba", "zamba", "zamba2",
                                   "bamba", "nemotron_h", "granitemoehybrid", "recurrent_gemma", "rwkv", "xlstm",
                                   "lfm2", "qwen3_next", "minimax", "plamo2"})


@dataclass(frozen=True)
class Batching:
    """How the trainer forms batches: padding-free, or padded with a sampler ("random", "group_by_length"...)."""

    padding_free: bool
    sampling: str
    why: str


def padding_free_blocker(model: PreTrainedModel) -> str | None:
    """Why padding-free batches would change this model's loss, or None when they are safe."""
    cfg = model.config.get_text_config()
    if cfg.model_type in RECURRENT_MODEL_TYPES:
        return f"{cfg.model_type} has recurrent (state-space) layers"
    other = sorted({str(t) for t in (getattr(cfg, "layer_types", None) or [])} - ATTENTION_LAYER_TYPES)
    if other:
        return f"{cfg.model_type} has {', '.join(other)} layers"
    # A PEFT wrapper (a continued adapter) passes position_ids through to the model it wraps.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "position_ids" not in inspect.signature(inner.forward).parameters:
        return f"{type(inner).__name__}.forward takes no position_ids"
    return None


def choose_batching(spec: TrainingSpec, model: PreTrainedModel) -> Batching:
    """Padding-free when the spec allows it and the model is safe with it; else length-grouped padded batches."""
    data = spec.data
    order = "random" if data.shuffle else "sequential"
    if data.packing:
        return Batching(False, order, "packing")
    blocker = padding_free_blocker(model) if data.padding_free else "padding_free is off"
    if blocker is None:
        return Batching(True, order, "padding-free")
    # Grouping needs every row's length up front: lazily tokenised and streamed rows do not have it.
    if data.shuffle and not (data.lazy_tokenize or data.streaming):
        return Batching(False, "group_by_length", f"padded, length-grouped ({blocker})")
    return Batching(False, order, f"padded ({blocker})")


def row_lengths(ds: Any) -> list[int] | None:
    """Token count of every row, read from the Arrow list offsets (no row is decoded); None if not tokenised."""
    if not isinstance(ds, datasets.Dataset) or LAZY_COLUMN in ds.column_names or "input_ids" not in ds.column_names:
        return None
    # A memory-mapped split gives a zero-copy Arrow slice (a select()ed view maps through its indices).
    column = ds.select_columns(["input_ids"]).with_format("arrow")[:]["input_ids"]
    return pc.list_value_length(column).to_pylist()


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped order, drawn from (seed, epoch): a resumed epoch repeats its order exactly.

    The stock sampler draws from torch's global RNG, whose state after a resume (restored from the checkpoint,
    mid-epoch) differs from the one the epoch started with: the rest of the epoch would see other rows.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer before each epoch (also the resumed one)."""
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def length_grouped_sampler(ds: Any, batch_size: int, seed: int) -> EpochLengthGroupedSampler | None:
    """A length-grouped sampler over the Arrow lengths (transformers' would decode every row to get them)."""
    lengths = row_lengths(ds)
    if lengths is None:
        return None
    return EpochLengthGroupedSampler(batch_size, lengths, seed)


def flash_attention(device: str, packed: bool, dtype: torch.dtype, allowed: bool = True) -> bool:
    """FlashAttention-2 varlen kernels: on CUDA, packed half-precision batches, with flash_attn installed.

    ``allowed``: the installation's TUNEYARD_FLASH_ATTENTION, as the job's spec carries it (runtime).
    """
    return (device == "cuda" and packed and dtype in (torch.float16, torch.bfloat16)
            and allowed and is_flash_attn_2_available())


def liger(device: str, allowed: bool = True) -> bool:
    """Liger's fused kernels (RMSNorm, SwiGLU, RoPE): on CUDA when the liger_kernel package is installed.

    ``allowed``: the installation's TUNEYARD_LIGER_KERNELS, as the job's spec carries it (runtime).
    """
    return device == "cuda" and allowed and importlib.util.find_spec("liger_kernel") is not None


def compile_blocker(device: str) -> str | None:
    """Why torch.compile cannot run here (Inductor builds C++ on CPU, Triton kernels on GPU), or None."""
    if device == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++")):
        return "torch.compile needs a C++ compiler (g++) on CPU; none is installed"
    if device == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile needs the triton package on GPU; it is not installed"
    return None


# The labelled positions' float32 logits the dense head may hold (with their softmax and gradient, about three
# times this): 256 MiB is 8,192 tokens of a 8,192-word vocabulary; beyond it TRL's tiles keep memory flat.
DENSE_HEAD_MAX_BYTES = 256 * 2**20


def dense_head_blocker(model: PreTrainedModel, device: str) -> str | None:
    """Why the dense LM head must not replace TRL's chunked one for this model, or None when it may."""
    if device != "cpu":
        return "on GPU TRL's kernel scores only the labelled positions already"
    cfg = model.config.get_text_config()
    if getattr(cfg, "final_logit_softcapping", None) or any(
            getattr(cfg, k, None) not in (None, 1, 1.0) for k in ("logit_scale", "output_multiplier",
                                                                 "lm_head_multiplier", "logits_scaling")):
        return f"{cfg.model_type} scales or caps its logits"
    if getattr(cfg, "output_router_logits", False):
        return "a mixture of experts adds its router loss in TRL's head"
    return None


def use_dense_head(model: PreTrainedModel) -> None:
    """Put the dense head in front of TRL's fused one (``add_fused_lm_head``, already installed on ``model``).

    A call with ``fused_lm_head=True`` whose labelled logits fit in ``DENSE_HEAD_MAX_BYTES`` is scored here; any
    other call (generation, pre-shifted labels, autocast, a batch too big) goes to TRL's forward unchanged.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    fused = model.forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        head = self.get_output_embeddings()
        if (not fused_lm_head or labels is None or shift_labels is not None or args
                or torch.is_autocast_enabled(labels.device.type)
                or int((labels[:, 1:] != -100).sum()) * head.weight.shape[0] * 4 > DENSE_HEAD_MAX_BYTES):
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                         num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(**kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:].to(head.weight.device)
        mask = targets != -100
        picked = targets[mask]
        logits = head(hidden.to(head.weight.device)[mask]).float()
        log_z = torch.logsumexp(logits, dim=-1)
        token_lp = logits.gather(-1, picked.unsqueeze(-1)).squeeze(-1) - log_z
        with torch.no_grad():  # metrics only (SFTTrainer logs them detached)
            log_p = logits - log_z.unsqueeze(-1)
            entropy = -(log_p.exp() * log_p).sum(-1)
            top1 = logits.argmax(-1) == picked

        def spread(x: torch.Tensor) -> torch.Tensor:
            # masked_scatter keeps an all-ignored batch connected to the model: a differentiable zero.
            return x.new_zeros(mask.shape).masked_scatter(mask, x)

        log_probs = spread(token_lp)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=spread(entropy),
                                   is_top1=spread(top1), label_mask=mask)

    model.forward = types.MethodType(functools.wraps(type(model).forward)(forward), model)
    model.tuneyard_dense_head = True
