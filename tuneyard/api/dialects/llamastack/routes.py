"""Llama Stack routes: post-training on ``/v1`` and ``/v1alpha`` in the query style (``job/status?job_uuid=``) and
the path style (``jobs/{job_uuid}/status``), datasets on ``/v1`` and ``/v1beta``, inference.chat_completion on
``/v1/inference``.

Errors use the RFC 7807-like body of the Llama Stack spec, ``{status, title, detail, instance}``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tuneyard.api.deps import Caller, Svc
from tuneyard.api.dialects.llamastack import translate as tr
from tuneyard.api.dialects.llamastack.schemas import (
    AppendRowsIn,
    ChatCompletionIn,
    DatasetList,
    DatasetOut,
    IterrowsOut,
    JobArtifactsOut,
    JobList,
    JobStatusOut,
    JobUuid,
    JobUuidIn,
    PreferenceOptimizeIn,
    RegisterDatasetIn,
    SupervisedFineTuneIn,
)
from tuneyard.api.generation import collect, open_events
from tuneyard.api.jsonbody import StrictJSONRoute
from tuneyard.domain.errors import NotFound, Problem, TuneyardError
from tuneyard.service.auth import Principal

POST_TRAINING_PREFIXES = ("/v1/post-training", "/v1alpha/post-training")
DATASET_PREFIXES = ("/v1/datasets", "/v1beta/datasets")
DATASETIO_PREFIXES = ("/v1/datasetio", "/v1beta/datasetio")
INFERENCE_PREFIXES = ("/v1/inference",)
# Paths whose errors (unknown paths and methods included) are Llama Stack's: /v1alpha and /v1beta are only its.
ERROR_PREFIXES = ("/v1/post-training", "/v1/datasets", "/v1/datasetio", "/v1/inference", "/v1alpha", "/v1beta")
post_training = APIRouter(tags=["llama-stack"], route_class=StrictJSONRoute)
datasets = APIRouter(tags=["llama-stack"], route_class=StrictJSONRoute)
datasetio = APIRouter(tags=["llama-stack"], route_class=StrictJSONRoute)
inference = APIRouter(tags=["llama-stack"], route_class=StrictJSONRoute)


def render_error(request: Request, status: int, message: str, type_: str, param: str | None,
                 code: str | None, problems: list[Problem] | None = None) -> JSONResponse:
    """``{status, title, detail, instance}``; the detail names the offending field(s) and lists every problem."""
    if problems and len(problems) > 1:
        detail = message  # combined_message: each problem already prefixed with its field
    else:
        detail = message if not param or param in message else f"{message} (field: {param})"
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    return JSONResponse({"status": status, "title": title, "detail": detail, "instance": request.url.path},
                        status_code=status)


def _job(svc: Svc, who: Principal, job_uuid: str):
    try:
        return svc.jobs.get_external(who, tr.DIALECT, job_uuid)
    except NotFound:
        pass
    try:
        return svc.jobs.get(who, job_uuid)
    except NotFound:
        raise NotFound(f"training job '{job_uuid}' not found", param="job_uuid", code="job_not_found") from None


# ----- post-training -----------------------------------------------------------------------------
@post_training.post("/supervised-fine-tune", response_model=JobUuid)
def supervised_fine_tune(svc: Svc, who: Caller, body: SupervisedFineTuneIn) -> JobUuid:
    """Start a supervised fine-tuning job under the client's job_uuid (a duplicate is a 409)."""
    # Errors are worded the Llama Stack way by tr.dialect_error, registered for these prefixes (api/app.py).
    svc.jobs.submit(who, tr.to_submission(body, who, svc.datasets, svc.settings))
    return JobUuid(job_uuid=body.job_uuid)


@post_training.post("/preference-optimize", response_model=JobUuid)
def preference_optimize(svc: Svc, who: Caller, body: PreferenceOptimizeIn) -> JobUuid:
    """Start a preference optimisation (DPO) job under the client's job_uuid (a duplicate is a 409)."""
    try:
        svc.jobs.submit(who, tr.to_preference_submission(body, who, svc.datasets, svc.settings))
    except TuneyardError as e:
        # This request names its model finetuned_model (the prefix's translator does the rest).
        raise e.rename_params({"model": "finetuned_model"}) from None
    return JobUuid(job_uuid=body.job_uuid)


