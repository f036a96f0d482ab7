"""The prepare step end to end on the tiny model: prepared.json, datasets, resolved spec, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneyard.data.prepare import run, split_positions
from tuneyard.data.splits import load_split
from tuneyard.demo.tiny import sample_rows, write_sample_jsonl
from tuneyard.domain.spec import DataSource, DataSpec, ModelSpec, SplitSpec, TrainingSpec
from tuneyard.jobdir import JobDir, iter_events, read_json
from tuneyard.service.jobs import runtime_spec
from tuneyard.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def make_job(tmp_path: Path, model: str | Path, train: Path, **data) -> JobDir:
    """A job directory holding spec.json for an SFT run on ``train``."""
    validation = data.pop("validation", None)
    val_source = DataSource(path=str(validation), param="validation_file") if validation else None
    # The installation's settings as the service writes them into every spec (the test's environment).
    spec = TrainingSpec(model=ModelSpec(name=str(model), source="local"),
                        data=DataSpec(train=DataSource(path=str(train)), validation=val_source,
                                      **{"max_length": 256, **data}), runtime=runtime_spec(Settings()))
    job = JobDir(tmp_path / "job").create()
    job.spec.write_text(spec.model_dump_json())
    return job


def test_prepare_writes_prepared_json_and_datasets(tmp_path, tiny_model_dir, tiny_tokenizer):

    train = write_sample_jsonl(tmp_path / "train.jsonl", repeat=2)
    job = make_job(tmp_path, tiny_model_dir, train, split=SplitSpec(type="sequential", validation_ratio=0.25))
    assert run(job.root) == 0
    prepared = read_json(job.prepared)
    assert prepared["ok"] is True
    assert set(prepared) == {"ok", "n_train", "n_validation", "train_tokens", "trainable_tokens",
                             "validation_tokens", "truncated", "dropped", "total_steps", "format", "template",
                             "hyperparameters"}
    assert (prepared["n_train"], prepared["n_validation"]) == (18, 6)
    assert (prepared["truncated"], prepared["dropped"], prepared["format"]) == (0, 0, "openai")

    train_ds = load_split(job.data / "train")
    val_ds = load_split(job.data / "validation")
    assert train_ds.column_names == ["input_ids", "labels"] and len(train_ds) == 18 and len(val_ds) == 6
    assert prepared["train_tokens"] == sum(len(x) for x in train_ds["input_ids"])
    assert prepared["trainable_tokens"] == sum(sum(y != -100 for y in x) for x in train_ds["labels"])
    # Sequential split: the last quarter of the file (rows 19-24 = demo rows 7-12) is held out.
    first_val = tiny_tokenizer.decode([t for t in val_ds[0]["labels"] if t != -100])
    assert first_val == sample_rows()[6]["messages"][2]["content"] + "<|im_end|>"

    resolved = TrainingSpec.model_validate(read_json(job.resolved_spec))
    assert resolved.is_resolved()
    hp = prepared["hyperparameters"]
    assert hp["n_epochs"] == resolved.hyperparameters.n_epochs == 6  # ceil(100 / 18)
    assert hp["batch_size"] == 1 and prepared["total_steps"] == 6 * 18
    messages = [e.message for e in iter_events(job.events)]
    assert "Training file: 24 examples (openai format)" in messages
    assert any(m.startswith("Tokenised 18 training examples: ") for m in messages)
    assert all(e.source == "prepare" for e in iter_events(job.events))
    assert not list(job.data.glob(".*")), "scratch files are removed"


def test_random_split_is_seeded():
    assert split_positions(100, 0.1, "random", 42) == split_positions(100, 0.1, "random", 42)
    assert split_positions(100, 0.1, "random", 42) != split_positions(100, 0.1, "random", 43)
    assert len(split_positions(100, 0.1, "random", 1)) == 10
    assert split_positions(10, 0.2, "sequential", 0) == {8, 9}
    assert split_positions(1, 0.5, "random", 0) == set()
    assert split_positions(3, 0.01, "random", 0) and len(split_positions(3, 0.99, "random", 0)) == 2


def test_prepare_with_validation_file_text_rows_and_truncation(tmp_path, tiny_model_dir):

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"The capital of {c} is {k}. " * n}) + "\n"
                             for n, (c, k) in enumerate([("Peru", "Lima"), ("Cuba", "Havana")] * 3, 1)))
    val = write_sample_jsonl(tmp_path / "val.jsonl")
    job = make_job(tmp_path, tiny_model_dir, train, validation=val, template="llama3", max_length=24)
    assert run(job.root) == 0
    prepared = read_json(job.prepared)
    assert prepared["ok"] and prepared["format"] == "text" and prepared["template"] == "llama3"
    # The validation rows' answers all lie past 24 tokens with the llama3 headers: cut, nothing is left.
    assert prepared["n_train"] == 6 and prepared["n_validation"] == 0
    assert not (job.data / "validation").exists()
    assert prepared["truncated"] == 4 and prepared["dropped"] == 12
    messages = [e.message for e in iter_events(job.events)]
    assert ("12 example(s) longer than max_length 24 were dropped (truncating them left nothing to train on)"
            in messages)
    train_ds = load_split(job.data / "train")
    assert max(len(x) for x in train_ds["input_ids"]) == 24
    assert prepared["trainable_tokens"] == prepared["train_tokens"]


def failure(job: JobDir) -> dict:
    prepared = read_json(job.prepared)
    assert prepared["ok"] is False
    return prepared["error"]


def test_missing_model(tmp_path, sample_jsonl):
    job = make_job(tmp_path, tmp_path / "no-such-model", sample_jsonl)
    assert run(job.root) == 0
    err = failure(job)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert err["message"].startswith(f"model '{tmp_path / 'no-such-model'}' could not be loaded: ")
    assert not job.resolved_spec.exists()


def test_too_few_examples(tmp_path, tiny_model_dir):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in sample_rows()[:7]))
    job = make_job(tmp_path, tiny_model_dir, train, min_examples=10)
    assert run(job.root) == 0
    assert failure(job) == {"code": "invalid_n_examples", "param": "training_file",
                            "message": "Training file has 7 example(s), but must have at least 10 examples"}


def test_invalid_training_and_validation_files(tmp_path, tiny_model_dir, sample_jsonl):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(sample_rows()[0]) + "\n" + '{"messages": [{"role": "bot", "content": "x"}]}\n')
    job = make_job(tmp_path, tiny_model_dir, bad)
    assert run(job.root) == 0
    assert failure(job) == {"code": "invalid_training_file", "param": "training_file",
                            "message": "Example 2, message 1: unknown role 'bot'"}
    job = make_job(tmp_path, tiny_model_dir, sample_jsonl, validation=bad)
    assert run(job.root) == 0
    err = failure(job)
    assert (err["code"], err["param"]) == ("invalid_validation_file", "validation_file")
    assert err["message"] == "Example 2, message 1: unknown role 'bot'"
    # The scheduler reports the failure from prepared.json; the events only tell the progress.
    events = list(iter_events(job.events))
    assert "Validating validation file" in [e.message for e in events]
    assert not [e for e in events if e.level == "error"]


def test_every_row_dropped(tmp_path, tiny_model_dir, sample_jsonl):
    job = make_job(tmp_path, tiny_model_dir, sample_jsonl, truncation="drop", max_length=8)
    assert run(job.root) == 0
    err = failure(job)
    assert err["code"] == "invalid_training_file"
    assert err["message"] == ("no training example is left: 12 longer than max_length 8 tokens, "
                              "0 with no token to train on")


def test_row_the_template_cannot_render(tmp_path, tiny_model_dir):
    train = tmp_path / "train.jsonl"
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    rows = [*sample_rows()[:2], {"messages": [{"role": "user", "content": "Q"},
                                              {"role": "assistant", "content": "", "tool_calls": [call]}]}]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = make_job(tmp_path, tiny_model_dir, train, template="mistral")
    assert run(job.root) == 0
    err = failure(job)
    assert err["code"] == "invalid_training_file"
    assert err["message"].startswith("Example 3: chat template failed: the mistral template supports")


def test_unexpected_error_is_internal_error(tmp_path):
    job = JobDir(tmp_path / "job").create()
    job.spec.write_text("{not json")
    assert run(job.root) == 1
    err = failure(job)
    assert err["code"] == "internal_error" and err["message"].startswith("data preparation failed: ")


@pytest.mark.timeout(120)
def test_module_entry_point(tmp_path, tiny_model_dir, sample_jsonl):
    job = make_job(tmp_path, tiny_model_dir, sample_jsonl, template="chatml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tuneyard.data.prepare", str(job.root)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    prepared = read_json(job.prepared)
    assert prepared["ok"] and prepared["n_train"] == 12 and prepared["template"] == "chatml"
    assert subprocess.run([sys.executable, "-m", "tuneyard.data.prepare"], env=env,
                          capture_output=True).returncode == 2


def _prepare_with(tmp_path: Path, monkeypatch, name: str, model: Path, train: Path, workers: int) -> JobDir:
    from tuneyard.settings import get_settings

    monkeypatch.setenv("TUNEYARD_PREPARE_WORKERS", str(workers))
    monkeypatch.setenv("TUNEYARD_PREPARE_PARALLEL_MIN_EXAMPLES", "1")
    monkeypatch.setenv("TUNEYARD_TOKENISED_CACHE_BYTES", "0")
    get_settings.cache_clear()
    try:
        (tmp_path / name).mkdir()
        job = make_job(tmp_path / name, model, train, split=SplitSpec(type="random", validation_ratio=0.2),
                       max_length=40)
        assert run(job.root) == 0
        return job
    finally:
        get_settings.cache_clear()


def test_process_pool_gives_the_same_splits_as_one_process(tmp_path, monkeypatch, tiny_model_dir):
    """A pool of processes tokenises chunks in parallel; the output is the one-process output, row for row."""
    import tuneyard.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "CHUNK_ROWS", 7)  # many chunks across the two processes
    rows = sample_rows() * 9
    for k in range(0, len(rows), 5):  # long answers, truncated at max_length
        rows[k] = {"messages": [{"role": "user", "content": "Tell a story."},
                                {"role": "assistant", "content": " ".join(["once upon a time"] * (k % 7 + 3))}]}
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one = _prepare_with(tmp_path, monkeypatch, "one", tiny_model_dir, train, workers=1)
    two = _prepare_with(tmp_path, monkeypatch, "two", tiny_model_dir, train, workers=2)
    p1, p2 = read_json(one.prepared), read_json(two.prepared)
    assert p1["ok"] and p1 == p2
    assert p1["truncated"] > 0  # max_length cuts rows: the counts came back from the processes
    for split in ("train", "validation"):
        a, b = load_split(one.data / split), load_split(two.data / split)
        assert a.to_dict() == b.to_dict() and len(a) > 0


def test_process_pool_names_the_bad_example(tmp_path, monkeypatch, tiny_model_dir):
    rows = sample_rows() * 3
    rows[30] = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # A template that fails on one row only: the error must name that row, whichever process met it.
    template = "{% for m in messages %}{% if m.content == 'q' %}{{ raise_exception('bad row') }}{% endif %}" \
               "{{ m.role }}: {{ m.content }}\n{% endfor %}"
    from tuneyard.settings import get_settings

    monkeypatch.setenv("TUNEYARD_PREPARE_WORKERS", "2")
    monkeypatch.setenv("TUNEYARD_PREPARE_PARALLEL_MIN_EXAMPLES", "1")
    get_settings.cache_clear()
    try:
        job = make_job(tmp_path, tiny_model_dir, train, template=template)
        assert run(job.root) == 0
    finally:
        get_settings.cache_clear()
    prepared = read_json(job.prepared)
    assert prepared["ok"] is False and prepared["error"]["code"] == "invalid_training_file"
    assert prepared["error"]["message"].startswith("Example 31: chat template failed: bad row")
    assert not (job.data / "train").exists()


@pytest.mark.parametrize("env,data,code,fragment", [
    ({"TUNEYARD_MAX_EXAMPLES_PER_JOB": "10"}, {}, "too_many_examples",
     "the training set has 12 examples, more than the 10 this installation allows per job"),
    ({"TUNEYARD_MAX_TOKENS_PER_JOB": "100"}, {}, "too_many_tokens",
     "tokens, more than the 100 this installation allows per job (TUNEYARD_MAX_TOKENS_PER_JOB)"),
    ({"TUNEYARD_MAX_TOKENS_PER_JOB": "1000"}, {"lazy_tokenize": True}, "too_many_tokens",
     "12 rows of up to max_length 256 tokens may hold more than the 1,000 tokens"),
])
def test_per_job_limits(tmp_path, monkeypatch, tiny_model_dir, env, data, code, fragment):
    from tuneyard.settings import get_settings

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TUNEYARD_TOKENISED_CACHE_BYTES", "0")
    get_settings.cache_clear()
    try:
        job = make_job(tmp_path, tiny_model_dir, write_sample_jsonl(tmp_path / "train.jsonl"), **data)
        assert run(job.root) == 0
    finally:
        get_settings.cache_clear()
    prepared = read_json(job.prepared)
    assert prepared["ok"] is False and prepared["error"]["code"] == code
    assert fragment in prepared["error"]["message"] and prepared["error"]["param"] == "training_file"


def test_unreadable_s3_data_does_not_hide_a_model_that_cannot_be_loaded(tmp_path, monkeypatch):
    from tests.unit.test_data_sources import BUCKET, handing_over, moto_s3
    from tuneyard.settings import get_settings

    with moto_s3({}) as s3:
        monkeypatch.setenv("TUNEYARD_S3_ENDPOINT_URL", s3["url"])
        handing_over(monkeypatch, s3["reader"], param="dataset_details.dataset_path")
        get_settings.cache_clear()
        try:
            spec = TrainingSpec(model=ModelSpec(name=str(tmp_path / "no-such-model"), source="local"),
                                data=DataSpec(train=DataSource(path=f"s3://{BUCKET}/ds/missing.jsonl",
                                                               param="dataset_details.dataset_path")),
                                runtime=runtime_spec(Settings()))
            job = JobDir(tmp_path / "job").create()
            job.spec.write_text(spec.model_dump_json())
            assert run(job.root) == 0
        finally:
            get_settings.cache_clear()
    err = failure(job)
    # The job's error has one param: the first failure's; its message holds both.
    assert (err["code"], err["param"]) == ("invalid_training_file", "dataset_details.dataset_path"), err
    assert err["message"].startswith("2 problems: "), err
    assert "no such key" in err["message"] and "; model '" in err["message"]
    assert "could not be loaded" in err["message"]


def test_bad_files_and_a_missing_model_are_reported_together(tmp_path, sample_jsonl):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(sample_rows()[0]) + "\n" + '{"messages": [{"role": "bot", "content": "x"}]}\n')
    job = make_job(tmp_path, tmp_path / "no-such-model", bad, validation=tmp_path / "gone.jsonl")
    assert run(job.root) == 0
    err = failure(job)
    assert (err["code"], err["param"]) == ("invalid_training_file", "training_file"), err
    assert err["message"].startswith("3 problems: training_file: Example 2, message 1: unknown role 'bot'; "
                                     "validation_file: "), err
    assert "; model '" in err["message"]
    assert not job.resolved_spec.exists()
