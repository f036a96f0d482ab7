"""Each speed choice of the trainer (tuneyard/trainer/fastpath.py) leaves the loss what the plain path gives.

- the LM head (TRL's fused, chunked one; on CPU with a small vocabulary tuneyard's dense one over the labelled
  positions only): the same loss and gradients as full logits + cross-entropy, and the dense one TRL's metrics;
- length-grouped padded batches (for models that cannot take padding-free ones): every row once per epoch,
  each with the loss it has alone, and less padding than random batches;
- torch.compile (``resources.torch_compile``): the same first training losses as eager;
- Liger kernels (GPU with liger_kernel only): the same first training losses as without.

Padding-free batches themselves are held to padded ones in test_padding_free.py.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.trainer.conftest import _merge, base_spec
from tests.trainer.test_padding_free import varied
from tuneyard.domain.spec import TrainingSpec
from tuneyard.jobdir import JobDir
from tuneyard.trainer import fastpath
from tuneyard.trainer.plumbing import load_model, lora_config, pick_precision
from tuneyard.trainer.recipes.sft import Trainer, build_config
from tuneyard.trainer.runtime import Ranks


def _trainer(tmp_path, model_dir, tokenizer, rows, name: str, device: str = "cpu", config_over=None, **over):
    """The trainer exactly as sft.run builds it (batching chosen for the model), on in-memory rows."""
    from datasets import Dataset

    spec = TrainingSpec.model_validate(_merge({**base_spec(model_dir), "data": {
        "train": {"path": "x"}, "padding_free": True, "max_length": 128}}, over))
    precision = pick_precision(spec, device)
    model = load_model(spec, device, precision, Ranks())
    model.config.use_cache = False
    batching = fastpath.choose_batching(spec, model)
    hp = spec.hyperparameters
    config = build_config(spec, JobDir(tmp_path / name), device, precision, hp.per_device_batch_size,
                          hp.gradient_accumulation_steps, has_eval=False, batching=batching)
    config.logging_steps = 1
    config.save_strategy = "no"
    for k, v in (config_over or {}).items():
        setattr(config, k, v)
    return Trainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                   peft_config=lora_config(spec))


def _first_losses(trainer, steps: int) -> list[float]:
    trainer.args.max_steps = steps
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_fused_lm_head_equals_full_logits(tmp_path, tiny_model_dir, tiny_tokenizer, tokenised_rows):
    """The trainer's loss never builds the logits; it must equal the plain shifted cross-entropy, gradients too."""
    trainer = _trainer(tmp_path, tiny_model_dir, tiny_tokenizer, tokenised_rows, "fused")
    batch = trainer.data_collator(varied(tokenised_rows))
    model = trainer.model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]

    fused = trainer.compute_loss(model, dict(batch))
    fused_grads = torch.autograd.grad(fused, trainable)

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits  # the full (1, tokens, vocabulary) logits
    assert logits.shape[-1] >= len(tiny_tokenizer)
    labels = batch["labels"][:, 1:]
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    plain_grads = torch.autograd.grad(plain, trainable)

    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for f, p in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(f, p, atol=1e-5, rtol=1e-4)
    assert any(g.abs().max() > 0 for g in fused_grads)