@post_training.get("/jobs", response_model=JobList)
def list_jobs(svc: Svc, who: Caller) -> JobList:
    """Every job of the organisation, whichever dialect created it, newest first."""
    jobs, _ = svc.jobs.list(who, after=None, limit=1000)
    return JobList(data=[JobUuid(job_uuid=tr.job_uuid(j)) for j in jobs])


def _status(svc: Svc, who: Principal, job_uuid: str) -> JobStatusOut:
    job = _job(svc, who, job_uuid)
    cks, _ = svc.jobs.checkpoints(who, job.id, after=None, limit=1000)
    resources = tr.resources(job, svc.settings)
    if (error := tr.failure(job)) is not None:
        resources["error"] = error
    return JobStatusOut(job_uuid=tr.job_uuid(job), status=tr.STATUS[job.status], scheduled_at=tr.iso(job.created_at),
                        started_at=tr.iso(job.started_at), completed_at=tr.iso(job.finished_at),
                        resources_allocated=resources, checkpoints=[tr.checkpoint_out(job, c) for c in reversed(cks)])


def _artifacts(svc: Svc, who: Principal, job_uuid: str) -> JobArtifactsOut:
    job = _job(svc, who, job_uuid)
    cks, _ = svc.jobs.checkpoints(who, job.id, after=None, limit=1000)
    out = [tr.checkpoint_out(job, c) for c in reversed(cks)]
    final = tr.final_output(job, cks[0] if cks else None)
    return JobArtifactsOut(job_uuid=tr.job_uuid(job), checkpoints=out + ([final] if final else []))


def _cancel(svc: Svc, who: Principal, job_uuid: str) -> Response:
    svc.jobs.cancel(who, _job(svc, who, job_uuid).id)
    return Response(status_code=200)


@post_training.get("/job/status", response_model=JobStatusOut)
def job_status(svc: Svc, who: Caller, job_uuid: Annotated[str, Query()]) -> JobStatusOut:
    """Status, timestamps, resources and every checkpoint with its metrics (also while running)."""
    return _status(svc, who, job_uuid)


@post_training.get("/jobs/{job_uuid}/status", response_model=JobStatusOut)
def job_status_path(svc: Svc, who: Caller, job_uuid: str) -> JobStatusOut:
    """Path-style form of ``job/status``."""
    return _status(svc, who, job_uuid)


@post_training.get("/job/artifacts", response_model=JobArtifactsOut)
def job_artifacts(svc: Svc, who: Caller, job_uuid: Annotated[str, Query()]) -> JobArtifactsOut:
    """Checkpoints, and the final adapter or model once the job completed."""
    return _artifacts(svc, who, job_uuid)


@post_training.get("/jobs/{job_uuid}/artifacts", response_model=JobArtifactsOut)
def job_artifacts_path(svc: Svc, who: Caller, job_uuid: str) -> JobArtifactsOut:
    """Path-style form of ``job/artifacts``."""
    return _artifacts(svc, who, job_uuid)


@post_training.post("/job/cancel")
def job_cancel(svc: Svc, who: Caller, body: JobUuidIn) -> Response:
    """Cancel a job (body ``{job_uuid}``); a finished job is a 409."""
    return _cancel(svc, who, body.job_uuid)


@post_training.post("/jobs/{job_uuid}/cancel")
def job_cancel_path(svc: Svc, who: Caller, job_uuid: str) -> Response:
    """Path-style form of ``job/cancel``."""
    return _cancel(svc, who, job_uuid)


# ----- datasets ------------------------------------------------------------------------------------
@datasets.post("", response_model=DatasetOut)
def register_dataset(svc: Svc, who: Caller, body: RegisterDatasetIn) -> DatasetOut:
    """Register rows (validated now, like an upload) or a URI under ``dataset_id``."""
    ds = svc.datasets.register(who, purpose=body.purpose, source=body.source.model_dump(),
                               dataset_id=body.dataset_id, metadata=body.metadata)
    return _dataset_out(svc, who, ds)


