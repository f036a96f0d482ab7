"""Tiny random vision-language models with their processors, built offline, and the solid-colour image task.

Two families, each saved with ``save_pretrained`` and loaded back by the real ``from_pretrained`` code:

* Qwen2-VL (``Qwen2VLForConditionalGeneration``): patch 14, merge 2, so a 28x28 image is 4 patches, one
  image token;
* LLaVA (``LlavaForConditionalGeneration`` over a tiny CLIP vision tower): a 28x28 image is 4 patches, four
  ``<image>`` tokens.

Their tokenizers are the demo's byte-level BPE (``tuneyard.demo.tiny.build_tokenizer``) with the families' image
tokens added, and a ChatML template that renders image parts as each family's placeholder.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tuneyard.demo.tiny import build_tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
QUESTION = "What colour is this?"
IMAGE_SIDE = 28


def _chatml_with_images(image_text: str) -> str:
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '" + image_text + "' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


def _corpus() -> list[str]:
    return [f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n{c}.<|im_end|>\n" for c in COLOURS] * 4


def _tokenizer(out: Path, extra: list[str], template: str):
    tok = build_tokenizer(_corpus(), out, vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": extra})
    tok.chat_template = template
    return tok


def build_tiny_qwen2_vl(out_dir: Path, seed: int = 0) -> Path:
    """A random Qwen2-VL-shaped model (1 vision block, 2 text layers) + Qwen2VLProcessor, saved to ``out_dir``."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = _chatml_with_images("<|vision_start|><|image_pad|><|vision_end|>")
    tok = _tokenizer(out, ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"], template)
    side = IMAGE_SIDE * IMAGE_SIDE
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": side, "longest_edge": 4 * side},
                                               patch_size=14, merge_size=2, temporal_patch_size=2)
    ids = tok.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                     "initializer_range": 0.1, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                     "bos_token_id": None,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "initializer_range": 0.1},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(out))
    # Qwen2VLProcessor itself needs torchvision (for its video processor): its parts are saved instead, and
    # AutoProcessor (or tuneyard's image-only fallback) assembles it from them.
    tok.save_pretrained(str(out))
    image_processor.save_pretrained(str(out))
    return out


def build_tiny_llava(out_dir: Path, seed: int = 0) -> Path:
    """A random LLaVA model (tiny CLIP tower + 2-layer Llama) + LlavaProcessor, saved to ``out_dir``."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = _chatml_with_images("<image>")
    tok = _tokenizer(out, ["<image>"], template)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIDE},
                                         crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", chat_template=template,
                               num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": IMAGE_SIDE,
                       "patch_size": 14, "projection_dim": 32},
        text_config={"model_type": "llama", "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                     "max_position_embeddings": 512, "initializer_range": 0.1, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id, "bos_token_id": None},
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out


def colour_image(colour: str, rng: random.Random, side: int = IMAGE_SIDE, blank: bool = False):
    """A solid image of ``colour`` with a little per-pixel noise (grey when ``blank``)."""
    from PIL import Image

    base = (128, 128, 128) if blank else COLOURS[colour]
    jitter = [rng.randint(-20, 20) for _ in range(3)]
    rgb = tuple(max(0, min(255, c + j)) for c, j in zip(base, jitter, strict=True))
    return Image.new("RGB", (side, side), rgb)


def store_png(data_dir: Path, image) -> str:
    """Store ``image`` as the prepare step does (content-addressed PNG under ``data_dir/images``); its REF."""
    import hashlib
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    ref = f"images/{hashlib.sha256(buf.getvalue()).hexdigest()}.png"
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    (data_dir / ref).write_bytes(buf.getvalue())
    return ref


def colour_rows(data_dir: Path, n_per_class: int, seed: int, *, blank: bool = False) -> list[dict]:
    """Image rows ("what colour is this?" -> "<colour>.") whose images are stored under ``data_dir/images``,
    referenced as the prepare step stores them (``images/<sha256>.png``)."""
    rng = random.Random(seed)
    images = data_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(n_per_class):
        for colour in COLOURS:
            ref = store_png(data_dir, colour_image(colour, rng, blank=blank))
            rows.append({"messages": [
                {"role": "user", "content": [{"type": "image", "image": ref}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": f"{colour}."},
            ], "colour": colour, "_images_from": str(data_dir)})
    rng.shuffle(rows)
    return rows


def write_rows_jsonl(path: Path, rows: list[dict]) -> Path:
    """Rows as JSONL (without the test's own ``colour`` key)."""
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if k != "colour" and not k.startswith("_")}) + "\n")
    return path


