"""Entry point of the trainer process: ``[torchrun ...] -m tuneyard.trainer JOBDIR``.

Reads ``JOBDIR/resolved_spec.json``, runs the recipe for ``spec.method`` and turns its outcome, or
any exception, into ``JOBDIR/result.json`` here and nowhere else. Exit status: 0 when the run
succeeded or stopped on request, 1 when it failed. See ``tuneyard.trainer.plumbing`` for the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pydantic import ValidationError

from tuneyard.domain.spec import TrainingSpec
from tuneyard.trainer.runtime import (
    Ranks,
    Reporter,
    TrainerError,
    classify,
    job_path,
    setup_logging,
    teardown_distributed,
)


def load_spec(path: os.PathLike) -> TrainingSpec:
    """The resolved spec at ``path``; TrainerError("invalid_spec") if missing, invalid or unresolved."""
    try:
        with open(path) as f:
            spec = TrainingSpec.model_validate_json(f.read())
    except FileNotFoundError as e:
        raise TrainerError("invalid_spec", f"{path} does not exist: the prepare step has not run") from e
    except (ValidationError, json.JSONDecodeError) as e:
        raise TrainerError("invalid_spec", f"{path} is not a valid TrainingSpec: {e}") from e
    hp = spec.hyperparameters
    if not spec.is_resolved() or None in (hp.per_device_batch_size, hp.gradient_accumulation_steps,
                                          hp.learning_rate):
        raise TrainerError("invalid_spec", f"{path} still has unresolved hyperparameters ('auto' or unset "
                                           "batch split / learning rate)")
    return spec


def hide_unused_trackers(spec: TrainingSpec) -> None:
    """Make W&B look absent to a run that does not log to it, before transformers and TRL are imported.

    Both ask ``is_wandb_available()`` at import time, which imports wandb (about 1.5 s of every trainer's
    start-up, for a job that never uses it); a ``None`` in ``sys.modules`` makes ``find_spec`` say it is absent.
    """
    if "wandb" in sys.modules or any(i.type == "wandb" for i in spec.integrations):
        return
    sys.modules["wandb"] = None  # type: ignore[assignment]


def die_with_launcher() -> None:
    """Under torchrun, end this rank when torchrun dies: ranks run in sessions of their own and would train on."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    launcher = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != launcher:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def standby() -> int:
    """Import what a trainer needs, then wait for the worker to name a job; train it as ``main`` does.

    The local launcher keeps one such process ready for one-process CPU jobs, so their trainer starts without
    the seconds of importing transformers, TRL and PEFT. The order comes on stdin (``tuneyard.standby``); end
    of input (the worker is gone) ends the process.
    """
    # W&B stays hidden (see hide_unused_trackers): the launcher starts a job that logs to it afresh.
    sys.modules.setdefault("wandb", None)  # type: ignore[arg-type]
    import importlib

    import torch

    from tuneyard.trainer import plumbing, recipes  # noqa: F401

    for module in recipes.RECIPES.values():
        importlib.import_module(module)

    from tuneyard.standby import take_order

    root = take_order()
    if root is None:
        return 0
    if threads := os.environ.get("OMP_NUM_THREADS"):
        # torch sized its thread pool at import, before the job's count was known.
        torch.set_num_threads(max(1, int(threads)))
    return main([root])


def main(argv: list[str] | None = None) -> int:
    """Run the trainer for one job directory; return the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m tuneyard.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("jobdir", help="the job directory (resolved_spec.json, data/, ...)")
    args = parser.parse_args(argv)
    die_with_launcher()

    job = job_path(args.jobdir)
    ranks = Ranks.from_env()
    log = setup_logging(job.root.name, ranks)
    if not job.root.is_dir():
        log.error("job directory %s does not exist", job.root)
        return 1
    reporter = Reporter(job, ranks)
    try:
        spec = load_spec(job.resolved_spec)
        hide_unused_trackers(spec)
        from tuneyard.trainer import plumbing, recipes

        result = plumbing.run(spec, job, ranks, reporter, log, recipes.load(spec.method))
    except (Exception, KeyboardInterrupt) as exc:  # every failure must end up in result.json
        code, message = classify(exc)
        log.error("training failed (%s): %s", code, message, exc_info=not isinstance(exc, TrainerError))
        reporter.failure(code, message)
        return 1
    finally:
        teardown_distributed()
    reporter.result(result)
    log.info("result: %s", result.status)
    return 0


if __name__ == "__main__":
    sys.exit(standby() if sys.argv[1:] == ["--standby"] else main())
