"""DPO through the real trainer subprocess: 2 gloo ranks follow the curve of 1 process at the same global batch
(training and validation metrics)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.preference import write_preference_jsonl
from tests.trainer.trainer_helpers import events, result, run_trainer
from tuneyard.domain.metrics import REWARDS
from tuneyard.domain.spec import TrainingSpec
from tuneyard.jobdir import JobDir, read_json

pytestmark = pytest.mark.slow

NAMES = ("train_loss", *(n for n in REWARDS if not n.startswith("valid_")))
VALID = ("valid_loss", *(n for n in REWARDS if n.startswith("valid_")))


def prepared_dpo_job(root: Path, model_dir: Path, name: str, nproc: int) -> JobDir:
    """A DPO job directory on the shared preference set (also its validation set), through the real prepare step:
    4 epochs x 3 steps of 4 pairs, micro-batches of 2 (2 x accumulation 2 on one process, 2 x 1 x 2 ranks on
    two), an evaluation each epoch."""
    from tuneyard.data.prepare import run

    job = JobDir(root / name).create()
    rows = str(write_preference_jsonl(root / f"{name}.jsonl"))
    spec = TrainingSpec.model_validate({
        "method": "dpo",
        "model": {"name": str(model_dir), "source": "local"},
        "data": {"train": {"path": rows}, "validation": {"path": rows, "param": "validation_file"},
                 "max_length": 128},
        "hyperparameters": {"n_epochs": 4, "batch_size": 4, "per_device_batch_size": 2, "learning_rate": 4e-3,
                            "beta": 0.1},
        "resources": {"device": "cpu", "nproc_per_node": nproc},
        "seed": 5,
    })
    job.spec.write_text(spec.model_dump_json())
    assert run(job.root) == 0
    assert read_json(job.prepared)["ok"], read_json(job.prepared)
    return job


def _metrics(job: JobDir, names: tuple[str, ...]) -> dict[int, dict[str, float]]:
    return {e["data"]["step"]: {n: e["data"][n] for n in names} for e in events(job, "metrics")
            if names[0] in e["data"]}


def test_two_processes_match_one(tmp_path, tiny_model_dir):
    """The same computation in another order (see test_sft_run's test of the same name): each rank gets every other
    micro-batch of the seeded permutation, DPO's loss is a mean over a micro-batch's pairs, and TRL gathers the
    reward metrics of every rank before it averages them. Tolerance 1e-4 on every logged value."""
    one = prepared_dpo_job(tmp_path, tiny_model_dir, "ftjob-dpo-1", 1)
    two = prepared_dpo_job(tmp_path, tiny_model_dir, "ftjob-dpo-2", 2)
    for job, nproc in ((one, 1), (two, 2)):
        proc = run_trainer(job, nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert result(job)["status"] == "succeeded", result(job)
    started = [e["message"] for e in events(two, "message") if e["message"].startswith("Training started")]
    assert started and started[0].endswith("2 process(es), cpu"), started
    a, b = _metrics(one, NAMES), _metrics(two, NAMES)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    va, vb = _metrics(one, VALID), _metrics(two, VALID)
    assert sorted(va) == sorted(vb) == [3, 6, 9, 12]
    for x, y in ((a, b), (va, vb)):
        for step in x:
            for n in x[step]:
                assert abs(x[step][n] - y[step][n]) < 1e-4, (step, n, x[step][n], y[step][n])
    assert (two.checkpoints / "checkpoint-12" / "rng_state_1.pth").is_file()
    assert result(two)["trained_tokens"] == result(one)["trained_tokens"] > 0
    # Not a flat curve compared with itself: the pairs are learnt.
    assert a[12]["rewards_margins"] > a[1]["rewards_margins"]