def test_padding_free_only_for_attention_only_models(tiny_model_dir):
    from transformers import MambaConfig, MambaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = TrainingSpec.model_validate(base_spec(tiny_model_dir))
    llama = load_model(spec, "cpu", pick_precision(spec, "cpu"), Ranks())
    assert fastpath.padding_free_blocker(llama) is None
    assert fastpath.choose_batching(spec, llama) == fastpath.Batching(True, "random", "padding-free")

    tiny = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2}
    qwen = Qwen2ForCausalLM(Qwen2Config(**tiny, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                                        use_sliding_window=True, sliding_window=8, max_window_layers=1))
    assert set(qwen.config.layer_types) == {"full_attention", "sliding_attention"}
    assert fastpath.padding_free_blocker(qwen) is None

    # A state-space model carries its state from one concatenated example into the next.
    mamba = MambaForCausalLM(MambaConfig(**tiny, state_size=4))
    assert "recurrent" in fastpath.padding_free_blocker(mamba)
    chosen = fastpath.choose_batching(spec, mamba)
    assert not chosen.padding_free and chosen.sampling == "group_by_length"
    no_shuffle = spec.model_copy(update={"data": spec.data.model_copy(update={"shuffle": False})})
    assert fastpath.choose_batching(no_shuffle, mamba).sampling == "sequential"
    lazy = spec.model_copy(update={"data": spec.data.model_copy(update={"lazy_tokenize": True})})
    assert fastpath.choose_batching(lazy, mamba).sampling == "random"  # no lengths to group by


def test_length_grouped_batches_keep_every_loss(tmp_path, tiny_model_dir, tiny_tokenizer, tokenised_rows):
    """Grouped by length: each row once per epoch, with its own loss (padding masked), and less padding."""
    pad = tiny_tokenizer.pad_token_id
    # transformers sorts "megabatches" of up to 50 batches, and fewer on a small set: 96 rows in batches of 2.
    rows = spread(tokenised_rows) * 4
    grouped = _trainer(tmp_path, tiny_model_dir, tiny_tokenizer, rows, "grouped", data={"padding_free": False},
                       hyperparameters={"per_device_batch_size": 2, "gradient_accumulation_steps": 1})
    assert grouped.args.train_sampling_strategy == "group_by_length" and not grouped.padding_free
    sampler = grouped._get_train_sampler()
    assert sorted(sampler) == list(range(len(rows)))  # a permutation: nothing dropped or repeated
    # Each epoch's order follows from the seed and the epoch alone, so a resumed epoch sees the same rows.
    again = grouped._get_train_sampler()
    sampler.set_epoch(1)
    again.set_epoch(1)
    assert list(sampler) == list(again) != list(grouped._get_train_sampler())
    assert fastpath.row_lengths(grouped.train_dataset) == [len(r["input_ids"]) for r in rows]

    model = grouped.model.eval()
    alone = {}
    with torch.no_grad():
        for i, r in enumerate(rows[:24]):
            ids, labels = torch.tensor([r["input_ids"]]), torch.tensor([r["labels"]])
            alone[i] = model(input_ids=ids, labels=labels, use_cache=False).loss.item()

    def padding(trainer) -> int:
        return sum(int((b["input_ids"] == pad).sum()) if "attention_mask" not in b
                   else int((b["attention_mask"] == 0).sum()) for b in trainer.get_train_dataloader())

    torch.manual_seed(0)
    seen: list[int] = []
    unseen: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        unseen.setdefault(tuple(r["input_ids"]), []).append(i)
    with torch.no_grad():
        for batch in grouped.get_train_dataloader():
            order = batch_rows(batch, unseen)
            seen += order
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
            for row, i in enumerate(order):
                lg, lb = logits[row, :-1], batch["labels"][row, 1:]
                got = torch.nn.functional.cross_entropy(lg[lb != -100], lb[lb != -100]).item()
                assert got == pytest.approx(alone[i % 24], abs=1e-5)
    assert sorted(seen) == list(range(len(rows)))

    plain = _trainer(tmp_path, tiny_model_dir, tiny_tokenizer, rows, "random", data={"padding_free": False},
                     hyperparameters={"per_device_batch_size": 2, "gradient_accumulation_steps": 1})
    plain.args.train_sampling_strategy = "random"
    torch.manual_seed(0)
    assert padding(grouped) < padding(plain)


