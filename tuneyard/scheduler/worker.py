"""The worker loop: claims jobs, runs their phases through a launcher, records what they report.

One tick: record new events from the event files of the jobs this worker runs; handle processes
that ended; carry out cancel/pause for running jobs; start prepare steps for jobs in
``validating_files``; start trainers for ``queued`` jobs while capacity lasts; renew leases.
Every status change is a conditional update (``store.repo.transition``), so several workers can
share one database, and the one place where a process outcome becomes a job status is
``_finish_train`` / ``_finish_prepare``. The processes' files are read through ``tuneyard.jobdir``'s models;
one that is malformed counts as missing (the process left no result), never as an error of the loop.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select, update

from tuneyard.data.sources import CREDENTIALS_ENV
from tuneyard.domain.jobs import JobStatus, fine_tuned_model_name
from tuneyard.domain.spec import TrainingSpec
from tuneyard.jobdir import (
    Failed,
    JobDir,
    JobError,
    PreparedOk,
    ProtocolError,
    Stopped,
    StopReason,
    Succeeded,
    latest_complete_checkpoint,
    read_checkpoint_marker,
)
from tuneyard.scheduler import recorder
from tuneyard.scheduler.joblogs import rotate_logs
from tuneyard.scheduler.launcher import Ended, JobHandle, Launcher, LaunchError, Placement, make_launcher
from tuneyard.service.files import FileService
from tuneyard.service.secrets import SecretService, SecretUnavailable
from tuneyard.service.webhooks import WebhookSender
from tuneyard.settings import Settings
from tuneyard.store import repo
from tuneyard.store.db import Store
from tuneyard.store.models import Job, JobEvent
from tuneyard.store.repo import add_event, transition

log = logging.getLogger("tuneyard.worker")
MAX_ATTEMPTS = 3
KILL_AFTER_TERM_SECONDS = 3.0


@dataclass
class Watched:
    """A job phase this worker looks after: the launcher's handle and what the worker has done about it."""

    handle: JobHandle
    jd: JobDir
    stop_sent_at: float | None = None
    # What the last stop request asked for ("cancel", "pause", "drain"): a cancel overrides a pause.
    stop_reason: StopReason | None = None
    term_sent_at: float | None = None
    # Set when the worker killed it for using more memory than TUNEYARD_JOB_MEMORY_BYTES (bytes it used).
    over_memory: int | None = None

    @property
    def phase(self) -> str:
        return self.handle.phase


def default_worker_id(settings: Settings) -> str:
    """A worker id that stays the same across restarts on one machine and home, so jobs are re-adopted."""
    return f"local:{socket.gethostname()}:{settings.home}"


