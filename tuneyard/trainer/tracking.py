"""Experiment tracking of one run: transformers' own TensorBoard, W&B and MLflow callbacks, set up from the spec.

- TensorBoard: every job, into ``JOBDIR/tracking/tensorboard`` (each attempt appends its event file, steps
  continuing), copied into ``output/tensorboard`` with the final output so it downloads with the artifacts.
- W&B (``integrations[].wandb``): the run id is the job id and ``resume="allow"``, so a resumed or retried job
  continues the same run; the key comes from the environment only (``WANDB_API_KEY``, ``WANDB_BASE_URL``, put
  there by the worker from a stored secret); the run's config holds the resolved spec (secret ids, never values).
  ``WANDB_MODE=offline`` in the server's environment keeps the run files in ``JOBDIR/tracking/wandb``.
- MLflow (extension): the tracking server, experiment and run name of the spec; the run id is kept in
  ``tracking/runs.json`` so that later attempts log into the same run.

A tracker that fails (server down, key refused) must not fail the training: each callback is wrapped in
``Guarded``, which on its first error writes a warning event saying the metrics could not be sent and switches
that tracker off for the rest of the attempt.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

from tuneyard.domain import tracking
from tuneyard.domain.spec import TrainingSpec
from tuneyard.jobdir import JobDir, read_json, write_json_atomic
from tuneyard.trainer.runtime import Reporter

RUNS_FILE = "runs.json"
# How long a tracker may take to answer before the attempt gives up on it (the libraries' defaults are minutes).
TRACKER_TIMEOUT_SECONDS = "20"


def callbacks(spec: TrainingSpec, job: JobDir, reporter: Reporter, log: logging.Logger) -> list[TrainerCallback]:
    """The tracking callbacks of this run: TensorBoard always, then each integration of the spec."""
    job.tracking.mkdir(parents=True, exist_ok=True)
    spec_json = spec.model_dump(mode="json")
    made: list[tuple[str, Any]] = [("TensorBoard", lambda: _tensorboard(job))]
    for integration in spec.integrations:
        cfg = tracking.parse(integration)
        if isinstance(cfg, tracking.WandbConfig):
            made.append(("W&B", lambda cfg=cfg: _Wandb(cfg, job, spec_json)))
        elif isinstance(cfg, tracking.MlflowConfig):
            made.append(("MLflow", lambda cfg=cfg: _Mlflow(cfg, job)))
    out: list[TrainerCallback] = []
    for name, make in made:
        try:
            out.append(Guarded(make(), name, reporter, log))
        except Exception as e:  # the tracker's library missing or broken: the run goes on without it
            Guarded(TrainerCallback(), name, reporter, log).fail("set up", e)
    return out


def _tensorboard(job: JobDir) -> TensorBoardCallback:
    callback = TensorBoardCallback()
    callback.logging_dir = str(tensorboard_dir(job))
    return callback


def tensorboard_dir(job: JobDir) -> Path:
    """Where every attempt of the job writes its TensorBoard event files."""
    return job.tracking / "tensorboard"


def copy_tensorboard(job: JobDir, dest: Path) -> None:
    """Put the job's TensorBoard event files into ``dest``/tensorboard (the output being assembled)."""
    src = tensorboard_dir(job)
    if src.is_dir():
        shutil.copytree(src, dest / "tensorboard", dirs_exist_ok=True)


def _runs(job: JobDir) -> dict[str, Any]:
    return read_json(job.tracking / RUNS_FILE) or {}


def _remember_run(job: JobDir, tracker: str, run_id: str) -> None:
    write_json_atomic(job.tracking / RUNS_FILE, {**_runs(job), tracker: run_id})


