"""Vision-language jobs in the real trainer: the images are used (a colour task learnt from them, and not without
them), the parts that stay frozen stay frozen, and the output loads back with the same processor."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.trainer.conftest import _merge, base_spec
from tests.trainer.trainer_helpers import result, run_trainer, train_losses
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


def colour_job(root, model_dir, rows, name):
    """A colour job run to its end; its JobDir."""
    job = build_vision_job(root, model_dir, rows, name, **COLOUR_SPEC)
    proc = run_trainer(job, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return job


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, tiny_qwen2_vl_dir, colours):
    """The colour job on the real images, uninterrupted (shared by the tests that read it)."""
    return colour_job(tmp_path_factory.mktemp("vlm-images"), tiny_qwen2_vl_dir, colours["train"], "ftjob-train")


@pytest.mark.slow
def test_qwen2_vl_names_the_colour_from_the_image_and_not_without_it(tmp_path, tiny_qwen2_vl_dir, colours,
                                                                      image_run):
    accuracy = {}
    for kind in ("train", "blank"):
        job = image_run if kind == "train" else colour_job(tmp_path, tiny_qwen2_vl_dir, colours[kind], "ftjob-blank")
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
def test_a_paused_vlm_job_resumes_to_the_uninterrupted_run(tmp_path, tiny_qwen2_vl_dir, colours, image_run):
    from tests.trainer.test_stop_resume import start_and_stop_at

    job = build_vision_job(tmp_path, tiny_qwen2_vl_dir, colours["train"], "ftjob-pause", **COLOUR_SPEC)
    code, _ = start_and_stop_at(job, "pause", after_step=3, timeout=600)
    assert code == 0 and result(job)["status"] == "stopped", (job.logs / "trainer.log").read_text()[-3000:]
    paused = result(job)["step"]
    assert paused < 16
    (job.control / "stop").unlink()
    proc = run_trainer(job, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert result(job)["status"] == "succeeded" and result(job)["trained_steps"] == 16
    reference = dict(train_losses(image_run))
    resumed = [(s, loss) for s, loss in train_losses(job) if s > paused]
    assert resumed and resumed[0][0] == paused + 1
    assert max(abs(loss - reference[s]) for s, loss in resumed) < 1e-4
    assert result(job)["trained_tokens"] == result(image_run)["trained_tokens"]


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
