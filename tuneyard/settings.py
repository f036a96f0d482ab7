"""Process configuration: the only module that reads the environment (prefix ``TUNEYARD_``)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path(os.path.expanduser("~")) / ".tuneyard"


class Settings(BaseSettings):
    """Every knob of a tuneyard process; the table of them (default, effect, test) is in docs/operations.md."""

    model_config = SettingsConfigDict(env_prefix="TUNEYARD_", extra="ignore")

    home: Path = Field(default_factory=_default_home)
    database_url: str | None = None
    local_roots: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    # HTTP server processes sharing the port (the job worker runs in the serving process, once); 0: one per
    # core, at most 4.
    api_workers: int = 1
    # Worker / launcher
    run_worker: bool = True
    # What runs the jobs' processes (scheduler/launcher.py LAUNCHERS): "local" (this machine) or "ray".
    launcher: str = "local"
    cpu_slots: int = 1
    cpu_procs_per_job: int = 1
    # GPUs (one rank each) of a GPU job whose request names no count (OpenAI, Llama Stack without "resources").
    gpus_per_job: int = Field(1, ge=1, le=1024)
    gpu_count: int | None = None
    poll_interval: float = 0.5
    prepare_slots: int = 2
    # Keep one prepare process started ahead of the next job, its imports done: a job's prepare step then
    # starts in milliseconds instead of seconds, for the memory of one idle Python process with transformers.
    prepare_standby: bool = True
    # The same for the trainer of a one-process CPU job (~8 s of importing transformers, TRL and PEFT): started
    # while no trainer runs, it takes the next such job; GPU jobs, torchrun groups and W&B runs start afresh.
    trainer_standby: bool = True
    cancel_grace_seconds: float = 3.0
    # How long a pausing trainer may take to finish its step and write its checkpoint before it is killed (the
    # job is then paused at its newest complete checkpoint, and the steps after it are lost).
    pause_grace_seconds: float = 600.0
    # On SIGTERM a worker asks its trainers to checkpoint and requeues their jobs, waiting this long;
    # 0: it stops at once and leaves them running, to be re-adopted by its next start on this machine.
    drain_seconds: float = 60.0
    # Most memory (resident, shared pages split) a trainer's processes may hold together; over it the job
    # fails with out_of_memory instead of taking the machine into the kernel's OOM killer. 0: no limit.
    job_memory_bytes: int = 0
    # A running job's log files are rotated beyond this size (one old copy kept: NAME.log.1); 0: never.
    job_log_bytes: int = 64 * 1024**2
    # A worker renews its jobs' leases every tick; a job whose lease lapsed this long ago has lost its worker.
    lease_seconds: float = 30.0
    # torch.compile every job's model (resources.torch_compile): faster steps after a compile of a minute or more.
    torch_compile: bool = False
    # GPU kernels a trainer uses when their package is installed (flash-attn, liger-kernel); false: never.
    flash_attention: bool = True
    liger_kernels: bool = True
    # On CPU, score only the labelled positions with one dense LM-head matmul while their logits fit in 256 MiB
    # (trainer/fastpath.py use_dense_head) instead of TRL's chunked head; false: TRL's head always.
    dense_lm_head: bool = True
    # Limits
    max_upload_bytes: int = 512 * 1024 * 1024
    # Any other request body (JSON, forms without files); larger bodies get a 413 before they are read.
    max_request_bytes: int = 32 * 1024 * 1024
    # Per API key (or JWT subject) token bucket: sustained requests/s and burst; 0 switches it off.
    rate_limit_per_second: float = 50.0
    rate_limit_burst: int = 200
    # Webhook deliveries: the first retry after this many seconds, doubling (at most an hour), this many tries in all.
    webhook_retry_seconds: float = 10.0
    webhook_max_attempts: int = 8
    # GET /metrics: None answers loopback clients only; set, every scrape must send it as a bearer token.
    metrics_token: str | None = None
    # A verified API key is trusted for this long without looking it up again, so a revoked key keeps working
    # for at most this many seconds; 0: every request looks its key up.
    auth_cache_seconds: float = 5.0
    # Unfinished (validating, queued, running, paused) jobs an organisation may have at once; 0: no limit.
    max_active_jobs_per_org: int = 100
    # JWT bearer tokens (Simplismart-style clients): HS* shared secret or an RS*/ES* public key (PEM or a path).
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_algorithms: str = "HS256"
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_org_claim: str = "org"
    jwt_role_claim: str = "role"
    # The most training examples and tokens (of the tokenised training set) one job may have; 0: no limit.
    max_examples_per_job: int = 0
    max_tokens_per_job: int = 0
    # The fewest training examples a job may have (a job's own minimum can only be higher).
    min_examples: int = 1
    # Tokenising a training file of at least this many examples uses a pool of processes (prepare_workers;
    # 0: one per core); smaller files are tokenised in the prepare process itself.
    prepare_workers: int = 0
    prepare_parallel_min_examples: int = 20000
    max_error_report: int = 20
    # Stored secrets: a Fernet key (urlsafe base64, 32 bytes); unset: a key file under home, made on first use.
    secret_key: str | None = None
    # Remote datasets: an S3-compatible endpoint (MinIO, moto...) instead of AWS, and the largest download.
    s3_endpoint_url: str | None = None
    max_download_bytes: int = 50 * 1024**3
    # Images of image rows (tuneyard/data/images.py): the largest one (bytes, as stored or downloaded), the most
    # pixels one may declare, the most a row may hold and the most rows with images a file may hold (OpenAI's
    # vision fine-tuning limits: 10 MB, 10 per example, 50,000 examples).
    max_image_bytes: int = Field(10 * 1024**2, ge=1)
    max_image_pixels: int = Field(64 * 1024**2, ge=1)
    max_images_per_example: int = Field(10, ge=1)
    max_image_examples: int = Field(50_000, ge=1)
    # The longest one remote dataset's download may take, start to end (not per read: a server trickling a byte
    # at a time is cut off too); the job then fails naming the source. 0: no limit.
    download_timeout_seconds: float = Field(3600.0, ge=0)
    # https:// sources on private or reserved addresses (10/8, 192.168/16, 169.254/16 cloud metadata...) are
    # refused unless this is set; loopback is always allowed.
    download_allow_private_hosts: bool = False
    # s3:// sources without a secret_id: anonymous requests (False), or the server's own AWS credentials
    # (environment, ~/.aws, instance role) for installations where every caller may read what the server can.
    s3_ambient_credentials: bool = False
    # Tokenised datasets kept for reuse by later jobs on the same data (LRU beyond this size); 0 turns it off.
    tokenised_cache_bytes: int = 20 * 1024**3
    # Base models listed by GET /v1/models besides the succeeded fine-tuned ones (comma-separated ids or paths).
    base_models: str = ""
    # Inference (POST /v1/chat/completions, /v1/completions): the inference process keeps base models and
    # adapters loaded within this many bytes, evicting the least recently used beyond it; 0: no limit.
    inference_memory_bytes: int = Field(16 * 1024**3, ge=0)
    # The inference process's loopback port; 0: any free one (found through $TUNEYARD_HOME/run/inference.json).
    inference_port: int = Field(0, ge=0, le=65535)
    # The server starts the inference process on the first inference request; false: only a `tuneyard infer`
    # started apart serves them (until it does, they are answered 503).
    inference_autostart: bool = True
    # How long the first inference request waits for a starting inference process.
    inference_start_seconds: float = Field(180.0, gt=0)
    # The largest base (its weight files, bytes) that POST /v1/fine_tuning/jobs/{id}/export merges: the export
    # runs synchronously in the inference process, so its size bounds the request's time; 0: no bound.
    export_max_bytes: int = Field(8 * 1024**3, ge=0)
    # The Ray launcher (TUNEYARD_LAUNCHER=ray): the cluster's address (ray://... or host:port of its GCS), and how
    # long one attempt to place a job's ranks waits before the job stays queued for the next tick.
    ray_address: str | None = None
    ray_placement_wait_seconds: float = Field(2.0, gt=0)
    # Storage every node can reach (a shared filesystem path or s3://bucket/prefix): job inputs, checkpoints and
    # outputs of Ray jobs. S3 credentials: a JSON object in the shape of an 'aws' secret; unset: boto3's own chain.
    storage_url: str | None = None
    storage_credentials: str | None = Field(None, repr=False)
    log_level: str = "info"
    # Client side (the `tuneyard jobs ...` commands)
    base_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None

    @field_validator("launcher")
    @classmethod
    def _known_launcher(cls, v: str) -> str:
        # Imported here: the registry's module imports this one.
        from tuneyard.scheduler.launcher import LAUNCHERS

        if v not in LAUNCHERS:
            raise ValueError(f"TUNEYARD_LAUNCHER={v!r}: there is no such launcher; use one of {sorted(LAUNCHERS)}")
        return v

    @field_validator("home", mode="before")
    @classmethod
    def _expand_home(cls, v: object) -> object:
        return Path(os.path.expanduser(str(v))) if v is not None else v

    @property
    def db_url(self) -> str:
        """The SQLAlchemy URL: the configured one, else SQLite under ``home``."""
        return self.database_url or f"sqlite:///{self.home / 'tuneyard.db'}"

    @property
    def files_dir(self) -> Path:
        return self.home / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def allowed_roots(self) -> list[Path]:
        """Directories under which local model and data paths are accepted, symlinks resolved."""
        raw = self.local_roots if self.local_roots else str(self.home / "local")
        return [Path(p).expanduser().resolve() for p in raw.split(":") if p.strip()]

    @property
    def run_dir(self) -> Path:
        """Where running processes leave their addresses (the inference process's inference.json)."""
        return self.home / "run"

    def storage_credentials_dict(self) -> dict | None:
        """TUNEYARD_STORAGE_CREDENTIALS parsed (None when unset); a malformed value is a ValueError naming it."""
        if not self.storage_credentials:
            return None
        import json

        try:
            value = json.loads(self.storage_credentials)
        except ValueError as e:
            raise ValueError(f"TUNEYARD_STORAGE_CREDENTIALS is not JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("TUNEYARD_STORAGE_CREDENTIALS must be a JSON object (access_key_id, secret_access_key...)")
        return value

    @property
    def base_model_list(self) -> list[str]:
        return [m.strip() for m in self.base_models.split(",") if m.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


def reset_settings() -> None:
    """Forget cached settings (tests and the CLI change the environment before starting a server)."""
    get_settings.cache_clear()
