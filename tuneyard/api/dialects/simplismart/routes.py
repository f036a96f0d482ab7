"""Simplismart Training Suite routes: ``POST /job/`` (multipart), ``GET /job/get|list|metrics/``, ``POST /job/cancel/``.

Errors use this dialect's body, ``{"detail": message, "field": param, "code": code, "errors": [...]}`` (see
``render_error``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import JSONResponse

from tuneyard.api.deps import Caller, Svc
from tuneyard.api.dialects.simplismart import translate as tr
from tuneyard.api.dialects.simplismart.schemas import CancelOut, CreateOut, JobList, JobRecord, MetricsOut
from tuneyard.api.jsonbody import StrictJSONRoute
from tuneyard.domain.errors import NotFound, Problem, Problems
from tuneyard.scheduler.capacity import detect
from tuneyard.service.auth import Principal

router = APIRouter(prefix="/job", tags=["simplismart"], route_class=StrictJSONRoute)
PREFIX = "/job"


def render_error(request: Request, status: int, message: str, type_: str, param: str | None,
                 code: str | None, problems: list[Problem] | None = None) -> JSONResponse:
    """Simplismart's FastAPI-style body: ``detail`` (the message, listing every problem) plus the first problem's
    field and machine code, and ``errors``: each problem as ``{field, message, code}``."""
    listed = problems or [Problem(param, message, code)]
    return JSONResponse({"detail": message, "field": param, "code": code,
                         "errors": [{"field": p.param, "message": p.message, "code": p.code} for p in listed]},
                        status_code=status)


def _own_org(who: Principal, org: str, param: str) -> None:
    # Another organisation's id gets the same answer as one that does not exist.
    if org != who.org_id:
        raise NotFound(f"organisation '{org}' not found", param=param, code="org_not_found")


JsonForm = Annotated[str, Form(description="JSON object, as a string")]


@router.post("/", response_model=CreateOut, summary="Start a new LLM/VLM training job")
def create_job(svc: Svc, who: Caller, org: Annotated[str, Form()],
               experiment_name: Annotated[str, Form(min_length=1, max_length=256)],
               dataset_config: JsonForm, model_details: JsonForm, train_config: JsonForm, dataset_details: JsonForm,
               infra_config: JsonForm) -> CreateOut:
    """Create a job from the five JSON configs; every field is honoured or refused with a 400 naming it."""
    # Every independent problem in one 400: the organisation, the configs, then what the service checks. Errors
    # are worded the Simplismart way by tr.dialect_error, registered for this prefix (api/app.py).
    problems = Problems()
    with problems.check():
        _own_org(who, org, "org")
    sub = None
    with problems.check():
        configs = tr.parse_configs({"dataset_config": dataset_config, "model_details": model_details,
                                    "train_config": train_config, "dataset_details": dataset_details,
                                    "infra_config": infra_config})
        sub = tr.to_submission(org, experiment_name, configs)
    if sub is None:
        problems.raise_if_any()
    job = svc.jobs.submit(who, sub, problems=problems)
    return CreateOut(request_id=job.id, status=tr.STATUS[job.status], experiment_name=experiment_name,
                     message="Training job submitted: validating the dataset and the model")


@router.get("/get/", response_model=JobRecord, summary="Retrieve details of a specific LLM/VLM training job")
def get_job(svc: Svc, who: Caller, org_id: Annotated[str, Query()], request_id: Annotated[str, Query()]) -> JobRecord:
    """The whole job record, configs as resolved."""
    _own_org(who, org_id, "org_id")
    return tr.job_record(_job(svc, who, request_id), detect(svc.settings))


@router.get("/list/", response_model=JobList, summary="List training jobs")
def list_jobs(svc: Svc, who: Caller, org_id: Annotated[str, Query()],
              limit: Annotated[int, Query(ge=1, le=1000)] = 100,
              after: Annotated[str | None, Query(description="request_id to list after (newest first)")] = None,
              ) -> JobList:
    """The organisation's jobs, newest first; ``total_count`` counts them all."""
    _own_org(who, org_id, "org_id")
    jobs, _ = svc.jobs.list(who, after=after, limit=limit)
    return JobList(jobs=[tr.job_summary(j) for j in jobs], total_count=svc.jobs.count(who))


@router.get("/metrics/", response_model=MetricsOut, summary="Training metrics of a job")
def job_metrics(svc: Svc, who: Caller, org_id: Annotated[str, Query()],
                request_id: Annotated[str, Query()]) -> MetricsOut:
    """Every logged metric (train_loss, eval_loss, learning_rate, ...) by step."""
    _own_org(who, org_id, "org_id")
    job = _job(svc, who, request_id)
    return MetricsOut(request_id=job.id, metrics=tr.metrics(svc.jobs.metric_events(who, job.id)))


@router.post("/cancel/", response_model=CancelOut, summary="Cancel a training job")
def cancel_job(svc: Svc, who: Caller, org_id: Annotated[str, Query()],
               request_id: Annotated[str, Query()]) -> CancelOut:
    """Stop the job (a running trainer stops within seconds); a finished job is a 409."""
    _own_org(who, org_id, "org_id")
    job = svc.jobs.cancel(who, _job(svc, who, request_id).id)
    return CancelOut(request_id=job.id, status=tr.STATUS[job.status], message="Training job cancelled")


def _job(svc: Svc, who: Principal, request_id: str):
    try:
        return svc.jobs.get(who, request_id)
    except NotFound:
        raise NotFound(f"training job '{request_id}' not found", param="request_id", code="job_not_found") from None
