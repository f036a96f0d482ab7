"""``GET /metrics`` in the Prometheus text format (prometheus-client).

Job figures (jobs by status and organisation, queue-wait and run-time histograms, running trainers, trained
tokens, retries by cause, worker lease age) are read from the database at each scrape, so every HTTP process
answers the same whole figures and they survive restarts. HTTP figures (requests by route and status, latency)
are counted in each process; with ``tuneyard serve --api-workers N`` the serving process gives its HTTP
processes one ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode) and a scrape sums them all.

Open to loopback clients; with ``TUNEYARD_METRICS_TOKEN`` set, every scrape must send it as a bearer token.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import time
from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import func, select

from tuneyard.api.serve import MULTIPROC_ENV
from tuneyard.domain.errors import Forbidden, Unauthorized
from tuneyard.domain.jobs import JobStatus
from tuneyard.store.models import Job, JobEvent

# Seconds: from a few seconds of queueing to a day of training.
WAIT_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
RUN_BUCKETS = (10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 72 * 3600)
# The worker's retry events say why (scheduler/worker.py puts the cause in the event's data).
RETRY_MARK = "retrying from the latest checkpoint"

# Per process; summed over the HTTP processes in multiprocess mode (the registry is chosen at import by the env).
HTTP_REQUESTS = Counter("tuneyard_http_requests", "HTTP requests answered", ["route", "method", "status"])
HTTP_LATENCY = Histogram("tuneyard_http_request_duration_seconds", "Time to answer an HTTP request",
                         ["route", "method"])

router = APIRouter()


def route_of(scope: dict) -> str:
    """The template of the route that answered (``/v1/fine_tuning/jobs/{job_id}``): ids would explode the labels."""
    # FastAPI routers included under several prefixes keep the full template in their effective route context.
    ctx = (scope.get("fastapi") or {}).get("effective_route_context")
    path = getattr(ctx, "path", None) or getattr(scope.get("route"), "path", None)
    return path or "unmatched"


def observe(route: str, method: str, status: int, seconds: float) -> None:
    """Count one answered request (called by the app's middleware)."""
    HTTP_REQUESTS.labels(route, method, str(status)).inc()
    HTTP_LATENCY.labels(route, method).observe(seconds)


class JobCollector:
    """The job figures, computed from the database at scrape time."""

    def __init__(self, store, lease_seconds: float) -> None:
        self.store = store
        self.lease_seconds = lease_seconds

    def collect(self) -> Iterator:
        """One scrape's job metrics."""
        now = time.time()
        with self.store.session() as s:
            by_status = s.execute(select(Job.org_id, Job.status, func.count(), func.coalesce(
                func.sum(Job.trained_tokens), 0)).group_by(Job.org_id, Job.status)).all()
            started = s.execute(select(Job.created_at, Job.started_at).where(Job.started_at.is_not(None))).all()
            finished = s.execute(select(Job.started_at, Job.finished_at).where(
                Job.started_at.is_not(None), Job.finished_at.is_not(None))).all()
            leases = s.execute(select(Job.worker_id, func.max(Job.lease_expires_at)).where(
                Job.worker_id.is_not(None), Job.lease_expires_at.is_not(None)).group_by(Job.worker_id)).all()
            retries = s.execute(select(JobEvent.data).where(JobEvent.level == "warn",
                                                            JobEvent.message.contains(RETRY_MARK))).all()
        jobs = GaugeMetricFamily("tuneyard_jobs", "Jobs by status and organisation", labels=["status", "org"])
        tokens = CounterMetricFamily("tuneyard_trained_tokens", "Tokens trained, by organisation", labels=["org"])
        per_org: dict[str, float] = {}
        seen = set()
        for org, status, n, toks in by_status:
            jobs.add_metric([status, org], n)
            per_org[org] = per_org.get(org, 0) + float(toks or 0)
            seen.add((status, org))
        for org in {o for _, o in seen}:
            for status in JobStatus:
                if (status.value, org) not in seen:
                    jobs.add_metric([status.value, org], 0)
        for org, n in per_org.items():
            tokens.add_metric([org], n)
        yield jobs
        yield tokens
        running = sum(n for _, status, n, _ in by_status if status == JobStatus.RUNNING)
        yield GaugeMetricFamily("tuneyard_running_trainers", "Jobs whose trainer is running", value=running)
        yield _histogram("tuneyard_job_queue_wait_seconds", "From submission to the trainer's first start",
                         [b - a for a, b in started], WAIT_BUCKETS)
        yield _histogram("tuneyard_job_run_seconds", "From the trainer's first start to the job's end",
                         [b - a for a, b in finished], RUN_BUCKETS)
        causes: dict[str, int] = {}
        for (data,) in retries:
            cause = (data or {}).get("retry_cause") or "unknown"
            causes[cause] = causes.get(cause, 0) + 1
        retried = CounterMetricFamily("tuneyard_job_retries", "Trainer restarts after an infrastructure failure",
                                      labels=["cause"])
        for cause, n in causes.items():
            retried.add_metric([cause], n)
        yield retried
        age = GaugeMetricFamily("tuneyard_worker_lease_age_seconds",
                                "Seconds since a worker last renewed its leases (a live worker renews each tick)",
                                labels=["worker"])
        for worker, expires in leases:
            age.add_metric([worker], max(0.0, now - (expires - self.lease_seconds)))
        yield age


def _histogram(name: str, doc: str, values: list[float], buckets: tuple[float, ...]) -> HistogramMetricFamily:
    counts = [sum(1 for v in values if v <= b) for b in buckets] + [len(values)]
    edges = [str(float(b)) for b in buckets] + ["+Inf"]
    return HistogramMetricFamily(name, doc, buckets=list(zip(edges, counts, strict=True)), sum_value=sum(values))


def _check_access(request: Request) -> None:
    token = request.app.state.settings.metrics_token
    if token:
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            raise Unauthorized("GET /metrics needs the metrics token (TUNEYARD_METRICS_TOKEN) as a bearer token",
                               code="invalid_metrics_token")
        return
    host = request.client.host if request.client else ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise Forbidden("GET /metrics answers loopback clients only; set TUNEYARD_METRICS_TOKEN to scrape it "
                               "from elsewhere", code="metrics_loopback_only")


@router.get("/metrics", tags=["ops"], include_in_schema=False)
def metrics(request: Request) -> Response:
    """The Prometheus text exposition of this installation."""
    _check_access(request)
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    else:
        registry.register(HTTP_REQUESTS)
        registry.register(HTTP_LATENCY)
    registry.register(JobCollector(request.app.state.services.store, request.app.state.settings.lease_seconds))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
