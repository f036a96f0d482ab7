"""Tables. Alembic migrations (store/migrations) are the only source of the schema; these mirror them.

Every row that belongs to a tenant carries ``org_id``; every list query is keyed by it (and, for a member,
by ``created_by``) and paged by the integer ``pk`` (insertion order), so pagination never scans. The one
exception: a list filtered by metadata values walks the organisation's jobs, newest first, until a page is
full.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
PK = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16), default="member")
    salt: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)


class File(Base):
    __tablename__ = "files"
    __table_args__ = (
        Index("ix_files_org_pk", "org_id", "pk"),
        Index("ix_files_org_owner_pk", "org_id", "created_by", "pk"),
        Index("ix_files_org_purpose_pk", "org_id", "purpose", "pk"),
    )

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))
    status_details: Mapped[str | None] = mapped_column(Text)
    # Path relative to the files directory; never derived from the uploaded file name.
    storage_path: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str | None] = mapped_column(String(64))
    n_examples: Mapped[int | None] = mapped_column(Integer)
    data_format: Mapped[str | None] = mapped_column(String(32))
    # The key (or JWT subject) that uploaded it: a member sees only its own.
    created_by: Mapped[str | None] = mapped_column(String(128))


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_org_pk", "org_id", "pk"),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_org_owner_pk", "org_id", "created_by", "pk"),
        Index("ix_jobs_org_status", "org_id", "status"),
        UniqueConstraint("org_id", "external_id", name="uq_jobs_org_external"),
        UniqueConstraint("org_id", "idempotency_key", name="uq_jobs_org_idempotency"),
    )

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    # Which dialect created it, and the id that dialect's client knows it by (Llama Stack job_uuid).
    dialect: Mapped[str] = mapped_column(String(16))
    external_id: Mapped[str | None] = mapped_column(String(128))
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    # The key (or JWT subject) that created it: a member sees only its own jobs.
    created_by: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(24))
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)

    model: Mapped[str] = mapped_column(String(512))
    training_file: Mapped[str | None] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    # The caller's own words, echoed back by its dialect (method, configs, metadata, integrations).
    request: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    resolved_hyperparameters: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    fine_tuned_model: Mapped[str | None] = mapped_column(String(512))
    output_dir: Mapped[str | None] = mapped_column(String(1024))
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # When its fine-tuned model was deleted (DELETE /v1/models/...): no longer listed or callable, files gone.
    model_deleted_at: Mapped[float | None] = mapped_column(Float)

    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    trained_steps: Mapped[int | None] = mapped_column(Integer)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    n_train_examples: Mapped[int | None] = mapped_column(Integer)
    estimated_finish: Mapped[float | None] = mapped_column(Float)

    # Ownership by a worker: which worker runs the current phase, until when, and the process.
    worker_id: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    pid: Mapped[int | None] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    # When a pause of the running trainer was asked for (None: not pausing). The job stays ``running``
    # until its trainer has stopped and its checkpoint is complete; cleared when a trainer starts.
    pause_requested_at: Mapped[float | None] = mapped_column(Float)
    # Highest event seq of the job's event file already recorded.
    events_seq: Mapped[int] = mapped_column(Integer, default=0)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (
        Index("ix_job_events_job_pk", "job_id", "pk"),
        # Events read from a job's event file carry its seq: recording one twice is impossible.
        UniqueConstraint("job_id", "file_seq", name="uq_job_events_file_seq"),
    )

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    file_seq: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (
        Index("ix_checkpoints_job_pk", "job_id", "pk"),
        UniqueConstraint("job_id", "step", name="uq_checkpoints_job_step"),
    )

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    path: Mapped[str] = mapped_column(String(1024))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Dataset(Base):
    """A registered dataset (Llama Stack ``/datasets``): stored rows (as a file) or a URI to fetch."""

    __tablename__ = "datasets"
    __table_args__ = (
        Index("ix_datasets_org_pk", "org_id", "pk"),
        Index("ix_datasets_org_owner_pk", "org_id", "created_by", "pk"),
        UniqueConstraint("org_id", "dataset_id", name="uq_datasets_org_dataset"),
    )

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    # The identifier the client registered it under (or one tuneyard chose).
    dataset_id: Mapped[str] = mapped_column(String(256))
    purpose: Mapped[str] = mapped_column(String(64))
    # {"type": "uri", "uri": ...} or {"type": "rows"} (the rows live in file_id).
    source: Mapped[dict[str, Any]] = mapped_column(JSON)
    file_id: Mapped[str | None] = mapped_column(String(64))
    n_rows: Mapped[int | None] = mapped_column(Integer)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str | None] = mapped_column(String(128))


class Secret(Base):
    """Credentials an organisation stores for its jobs (S3, hub tokens...), encrypted at rest."""

    __tablename__ = "secrets"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_secrets_org_name"),)

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(16))
    # Fernet token of the JSON value; the plaintext is never stored, logged or returned.
    ciphertext: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class AuditEvent(Base):
    """Who did what to which object: written in the same transaction as the change, never updated."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_org_pk", "org_id", "pk"),)

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    org_id: Mapped[str] = mapped_column(String(64))
    # A key id, "jwt:<subject>", or "cli" for the tuneyard command on the server.
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    object_id: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class WebhookEndpoint(Base):
    """Where an organisation wants to be told about its jobs (OpenAI's fine_tuning.job.* events)."""

    __tablename__ = "webhook_endpoints"

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[Any]] = mapped_column(JSON)
    # Fernet token of the signing secret (whsec_...): shown once at creation, needed again at every delivery.
    secret_ciphertext: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float)


class WebhookDelivery(Base):
    """One event for one endpoint, queued in the same transaction as the job's change, delivered at least once."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # One delivery per endpoint and event of a job, however often the change is recorded.
        UniqueConstraint("endpoint_id", "event_key", name="uq_webhook_deliveries_event"),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    )

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    # The webhook-id header: the same on every try, so a receiver can drop repeats.
    id: Mapped[str] = mapped_column(String(64), unique=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True)
    org_id: Mapped[str] = mapped_column(String(64), index=True)
    event_key: Mapped[str] = mapped_column(String(128))
    event_type: Mapped[str] = mapped_column(String(64))
    # The exact body signed and sent on every try.
    payload: Mapped[str] = mapped_column(Text)
    # pending -> delivered | failed (gave up after TUNEYARD_WEBHOOK_MAX_ATTEMPTS tries)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    delivered_at: Mapped[float | None] = mapped_column(Float)
