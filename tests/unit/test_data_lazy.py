"""lazy_tokenize: the prepare step stores rows; the trainer's per-batch encoder gives the eager tokens exactly."""

from __future__ import annotations

from tests.unit.test_data_prepare import make_job
from tuneyard.data.prepare import run
from tuneyard.data.splits import LAZY_COLUMN, load_split
from tuneyard.demo.tiny import write_sample_jsonl
from tuneyard.domain.spec import SplitSpec, TrainingSpec
from tuneyard.jobdir import read_json


def test_lazy_rows_encode_to_the_eager_tokens(tmp_path, tiny_model_dir, tiny_tokenizer):

    from tuneyard.trainer.recipes.sft import lazy_encoder

    train = write_sample_jsonl(tmp_path / "train.jsonl", repeat=2)
    split = SplitSpec(type="sequential", validation_ratio=0.25)
    eager = make_job(tmp_path / "eager", tiny_model_dir, train, split=split, system_prompt="Be brief.")
    lazy = make_job(tmp_path / "lazy", tiny_model_dir, train, split=split, system_prompt="Be brief.",
                    lazy_tokenize=True)
    assert run(eager.root) == 0 and run(lazy.root) == 0
    e, z = read_json(eager.prepared), read_json(lazy.prepared)
    assert (z["n_train"], z["n_validation"], z["total_steps"]) == (e["n_train"], e["n_validation"], e["total_steps"])
    assert z["train_tokens"] is None and e["train_tokens"] > 0
    spec = TrainingSpec.model_validate(read_json(lazy.resolved_spec))
    assert spec.data.template and "im_start" in spec.data.template  # the resolved template text itself
    for split_name in ("train", "validation"):
        rows = load_split(lazy.data / split_name)
        assert rows.column_names == [LAZY_COLUMN]
        rows.set_transform(lazy_encoder(spec, tiny_tokenizer))
        want = load_split(eager.data / split_name)
        got = rows[: len(rows)]
        assert got["input_ids"] == want["input_ids"] and got["labels"] == want["labels"]
        assert rows[0]["input_ids"] == want[0]["input_ids"]


def test_an_answer_that_does_not_fit_carries_no_loss(tmp_path, tiny_model_dir, tiny_tokenizer):

    from tuneyard.trainer.recipes.sft import lazy_encoder

    train = write_sample_jsonl(tmp_path / "train.jsonl")
    job = make_job(tmp_path / "short", tiny_model_dir, train, lazy_tokenize=True, max_length=16)
    assert run(job.root) == 0
    spec = TrainingSpec.model_validate(read_json(job.resolved_spec))
    rows = load_split(job.data / "train")
    rows.set_transform(lazy_encoder(spec, tiny_tokenizer))
    first = rows[0]
    assert len(first["input_ids"]) <= 16 and set(first["labels"]) == {-100}
