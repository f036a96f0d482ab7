"""In-process checks: spec -> TRL mapping, schedule rules, checkpoint discovery and failure results."""

from __future__ import annotations

import logging

import pytest

from tests.trainer.conftest import base_spec
from tuneyard.domain.spec import TrainingSpec
from tuneyard.jobdir import JobDir, iter_events, read_json, write_json_atomic
from tuneyard.trainer.progress import CHECKPOINT_MARKER, latest_complete_checkpoint
from tuneyard.trainer.runtime import Ranks, TrainerError, classify


def spec_of(model_dir, **over) -> TrainingSpec:
    from tests.trainer.conftest import _merge

    return TrainingSpec.model_validate(_merge(base_spec(model_dir), over))


def make_trainer(spec: TrainingSpec, job: JobDir, rows: list[dict], world_size: int = 1):
    """The SFTTrainer the recipe would build for ``spec`` (in this process, nothing trained)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from tuneyard.trainer.plumbing import batch_split, finalise_schedule, load_model, lora_config, pick_precision
    from tuneyard.trainer.recipes.sft import build_config

    precision = pick_precision(spec, "cpu")
    per_device, accum = batch_split(spec, world_size)
    config = build_config(spec, job, "cpu", precision, per_device, accum, has_eval=True)
    trainer = SFTTrainer(model=load_model(spec, "cpu", precision, Ranks()), args=config,
                         train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows[:4]),
                         processing_class=AutoTokenizer.from_pretrained(spec.model.name),
                         peft_config=lora_config(spec))
    total = finalise_schedule(trainer.args, spec, len(trainer.train_dataset), per_device, accum, world_size)
    return trainer, total


def test_spec_maps_onto_sft_config(tmp_path, tiny_model_dir, tokenised_rows):
    spec = spec_of(tiny_model_dir, hyperparameters={
        "weight_decay": 0.1, "max_grad_norm": 0.5, "lr_scheduler": "cosine", "optimizer": "sgd",
        "gradient_checkpointing": True, "warmup_ratio": 0.25}, schedule={"save_total_limit": 3})
    trainer, total = make_trainer(spec, JobDir(tmp_path / "job"), tokenised_rows * 4)
    a = trainer.args
    assert total == a.max_steps == 48
    assert a.per_device_train_batch_size == 2 and a.gradient_accumulation_steps == 2
    assert a.per_device_eval_batch_size == 4
    assert a.learning_rate == 5e-3 and a.weight_decay == 0.1 and a.max_grad_norm == 0.5
    assert a.lr_scheduler_type == "cosine" and a.optim == "sgd"
    assert a.gradient_checkpointing is True and a.activation_checkpointing is True
    assert a.seed == a.data_seed == 11
    assert a.warmup_steps == 12 and a.logging_steps == 1
    assert (a.eval_strategy, a.save_strategy, a.save_total_limit) == ("epoch", "epoch", 3)
    assert a.output_dir == str(tmp_path / "job" / "checkpoints")
    assert a.report_to == [] and a.bf16 is False and a.fp16 is False and a.use_cpu is True
    assert a.padding_free is True and a.max_length is None and a.packing is False
    assert trainer.padding_free is True
    # LoRA r/alpha/targets/modules_to_save reach PEFT.
    peft_cfg = trainer.model.peft_config["default"]
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.modules_to_save) == (8, 16, ["lm_head"])


def test_packing_counts_steps_on_packed_rows_and_long_runs_log_every_hundredth(tmp_path, tiny_model_dir,
                                                                              tokenised_rows):
    spec = spec_of(tiny_model_dir, data={"packing": True, "max_length": 64},
                   hyperparameters={"n_epochs": 30, "warmup_steps": 5})
    trainer, total = make_trainer(spec, JobDir(tmp_path / "job"), tokenised_rows * 4)
    packed = len(trainer.train_dataset)
    assert packed == 24  # two 30-token rows fit in 64, with bfd
    assert "seq_lengths" in trainer.train_dataset.column_names and trainer.padding_free is True
    assert trainer.args.packing_strategy == "bfd" and trainer.args.max_length == 64
    assert total == 30 * (packed // 4) == 180
    assert trainer.args.logging_steps == 2 and trainer.args.warmup_steps == 5
    # The packed batch trains (position_ids restart per example; see test_padding_free).
    assert trainer.evaluate()["eval_loss"] > 0


def test_max_steps_per_epoch_caps_each_epoch(tmp_path, tiny_model_dir, tokenised_rows):
    spec = spec_of(tiny_model_dir, hyperparameters={"max_steps_per_epoch": 5})
    trainer, total = make_trainer(spec, JobDir(tmp_path / "job"), tokenised_rows * 4)
    assert total == 4 * 5
    a = trainer.args
    assert (a.eval_strategy, a.eval_steps, a.save_strategy, a.save_steps) == ("steps", 5, "steps", 5)


def test_batch_split_keeps_the_global_batch(tiny_model_dir):
    from tuneyard.trainer.plumbing import batch_split

    spec = spec_of(tiny_model_dir, hyperparameters={"batch_size": 8, "per_device_batch_size": 2,
                                                    "gradient_accumulation_steps": 2},
                   resources={"nproc_per_node": 2})
    assert batch_split(spec, 2) == (2, 2)
    assert batch_split(spec, 1) == (2, 4)  # fewer processes than planned: more accumulation
    assert batch_split(spec, 4) == (2, 1)
    with pytest.raises(TrainerError) as e:
        batch_split(spec, 3)
    assert e.value.code == "invalid_spec"


def test_datasets_are_checked_and_validation_capped(make_job):
    from tuneyard.data.splits import write_rows
    from tuneyard.trainer.recipes.sft import load_token_splits

    job = make_job("ftjob-data", schedule={"max_validation_steps": 1})
    spec = TrainingSpec.model_validate_json(job.resolved_spec.read_text())
    train, valid = load_token_splits(job, spec, world_size=2)
    assert len(train) == 48 and len(valid) == 1 * 4 * 2  # steps x eval micro-batch x processes
    write_rows(job.data / "validation2", [{"input_ids": [1, 2]}])
    (job.data / "validation").rename(job.data / "old")
    (job.data / "validation2").rename(job.data / "validation")
    with pytest.raises(TrainerError, match=r"lacks column\(s\) \['labels'\]") as e:
        load_token_splits(job, spec, world_size=1)
    assert e.value.code == "data_error"


def test_only_marked_checkpoints_count(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert latest_complete_checkpoint(ckpts) is None
    for step, marked in ((4, True), (12, True), (20, False)):
        d = ckpts / f"checkpoint-{step}"
        d.mkdir(parents=True)
        if marked:
            write_json_atomic(d / CHECKPOINT_MARKER, {"step": step})
    (ckpts / "checkpoint-x").mkdir()
    assert latest_complete_checkpoint(ckpts) == ckpts / "checkpoint-12"


def test_classify():
    assert classify(TrainerError("data_error", "no rows")) == ("data_error", "no rows")
    code, message = classify(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"))
    assert code == "out_of_memory" and "Tried to allocate" in message and "\n" not in message
    assert classify(ValueError("bad"))[0] == "training_error"


@pytest.fixture()
def run_main():
    """Call the trainer's main() in this process, then give pytest its logging back."""
    import transformers

    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def run(job: JobDir) -> int:
        from tuneyard.trainer.__main__ import main

        return main([str(job.root)])

    yield run
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.captureWarnings(False)
    transformers.utils.logging.disable_propagation()
    transformers.utils.logging.enable_default_handler()