def spread(rows: list[dict]) -> list[dict]:
    """24 distinct examples of 1, 2 or 3 demo rows joined: lengths 30 to 90 tokens."""
    out = []
    for i in range(24):
        start, k = i // 2, 1 + i % 2 + i // 12
        joined = [rows[(start + j) % len(rows)] for j in range(k)]
        out.append({key: [x for r in joined for x in r[key]] for key in ("input_ids", "labels")})
    assert len({tuple(r["input_ids"]) for r in out}) == len(out)
    return out


def batch_rows(batch: dict, unseen: dict[tuple, list[int]]) -> list[int]:
    """Which rows a padded batch holds, by their unpadded input_ids (a copy of a row counts as any of them)."""
    return [unseen[tuple(ids[mask.bool()].tolist())].pop()
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]


@pytest.mark.slow
def test_torch_compile_keeps_the_first_losses(tmp_path, tiny_model_dir, tiny_tokenizer, tokenised_rows):
    if fastpath.compile_blocker("cpu") is not None:
        pytest.skip(fastpath.compile_blocker("cpu"))
    rows = tokenised_rows * 2
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        trainer = _trainer(tmp_path, tiny_model_dir, tiny_tokenizer, rows, f"compile-{compiled}",
                           resources={"torch_compile": compiled})
        assert trainer.args.torch_compile is compiled
        losses[compiled] = _first_losses(trainer, 4)
        assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule) is compiled
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], abs=2e-4)


def test_gpu_kernels_only_on_cuda_with_their_package_unless_turned_off(monkeypatch):
    from transformers.utils import is_flash_attn_2_available

    from tuneyard.service.jobs import runtime_spec
    from tuneyard.settings import Settings

    assert fastpath.liger("cpu") is False
    assert fastpath.liger("cuda") is (importlib.util.find_spec("liger_kernel") is not None)
    assert fastpath.flash_attention("cpu", True, torch.bfloat16) is False
    assert fastpath.flash_attention("cuda", True, torch.float32) is False
    assert fastpath.flash_attention("cuda", True, torch.bfloat16) is is_flash_attn_2_available()
    # TUNEYARD_LIGER_KERNELS / TUNEYARD_FLASH_ATTENTION=false reach the trainer through the spec's runtime.
    monkeypatch.setenv("TUNEYARD_LIGER_KERNELS", "false")
    monkeypatch.setenv("TUNEYARD_FLASH_ATTENTION", "false")
    runtime = runtime_spec(Settings())
    assert fastpath.liger("cuda", runtime.liger_kernels) is False
    assert fastpath.flash_attention("cuda", True, torch.bfloat16, runtime.flash_attention) is False


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="Liger kernels need a CUDA GPU and the liger_kernel package")
def test_liger_keeps_the_first_losses(tmp_path, tiny_model_dir, tiny_tokenizer, tokenised_rows):
    losses = {}
    for use in (False, True):
        torch.manual_seed(0)
        trainer = _trainer(tmp_path, tiny_model_dir, tiny_tokenizer, tokenised_rows * 2, f"liger-{use}",
                           device="cuda", resources={"device": "cuda"}, model={"torch_dtype": "float32"},
                           config_over={"use_liger_kernel": use})
        assert trainer.args.use_liger_kernel is use
        losses[use] = _first_losses(trainer, 4)
    assert losses[True] == pytest.approx(losses[False], abs=1e-3)


