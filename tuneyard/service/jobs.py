"""JobService: what every dialect does with jobs, scoped to the caller's organisation in one place."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from tuneyard.data.sources import SECRET_TYPES, check_uri, hub_local_dir, is_uri, kind_of, parse_hub
from tuneyard.domain import capabilities, tracking
from tuneyard.domain.errors import Conflict, InvalidRequest, InvalidState, NotFound, Problems, RateLimited
from tuneyard.domain.jobs import JobStatus, is_fine_tuned_name
from tuneyard.domain.spec import DataSource, IntegrationSpec, ModelSpec, RuntimeSpec, TrainingSpec
from tuneyard.ids import new_id
from tuneyard.jobdir import JobDir, StopReason, write_json_atomic
from tuneyard.scheduler.launcher import Launcher, launcher_class
from tuneyard.service import lineage
from tuneyard.service.audit import record_by
from tuneyard.service.auth import Principal, visible
from tuneyard.service.files import FileService
from tuneyard.service.paths import check_model_name, confine
from tuneyard.service.secrets import SecretService
from tuneyard.settings import Settings
from tuneyard.store.db import Store
from tuneyard.store.models import Checkpoint, File, Job, JobEvent
from tuneyard.store.repo import add_event, json_value_is, page, transition

PAUSING_MESSAGE = "Pausing fine-tuning job: saving a checkpoint at the next step"
ACTIVE = [JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED]
METADATA_KEY = re.compile(r"^metadata\[(.+)\]$")


@dataclass
class Submission:
    """A dialect-neutral job request: the spec plus what the dialect wants stored and echoed."""

    spec: TrainingSpec
    dialect: str
    request: dict[str, Any] = field(default_factory=dict)
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    external_id: str | None = None
    idempotency_key: str | None = None
    # The request named no device count (OpenAI and Llama Stack without the resources extension): a GPU job
    # gets TUNEYARD_GPUS_PER_JOB.
    default_devices: bool = False


class JobService:
    """Submit, read, list, cancel, pause and resume jobs of the caller's organisation."""

    def __init__(self, store: Store, settings: Settings, files: FileService, secrets: SecretService) -> None:
        self.store = store
        self.settings = settings
        self.files = files
        self.secrets = secrets
        self._launcher: Launcher | None = None

    @property
    def launcher(self) -> Launcher:
        """The configured launcher, asked what a job can get (it starts nothing here)."""
        if self._launcher is None:
            self._launcher = launcher_class(self.settings.launcher).from_settings(self.settings)
        return self._launcher

    # ----- submission -------------------------------------------------------------------------
    def submit(self, who: Principal, sub: Submission, problems: Problems | None = None) -> Job:
        """Check a submission, store the job in ``validating_files`` and write its job directory.

        Every problem found is raised as one error, with ``problems`` (what the dialect found already) first;
        nothing is stored then.
        """
        if sub.idempotency_key and not problems:
            existing = self._by_idempotency_key(who, sub.idempotency_key)
            if existing is not None:
                return existing
        spec = self._check_spec(who, sub.spec, problems or Problems(), default_devices=sub.default_devices)
        self._check_quota(who)
        job_id = new_id("ftjob")
        jd = JobDir(self.settings.jobs_dir / who.org_id / job_id).create()
        write_json_atomic(jd.spec, spec.model_dump(mode="json"))
        now = time.time()
        job = Job(id=job_id, org_id=who.org_id, dialect=sub.dialect, external_id=sub.external_id,
                  idempotency_key=sub.idempotency_key, created_by=who.key_id,
                  status=JobStatus.VALIDATING_FILES.value, created_at=now,
                  updated_at=now, model=sub.spec.model.name, training_file=spec.data.train.file_id,
                  validation_file=spec.data.validation.file_id if spec.data.validation else None,
                  suffix=sub.suffix, seed=spec.seed, request=sub.request, metadata_=sub.metadata,
                  spec=spec.model_dump(mode="json"), output_dir=str(jd.root), result_files=[], attempt=0,
                  events_seq=0)
        try:
            with self.store.session(write=True) as s:
                s.add(job)
                s.flush()
                add_event(s, job_id, f"Created fine-tuning job: {job_id}")
                record_by(s, who, "job.create", job_id, {"dialect": sub.dialect, "model": sub.spec.model.name})
                add_event(s, job_id, f"Validating training file: {spec.data.train.file_id or spec.data.train.path}")
        except IntegrityError as e:
            if sub.idempotency_key:
                existing = self._by_idempotency_key(who, sub.idempotency_key)
                if existing is not None:
                    return existing
            if sub.external_id:
                raise Conflict(f"a job with id '{sub.external_id}' already exists", param="job_uuid",
                               code="duplicate_job") from e
            raise
        return job

    def _check_quota(self, who: Principal) -> None:
        limit = self.settings.max_active_jobs_per_org
        if limit <= 0:
            return
        with self.store.session() as s:
            active = s.scalar(select(func.count()).select_from(Job).where(
                Job.org_id == who.org_id, Job.status.in_([st.value for st in ACTIVE]))) or 0
        if active >= limit:
            raise RateLimited(f"Your organisation has {active} unfinished jobs, the most it may have at once "
                              f"({limit}); wait for some to finish or cancel some.", code="quota_exceeded",
                              headers={"retry-after": "60"})

    def _by_idempotency_key(self, who: Principal, key: str) -> Job | None:
        with self.store.session() as s:
            job = s.scalar(select(Job).where(Job.org_id == who.org_id, Job.idempotency_key == key))
        if job is not None and not who.is_admin and job.created_by != who.key_id:
            # Keys are unique per organisation: a member must not get (or learn about) a colleague's job.
            raise Conflict("this Idempotency-Key was already used in your organisation; use a new one",
                           param="Idempotency-Key", code="idempotency_key_reused")
        return job

    def _check_spec(self, who: Principal, spec: TrainingSpec, problems: Problems, *, default_devices: bool = False
                    ) -> TrainingSpec:
        """The spec with its model and data sources resolved; every independent problem raised at once."""
        roots = self.settings.allowed_roots
        model, adapter = spec.model, spec.adapter
        with problems.check():
            if spec.model.init_adapter is not None or spec.model.parent is not None:
                # Only the resolution of a fine-tuned model's name sets them (to paths it found, not given ones).
                raise InvalidRequest("init_adapter and parent come from naming a fine-tuned model as the model; "
                                     "they cannot be given", param="model")
            if is_fine_tuned_name(spec.model.name):
                # Continued training: the parent's base and weights (docs/continued-training.md).
                model, adapter = lineage.continue_from(lineage.resolve(self.store, who, spec.model.name), spec)
            else:
                name, source = check_model_name(spec.model.name, roots)
                model = spec.model.model_copy(update={"name": name, "source": source})
        if model.secret_id is not None:
            with problems.check():
                row = self.secrets.check(who, model.secret_id, param="model_secret_id")
                if row.type != "hf":
                    raise InvalidRequest(f"secret '{model.secret_id}' is a '{row.type}' secret; reading a hub "
                                         "model needs an 'hf' secret (a token)", param="model_secret_id")
        # A job that will run on CPU runs TUNEYARD_CPU_PROCS_PER_JOB gloo processes: the spec says so, so that
        # the batch is split for them from the start (and a batch that cannot be is refused here, not in the
        # trainer).
        # A GPU job that named no count gets TUNEYARD_GPUS_PER_JOB, one rank per GPU.
        if spec.resources.device == "cpu" or not self.launcher.capacity().has_cuda:
            nproc = max(spec.resources.nproc_per_node, self.settings.cpu_procs_per_job)
        else:
            nproc = self.settings.gpus_per_job if default_devices else spec.resources.nproc_per_node
        spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"nproc_per_node": nproc})})
        spec = spec.model_copy(update={"model": model, "adapter": adapter})
        with problems.check():
            _check_vision_config(spec.model)
        train = valid = None
        with problems.check():
            train = self._resolve_source(who, spec.data.train)
        if spec.data.validation:
            with problems.check():
                valid = self._resolve_source(who, spec.data.validation)
        self._check_resources(spec, problems)
        integrations = self._check_integrations(who, spec, problems)
        problems.raise_if_any()
        data = spec.data.model_copy(update={"train": train, "validation": valid})
        resources = spec.resources.model_copy(
            update={"torch_compile": spec.resources.torch_compile or self.settings.torch_compile})
        return spec.model_copy(update={"model": model, "data": data, "resources": resources,
                                       "integrations": integrations, "runtime": runtime_spec(self.settings)})

    def _check_integrations(self, who: Principal, spec: TrainingSpec, problems: Problems) -> list[IntegrationSpec]:
        """The trackers checked (domain/tracking.py), each W&B one with the secret its key comes from resolved."""
        found = tracking.check(spec.integrations)
        for p in found:
            problems.add(InvalidRequest(p.message, param=p.param, code=p.code))
        # Whether a key is stored is independent of the settings' shape: both are reported at once.
        out = []
        for i in spec.integrations:
            if i.type == "wandb":
                with problems.check():
                    i = i.model_copy(update={"config": {**i.config, "secret_id": self._wandb_secret(who, i)}})
            out.append(i)
        return out

    def _wandb_secret(self, who: Principal, integration: IntegrationSpec) -> str:
        """The id of the stored 'wandb' secret a W&B integration uses: the one it names, else the organisation's."""
        param = integration.param
        named = integration.config.get("secret_id")
        if isinstance(named, str) and named:
            row = self.secrets.check(who, named, param=param)
            if row.type != "wandb":
                raise InvalidRequest(f"{param}: secret '{named}' is a '{row.type}' secret; W&B needs a 'wandb' secret "
                                     "(api_key, optional host)", param=param)
            return row.id
        rows = [r for r in self.secrets.list(who) if r.type == "wandb"]
        if not rows:
            # Without a key the run would log nowhere: refuse rather than accept and ignore.
            raise InvalidRequest(f"{param}: W&B needs an API key, and your organisation has no stored 'wandb' secret; "
                                 "store one (POST /v1/secrets, type 'wandb', value {\"api_key\": ...}) or name one "
                                 "with wandb.secret_id", param=param, code="integration_secret_missing")
        if len(rows) > 1:
            raise InvalidRequest(f"{param}: your organisation has {len(rows)} 'wandb' secrets "
                                 f"({', '.join(r.name for r in rows)}); name one with wandb.secret_id", param=param,
                                 code="integration_secret_ambiguous")
        return rows[0].id

    def _resolve_source(self, who: Principal, src: DataSource) -> DataSource:
        if src.file_id is not None:
            # Each step needs the one before: the file must exist to have a purpose, and so on.
            try:
                f = self.files.get(who, src.file_id)
            except NotFound as e:
                raise InvalidRequest(f"File {src.file_id} not found", param=src.param,
                                     code="file_not_found") from e
            if f.purpose != "fine-tune":
                raise InvalidRequest(f"File {src.file_id} has purpose '{f.purpose}'; fine-tuning needs a file "
                                     "uploaded with purpose 'fine-tune'", param=src.param, code="invalid_file_purpose")
            if f.status != "processed":
                raise InvalidRequest(f"File {src.file_id} is not ready ({f.status}): {f.status_details or ''}",
                                     param=src.param, code="file_not_ready")
            return src.model_copy(update={"path": str(self.files.path_of(f))})
        if not src.path:
            raise InvalidRequest("a training data source is required", param=src.param)
        kind = kind_of(src.path)
        if is_uri(src.path):
            check_uri(src)
        local_dir = hub_local_dir(src.path)
        if local_dir is not None:
            # hf:///abs/dir is a hub-style directory on this machine: confined like any local path.
            split = parse_hub(src.path, src).split
            src = src.model_copy(update={"path": local_dir, "split": split})
            kind = None
        # Once the path's kind is known, its options, its secret and its place are independent checks.
        problems = Problems()
        for name, applies, what in (("region", kind == "s3", "s3:// sources"),
                                     ("subset", kind == "hf", "hub datasets (hf://owner/name)"),
                                     ("revision", kind == "hf", "hub datasets (hf://owner/name)"),
                                     ("split", kind in ("hf", None), "hub datasets and local dataset directories")):
            if getattr(src, name) is not None and not applies:
                problems.add(InvalidRequest(f"{src.param}: {name} applies to {what} only", param=name))
        if src.secret_id is not None:
            with problems.check():
                # The same answer whether or not another organisation has a secret of that name.
                row = self.secrets.check(who, src.secret_id, param="secret_id")
                want = SECRET_TYPES.get(kind or "")
                if want is None:
                    raise InvalidRequest(f"{src.param}: secret_id applies to s3:// sources and hub datasets only",
                                         param="secret_id")
                if row.type != want:
                    raise InvalidRequest(f"secret '{src.secret_id}' has type '{row.type}'; {kind}:// sources need a "
                                         f"secret of type '{want}'", param="secret_id")
        if kind is not None:
            problems.raise_if_any()
            return src
        path = None
        with problems.check():
            path = confine(src.path, self.settings.allowed_roots, param=src.param, want_dir=None)
            if src.split is not None and not path.is_dir():
                raise InvalidRequest(f"{src.param}: split applies to hub datasets and dataset directories, not to "
                                     "one file", param="split")
        problems.raise_if_any()
        return src.model_copy(update={"path": str(path)})

    def _check_resources(self, spec: TrainingSpec, problems: Problems) -> None:
        """Record each thing this installation cannot honour (they are independent: all are reported)."""
        batch = spec.hyperparameters.batch_size
        if isinstance(batch, int) and batch % spec.world_size:
            problems.add(InvalidRequest(f"batch_size {batch} must be a multiple of the {spec.world_size} training "
                                        "processes this job runs on", param="batch_size"))
        if spec.schedule.keep_best_checkpoint and spec.data.validation is None and not spec.data.split.validation_ratio:
            # About the inputs, not the recipe: the prepare step checks it again on what it holds out.
            problems.add(InvalidRequest("keep_best_checkpoint needs validation data: a validation file or a split "
                                        "that holds some rows out", param="keep_best_checkpoint"))
        # What the recipe supports (the one table in domain/), then what the launcher can ever give the job.
        found = capabilities.check(spec) + self.launcher.fits(spec)
        for p in found:
            problems.add(InvalidRequest(p.message, param=p.param, code=p.code))

    # ----- reading ----------------------------------------------------------------------------
    def get(self, who: Principal, job_id: str) -> Job:
        """One job of the caller's organisation, or NotFound (also for other organisations' jobs)."""
        with self.store.session() as s:
            job = s.scalar(select(Job).where(Job.id == job_id, visible(Job, who)))
        if job is None:
            raise NotFound(f"Fine-tuning job {job_id} not found", param="fine_tuning_job_id",
                           code="fine_tuning_job_not_found")
        return job

    def get_external(self, who: Principal, dialect: str, external_id: str) -> Job:
        """A job by the id its dialect's client gave it (e.g. a Llama Stack job_uuid)."""
        with self.store.session() as s:
            job = s.scalar(select(Job).where(visible(Job, who), Job.external_id == external_id))
        if job is None:
            raise NotFound(f"job '{external_id}' not found", param="job_uuid", code="job_not_found")
        return job

    def list(self, who: Principal, *, after: str | None, limit: int, metadata: dict[str, str] | None = None
             ) -> tuple[list[Job], bool]:
        """A page of the organisation's jobs, newest first, optionally filtered by metadata values."""
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be between 1 and 1000", param="limit")
        q = select(Job).where(visible(Job, who))
        for k, v in (metadata or {}).items():
            q = q.where(json_value_is(Job.metadata_, k, v, self.store.engine.dialect.name))
        with self.store.session() as s:
            return page(s, q, Job, after=after, limit=limit)

    def count(self, who: Principal) -> int:
        """How many jobs the organisation has."""
        with self.store.session() as s:
            return s.scalar(select(func.count()).select_from(Job).where(visible(Job, who))) or 0

    def metric_events(self, who: Principal, job_id: str) -> list[JobEvent]:
        """Every metrics event of a job, oldest first."""
        self.get(who, job_id)
        with self.store.session() as s:
            return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "metrics")
                                  .order_by(JobEvent.pk)))

    def events(self, who: Principal, job_id: str, *, after: str | None, limit: int
               ) -> tuple[list[JobEvent], bool]:
        """A page of a job's events, newest first."""
        self.get(who, job_id)
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be between 1 and 1000", param="limit")
        with self.store.session() as s:
            return page(s, select(JobEvent).where(JobEvent.job_id == job_id), JobEvent, after=after, limit=limit)

    def checkpoints(self, who: Principal, job_id: str, *, after: str | None, limit: int
                    ) -> tuple[list[Checkpoint], bool]:
        """A page of a job's checkpoints, newest first."""
        self.get(who, job_id)
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be between 1 and 1000", param="limit")
        with self.store.session() as s:
            return page(s, select(Checkpoint).where(Checkpoint.job_id == job_id), Checkpoint, after=after,
                        limit=limit)

    def checkpoint(self, who: Principal, job_id: str, checkpoint_id: str) -> Checkpoint:
        """One checkpoint of one job."""
        self.get(who, job_id)
        with self.store.session() as s:
            ck = s.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.id == checkpoint_id))
        if ck is None:
            raise NotFound(f"Checkpoint {checkpoint_id} not found", param="checkpoint_id")
        return ck

    def output_dir(self, who: Principal, job_id: str) -> Path:
        """The directory holding the trained adapter or model; Conflict until the job succeeded."""
        job = self.get(who, job_id)
        if job.status != JobStatus.SUCCEEDED:
            raise Conflict(f"Fine-tuning job {job_id} has no artifacts: its status is '{job.status}'",
                           code="job_not_succeeded")
        if job.model_deleted_at is not None:
            raise NotFound(f"Fine-tuning job {job_id} has no artifacts: its model {job.fine_tuned_model} was deleted",
                           code="model_deleted")
        return JobDir(Path(job.output_dir)).output

    def checkpoint_dir(self, who: Principal, checkpoint_job: str, checkpoint_id: str) -> Path:
        """The directory of one checkpoint's weights; NotFound once its model was deleted."""
        ck = self.checkpoint(who, checkpoint_job, checkpoint_id)
        path = Path(ck.path)
        if not path.is_dir():
            raise NotFound(f"Checkpoint {checkpoint_id} has no files any more (its model was deleted)",
                           param="checkpoint_id", code="model_deleted")
        return path

    def result_file(self, who: Principal, job_id: str) -> File | None:
        job = self.get(who, job_id)
        return self.files.get(who, job.result_files[0]) if job.result_files else None

    # ----- control ----------------------------------------------------------------------------
    def cancel(self, who: Principal, job_id: str) -> Job:
        """Cancel a job at any stage; a running trainer is stopped by its worker within seconds."""
        job = self.get(who, job_id)
        if JobStatus(job.status).terminal:
            raise _invalid_state(job, "cancel")
        self._request_stop(job, "cancel")
        with self.store.session() as s:
            if not transition(s, job_id, JobStatus.CANCELLED):
                # It finished in the meantime: say how, as if it had been finished already.
                raise _invalid_state(self.get(who, job_id), "cancel")
            add_event(s, job_id, "Fine-tuning job cancelled by request")
            record_by(s, who, "job.cancel", job_id)
        return self.get(who, job_id)

    def pause(self, who: Principal, job_id: str) -> Job:
        """Pause a queued job at once; ask a running one's trainer to checkpoint at its next step.

        A running job stays ``running`` (with a "pausing" event) until its trainer has stopped and its
        checkpoint is complete; its worker then moves it to ``paused``. Asking again while it is pausing
        changes nothing and returns the job.
        """
        job = self.get(who, job_id)
        # A queued job may start meanwhile: then it is paused as a running one (at most a few tries).
        for _ in range(3):
            if job.status == JobStatus.QUEUED:
                with self.store.session() as s:
                    won = transition(s, job_id, JobStatus.PAUSED, expect={JobStatus.QUEUED})
                    if won:
                        add_event(s, job_id, "Fine-tuning job paused by request")
                        record_by(s, who, "job.pause", job_id)
                if won:
                    return self.get(who, job_id)
            elif job.status == JobStatus.RUNNING:
                if job.pause_requested_at is not None:
                    return job
                now = time.time()
                with self.store.session() as s:
                    won = s.execute(update(Job).where(
                        Job.id == job_id, Job.status == JobStatus.RUNNING, Job.pause_requested_at.is_(None),
                    ).values(pause_requested_at=now, updated_at=now)).rowcount == 1
                    if won:
                        add_event(s, job_id, PAUSING_MESSAGE, data={"pausing": True})
                        record_by(s, who, "job.pause", job_id)
                if won:
                    # Written once the request is stored: the trainer must not pause a job the database
                    # does not know is pausing. The worker writes it again should this write be lost.
                    self._request_stop(job, "pause")
                    return self.get(who, job_id)
            else:
                raise _invalid_state(job, "pause")
            job = self.get(who, job_id)
        raise Conflict(f"Fine-tuning job {job_id} changed state; try again", code="invalid_state")

    def resume(self, who: Principal, job_id: str) -> Job:
        """Put a paused job back in the queue; it continues from its latest checkpoint."""
        job = self.get(who, job_id)
        if job.status != JobStatus.PAUSED:
            raise _invalid_state(job, "resume")
        with self.store.session() as s:
            if not transition(s, job_id, JobStatus.QUEUED, expect={JobStatus.PAUSED}):
                raise _invalid_state(self.get(who, job_id), "resume")
            add_event(s, job_id, "Fine-tuning job resumed")
            record_by(s, who, "job.resume", job_id)
        return self.get(who, job_id)

    @staticmethod
    def _request_stop(job: Job, reason: StopReason) -> None:
        # Tell a running trainer directly: it stops at the next step even before the worker notices.
        if job.status == JobStatus.RUNNING and job.output_dir:
            JobDir(Path(job.output_dir)).request_stop(reason)

    # ----- models -----------------------------------------------------------------------------


