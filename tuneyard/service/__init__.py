"""The service layer: logic shared by every dialect, scoped to the caller's organisation."""

from __future__ import annotations

from dataclasses import dataclass

from tuneyard.service.audit import AuditService
from tuneyard.service.auth import KeyCache
from tuneyard.service.datasets import DatasetService
from tuneyard.service.exports import ExportService
from tuneyard.service.files import FileService
from tuneyard.service.jobs import JobService
from tuneyard.service.models import ModelService
from tuneyard.service.secrets import SecretService
from tuneyard.service.webhooks import WebhookService
from tuneyard.settings import Settings
from tuneyard.store.db import Store


@dataclass
class Services:
    """Everything a request handler or the worker needs, built once per process."""

    settings: Settings
    store: Store
    files: FileService
    jobs: JobService
    models: ModelService
    exports: ExportService
    datasets: DatasetService
    secrets: SecretService
    audit: AuditService
    keys: KeyCache
    webhooks: WebhookService

    @classmethod
    def build(cls, settings: Settings) -> Services:
        """Open the store (migrating it) and wire the services together."""
        settings.home.mkdir(parents=True, exist_ok=True)
        store = Store(settings.db_url)
        files = FileService(store, settings)
        secrets = SecretService(store, settings)
        jobs = JobService(store, settings, files, secrets)
        return cls(settings=settings, store=store, files=files, jobs=jobs, models=ModelService(store, settings),
                   exports=ExportService(store, settings, jobs, secrets),
                   datasets=DatasetService(store, settings, files), secrets=secrets, audit=AuditService(store),
                   keys=KeyCache(settings.auth_cache_seconds), webhooks=WebhookService(store, settings))