@pytest.mark.slow
def test_a_padded_length_grouped_job_trains_and_resumes_exactly(make_job, tokenised_rows):
    """The trainer process on a job whose batches must be padded: grouped by length, every token counted once,
    and a run paused mid-epoch goes on with the very batches the uninterrupted run had."""
    from tests.trainer.test_stop_resume import start_and_stop_at
    from tests.trainer.trainer_helpers import TRAIN_REPEAT, events, result, run_trainer, train_losses

    spec = {"data": {"padding_free": False}, "hyperparameters": {"n_epochs": 2}}
    job = make_job("ftjob-grouped", validation=False, **spec)
    proc = run_trainer(job)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "batches padded, length-grouped (padding_free is off)" in proc.stderr
    losses = [loss for _, loss in train_losses(job)]
    assert len(losses) == 24 and sum(losses[-4:]) < sum(losses[:4]) - 4.0, losses
    tokens = [e["data"]["trained_tokens"] for e in events(job, "metrics") if "trained_tokens" in e["data"]]
    assert tokens[-1] == 2 * TRAIN_REPEAT * sum(len(r["input_ids"]) for r in tokenised_rows)

    paused_job = make_job("ftjob-grouped-paused", validation=False, **spec)
    # In the second epoch: its order must not depend on what the RNG went through before the pause.
    code, _ = start_and_stop_at(paused_job, "pause", after_step=14)
    assert code == 0 and result(paused_job)["reason"] == "pause"
    paused = result(paused_job)["step"]
    assert 14 <= paused < 24, "the pause should land inside the second epoch"
    (paused_job.control / "stop").unlink()
    assert run_trainer(paused_job).returncode == 0
    reference = dict(train_losses(job))
    resumed = [(s, loss) for s, loss in train_losses(paused_job) if s > paused]
    assert resumed and resumed[0][0] == paused + 1 and resumed[-1][0] == 24
    assert max(abs(loss - reference[s]) for s, loss in resumed) < 1e-4


def test_dense_head_equals_trls_chunked_head(tmp_path, tiny_model_dir, tiny_tokenizer, tokenised_rows, monkeypatch):
    """On CPU the labelled positions are scored by one dense matmul: TRL's loss, gradients and metrics, exactly."""
    trainer = _trainer(tmp_path, tiny_model_dir, tiny_tokenizer, tokenised_rows, "dense")
    assert trainer.model.get_base_model().tuneyard_dense_head
    batch = trainer.data_collator(varied(tokenised_rows))
    assert batch["input_ids"].shape[0] == 1 and (batch["labels"] == -100).any()  # padding-free, prompts unscored
    model = trainer.model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def run() -> tuple[torch.Tensor, list[torch.Tensor], dict[str, float]]:
        trainer._metrics["train"].clear()
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(37))
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
        return loss, torch.autograd.grad(loss, trainable), metrics

    head_calls = []  # the dense head calls the LM head module; TRL's tiles use its weight alone
    trainer.model.get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1))
    dense = run()
    assert head_calls == [1]
    monkeypatch.setattr(fastpath, "DENSE_HEAD_MAX_BYTES", 0)  # every batch too big: TRL's chunked head
    chunked = run()
    assert head_calls == [1]
    torch.testing.assert_close(dense[0], chunked[0], atol=1e-5, rtol=1e-5)
    for d, c in zip(dense[1], chunked[1], strict=True):
        torch.testing.assert_close(d, c, atol=1e-6, rtol=1e-4)
    assert set(dense[2]) == {"entropy", "mean_token_accuracy"}
    assert dense[2] == pytest.approx(chunked[2], abs=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                    reason="FlashAttention varlen kernels need a CUDA GPU and the flash_attn package")
def test_flash_attention_keeps_the_first_losses(tmp_path, tiny_model_dir, tiny_tokenizer, tokenised_rows, monkeypatch):
    from tuneyard.settings import reset_settings

    losses = {}
    try:
        for use in (False, True):
            monkeypatch.setenv("TUNEYARD_FLASH_ATTENTION", str(use).lower())
            reset_settings()
            torch.manual_seed(0)
            trainer = _trainer(tmp_path, tiny_model_dir, tiny_tokenizer, tokenised_rows * 2, f"flash-{use}",
                               device="cuda", resources={"device": "cuda"}, model={"torch_dtype": "bfloat16"})
            assert (trainer.model.config._attn_implementation == "flash_attention_2") is use
            losses[use] = _first_losses(trainer, 4)
    finally:
        reset_settings()
    assert losses[True] == pytest.approx(losses[False], abs=2e-2)  # bf16 kernels: the same loss to rounding
