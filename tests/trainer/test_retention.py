"""Checkpoint retention: save_total_limit keeps the newest, keep_best_checkpoint also the best by validation loss."""

from __future__ import annotations

import pytest

from tests.trainer.conftest import build_job, tokenise_chat
from tests.trainer.trainer_helpers import events, run_trainer
from tuneyard.data.splits import write_rows
from tuneyard.demo.tiny import sample_rows


@pytest.mark.slow
def test_the_best_checkpoint_outlives_the_rotation(tmp_path, tiny_model_dir, tiny_tokenizer, tokenised_rows):
    # Validation answers are the wrong ones (each prompt with the next row's answer): the better the model
    # learns the training answers, the worse its validation loss gets after the first epochs.
    rows = sample_rows()
    wrong = [{"messages": [*r["messages"][:-1], rows[(i + 1) % len(rows)]["messages"][-1]]}
             for i, r in enumerate(rows)]
    job = build_job(tmp_path, tiny_model_dir, tokenised_rows, "ftjob-best", hyperparameters={"n_epochs": 6},
                    schedule={"save_total_limit": 1, "keep_best_checkpoint": True})
    write_rows(job.data / "validation", tokenise_chat(tiny_tokenizer, wrong))
    proc = run_trainer(job, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    valid = {e["data"]["step"]: e["data"]["valid_loss"] for e in events(job, "metrics") if "valid_loss" in e["data"]}
    best = min(valid, key=valid.get)
    last = max(valid)
    assert best != last, valid  # the data makes the best an early one
    kept = sorted(int(p.name.split("-")[1]) for p in job.checkpoints.glob("checkpoint-*"))
    assert kept == sorted({best, last}), (kept, valid)


def test_keep_best_maps_onto_the_trainer_config(tmp_path, tiny_model_dir, tokenised_rows):
    from tests.trainer.test_config import spec_of
    from tuneyard.trainer.plumbing import pick_precision
    from tuneyard.trainer.recipes.sft import build_config

    for keep, has_eval, want in ((True, True, "eval_loss"), (True, False, None), (False, True, None)):
        spec = spec_of(tiny_model_dir, schedule={"keep_best_checkpoint": keep})
        job = build_job(tmp_path, tiny_model_dir, tokenised_rows, f"job-{keep}-{has_eval}")
        config = build_config(spec, job, "cpu", pick_precision(spec, "cpu"), 2, 2, has_eval=has_eval)
        assert config.metric_for_best_model == want
        if want:
            assert config.greater_is_better is False
