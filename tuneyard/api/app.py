"""The FastAPI application: every dialect's router over one set of services, plus the worker loop.

Importing this module must not import torch or transformers (start-up stays well under 2 s).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from tuneyard import __version__, dashboard
from tuneyard.api import errors, metrics
from tuneyard.api.admin import router as admin_router
from tuneyard.api.dialects.llamastack import routes as llamastack
from tuneyard.api.dialects.openai.routes import PREFIXES as OPENAI_PREFIXES
from tuneyard.api.dialects.openai.routes import router as openai_router
from tuneyard.api.dialects.simplismart import routes as simplismart
from tuneyard.api.limits import BodyLimitMiddleware, RateLimiter
from tuneyard.inference.client import InferenceClient
from tuneyard.service import Services
from tuneyard.settings import Settings, get_settings

log = logging.getLogger("tuneyard.api")


def create_app(settings: Settings | None = None, *, run_worker: bool | None = None) -> FastAPI:
    """Build the app; the worker runs inside it unless ``run_worker`` (or TUNEYARD_RUN_WORKER) says no."""
    settings = settings or get_settings()
    start_worker = settings.run_worker if run_worker is None else run_worker

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        services = Services.build(settings)
        app.state.services = services
        worker = None
        if start_worker:
            from tuneyard.scheduler.worker import Worker

            worker = Worker(services.store, settings, services.files)
            worker.start()
        app.state.worker = worker
        app.state.inference = InferenceClient(settings)
        log.info("tuneyard %s serving, state in %s", __version__, settings.home)
        try:
            yield
        finally:
            await app.state.inference.close()
            if worker is not None:
                worker.shutdown()
            services.store.dispose()

    app = FastAPI(title="tuneyard", version=__version__, lifespan=lifespan,
                  description="Self-hosted fine-tuning: OpenAI, Simplismart and Llama Stack dialects over one job "
                              "model.")
    errors.install(app)
    app.state.settings = settings
    app.add_middleware(BodyLimitMiddleware, settings=settings)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        # Outermost, so that every answer is counted, refusals included; by route template, not raw path.
        t0 = time.perf_counter()
        response = await call_next(request)
        metrics.observe(metrics.route_of(request.scope), request.method, response.status_code,
                        time.perf_counter() - t0)
        return response

    app.state.limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    for i, prefix in enumerate(OPENAI_PREFIXES):
        # One schema entry per operation: the other prefixes serve the very same handlers.
        app.include_router(openai_router, prefix=prefix, include_in_schema=i == 0)
    # tuneyard's own: secrets and the audit log, in the OpenAI error format.
    app.include_router(admin_router, prefix="/v1")
    app.include_router(simplismart.router)
    errors.register_renderer(simplismart.PREFIX, simplismart.render_error, simplismart.tr.dialect_error)
    for prefix in llamastack.POST_TRAINING_PREFIXES:
        app.include_router(llamastack.post_training, prefix=prefix, include_in_schema=prefix.startswith("/v1/"))
    for prefix in llamastack.DATASET_PREFIXES:
        app.include_router(llamastack.datasets, prefix=prefix, include_in_schema=prefix.startswith("/v1/"))
    for prefix in llamastack.DATASETIO_PREFIXES:
        app.include_router(llamastack.datasetio, prefix=prefix, include_in_schema=prefix.startswith("/v1/"))
    for prefix in llamastack.INFERENCE_PREFIXES:
        app.include_router(llamastack.inference, prefix=prefix)
    # Every path under these answers in the Llama Stack shape, unknown ones (404) and wrong methods (405) too.
    for prefix in llamastack.ERROR_PREFIXES:
        errors.register_renderer(prefix, llamastack.render_error, llamastack.tr.dialect_error)

    app.include_router(metrics.router)
    # The browser dashboard: static files over the public API above (tuneyard/dashboard).
    dashboard.mount(app)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        """Liveness: the process answers and its worker loop (if any) is alive; the inference process (None
        until one runs): its backend, whether vLLM is there, what it has loaded and how often."""
        worker = getattr(app.state, "worker", None)
        return {"status": "ok", "version": __version__,
                "worker": None if worker is None else {"id": worker.worker_id, "running_jobs": len(worker.procs)},
                "inference": await app.state.inference.health()}

    return app
