"""Trainer fixtures: tokenised demo rows and job directories with a resolved spec and tokenised data."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.trainer.trainer_helpers import TRAIN_REPEAT, run_trainer
from tuneyard.domain.spec import TrainingSpec
from tuneyard.jobdir import JobDir


def tokenise_chat(tokenizer, rows: list[dict]) -> list[dict]:
    """input_ids from the chat template; labels: the assistant turn (answer + <|im_end|>\n), else -100."""
    out = []
    for row in rows:
        messages = row["messages"]
        full = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True,
                                               add_generation_prompt=True)["input_ids"]
        assert full[: len(prompt)] == prompt
        out.append({"input_ids": list(full), "labels": [-100] * len(prompt) + list(full[len(prompt):])})
    return out


@pytest.fixture(scope="session")
def tokenised_rows(tiny_tokenizer) -> list[dict]:
    """The demo rows tokenised and labelled the way the data pipeline hands them to the trainer."""
    from tuneyard.demo.tiny import sample_rows

    return tokenise_chat(tiny_tokenizer, sample_rows())


def base_spec(model_dir: Path) -> dict:
    """A resolved spec for the tiny model: LoRA on all linear layers + lm_head, 4 epochs x 12 steps."""
    return {
        "method": "sft",
        "model": {"name": str(model_dir), "source": "local"},
        "data": {"train": {"path": "train.jsonl"}, "padding_free": True, "max_length": 128},
        # The random base can only sharpen its output distribution through its head: train it in full.
        "adapter": {"type": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear",
                    "modules_to_save": ["lm_head"]},
        "hyperparameters": {"n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 1.0,
                            "learning_rate": 5e-3, "per_device_batch_size": 2,
                            "gradient_accumulation_steps": 2, "per_device_eval_batch_size": 4},
        "schedule": {"save_total_limit": 2},
        "resources": {"device": "cpu", "nproc_per_node": 1},
        "seed": 11,
    }


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_job(root: Path, model_dir: Path, rows: list[dict], name: str = "ftjob-test", *,
              validation: bool = True, **overrides) -> JobDir:
    """A job directory: resolved_spec.json (base_spec + ``overrides``) and tokenised data/train|validation."""
    from tuneyard.data.splits import write_rows

    job = JobDir(root / name).create()
    spec = TrainingSpec.model_validate(_merge(base_spec(model_dir), overrides))
    job.resolved_spec.write_text(spec.model_dump_json(indent=2))
    write_rows(job.data / "train", rows * TRAIN_REPEAT)
    if validation:
        write_rows(job.data / "validation", rows)
    return job


@pytest.fixture()
def make_job(tmp_path, tiny_model_dir, tokenised_rows) -> Callable[..., JobDir]:
    """``make_job(name, validation=True, **spec_overrides)`` -> a fresh job directory under tmp_path."""

    def make(name: str = "ftjob-test", *, validation: bool = True, **overrides) -> JobDir:
        return build_job(tmp_path, tiny_model_dir, tokenised_rows, name, validation=validation, **overrides)

    return make


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, tiny_model_dir, tokenised_rows) -> JobDir:
    """One finished LoRA run of base_spec (1 process), shared by the tests that read its outputs."""
    job = build_job(tmp_path_factory.mktemp("lora"), tiny_model_dir, tokenised_rows, "ftjob-lora")
    proc = run_trainer(job)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return job