def _check_vision_config(model: ModelSpec) -> None:
    """A 400 for ``model_type: vlm`` on a local text model, from its config.json alone (the API process loads no
    model code; a hub model is checked in the prepare step, with data/vision.py's is_vision_model)."""
    if model.model_type != "vlm" or model.source != "local":
        return
    try:
        config = json.loads((Path(model.name) / "config.json").read_text())
    except (OSError, ValueError):
        return  # the prepare step reports a config that does not load
    if isinstance(config, dict) and "vision_config" not in config:
        raise InvalidRequest(f"model_type is 'vlm', but model '{model.name}' is a text model (its config.json has no "
                             "vision_config); name a vision-language model or use model_type 'llm'",
                             param="model_type", code="model_not_vision")


def _invalid_state(job: Job, action: str) -> InvalidState:
    """The 409 for ``action`` on ``job`` in its current status, with the facts each dialect words its own way."""
    if action == "cancel":
        message = f"Fine-tuning job {job.id} is already {job.status} and cannot be cancelled"
    elif action == "pause":
        message = f"Only queued or running jobs can be paused; {job.id} is {job.status}"
    else:
        message = f"Only paused jobs can be resumed; {job.id} is {job.status}"
    return InvalidState(message, job_id=job.id, external_id=job.external_id, status=job.status, action=action)


