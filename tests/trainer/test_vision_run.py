"""Vision-language jobs in the real trainer: the images are used (a colour task learnt from them, and not without
them), the parts that stay frozen stay frozen, and the output loads back with the same processor."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.trainer.conftest import _merge, base_spec
from tests.trainer.trainer_helpers import result, run_trainer
from tests.vision import build_vision_job, colour_accuracy, colour_rows
from tuneyard.data.prepare import run as prepare
from tuneyard.data.splits import load_split
from tuneyard.demo.tiny import sample_rows
from tuneyard.domain.spec import TrainingSpec
from tuneyard.jobdir import JobDir, read_json

# 16 rows (4 colours x 4), 4 a step, 4 epochs: 16 steps. The random vision tower stays frozen; its aligner learns.
COLOUR_SPEC = {"vision": {"freeze_aligner": False},
               "hyperparameters": {"n_epochs": 4, "batch_size": 4, "per_device_batch_size": 4, "learning_rate": 1e-2}}


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    return {"train": colour_rows(root / "train", 4, seed=1),
            "blank": colour_rows(root / "blank", 4, seed=1, blank=True),
            "held": colour_rows(root / "held", 4, seed=2), "held_dir": root / "held"}


@pytest.mark.slow
def test_qwen2_vl_names_the_colour_from_the_image_and_not_without_it(tmp_path, tiny_qwen2_vl_dir, colours):
    accuracy = {}
    for kind in ("train", "blank"):
        job = build_vision_job(tmp_path, tiny_qwen2_vl_dir, colours[kind], f"ftjob-{kind}", **COLOUR_SPEC)
        proc = run_trainer(job, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        res = result(job)
        assert res["status"] == "succeeded" and res["trained_steps"] == 16
        # Every token of every row, the image tokens among them, each epoch.
        rows = load_split(job.data / "train")
        assert res["trained_tokens"] == 4 * sum(len(ids) for ids in rows["input_ids"])
        adapter = json.loads((job.output / "adapter_config.json").read_text())
        targets = adapter["target_modules"]
        assert any(".merger." in t for t in targets) and not any(".blocks." in t for t in targets)
        assert (job.output / "processor_config.json").exists() and (job.output / "tokenizer.json").exists()
        accuracy[kind] = colour_accuracy(tiny_qwen2_vl_dir, job.output, colours["held"], colours["held_dir"])
    # Four colours: chance is 0.25. Blank images leave only the prior, the same answer for every image.
    assert accuracy["train"] >= 0.75 and accuracy["blank"] <= 0.5, accuracy


@pytest.mark.slow
def test_an_image_model_on_text_rows_trains_fully_with_its_vision_tower_frozen(tmp_path, tiny_llava_dir):
    from transformers import AutoModelForImageTextToText

    from tuneyard.data.vision import load_processor

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in sample_rows()))
    # model_type is left 'llm': the prepare step sees the vision config and makes the job a VLM job.
    spec = _merge(base_spec(tiny_llava_dir), {"data": {"train": {"path": str(train)}},
                                              "adapter": {"type": "full", "modules_to_save": []},
                                              "hyperparameters": {"n_epochs": 1}})
    job = JobDir(tmp_path / "ftjob-llava").create()
    job.spec.write_text(TrainingSpec.model_validate(spec).model_dump_json())
    assert prepare(job.root) == 0, read_json(job.prepared)
    assert read_json(job.prepared)["ok"], read_json(job.prepared)
    assert read_json(job.resolved_spec)["model"]["model_type"] == "vlm"
    assert load_split(job.data / "train")["images"] == [[]] * 12
    proc = run_trainer(job, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert result(job)["status"] == "succeeded" and result(job)["trained_steps"] == 3
    base = load_file(str(tiny_llava_dir / "model.safetensors"))
    tuned = load_file(str(job.output / "model.safetensors"))
    changed = {k for k in base if not (base[k] == tuned[k]).all()}
    assert changed and all("language_model" in k or k.startswith("lm_head") for k in changed), sorted(changed)
    model = AutoModelForImageTextToText.from_pretrained(str(job.output))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(load_processor(str(job.output))).__name__ == "LlavaProcessor"


def test_model_type_vlm_on_a_text_model_fails_the_prepare_step(tmp_path, tiny_model_dir):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in sample_rows()))
    spec = _merge(base_spec(tiny_model_dir), {"model": {"model_type": "vlm"}, "data": {"train": {"path": str(train)}}})
    job = JobDir(tmp_path / "ftjob-text").create()
    job.spec.write_text(TrainingSpec.model_validate(spec).model_dump_json())
    assert prepare(job.root) == 0
    error = read_json(job.prepared)["error"]
    assert error["param"] == "model_type" and "text-only model" in error["message"], error
