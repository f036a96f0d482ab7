"""streaming: no tokenised copy; the trainer reads the source rows, tokenises them as it goes, and learns."""

from __future__ import annotations

import json

import pytest

from tests.trainer.conftest import _merge, base_spec
from tests.trainer.trainer_helpers import events, run_trainer, train_losses
from tuneyard.data.pipeline import streamed_examples
from tuneyard.data.prepare import run as prepare
from tuneyard.data.splits import STREAM_FILE, load_split
from tuneyard.demo.tiny import sample_rows
from tuneyard.domain.spec import TrainingSpec
from tuneyard.jobdir import JobDir, read_json


def make(tmp_path, model_dir, name: str, **data) -> JobDir:
    train = tmp_path / "train.jsonl"
    if not train.exists():
        train.write_text("".join(json.dumps(r) + "\n" for r in sample_rows() * 4))
    spec = _merge(base_spec(model_dir), {"data": {"train": {"path": str(train)},
                                                  "split": {"type": "random", "validation_ratio": 0.25}, **data}})
    job = JobDir(tmp_path / name).create()
    job.spec.write_text(TrainingSpec.model_validate(spec).model_dump_json())
    assert prepare(job.root) == 0, read_json(job.prepared)
    return job


def test_streamed_splits_are_the_tokenised_splits(tmp_path, tiny_model_dir, tiny_tokenizer):
    eager = make(tmp_path, tiny_model_dir, "eager")
    streamed = make(tmp_path, tiny_model_dir, "streamed", streaming=True)
    e, s = read_json(eager.prepared), read_json(streamed.prepared)
    assert (s["n_train"], s["n_validation"], s["total_steps"]) == (e["n_train"], e["n_validation"],
                                                                    e["total_steps"]) == (36, 12, 36)
    assert s["train_tokens"] is None
    assert not (streamed.data / "train").exists() and (streamed.data / STREAM_FILE).exists()
    spec = TrainingSpec.model_validate(read_json(streamed.resolved_spec))
    manifest = read_json(streamed.data / STREAM_FILE)
    options = {"template": spec.data.template, "max_length": spec.data.max_length}
    for split in ("train", "validation"):
        want = load_split(eager.data / split)
        got = list(streamed_examples(manifest, split, tiny_tokenizer, options))
        assert [g["input_ids"].tolist() for g in got] == want["input_ids"]
        assert [g["labels"].tolist() for g in got] == want["labels"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_streamed_job_trains(tmp_path, tiny_model_dir, nproc):
    job = make(tmp_path, tiny_model_dir, f"stream-{nproc}", streaming=True)
    proc = run_trainer(job, nproc=nproc, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_json(job.result)
    # 36 rows, batch 4: 9 steps an epoch, 4 epochs; the step count is known although the set has no length.
    assert result["status"] == "succeeded" and result["trained_steps"] == 36
    assert result["trained_tokens"] > 0
    losses = [loss for _, loss in train_losses(job)]
    assert len(losses) == 36
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 1.0, losses
    valid = [e["data"]["valid_loss"] for e in events(job, "metrics") if "valid_loss" in e["data"]]
    assert len(valid) == 4 and valid[-1] < valid[0]
    assert (job.output / "adapter_config.json").exists()
