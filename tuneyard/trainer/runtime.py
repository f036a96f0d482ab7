"""What every trainer recipe shares: ranks, logging, the one reporter that writes events and results, errors.

Nothing here imports torch at module level: ``__main__`` must be able to report a failure (a bad spec,
a refused method) before the heavy imports, and the tests import these helpers cheaply.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from tuneyard.jobdir import EventLevel, EventType, EventWriter, Failed, JobDir, JobError, Stopped, Succeeded

# Codes a failed result.json can carry; the scheduler maps them onto the job's error.
ERROR_CODES = (
    "invalid_spec",          # resolved_spec.json missing, unparsable, or still holding "auto"
    "unsupported",           # a method / option this trainer does not implement (e.g. DPO, FSDP)
    "device_unavailable",    # CUDA asked for but absent, QLoRA without CUDA or bitsandbytes
    "data_error",            # tokenised datasets missing or malformed
    "model_load_error",      # base model or tokenizer could not be loaded
    "out_of_memory",         # CUDA (or host) out of memory
    "training_error",        # anything else raised while training
)


class TrainerError(Exception):
    """A failure with a machine code and a message short enough to show a user as is."""

    def __init__(self, code: str, message: str) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run, read from the variables torchrun sets (one process without them)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Ranks:
        """The ranks torchrun exported, or a single process."""
        env = os.environ
        return cls(rank=int(env.get("RANK", "0")), local_rank=int(env.get("LOCAL_RANK", "0")),
                   world_size=int(env.get("WORLD_SIZE", "1")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _JobFilter(logging.Filter):
    def __init__(self, job_id: str, rank: int) -> None:
        super().__init__()
        self.job_id, self.rank = job_id, rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id, record.rank = self.job_id, self.rank
        return True


def setup_logging(job_id: str, ranks: Ranks) -> logging.Logger:
    """Route this process's logs (ours, the libraries', Python warnings) to stderr, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_JobFilter(job_id, ranks.rank))
    handler.setFormatter(logging.Formatter(
        "%(job_id)s %(asctime)s %(levelname)s rank=%(rank)d %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Replica ranks repeat rank 0's story; only their warnings are news.
    root.setLevel(logging.INFO if ranks.is_main else logging.WARNING)
    for noisy in ("transformers", "trl", "peft", "datasets", "accelerate", "torch", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    # PEFT asks every model this deprecated question once per run: noise in every job log, nothing to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    return logging.getLogger("tuneyard.trainer")


def quiet_libraries() -> None:
    """Send library logs through the root handler and turn off progress bars (they garble log files)."""
    import datasets
    import transformers

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_warning()


class Reporter:
    """The one writer of this process's events and result; silent on every rank but 0."""

    def __init__(self, job: JobDir, ranks: Ranks) -> None:
        self.job = job
        self.ranks = ranks
        self._events = EventWriter(job.events, "trainer") if ranks.is_main else None

    def emit(self, type: EventType, message: str, data: dict | None = None, level: EventLevel = "info") -> None:
        """Append an event (rank 0 only)."""
        if self._events is not None:
            self._events.emit(type, message, data, level)
            logging.getLogger("tuneyard.trainer.events").log(
                logging.ERROR if level == "error" else logging.INFO, "%s: %s", type, message)

    def result(self, result: Succeeded | Stopped | Failed) -> None:
        """Write result.json (rank 0 only)."""
        if self.ranks.is_main:
            self.job.write_result(result)

    def failure(self, code: str, message: str) -> None:
        """Record a failure: event + result on rank 0; another rank writes the result only if none exists."""
        if self.ranks.is_main:
            self.emit("message", f"Training failed: {message}", {"code": code}, level="error")
            self.result(Failed(error=JobError(code=code, message=message)))
        elif not self.job.result.exists():
            # torchrun tears rank 0 down when another rank dies, so rank 0 may never write why.
            self.job.write_result(Failed(error=JobError(code=code, message=message, rank=self.ranks.rank)))


def classify(exc: BaseException) -> tuple[str, str]:
    """The (code, message) a result.json reports for ``exc``."""
    if isinstance(exc, TrainerError):
        return exc.code, exc.message
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0][:500]
    lowered = text.lower()
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in lowered:
        return "out_of_memory", f"Out of memory: {first}. Lower the batch size, max_length or use QLoRA."
    if isinstance(exc, MemoryError) or "can't allocate memory" in lowered or "cannot allocate memory" in lowered:
        return "out_of_memory", (f"Out of host memory ({first}). Lower the batch size or max_length, or turn on "
                                 "gradient checkpointing.")
    if _errno(exc) == errno.ENOSPC:
        return "disk_full", (f"No space left on device: {first}. Free space under TUNEYARD_HOME or lower "
                             "save_total_limit; the checkpoints written before are kept.")
    return "training_error", f"{type(exc).__name__}: {first}"


def _errno(exc: BaseException) -> int | None:
    """The errno of ``exc`` or of an exception it was raised from (libraries wrap OSErrors)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def teardown_distributed() -> None:
    """Destroy the process group if this process joined one, so the process exits without hanging."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def job_path(arg: str) -> JobDir:
    """The job directory named on the command line, as an absolute path."""
    return JobDir(Path(arg).resolve())