@pytest.mark.parametrize(("overrides", "code", "fragment"), [
    # DPO is a recipe now: on a set tokenised for SFT it names what the set lacks.
    ({"method": "dpo"}, "data_error", "preference"),
    ({"model": {"quant_bits": 4}}, "device_unavailable", "QLoRA"),
    ({"model": {"torch_dtype": "float16"}}, "unsupported", "float16"),
    ({"model": {"name": "/nonexistent/model"}}, "model_load_error", "/nonexistent/model"),
    ({"resources": {"distributed": "fsdp"}}, "unsupported", "fsdp"),
    ({"hyperparameters": {"n_epochs": "auto"}}, "invalid_spec", "unresolved"),
], ids=["dpo-on-sft-data", "qlora-on-cpu", "fp16-on-cpu", "bad-model", "fsdp", "unresolved"])
def test_failures_become_a_failed_result(make_job, run_main, overrides, code, fragment):
    job = make_job("ftjob-fail", **overrides)
    assert run_main(job) == 1
    res = read_json(job.result)
    assert res["status"] == "failed" and res["error"]["code"] == code
    assert fragment in res["error"]["message"]
    last = list(iter_events(job.events))[-1]
    assert last.type == "message" and last.level == "error" and fragment in last.message


def test_missing_data_is_a_data_error(make_job, run_main):
    import shutil

    job = make_job("ftjob-nodata")
    shutil.rmtree(job.data / "train")
    assert run_main(job) == 1
    assert read_json(job.result)["error"]["code"] == "data_error"


def test_shuffle_false_keeps_file_order(tmp_path, tiny_model_dir, tokenised_rows):
    from torch.utils.data import RandomSampler, SequentialSampler

    ordered = spec_of(tiny_model_dir, data={"shuffle": False})
    trainer, _ = make_trainer(ordered, JobDir(tmp_path / "a"), tokenised_rows * 4)
    assert trainer.args.train_sampling_strategy == "sequential"
    assert isinstance(trainer._get_train_sampler(), SequentialSampler)
    shuffled, _ = make_trainer(spec_of(tiny_model_dir), JobDir(tmp_path / "b"), tokenised_rows * 4)
    assert isinstance(shuffled._get_train_sampler(), RandomSampler)
