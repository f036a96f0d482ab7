"""Image rows for vision-language models: recognising a VLM, tokenising as its processor does, what is trained."""

from __future__ import annotations

import pytest

from tests.vision import colour_rows, store_png
from tuneyard.data.images import open_image
from tuneyard.data.tokenize import IGNORE_INDEX, ConversationEncoder, EncodeError, EncodeStats
from tuneyard.data.vision import VisionEncoder, is_vision_model, load_processor
from tuneyard.domain import capabilities
from tuneyard.domain.spec import TrainingSpec


@pytest.fixture(scope="module", params=["qwen2_vl", "llava"])
def vlm(request):
    """(model directory, processor) of each tiny family."""
    path = request.getfixturevalue("tiny_qwen2_vl_dir" if request.param == "qwen2_vl" else "tiny_llava_dir")
    return path, load_processor(str(path))


def test_vision_models_are_recognised(tiny_qwen2_vl_dir, tiny_llava_dir, tiny_model_dir):
    assert is_vision_model(tiny_qwen2_vl_dir) and is_vision_model(str(tiny_llava_dir))
    assert not is_vision_model(tiny_model_dir)


def test_image_rows_tokenise_as_the_processor_does(vlm, tmp_path):
    path, proc = vlm
    rows = colour_rows(tmp_path, 1, seed=0)
    rows = [{"messages": r["messages"]} for r in rows]
    # A second image, of another size, in a two-turn row: every image expands by its own size.
    from PIL import Image

    wide = store_png(tmp_path, Image.new("RGB", (56, 42), (9, 9, 9)))
    two = {"messages": [*rows[0]["messages"], {"role": "user", "content": [
        {"type": "text", "text": "And this?"}, {"type": "image", "image": wide}]},
        {"role": "assistant", "content": "black."}]}
    stats = EncodeStats()
    encoded = VisionEncoder(proc, str(tmp_path)).encode([*rows, two], stats)
    image_id = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    for row, enc in zip([*rows, two], encoded, strict=True):
        refs = [p["image"] for m in row["messages"] if isinstance(m["content"], list) for p in m["content"]
                if p["type"] == "image"]
        assert enc.images == refs
        text = proc.apply_chat_template(row["messages"], tokenize=False)
        want = proc(text=[text], images=[open_image(tmp_path, r) for r in refs])["input_ids"][0]
        assert enc.input_ids.tolist() == list(want)
        trained = proc.tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True)
                                         if lab != IGNORE_INDEX])
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert trained == "".join(f"{a}<|im_end|>" for a in answers)
        assert not (enc.labels[enc.input_ids == image_id] != IGNORE_INDEX).any()
    # Image tokens count among the job's tokens.
    assert stats.tokens == sum(len(e.input_ids) for e in encoded) and stats.examples == len(encoded)


def test_image_rows_that_cannot_be_trained_are_refused(tiny_qwen2_vl_dir, tiny_tokenizer, tmp_path):
    proc = load_processor(str(tiny_qwen2_vl_dir))
    row = {"messages": colour_rows(tmp_path, 1, seed=0)[0]["messages"]}
    in_answer = {"messages": [row["messages"][0], {"role": "assistant", "content": [
        {"type": "image", "image": row["messages"][0]["content"][0]["image"]}]}]}
    with pytest.raises(EncodeError, match=r"message 2 \(assistant\) holds an image"):
        VisionEncoder(proc, str(tmp_path)).encode([row, in_answer])
    # A template that does not show the images cannot be trained on them.
    hides = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] if m['content'] is string else '' }}\n" \
            "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(EncodeError, match="shows 0 image placeholder"):
        VisionEncoder(proc, str(tmp_path), template=hides).encode([row])
    # A text model given the same row says so.
    with pytest.raises(EncodeError, match="text-only model"):
        ConversationEncoder(tiny_tokenizer).encode([row])
    # Too long to keep its image whole: dropped, never cut through the image.
    stats = EncodeStats()
    assert VisionEncoder(proc, str(tmp_path), max_length=8).encode([row], stats) == [None]
    assert stats.dropped_too_long == 1


def test_capabilities_of_vision_language_jobs():
    base = {"model": {"name": "org/vlm", "model_type": "vlm"}, "data": {"train": {"path": "t.jsonl"}}}
    assert capabilities.check(TrainingSpec.model_validate(base)) == []
    for option in ("packing", "lazy_tokenize", "streaming"):
        bad = TrainingSpec.model_validate({**base, "data": {"train": {"path": "t.jsonl"}, option: True}})
        assert [p.param for p in capabilities.check(bad)] == [option]
    dpo = TrainingSpec.model_validate({**base, "method": "dpo"})
    assert [p.param for p in capabilities.check(dpo)] == ["model_type"]
    text = TrainingSpec.model_validate({**base, "model": {"name": "org/llm"}, "vision": {"freeze_vit": False}})
    problems = capabilities.check(text)
    assert [p.param for p in problems] == ["freeze_vit"] and "vision-language models" in problems[0].message
    with pytest.raises(ValueError, match="min_pixels is larger"):
        TrainingSpec.model_validate({**base, "vision": {"max_pixels": 100, "min_pixels": 200}})


def test_adapter_goes_on_the_parts_that_are_trained(tiny_qwen2_vl_dir, tiny_llava_dir):
    from transformers import AutoModelForImageTextToText

    from tuneyard.trainer.vision import lora_targets, part_of

    spec = {"model": {"name": "x", "model_type": "vlm"}, "data": {"train": {"path": "t.jsonl"}}}
    for path, vision, aligner in ((tiny_qwen2_vl_dir, "model.visual.", "model.visual.merger."),
                                  (tiny_llava_dir, "model.vision_tower.", "model.multi_modal_projector.")):
        model = AutoModelForImageTextToText.from_pretrained(str(path))
        default = lora_targets(TrainingSpec.model_validate(spec), model)
        assert default and all(part_of(n) == "language" and "language_model" in n for n in default)
        both = lora_targets(TrainingSpec.model_validate({**spec, "vision": {"freeze_vit": False,
                                                                             "freeze_aligner": False}}), model)
        assert any(n.startswith(aligner) for n in both)
        assert any(n.startswith(vision) and not n.startswith(aligner) for n in both)
        only_q = lora_targets(TrainingSpec.model_validate({**spec, "adapter": {"target_modules": ["q_proj"]}}), model)
        assert only_q and all(n.endswith(".q_proj") and "language_model" in n for n in only_q)