def _dataset_out(svc: Svc, who: Principal, ds) -> DatasetOut:
    rows = svc.datasets.stored_rows(who, ds) if ds.source.get("type") == "rows" else None
    return tr.dataset_out(ds, rows)


@datasets.get("", response_model=DatasetList)
def list_datasets(svc: Svc, who: Caller) -> DatasetList:
    """The organisation's datasets."""
    return DatasetList(data=[_dataset_out(svc, who, d) for d in svc.datasets.list(who)])


@datasets.get("/{dataset_id:path}", response_model=DatasetOut)
def get_dataset(svc: Svc, who: Caller, dataset_id: str) -> DatasetOut:
    """One dataset."""
    return _dataset_out(svc, who, svc.datasets.get(who, dataset_id))


@datasets.delete("/{dataset_id:path}", status_code=200)
def unregister_dataset(svc: Svc, who: Caller, dataset_id: str) -> Response:
    """Forget a dataset and its stored rows (200 and no body, as Llama Stack's document and server answer)."""
    svc.datasets.unregister(who, dataset_id)
    return Response(status_code=200)


# ----- datasetio -----------------------------------------------------------------------------------
MAX_INDEX = 2**31 - 1  # a bound the row iterator can take (a larger number is a 400, not an overflow)
@datasetio.get("/iterrows/{dataset_id:path}", response_model=IterrowsOut)
def iterrows(svc: Svc, who: Caller, dataset_id: str,
             start_index: Annotated[int | None, Query(le=MAX_INDEX)] = None,
             limit: Annotated[int | None, Query(le=MAX_INDEX)] = None) -> IterrowsOut:
    """A page of the dataset's rows from ``start_index`` (default 0); ``limit`` absent or -1: every row."""
    rows, more = svc.datasets.rows(who, dataset_id, start_index=start_index or 0,
                                   limit=None if limit is None or limit == -1 else limit)
    return IterrowsOut(data=rows, has_more=more)


@datasetio.post("/append-rows/{dataset_id:path}")
def append_rows(svc: Svc, who: Caller, dataset_id: str, body: AppendRowsIn) -> Response:
    """Add rows to a dataset registered from rows, validated like registered rows (all of them, or none)."""
    svc.datasets.append_rows(who, dataset_id, body.rows)
    return Response(status_code=200)


# ----- inference ---------------------------------------------------------------------------------
@inference.post("/chat-completion")
async def chat_completion(request: Request, svc: Svc, who: Caller, body: ChatCompletionIn) -> Any:
    """inference.chat_completion on a fine-tuned model (the identifier of its job's final artifact) or a
    configured base model; SSE chunks with ``stream``."""
    gen = tr.chat_request(body)
    try:
        model = await run_in_threadpool(tr.callable_model, svc.models, who, body.model_id)
        events = await open_events(request, svc, who, model, gen)
    except TuneyardError as e:
        if e.code == "model_not_found":  # in this dialect's ids, not the shared name a checkpoint became
            raise NotFound(f"The model '{body.model_id}' does not exist", param="model_id",
                           code="model_not_found") from None
        raise e.rename_params({"model": "model_id"}) from None
    if not body.stream:
        texts, reasons, usage = await collect([events], 1)
        return tr.chat_response(texts.get(0, ""), reasons.get(0, "stop"), usage)

    async def sse() -> AsyncIterator[bytes]:
        yield _sse(tr.chat_chunk("start"))
        reason = "stop"
        async for ev in events:
            if ev["type"] == "delta":
                yield _sse(tr.chat_chunk("progress", ev["text"]))
            elif ev["type"] == "end":
                reason = ev["finish_reason"]
            elif ev["type"] == "usage":
                yield _sse(tr.chat_chunk("complete", finish_reason=reason, usage=ev))
            elif ev["type"] == "error":
                yield _sse({"error": {"message": f"Generation failed: {ev['message']}"}})
                return

    return StreamingResponse(sse(), media_type="text/event-stream")


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()
