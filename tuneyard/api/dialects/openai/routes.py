"""OpenAI fine-tuning + files endpoints under /v1 (as also served by Nebius and TrueFoundry)."""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from tuneyard.api.deps import Caller, Svc
from tuneyard.api.dialects.openai import translate as tr
from tuneyard.api.dialects.openai.schemas import (
    CheckpointOut,
    CreateJobIn,
    FileDeletedOut,
    FileOut,
    JobOut,
    ListOut,
    ModelOut,
)
from tuneyard.api.jsonbody import StrictJSONRoute
from tuneyard.domain.errors import InvalidRequest, Problems

router = APIRouter(tags=["openai"], route_class=StrictJSONRoute)
# Served at /v1 (OpenAI, Nebius) and at /api/llm (TrueFoundry's path for the same API).
PREFIXES = ("/v1", "/api/llm")


def _list(items: list, has_more: bool) -> ListOut:
    return ListOut(data=items, has_more=has_more, first_id=items[0].id if items else None,
                   last_id=items[-1].id if items else None)


def _metadata_filter(request: Request) -> dict[str, str]:
    out: dict[str, str] = {}
    bad: list[str] = []
    for k, v in request.query_params.multi_items():
        if k.startswith("metadata[") and k.endswith("]"):
            # No stored metadata holds a NUL (refused at submit), and the database's JSON path cannot take one.
            if "\x00" in k or "\x00" in v:
                bad.append(k)
            out[k[len("metadata["):-1]] = v
    if bad:
        raise InvalidRequest(" ".join(f"Invalid value for '{k}': metadata may not contain NUL characters."
                                      for k in bad), param=bad[0])
    return out


# ----- files ---------------------------------------------------------------------------------------
# ``expires_after`` comes either as one JSON part (OpenAPI's encoding of an object in multipart, which OpenAI's
# document implies) or as bracketed fields (what the OpenAI SDKs send): tr.expires_after_seconds reads both.


@router.post("/files", response_model=FileOut)
async def create_file(
    request: Request, svc: Svc, who: Caller,
    file: Annotated[UploadFile | None, File()] = None,
    purpose: Annotated[str | None, Form()] = None,
    expires_after: Annotated[str | None, Form()] = None,
    expires_after_anchor: Annotated[str | None, Form(alias="expires_after[anchor]")] = None,
    expires_after_seconds: Annotated[str | None, Form(alias="expires_after[seconds]")] = None,
) -> FileOut:
    """Upload a file (multipart); ``fine-tune`` files are validated row by row before they are kept."""
    try:
        tr.check_file_parts(list((await request.form()).keys()))
        if file is None:
            raise InvalidRequest("'file' must be a file part (multipart filename given)", param="file")
        seconds = tr.expires_after_seconds(expires_after, expires_after_anchor, expires_after_seconds)
    except InvalidRequest:
        if file is not None:
            await file.close()
        raise
    try:
        f = await run_in_threadpool(svc.files.create, who, file.file, file.filename, purpose, seconds)
    finally:
        await file.close()
    return tr.file_out(f)


@router.get("/files", response_model=ListOut)
def list_files(svc: Svc, who: Caller, after: str | None = None, limit: Annotated[int, Query()] = 10000,
               order: str = "desc", purpose: str | None = None) -> ListOut:
    rows, more = svc.files.list(who, after=after, limit=limit, order=order, purpose=purpose)
    return _list([tr.file_out(f) for f in rows], more)


@router.get("/files/{file_id}", response_model=FileOut)
def retrieve_file(svc: Svc, who: Caller, file_id: str) -> FileOut:
    return tr.file_out(svc.files.get(who, file_id))


@router.delete("/files/{file_id}", response_model=FileDeletedOut)
def delete_file(svc: Svc, who: Caller, file_id: str) -> FileDeletedOut:
    svc.files.delete(who, file_id)
    return FileDeletedOut(id=file_id, deleted=True)


@router.get("/files/{file_id}/content", response_class=FileResponse)
def file_content(svc: Svc, who: Caller, file_id: str) -> FileResponse:
    f = svc.files.get(who, file_id)
    return FileResponse(svc.files.path_of(f), media_type="application/octet-stream", filename=f.filename)