class _Wandb(WandbCallback):
    """transformers' W&B callback with the run opened by us: id = job id, the spec's project/name/entity/tags."""

    def __init__(self, cfg: tracking.WandbConfig, job: JobDir, spec_json: dict) -> None:
        super().__init__()
        self.cfg, self.job, self.spec_json = cfg, job, spec_json

    def setup(self, args: Any, state: Any, model: Any, **kwargs: Any) -> None:
        """Open (or, on a later attempt, resume) the job's run, then let transformers add its own config."""
        if state.is_world_process_zero and self._wandb.run is None:
            root = self.job.tracking / "wandb"
            root.mkdir(parents=True, exist_ok=True)
            # W&B's caches and settings stay inside the job, not in the home directory of the service.
            for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                             ("WANDB_DATA_DIR", "data")):
                os.environ.setdefault(var, str(root / sub))
            os.environ.setdefault("WANDB_SILENT", "true")
            os.environ.setdefault("WANDB_INIT_TIMEOUT", TRACKER_TIMEOUT_SECONDS)
            run_id = self.job.root.name
            self._wandb.init(id=run_id, resume="allow", project=self.cfg.project, entity=self.cfg.entity,
                             name=self.cfg.name or run_id, tags=self.cfg.tags, dir=str(root),
                             config={"tuneyard": {"job_id": run_id, "spec": self.spec_json}})
            _remember_run(self.job, "wandb", run_id)
        super().setup(args, state, model, **kwargs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Finish the run, so that its files are complete when the attempt ends (paused, stopped or done)."""
        super().on_train_end(args, state, control, **kwargs)
        if state.is_world_process_zero and self._wandb is not None and self._wandb.run is not None:
            self._wandb.finish()


class _Mlflow(MLflowCallback):
    """transformers' MLflow callback on the spec's server and experiment; later attempts reopen the same run."""

    def __init__(self, cfg: tracking.MlflowConfig, job: JobDir) -> None:
        super().__init__()
        self.cfg, self.job = cfg, job

    def setup(self, args: Any, state: Any, model: Any) -> None:
        """Point MLflow at the spec's server (environment: the callback reads it there), then open the run."""
        env = {"MLFLOW_TRACKING_URI": self.cfg.tracking_uri}
        if self.cfg.experiment:
            env["MLFLOW_EXPERIMENT_NAME"] = self.cfg.experiment
        previous = _runs(self.job).get("mlflow")
        if previous:
            env["MLFLOW_RUN_ID"] = previous
        os.environ.update(env)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", TRACKER_TIMEOUT_SECONDS)
        args.run_name = self.cfg.run_name or self.job.root.name
        super().setup(args, state, model)
        if state.is_world_process_zero and self._ml_flow.active_run() is not None:
            self._ml_flow.set_tag("tuneyard.job_id", self.job.root.name)
            _remember_run(self.job, "mlflow", self._ml_flow.active_run().info.run_id)


class Guarded(TrainerCallback):
    """A tracker's callback whose failures cost the tracker, never the training (one warning event, then off)."""

    def __init__(self, inner: TrainerCallback, name: str, reporter: Reporter, log: logging.Logger) -> None:
        self.inner, self.name, self.reporter, self.log = inner, name, reporter, log
        self.failed = False

    def _call(self, event: str, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.failed:
            return None
        try:
            return getattr(self.inner, event)(args, state, control, **kwargs)
        except Exception as e:  # any failure of a tracker library: the run goes on without it
            self.fail(event, e)
            return None

    def fail(self, where: str, e: Exception) -> None:
        """Switch the tracker off for this attempt, with one warning event saying why."""
        self.failed = True
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        self.log.warning("%s failed in %s: %s", self.name, where, why, exc_info=True)
        self.reporter.emit("message", f"{self.name}: the metrics could not be sent ({why}); training goes on "
                                      f"without {self.name}", {"tracker": self.name, "error": why}, level="warn")


def _forward(event: str):
    def method(self: Guarded, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        return self._call(event, args, state, control, **kwargs)

    method.__name__ = event
    method.__doc__ = f"Forward {event} to the tracker's callback."
    return method


for _event in [n for n in vars(TrainerCallback) if n.startswith("on_")]:
    setattr(Guarded, _event, _forward(_event))