def runtime_spec(settings: Settings) -> RuntimeSpec:
    """The settings a job's processes follow, as the spec carries them to wherever a launcher runs them."""
    return RuntimeSpec(
        flash_attention=settings.flash_attention, liger_kernels=settings.liger_kernels,
        s3_endpoint_url=settings.s3_endpoint_url, s3_ambient_credentials=settings.s3_ambient_credentials,
        max_download_bytes=settings.max_download_bytes,
        download_allow_private_hosts=settings.download_allow_private_hosts,
        download_timeout_seconds=settings.download_timeout_seconds, max_error_report=settings.max_error_report,
        min_examples=settings.min_examples, max_examples_per_job=settings.max_examples_per_job,
        max_tokens_per_job=settings.max_tokens_per_job, prepare_workers=settings.prepare_workers,
        prepare_parallel_min_examples=settings.prepare_parallel_min_examples,
        tokenised_cache_dir=str(settings.home / "cache" / "tokenised") if settings.tokenised_cache_bytes > 0 else None,
        tokenised_cache_bytes=settings.tokenised_cache_bytes, dense_lm_head=settings.dense_lm_head,
        max_image_bytes=settings.max_image_bytes, max_image_pixels=settings.max_image_pixels,
        max_images_per_example=settings.max_images_per_example, max_image_examples=settings.max_image_examples,
        allowed_roots=[str(r) for r in settings.allowed_roots])