# ----- jobs ----------------------------------------------------------------------------------------
@router.post("/fine_tuning/jobs", response_model=JobOut)
def create_job(svc: Svc, who: Caller, body: CreateJobIn,
               idempotency_key: Annotated[str | None, Header(max_length=256)] = None) -> JobOut:
    """Create a fine-tuning job; it starts in ``validating_files``."""
    problems = Problems()
    job = svc.jobs.submit(who, tr.to_submission(body, idempotency_key, problems), problems)
    return tr.job_out(job)


@router.get("/fine_tuning/jobs", response_model=ListOut)
def list_jobs(request: Request, svc: Svc, who: Caller, after: str | None = None,
              limit: Annotated[int, Query()] = 20) -> ListOut:
    rows, more = svc.jobs.list(who, after=after, limit=limit, metadata=_metadata_filter(request))
    return _list([tr.job_out(j) for j in rows], more)


@router.get("/fine_tuning/jobs/{job_id}", response_model=JobOut)
def retrieve_job(svc: Svc, who: Caller, job_id: str) -> JobOut:
    return tr.job_out(svc.jobs.get(who, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(svc: Svc, who: Caller, job_id: str) -> JobOut:
    return tr.job_out(svc.jobs.cancel(who, job_id))


@router.post("/fine_tuning/jobs/{job_id}/pause", response_model=JobOut)
def pause_job(svc: Svc, who: Caller, job_id: str) -> JobOut:
    return tr.job_out(svc.jobs.pause(who, job_id))


@router.post("/fine_tuning/jobs/{job_id}/resume", response_model=JobOut)
def resume_job(svc: Svc, who: Caller, job_id: str) -> JobOut:
    return tr.job_out(svc.jobs.resume(who, job_id))


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=ListOut)
def list_events(svc: Svc, who: Caller, job_id: str, after: str | None = None,
                limit: Annotated[int, Query()] = 20) -> ListOut:
    rows, more = svc.jobs.events(who, job_id, after=after, limit=limit)
    return _list([tr.event_out(e) for e in rows], more)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", response_model=ListOut)
def list_checkpoints(svc: Svc, who: Caller, job_id: str, after: str | None = None,
                     limit: Annotated[int, Query()] = 10) -> ListOut:
    job = svc.jobs.get(who, job_id)
    rows, more = svc.jobs.checkpoints(who, job_id, after=after, limit=limit)
    return _list([tr.checkpoint_out(c, job) for c in rows], more)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint_id}", response_model=CheckpointOut)
def retrieve_checkpoint(svc: Svc, who: Caller, job_id: str, checkpoint_id: str) -> CheckpointOut:
    job = svc.jobs.get(who, job_id)
    return tr.checkpoint_out(svc.jobs.checkpoint(who, job_id, checkpoint_id), job)


@router.get("/fine_tuning/jobs/{job_id}/artifacts", response_class=FileResponse)
def download_artifacts(svc: Svc, who: Caller, job_id: str, background: BackgroundTasks) -> FileResponse:
    """The trained adapter (or full model) with its tokenizer, as a .tar.gz archive."""
    out = svc.jobs.output_dir(who, job_id)
    fd, tmp = tempfile.mkstemp(suffix=".tar.gz", dir=svc.settings.home)
    os.close(fd)
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(Path(out).rglob("*")):
            if p.is_file():
                tar.add(p, arcname=f"{job_id}/{p.relative_to(out)}")
    background.add_task(os.unlink, tmp)
    return FileResponse(tmp, media_type="application/gzip", filename=f"{job_id}.tar.gz")


# ----- models --------------------------------------------------------------------------------------
@router.get("/models", response_model=ListOut)
def list_models(svc: Svc, who: Caller) -> ListOut:
    items = [ModelOut(id=m, created=int(c), owned_by=o) for m, c, o in svc.jobs.models(who)]
    return ListOut(data=items, has_more=False)


@router.get("/models/{model_id:path}", response_model=ModelOut)
def retrieve_model(svc: Svc, who: Caller, model_id: str) -> ModelOut:
    m, c, o = svc.jobs.model(who, model_id)
    return ModelOut(id=m, created=int(c), owned_by=o)
