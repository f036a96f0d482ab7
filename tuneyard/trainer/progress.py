"""Trainer callbacks: progress events for the scheduler, complete-checkpoint marks, and cooperative stop.

Events (written by rank 0 through the job's one ``Reporter``):

- ``message`` at the start: "Training started: 24 steps, 2 epochs, LoRA r=8 on 7 modules, 1 process(es), cpu".
- ``metrics`` at each logging step: ``step, total_steps, epoch, train_loss, train_mean_token_accuracy,
  learning_rate, grad_norm, tokens_per_second, trained_tokens, elapsed_s, eta_s``; after each evaluation:
  ``step, total_steps, epoch, valid_loss, valid_mean_token_accuracy, elapsed_s``; and what else the recipe
  logs under the names of ``tuneyard.domain.metrics`` (DPO: ``rewards_chosen``, ``rewards_rejected``,
  ``rewards_margins``, ``rewards_accuracies`` and their ``valid_`` forms).
- ``checkpoint`` once a checkpoint is completely written (every rank's files on disk and our marker
  file, ``tuneyard.jobdir.CheckpointMarker``, last): ``step, path, metrics`` (``CheckpointSaved``).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tuneyard.domain import metrics

# The marker and the lookup live with the job directory's layout: the worker reads them without torch.
from tuneyard.jobdir import (
    CHECKPOINT_MARKER,
    STOP_REASONS,
    CheckpointMarker,
    CheckpointSaved,
    JobDir,
    StopReason,
    latest_complete_checkpoint,
    write_checkpoint_marker,
)
from tuneyard.trainer.runtime import Reporter

log = logging.getLogger("tuneyard.trainer")

__all__ = ["CHECKPOINT_MARKER", "SAVING_STOPS", "ProgressCallback", "StopCallback", "keep_newest_and_best",
           "latest_complete_checkpoint"]

# Sent in every metrics event (None when the recipe does not log it), as before the vocabulary existed.
_ALWAYS = {"train_loss", "train_mean_token_accuracy", "learning_rate", "grad_norm", "valid_loss",
           "valid_mean_token_accuracy"}
# Rank 0 broadcasts the reason as a number: one for every reason the stop file can hold.
_STOP_CODES: dict[str | None, int] = {None: 0, **{r: i for i, r in enumerate(STOP_REASONS, 1)}}
# Stops that save a checkpoint first: a pause (resumed by the user), a drain (the worker shutting down;
# the job goes back to the queue and resumes from it).
SAVING_STOPS = ("pause", "drain")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ProgressCallback(TrainerCallback):
    """Turns the Trainer's logs, evaluations and saves into tuneyard events; marks checkpoints complete."""

    def __init__(self, reporter: Reporter, *, describe: str, n_epochs: int,
                 spec_json: dict[str, Any]) -> None:
        self.reporter = reporter
        self.describe = describe
        self.n_epochs = n_epochs
        self.spec_json = spec_json
        self.latest: dict[str, float] = {}
        self.last_checkpoint: Path | None = None
        self._t0 = time.monotonic()
        self._first_step = 0
        self._last_log = (self._t0, 0)  # (time, tokens) at the previous metrics event

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._t0 = time.monotonic()
        self._first_step = state.global_step
        self._last_log = (self._t0, state.num_input_tokens_seen)
        verb = f"resumed at step {state.global_step}/{state.max_steps}" if state.global_step else \
            f"started: {state.max_steps} steps"
        self.reporter.emit("message", f"Training {verb}, {self.n_epochs} epochs, {self.describe}",
                           {"total_steps": state.max_steps, "start_step": state.global_step,
                            "n_epochs": self.n_epochs})

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_log = True  # the last loss is always reported, whatever the interval

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        now = time.monotonic()
        base = {"step": state.global_step, "total_steps": state.max_steps,
                "epoch": round(state.epoch or 0.0, 4), "elapsed_s": round(now - self._t0, 3)}
        if "loss" in logs:
            tokens = int(state.num_input_tokens_seen)
            dt = now - self._last_log[0]
            tps = (tokens - self._last_log[1]) / dt if dt > 0 else 0.0
            self._last_log = (now, tokens)
            done = state.global_step - self._first_step
            eta = (now - self._t0) / done * (state.max_steps - state.global_step) if done > 0 else None
            found = metrics.from_logs(logs, "train")
            self.latest.update({k: v for k, v in found.items() if metrics.METRICS[k].latest})
            data = {**base, **{m.name: None for m in metrics.TRAIN if m.name in _ALWAYS}, **found,
                    "tokens_per_second": round(tps, 2), "trained_tokens": tokens,
                    "eta_s": None if eta is None else round(eta, 1)}
            self.reporter.emit("metrics", f"Step {state.global_step}/{state.max_steps}: training loss="
                                          f"{_fmt(logs['loss'])}", data)
        elif "eval_loss" in logs:
            found = metrics.from_logs(logs, "valid")
            self.latest.update(found)
            data = {**base, **{m.name: None for m in metrics.VALID if m.name in _ALWAYS}, **found}
            self.reporter.emit("metrics", f"Step {state.global_step}/{state.max_steps}: validation loss="
                                          f"{_fmt(logs['eval_loss'])}", data)
        # The Trainer's end-of-train summary ("train_loss" averaged over this process's steps only) is not
        # reported: after a resume it would average a different span than the metrics events.

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        # Every rank writes its own RNG state into the checkpoint: wait for all before calling it complete.
        if _distributed():
            dist.barrier()
        if not state.is_world_process_zero:
            return
        path = Path(args.output_dir, f"checkpoint-{state.global_step}").resolve()
        metrics = dict(self.latest)
        write_checkpoint_marker(path, CheckpointMarker(step=state.global_step,
                                                       trained_tokens=int(state.num_input_tokens_seen),
                                                       metrics=metrics, spec=self.spec_json))
        self.last_checkpoint = path
        schedule = self.spec_json.get("schedule") or {}
        if schedule.get("keep_best_checkpoint") and schedule.get("save_total_limit"):
            keep_newest_and_best(Path(args.output_dir), schedule["save_total_limit"], state.best_model_checkpoint)
        self.reporter.emit("checkpoint", f"Checkpoint saved at step {state.global_step}",
                           CheckpointSaved(step=state.global_step, path=str(path), metrics=metrics).model_dump())