class Worker:
    """Runs jobs on this machine; many workers may share one database."""

    def __init__(self, store: Store, settings: Settings, files: FileService, *,
                 launcher: Launcher | None = None, worker_id: str | None = None) -> None:
        self.store = store
        self.settings = settings
        self.files = files
        self.launcher: Launcher = launcher or make_launcher(settings)
        self.worker_id = worker_id or default_worker_id(settings)
        self.secrets = SecretService(store, settings)
        self.webhooks = WebhookSender(store, settings)
        self.procs: dict[str, Watched] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._adopted = False
        self._draining = False

    # ----- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop in a background thread."""
        self._thread = threading.Thread(target=self.run_forever, name="tuneyard-worker", daemon=True)
        self._thread.start()
        # Webhook deliveries on a thread of their own: a slow receiver must not hold up the jobs.
        self.webhooks.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop, then drain for ``TUNEYARD_DRAIN_SECONDS`` (0: leave every process running, to be
        re-adopted by the next worker on this machine)."""
        self._stop.set()
        self.webhooks.stop()
        if self._thread is not None:
            self._thread.join(timeout)
        self.launcher.close()
        if self.settings.drain_seconds > 0 and self.procs:
            self.drain(self.settings.drain_seconds)

    def drain(self, seconds: float) -> None:
        """Checkpoint the running trainers and put their jobs back in the queue, stop the prepare steps and
        release their jobs; what has not stopped within ``seconds`` is left running to be re-adopted."""
        self._draining = True
        log.info("draining %d job(s) for up to %.0f s", len(self.procs), seconds)
        for w in list(self.procs.values()):
            if w.stop_sent_at is not None or w.jd.stop_requested():
                continue  # being cancelled or paused already (maybe asked by the API, not yet by us): that goes on
            if w.phase == "train":
                self.launcher.stop(w.handle, w.jd, "drain")
            else:
                self.launcher.terminate(w.handle)
        deadline = time.time() + seconds
        while self.procs and time.time() < deadline:
            for job_id in list(self.procs):
                try:
                    self._watch(job_id)
                except Exception:
                    log.exception("job %s: draining failed", job_id)
            self._renew_leases()
            time.sleep(0.2)
        if self.procs:
            log.warning("drain timed out: %s left running, to be re-adopted", ", ".join(sorted(self.procs)))

    def run_forever(self) -> None:
        """Tick until shut down; an error in one tick is logged and the loop goes on."""
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("worker tick failed")
            self._stop.wait(self.settings.poll_interval)

    def tick(self) -> None:
        """One pass over everything this worker looks after."""
        if not self._adopted:
            self._adopt()
            self._adopted = True
        for job_id in list(self.procs):
            self._watch(job_id)
        self._recover_lost()
        self._start_prepares()
        self._start_trainers()
        self._renew_leases()
        # The standby is for the next job: started while no prepare step runs, it takes no core from one.
        if not self._draining and not any(p.phase == "prepare" for p in self.procs.values()):
            self.launcher.warm()

    # ----- adoption after a restart -----------------------------------------------------------
    def _adopt(self) -> None:
        with self.store.session() as s:
            mine = repo.jobs_held_by(s, self.worker_id)
        for job in mine:
            jd = JobDir(Path(job.output_dir))
            phase = "prepare" if job.status == JobStatus.VALIDATING_FILES else "train"
            h = self.launcher.adopt(job.id, jd, phase)
            if h is not None:
                log.info("job %s: re-adopted its %s step", job.id, phase)
                self.procs[job.id] = Watched(h, jd)
            elif job.status in (JobStatus.VALIDATING_FILES, JobStatus.RUNNING):
                # It ended while no worker watched it: its files say how.
                self.procs[job.id] = Watched(Ended(job_id=job.id, phase=phase), jd)

    def _recover_lost(self) -> None:
        """Take over running jobs whose worker stopped renewing their lease (crashed, or its machine died).

        A trainer still alive on this machine is adopted where it is; otherwise the job goes back to the
        queue and resumes from its latest complete checkpoint (counted as an attempt).
        """
        now = time.time()
        with self.store.session() as s:
            lost = repo.lapsed_running(s, self.worker_id, now)
        for job in lost:
            if job.id in self.procs:
                continue
            jd = JobDir(Path(job.output_dir))
            with self.store.session() as s:
                # Whoever moves the lease first owns the job; the others see that they lost and leave it.
                won = repo.take_over(s, job, self.worker_id, now, self.settings.lease_seconds)
            if not won:
                continue
            h = self.launcher.adopt(job.id, jd, "train")
            if h is not None:
                self.procs[job.id] = Watched(h, jd)
                with self.store.session() as s:
                    add_event(s, job.id, f"Worker {job.worker_id} stopped answering; {self.worker_id} took over "
                              "the running trainer", level="warn")
                continue
            with self.store.session() as s:
                if job.pause_requested_at is not None:
                    # Pausing when its worker was lost: paused at the checkpoint the trainer left, not retried.
                    res, _ = _read(jd.read_result, job.id)
                    if isinstance(res, Stopped):
                        self._pause(s, job, jd, res=res)
                    else:
                        self._pause(s, job, jd, died=f"Worker {job.worker_id} was lost with the trainer while "
                                                     "pausing")
                elif job.attempt < MAX_ATTEMPTS:
                    if transition(s, job.id, JobStatus.QUEUED, expect={JobStatus.RUNNING}, worker_id=None,
                                  lease_expires_at=None, pid=None):
                        add_event(s, job.id, f"Worker {job.worker_id} was lost with the trainer; retrying from the "
                                  f"latest checkpoint (attempt {job.attempt + 1} of {MAX_ATTEMPTS})", level="warn",
                                  data={"retry_cause": "worker_lost"})
                elif transition(s, job.id, JobStatus.FAILED, expect={JobStatus.RUNNING}, worker_id=None,
                                lease_expires_at=None, pid=None, error=_error({
                                    "code": "worker_lost",
                                    "message": f"the job's worker was lost {job.attempt} times"})):
                    add_event(s, job.id, "Fine-tuning job failed: its worker kept being lost", level="error")

    # ----- watching running processes ---------------------------------------------------------
    def _watch(self, job_id: str) -> None:
        w = self.procs[job_id]
        with self.store.session() as s:
            job = s.scalar(select(Job).where(Job.id == job_id))
        if job is None:
            self._terminate_now(w)
            self.procs.pop(job_id, None)
            return
        if w.phase == "train" and job.worker_id not in (None, self.worker_id):
            # Our lease lapsed and another worker took the job. If it adopted this very trainer (same
            # machine) the job is still running: let go. If it requeued the job, it could not see this
            # trainer and will start another: this one must stop.
            if job.status != JobStatus.RUNNING or w.handle.attempt is not None and job.attempt != w.handle.attempt:
                self._terminate_now(w)
            log.warning("job %s: now owned by worker %s; letting go of it", job_id, job.worker_id)
            self.procs.pop(job_id, None)
            return
        jd = w.jd
        self.ingest(job, jd)
        # None also while processes of it outlive its main one (the launcher ends them first).
        code = w.handle.poll()
        if code is None:
            self._enforce_control(job, w)
            self._enforce_memory(job, w)
            if self.settings.job_log_bytes:
                rotate_logs(jd.logs, self.settings.job_log_bytes)
            return
        self.ingest(job, jd)
        # Forget the process only once its outcome is recorded: a failed write is retried next tick.
        if w.phase == "prepare":
            self._finish_prepare(job, jd, code)
        else:
            self._finish_train(job, jd, code, w)
        self.procs.pop(job_id, None)

    def _enforce_control(self, job: Job, w: Watched) -> None:
        status = JobStatus(job.status)
        wanted = {JobStatus.CANCELLED: "cancel", JobStatus.PAUSED: "pause", JobStatus.FAILED: "cancel"}.get(status)
        if status == JobStatus.RUNNING and job.pause_requested_at is not None:
            wanted = "pause"  # the job stays running until the trainer has stopped with its checkpoint
        if wanted is None:
            return
        now = time.time()
        if w.stop_reason != wanted or w.stop_sent_at is None:
            # The API wrote the request already; writing it again covers one lost in a race with the start of
            # the trainer, and a cancel replaces a pause still under way.
            self.launcher.stop(w.handle, w.jd, wanted)
            w.stop_reason = wanted
            w.stop_sent_at = now
        # A prepare step has nothing to save; a cancelled trainer gets a few seconds to stop at a step
        # boundary; a pausing one must finish its step and write its checkpoint.
        if w.phase == "prepare":
            grace = 0.0
        elif wanted == "cancel":
            grace = self.settings.cancel_grace_seconds
        else:
            grace = self.settings.pause_grace_seconds
        if w.term_sent_at is None and now - w.stop_sent_at >= grace:
            self.launcher.terminate(w.handle)
            w.term_sent_at = now
        elif w.term_sent_at is not None and now - w.term_sent_at > KILL_AFTER_TERM_SECONDS:
            self.launcher.kill(w.handle)

    def _enforce_memory(self, job: Job, w: Watched) -> None:
        """Kill a trainer whose processes use more memory than TUNEYARD_JOB_MEMORY_BYTES (a job must not
        take the machine, and the server with it, into the kernel's OOM killer)."""
        limit = self.settings.job_memory_bytes
        if not limit or w.phase != "train" or w.over_memory is not None:
            return
        used = self.launcher.resident_bytes(w.handle)
        if used is not None and used > limit:
            log.warning("job %s: its processes use %d bytes, over the %d byte limit: killing them", job.id, used,
                        limit)
            w.over_memory = used
            self.launcher.kill(w.handle)

    def _terminate_now(self, w: Watched) -> None:
        self.launcher.terminate(w.handle)
        time.sleep(0.2)
        self.launcher.kill(w.handle)

    # ----- recording events -------------------------------------------------------------------
    def ingest(self, job: Job, jd: JobDir) -> int:
        """Record the job's new events (each once, by seq) and the progress they carry; returns how many."""
        return recorder.ingest(self.store, job, jd)

    # ----- prepare phase ----------------------------------------------------------------------
    def _start_prepares(self) -> None:
        running = sum(1 for p in self.procs.values() if p.phase == "prepare")
        free = self.settings.prepare_slots - running
        if free <= 0:
            return
        now = time.time()
        with self.store.session() as s:
            candidates = repo.prepare_candidates(s, now, free)
        for job_id in candidates:
            if job_id in self.procs:
                continue
            with self.store.session() as s:
                job = repo.claim_for_prepare(s, job_id, self.worker_id, now, self.settings.lease_seconds)
            if job is None:
                continue
            jd = JobDir(Path(job.output_dir)).create()
            try:
                env = {**self._source_credentials(job), **self._model_credentials(job)}
            except SecretUnavailable as e:
                with self.store.session() as s:
                    if transition(s, job.id, JobStatus.FAILED, expect={JobStatus.VALIDATING_FILES}, worker_id=None,
                                  lease_expires_at=None, error=_error({"code": e.code, "message": e.message,
                                                                       "param": e.param})):
                        add_event(s, job.id, f"Validation failed: {e.message}", level="error")
                continue
            h = self.launcher.prepare(job.id, jd, job.attempt, env=env)
            self.procs[job.id] = Watched(h, jd)
            with self.store.session() as s:
                repo.record_process(s, job.id, h.pid)

    def _model_credentials(self, job: Job) -> dict[str, str]:
        """HF_TOKEN for a private hub model, from the stored secret the spec names (environment only)."""
        secret_id = ((job.spec or {}).get("model") or {}).get("secret_id")
        if not secret_id:
            return {}
        _, value = self.secrets.resolve(job.org_id, secret_id, param="model_secret_id")
        return {"HF_TOKEN": value["token"]}

    def _tracking_credentials(self, job: Job) -> dict[str, str]:
        """WANDB_API_KEY (and WANDB_BASE_URL) of a W&B integration, from the secret the service resolved at submit."""
        for integration in (job.spec or {}).get("integrations") or []:
            secret_id = (integration.get("config") or {}).get("secret_id")
            if integration.get("type") == "wandb" and secret_id:
                _, value = self.secrets.resolve(job.org_id, secret_id, param=integration.get("param") or "integrations")
                env = {"WANDB_API_KEY": value["api_key"]}
                if value.get("host"):
                    env["WANDB_BASE_URL"] = value["host"]
                return env
        return {}

    def _source_credentials(self, job: Job) -> dict[str, str]:
        """The environment that hands each remote source its secret (decrypted here, never written to disk)."""
        creds: dict[str, dict] = {}
        data = (job.spec or {}).get("data") or {}
        for src in (data.get("train"), data.get("validation")):
            if src and src.get("secret_id"):
                type_, value = self.secrets.resolve(job.org_id, src["secret_id"])
                # Keyed by the source's param: the two sources of a job may use different secrets.
                creds[src.get("param") or "training_file"] = {**value, "type": type_}
        return {CREDENTIALS_ENV: json.dumps(creds)} if creds else {}

    def _finish_prepare(self, job: Job, jd: JobDir, code: int) -> None:
        res, unreadable = _read(jd.read_prepared, job.id)
        with self.store.session() as s:
            if isinstance(res, PreparedOk):
                if transition(s, job.id, JobStatus.QUEUED, expect={JobStatus.VALIDATING_FILES}, worker_id=None,
                              lease_expires_at=None, pid=None, resolved_hyperparameters=res.hyperparameters,
                              total_steps=res.total_steps, n_train_examples=res.n_train,
                              trained_steps=0, trained_tokens=0):
                    add_event(s, job.id, "Files validated, moving job to queued state")
                return
            if self._draining and res is None:
                # Stopped by this worker's shutdown: the next worker prepares the job again.
                repo.release_prepare(s, job.id)
                return
            err = res.error.model_dump() if res is not None else {
                "code": "internal_error",
                "message": f"data preparation exited with code {code} without a result{unreadable}; see {jd.logs}"}
            if transition(s, job.id, JobStatus.FAILED, expect={JobStatus.VALIDATING_FILES}, worker_id=None,
                          lease_expires_at=None, pid=None, error=_error(err)):
                add_event(s, job.id, f"Validation failed: {err['message']}", level="error")

    # ----- training phase ---------------------------------------------------------------------
    def _start_trainers(self) -> None:
        with self.store.session() as s:
            queued = repo.queued_jobs(s)
        for job in queued:
            if job.id in self.procs:
                continue  # a paused-then-resumed job whose old trainer is still saving
            spec = TrainingSpec.model_validate(job.spec)
            cap = self.launcher.capacity()
            # The spec says how many processes (CPU jobs: TUNEYARD_CPU_PROCS_PER_JOB, written at submission).
            want = Placement.for_spec(spec, cuda=cap.has_cuda)
            free_gpus = cap.gpus if cap.free_gpus is None else cap.free_gpus
            free_cpu = cap.cpu_slots if cap.free_cpu_slots is None else cap.free_cpu_slots
            if want.gpus_per_node and free_gpus < want.gpus_per_node or not want.gpus_per_node and free_cpu < 1:
                continue  # wait; a smaller job behind it may still fit
            jd = JobDir(Path(job.output_dir))
            if not self.launcher.idle(jd):
                continue  # an earlier run of this job is still winding down: never two trainers on one job
            with self.store.session() as s:
                won = repo.claim_for_training(s, job, self.worker_id, time.time(), self.settings.lease_seconds)
            if not won:
                continue
            jd.create()
            jd.clear_stop()
            jd.result.unlink(missing_ok=True)
            try:
                h = self.launcher.train(job.id, jd, job.attempt + 1, want,
                                        env={**self._model_credentials(job), **self._tracking_credentials(job)})
            except (OSError, SecretUnavailable, LaunchError) as e:
                with self.store.session() as s:
                    transition(s, job.id, JobStatus.FAILED, worker_id=None, lease_expires_at=None, error=_error(
                        {"code": "launch_failed", "message": f"could not start the trainer: {e}"}))
                continue
            with self.store.session() as s:
                if h is None:
                    # Taken between the look and the start (another launcher's job on the same devices): later.
                    repo.unclaim_training(s, job)
                    continue
                repo.record_process(s, job.id, h.pid)
                add_event(s, job.id, "Fine-tuning job started" if job.attempt == 0 and not job.trained_steps
                          else f"Fine-tuning job restarted (attempt {job.attempt + 1})")
            self.procs[job.id] = Watched(h, jd)

    def _finish_train(self, job: Job, jd: JobDir, code: int, w: Watched | None = None) -> None:
        res, unreadable = _read(jd.read_result, job.id)
        if w is not None and w.over_memory is not None:
            mib, limit = w.over_memory // 2**20, self.settings.job_memory_bytes // 2**20
            res = Failed(error=JobError(
                code="out_of_memory",
                message=f"the trainer used {mib:,} MiB of memory, over this installation's limit of {limit:,} MiB "
                        "per job (TUNEYARD_JOB_MEMORY_BYTES); lower the batch size or max_length, or turn on "
                        "gradient checkpointing"))
        with self.store.session() as s:
            current, pausing = s.execute(select(Job.status, Job.pause_requested_at).where(Job.id == job.id)).one()
            s.execute(update(Job).where(Job.id == job.id).values(pid=None, lease_expires_at=None))
            if current != JobStatus.RUNNING:
                # Cancelled meanwhile (or paused at once by an earlier release): that status stands.
                s.execute(update(Job).where(Job.id == job.id).values(worker_id=None))
                return
            if isinstance(res, Succeeded):
                if pausing is not None:
                    add_event(s, job.id, "The trainer finished its last step before it could pause")
                self._succeed(s, job, jd, res)
                return
            if isinstance(res, Stopped) and (res.reason == "pause" or pausing is not None and res.reason == "drain"):
                # Stopped at a step boundary with its checkpoint written (a drain's counts as the pause's).
                self._pause(s, job, jd, res=res)
                return
            if isinstance(res, Stopped) and res.reason == "drain":
                # Not a failed attempt: the restart continues this one from its checkpoint.
                if transition(s, job.id, JobStatus.QUEUED, expect={JobStatus.RUNNING}, worker_id=None,
                              attempt=max(0, job.attempt - 1)):
                    add_event(s, job.id, f"The worker is shutting down: checkpointed at step {res.step}; "
                              "the job resumes from there when a worker is free", data={"step": res.step})
                return
            if isinstance(res, Failed):
                if transition(s, job.id, JobStatus.FAILED, expect={JobStatus.RUNNING}, worker_id=None,
                              error=_error(res.error.model_dump())):
                    add_event(s, job.id, f"Fine-tuning job failed: {res.error.message}", level="error")
                return
            # No result: the trainer died (killed, OOM-killed, machine rebooted), or could not even write one
            # (or wrote one that does not read: the same to us, but said in the event).
            free = _free_bytes(jd.root)
            if free is not None and free < DISK_FULL_BYTES:
                # Retrying on a full disk cannot help: say what is wrong.
                if transition(s, job.id, JobStatus.FAILED, expect={JobStatus.RUNNING}, worker_id=None, error=_error({
                        "code": "disk_full",
                        "message": f"the trainer stopped with the disk holding {jd.root.parent} full ({free:,} bytes "
                                   "free); free space or lower save_total_limit; the checkpoints written before are "
                                   "kept"})):
                    add_event(s, job.id, "Fine-tuning job failed: the disk is full", level="error")
                return
            if pausing is not None:
                # The user asked for a pause: honour it at the last checkpoint that is whole, never retry.
                self._pause(s, job, jd, died=f"The trainer exited unexpectedly (exit code {code}{unreadable}) while "
                                             "pausing")
                return
            if job.attempt < MAX_ATTEMPTS:
                if transition(s, job.id, JobStatus.QUEUED, expect={JobStatus.RUNNING}, worker_id=None):
                    add_event(s, job.id, f"Trainer exited unexpectedly (exit code {code}{unreadable}); retrying "
                              f"from the latest checkpoint (attempt {job.attempt + 1} of {MAX_ATTEMPTS})", level="warn",
                              data={"retry_cause": "trainer_exited"})
                return
            if transition(s, job.id, JobStatus.FAILED, expect={JobStatus.RUNNING}, worker_id=None, error=_error({
                    "code": "trainer_crashed",
                    "message": f"the trainer exited unexpectedly (exit code {code}{unreadable}) {job.attempt} times; "
                               f"see the logs in {jd.logs}"})):
                add_event(s, job.id, "Fine-tuning job failed: the trainer kept crashing", level="error")

    def _pause(self, s, job: Job, jd: JobDir, *, res: Stopped | None = None, died: str | None = None) -> None:
        """Move a pausing job whose trainer is gone to ``paused`` at its newest complete checkpoint.

        ``res``: the trainer's result, it stopped on request, so that checkpoint must be of the step it stopped
        at. ``died``: it ended before saving (says how); the steps after the newest complete checkpoint are
        lost, so their metrics go and the job claims only what that checkpoint holds.
        """
        ckpt = latest_complete_checkpoint(jd.checkpoints) if jd.checkpoints.is_dir() else None
        mark, _ = _read(lambda: read_checkpoint_marker(ckpt), job.id) if ckpt is not None else (None, "")
        if mark is None:
            ckpt = None  # gone or spoilt since it was found: there is no checkpoint to resume from
        step = mark.step if mark is not None else 0
        if res is not None and res.step != step:
            died = f"The trainer stopped at step {res.step} without a complete checkpoint of it"
        values: dict[str, Any] = {"worker_id": None, "lease_expires_at": None, "pid": None,
                                  "pause_requested_at": None, "estimated_finish": None, "trained_steps": step}
        if mark is not None and mark.trained_tokens is not None:
            values["trained_tokens"] = mark.trained_tokens
        if died is None:
            values["attempt"] = max(0, job.attempt - 1)  # a pause is not a failed attempt
        if not transition(s, job.id, JobStatus.PAUSED, expect={JobStatus.RUNNING}, **values):
            return
        data = {"step": step, "checkpoint": str(ckpt) if ckpt else None}
        if died is None:
            where = f"at step {step}; resume continues from its checkpoint" if ckpt else \
                "before its first step; resume starts from the beginning"
            add_event(s, job.id, f"Fine-tuning job paused {where}", data=data)
            return
        recorder.supersede_metrics(s, job.id, step)
        where = f"at the newest complete checkpoint, step {step}; resume continues from there" if ckpt else \
            "with no complete checkpoint; resume starts from the beginning"
        add_event(s, job.id, f"{died}; paused {where}", level="warn", data=data)

    def _succeed(self, s, job: Job, jd: JobDir, res: Succeeded) -> None:
        export = (job.spec or {}).get("export_dir")
        if export:
            self._export(s, job, jd, Path(export))
        csv_bytes = self._metrics_csv(s, job.id)
        result = self.files.add_result_file(s, job.org_id, f"{job.id}-results.csv", csv_bytes, job.created_by)
        model_name = fine_tuned_model_name(job.model, job.org_id, job.suffix, job.id)
        if transition(s, job.id, JobStatus.SUCCEEDED, expect={JobStatus.RUNNING}, worker_id=None,
                      fine_tuned_model=model_name, result_files=[result.id],
                      trained_tokens=res.trained_tokens, trained_steps=res.trained_steps,
                      estimated_finish=None):
            add_event(s, job.id, f"New fine-tuned model created: {model_name}", data={"output_dir": res.output_dir})
            add_event(s, job.id, "The job has successfully completed")

    @staticmethod
    def _export(s, job: Job, jd: JobDir, export_dir: Path) -> None:
        """Copy the final output to <export_dir>/<external id or job id>/; a failure is reported, not fatal."""
        dest = export_dir / (job.external_id or job.id)
        tmp = dest.with_name(f".{dest.name}.partial")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(jd.output, tmp)
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
            add_event(s, job.id, f"Output copied to {dest}", data={"export_dir": str(dest)})
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            add_event(s, job.id, f"Could not copy the output to {dest}: {e.strerror or e}; it stays in "
                      f"{jd.output}", level="warn")

    @staticmethod
    def _metrics_csv(s, job_id: str) -> bytes:
        rows: dict[int, dict[str, Any]] = {}
        q = select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "metrics").order_by(JobEvent.pk)
        for (data,) in s.execute(q):
            if not data or "step" not in data:
                continue
            row = rows.setdefault(int(data["step"]), {"step": int(data["step"])})
            for src, dst in (("train_loss", "train_loss"), ("train_mean_token_accuracy", "train_accuracy"),
                             ("valid_loss", "valid_loss"), ("valid_mean_token_accuracy", "valid_mean_token_accuracy")):
                if data.get(src) is not None:
                    row[dst] = data[src]
        buf = io.StringIO()
        cols = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for step in sorted(rows):
            w.writerow(rows[step])
        return buf.getvalue().encode()

    # ----- leases -----------------------------------------------------------------------------
    def _renew_leases(self) -> None:
        if not self.procs:
            return
        with self.store.session() as s:
            repo.renew_leases(s, list(self.procs), self.worker_id, time.time() + self.settings.lease_seconds)


# Below this much free space a trainer that died without a result is taken to have filled the disk.
DISK_FULL_BYTES = 32 * 2**20


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


_T = TypeVar("_T")


def _read(read: Callable[[], _T | None], job_id: str) -> tuple[_T | None, str]:
    """What a job file holds, or None when it is missing or malformed; for a malformed one, a note saying so.

    A malformed file is what a process that died mid-way leaves as much as a missing one: both get the same
    classification (no result), and the note goes into the job's event so that nobody has to guess which.
    """
    try:
        return read(), ""
    except ProtocolError as e:
        log.warning("job %s: %s; taken as no result", job_id, e)
        return None, f"; its {e.path.name} is unreadable: {e.problem}"


def _error(err: dict) -> dict:
    return {"code": str(err.get("code") or "error"), "message": str(err.get("message") or "unknown error"),
            "param": err.get("param")}

