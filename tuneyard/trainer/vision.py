"""Vision-language models in the trainer: loading, what is trained (LoRA on the language model by default, the
vision tower and the aligner frozen unless ``spec.vision`` says otherwise), and the collator that loads each
batch's images and runs the image processor over them.

A VLM is a model kind, not a recipe: the SFT recipe hands a ``vlm`` job to ``build_trainer`` here, which keeps its
config and sampler and changes only the batches (padded, never padding-free: the image features of a row must
stay with that row's placeholder tokens) and the adapter's targets. The parts of a model are told apart by module
name, as ms-swift does: the aligner (projector) first, since Qwen2-VL keeps it inside its vision module.
"""

from __future__ import annotations

from typing import Any

import torch

from tuneyard.data.images import open_image
from tuneyard.data.tokenize import IGNORE_INDEX
from tuneyard.data.vision import image_token, load_processor
from tuneyard.domain.spec import TrainingSpec
from tuneyard.trainer.runtime import TrainerError

# Module-name segments of each part (Qwen2-VL: visual / visual.merger; LLaVA: vision_tower / multi_modal_projector;
# Idefics3: vision_model / connector; Gemma 3: vision_tower / multi_modal_projector).
ALIGNER_NAMES = ("multi_modal_projector", "merger", "connector", "mm_projector", "aligner")
VISION_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder")
PARTS = ("language", "vision", "aligner")


def processor(spec: TrainingSpec) -> Any:
    """The job's processor (tokenizer + image processor), with its pixel limits."""
    m, v = spec.model, spec.vision
    try:
        return load_processor(m.name, revision=m.revision, trust_remote_code=m.trust_remote_code,
                              max_pixels=v.max_pixels, min_pixels=v.min_pixels)
    except Exception as e:
        raise TrainerError("model_load_error", f"cannot load the processor of {m.name}: {_short(e)}") from e


def model_class(name: str, kwargs: dict[str, Any]) -> Any:
    """``AutoModelForImageTextToText``, or the model's own class where the auto class does not know it."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(name, revision=kwargs.get("revision"),
                                        trust_remote_code=kwargs.get("trust_remote_code", False))
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or kwargs.get("trust_remote_code"):
        return AutoModelForImageTextToText
    import transformers

    for arch in config.architectures or ():
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    raise TrainerError("model_load_error", f"{name} ({config.model_type}) is no vision-language model that "
                                           "transformers can load (AutoModelForImageTextToText does not know it)")


def part_of(name: str) -> str:
    """Which part of a VLM the module (or parameter) ``name`` belongs to: language, vision or aligner."""
    segments = name.split(".")
    if any(s in ALIGNER_NAMES for s in segments):
        return "aligner"
    if any(s in VISION_NAMES for s in segments):
        return "vision"
    return "language"


def trained_parts(spec: TrainingSpec) -> set[str]:
    """The parts a job trains: the language model always, the vision tower and aligner when not frozen."""
    parts = {"language"}
    if not spec.vision.freeze_vit:
        parts.add("vision")
    if not spec.vision.freeze_aligner:
        parts.add("aligner")
    return parts


def lora_targets(spec: TrainingSpec, model: torch.nn.Module) -> list[str]:
    """The full names of the linear layers the adapter goes on: those of the trained parts that match the spec's
    ``target_modules`` ("all-linear": every linear layer but the output head)."""
    wanted = spec.adapter.target_modules
    parts = trained_parts(spec)
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.rsplit(".", 1)[-1] == "lm_head":
            continue
        if part_of(name) not in parts:
            continue
        if wanted == "all-linear" or name.rsplit(".", 1)[-1] in wanted:
            out.append(name)
    if not out:
        raise TrainerError("invalid_spec", f"adapter.target_modules {wanted} matches no linear layer of the parts "
                                           f"this job trains ({', '.join(sorted(parts))})")
    return out


def lora_config(spec: TrainingSpec, model: torch.nn.Module) -> Any:
    """PEFT's LoRA config for a VLM: on the trained parts only (see ``lora_targets``)."""
    from tuneyard.trainer.plumbing import lora_config as text_lora_config

    config = text_lora_config(spec)
    config.target_modules = set(lora_targets(spec, model))
    return config


def freeze_parts(spec: TrainingSpec, model: torch.nn.Module) -> None:
    """Full fine-tuning: no gradient for the parts the spec keeps frozen."""
    parts = trained_parts(spec)
    for name, param in model.named_parameters():
        if part_of(name) not in parts:
            param.requires_grad_(False)


class VisionCollator:
    """Pads a batch's ids and labels (right side) and turns its rows' images, in row order, into the image
    processor's tensors, so that the n-th image's features fill the n-th run of placeholder tokens."""

    def __init__(self, proc: Any, data_dir: str) -> None:
        self.processor = proc
        self.data_dir = data_dir
        tok = proc.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.image_id = image_token(proc)[1]
        self.type_ids = bool(getattr(proc, "return_mm_token_type_ids", False))

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        images = []
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.as_tensor(f["input_ids"])
            labels[i, :n] = torch.as_tensor(f["labels"])
            mask[i, :n] = 1
            images += [open_image(self.data_dir, ref) for ref in f.get("images") or ()]
        batch: dict[str, torch.Tensor] = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if self.type_ids:
            # Multimodal RoPE (Qwen2-VL) places image tokens by these: 1 image, 0 text.
            batch["mm_token_type_ids"] = ((ids == self.image_id) & (mask == 1)).long()
        if images:
            pixels = self.processor.image_processor(images=images, return_tensors="pt")
            batch.update({k: v for k, v in pixels.items() if isinstance(v, torch.Tensor)})
        return batch


def build_trainer(ctx: Any, model: Any, train: Any, valid: Any, callbacks: list) -> Any:
    """The SFT recipe's trainer for a VLM job: padded batches with their images, the adapter on the trained parts."""
    from tuneyard.trainer.fastpath import Batching
    from tuneyard.trainer.plumbing import _is_moe, optimizer_override
    from tuneyard.trainer.recipes.sft import Trainer, build_config

    spec = ctx.spec
    model.config.use_cache = False
    order = "group_by_length" if spec.data.shuffle else "sequential"
    batching = Batching(False, order, "padded (vision-language rows: no padding-free batches across rows)")
    config = build_config(spec, ctx.job, ctx.device, ctx.precision, ctx.per_device, ctx.accum,
                          has_eval=valid is not None, moe=_is_moe(model), world_size=ctx.ranks.world_size,
                          batching=batching)
    # The collator needs the images column, and the rows are tokenised already.
    config.remove_unused_columns = False
    config.dataset_kwargs = {"skip_prepare_dataset": True}
    # A batch without images leaves a trained vision tower or aligner without gradients.
    config.ddp_find_unused_parameters = config.ddp_find_unused_parameters or len(trained_parts(spec)) > 1
    peft_config = None
    if not hasattr(model, "peft_config"):
        if spec.adapter.type == "lora":
            peft_config = lora_config(spec, model)
        else:
            freeze_parts(spec, model)
    ctx.log.info("sft (vision-language): batches %s; trains %s", batching.why,
                 ", ".join(p for p in PARTS if p in trained_parts(spec)))
    return Trainer(model=model, args=config, train_dataset=train, eval_dataset=valid, processing_class=ctx.tokenizer,
                   data_collator=VisionCollator(ctx.tokenizer, str(ctx.job.data)), peft_config=peft_config,
                   callbacks=callbacks, optimizer_cls_and_kwargs=optimizer_override(spec, ctx.device))


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:400] if text else type(e).__name__