def keep_newest_and_best(checkpoints: Path, limit: int, best: str | None) -> list[Path]:
    """Delete complete checkpoints beyond the ``limit`` newest, sparing ``best``; the ones deleted.

    The Trainer's own rotation counts the best among the ``limit`` it keeps (and at the end of a run with a
    limit of 1 keeps the best alone): this keeps the newest ``limit`` and the best besides.
    """
    complete = sorted((int(p.name.split("-")[1]), p.resolve()) for p in checkpoints.glob("checkpoint-*")
                      if p.is_dir() and (p / CHECKPOINT_MARKER).exists())
    keep = {p for _, p in complete[-limit:]}
    if best:
        keep.add(Path(best).resolve())
    gone = [p for _, p in complete if p not in keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


class StopCallback(TrainerCallback):
    """Cooperative stop: JOBDIR/control/stop saying "cancel" stops at once, "pause" or "drain" after a checkpoint.

    Rank 0 reads the file and broadcasts its decision, so every rank leaves the loop at the same step
    (one rank stopping alone would leave the others blocked in the next gradient all-reduce).
    """

    def __init__(self, job: JobDir) -> None:
        self.job = job
        self.reason: StopReason | None = None

    def poll(self, args: TrainingArguments) -> StopReason | None:
        """The stop reason rank 0 sees now, the same on every rank (a collective: call it on all ranks)."""
        reason = None
        if args.process_index == 0:
            # An unreadable request reads as a cancel (tuneyard.jobdir.StopRequest).
            request = self.job.stop_requested()
            reason = request.reason if request is not None else None
        if _distributed():
            code = torch.tensor([_STOP_CODES[reason]], dtype=torch.int64, device=args.device)
            dist.broadcast(code, src=0)
            reason = {v: k for k, v in _STOP_CODES.items()}[int(code.item())]
        return reason

    def _stop(self, reason: StopReason, state: TrainerState, control: TrainerControl) -> None:
        self.reason = reason
        control.should_training_stop = True
        if reason == "cancel":
            control.should_save = control.should_evaluate = False
        log.info("stop requested (%s) at step %d", reason, state.global_step)

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        # Inside a gradient-accumulation step only a cancel is honoured: a pause needs a whole step to save.
        if self.reason is None and self.poll(args) == "cancel":
            self._stop("cancel", state, control)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.reason is not None:
            return
        reason = self.poll(args)
        if reason is None:
            return
        self._stop(reason, state, control)
        if reason in SAVING_STOPS:
            control.should_save = True
            control.should_log = True

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        # The loop runs its epoch-end hooks after a break: a stopped run must not save or evaluate again.
        if self.reason is not None:
            control.should_save = control.should_evaluate = False


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)