def build_vision_job(root: Path, model_dir: Path, rows: list[dict], name: str, *, validation: list[dict] | None = None,
                     **spec: dict):
    """A VLM job directory: ``resolved_spec.json`` (``spec`` over a small LoRA run) and its tokenised image rows,
    written as the prepare step writes them (images under ``data/images``, references in the rows)."""
    import shutil

    from tests.trainer.conftest import _merge, base_spec
    from tuneyard.data.splits import SplitWriter
    from tuneyard.data.vision import VisionEncoder, load_processor, vision_features, vision_table
    from tuneyard.domain.spec import TrainingSpec
    from tuneyard.jobdir import JobDir

    job = JobDir(root / name).create()
    full = _merge(base_spec(model_dir), {"model": {"model_type": "vlm"},
                                         "hyperparameters": {"n_epochs": 3, "batch_size": 8,
                                                             "per_device_batch_size": 8,
                                                             "gradient_accumulation_steps": 1}})
    resolved = TrainingSpec.model_validate(_merge(full, spec))
    job.resolved_spec.write_text(resolved.model_dump_json(indent=2))
    job.data.mkdir(parents=True, exist_ok=True)
    encoder = VisionEncoder(load_processor(str(model_dir)), str(job.data), max_length=resolved.data.max_length)
    for split, split_rows in (("train", rows), ("validation", validation)):
        if not split_rows:
            continue
        for row in split_rows:
            for m in row["messages"]:
                for part in m["content"] if isinstance(m["content"], list) else ():
                    if part["type"] == "image" and not (job.data / part["image"]).exists():
                        (job.data / part["image"]).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy(Path(row["_images_from"]) / part["image"], job.data / part["image"])
        clean = [{k: v for k, v in r.items() if not k.startswith("_") and k != "colour"} for r in split_rows]
        with SplitWriter(job.data / split, vision_features()) as writer:
            writer.write_table(vision_table([e for e in encoder.encode(clean) if e is not None]))
            writer.commit()
    return job


def colour_accuracy(base_dir: Path, output_dir: Path, rows: list[dict], data_dir: Path) -> float:
    """The share of ``rows`` whose colour the fine-tuned model (base + the adapter in ``output_dir``, with the processor
    saved there) scores highest among all the colours' answers."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from tuneyard.data.vision import VisionEncoder, load_processor
    from tuneyard.trainer.vision import VisionCollator

    proc = load_processor(str(output_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(base_dir))
    if (output_dir / "adapter_config.json").exists():
        model = PeftModel.from_pretrained(model, str(output_dir))
    model.eval()
    encoder = VisionEncoder(proc, str(data_dir))
    names = list(COLOURS)
    candidates = []
    for row in rows:
        for colour in names:
            candidates.append({"messages": [row["messages"][0], {"role": "assistant", "content": f"{colour}."}]})
    encoded = encoder.encode(candidates)
    batch = VisionCollator(proc, str(data_dir))([{"input_ids": e.input_ids, "labels": e.labels, "images": e.images}
                                                 for e in encoded])
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    scores = (picked * mask).sum(-1).view(len(rows), len(names))
    guesses = scores.argmax(-1).tolist()
    return sum(names[g] == row["colour"] for g, row in zip(guesses, rows, strict=True)) / len(rows)
