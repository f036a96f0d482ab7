"""OpenAI fine-tuning, files, models and inference (chat completions, completions) endpoints under /v1 (as also
served by Nebius and TrueFoundry)."""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import FileResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tuneyard.api.deps import Caller, Svc
from tuneyard.api.dialects.openai import translate as tr
from tuneyard.api.dialects.openai.schemas import (
    ChatCompletionIn,
    CheckpointOut,
    CompletionIn,
    CreateJobIn,
    ExportIn,
    ExportOut,
    FileDeletedOut,
    FileOut,
    JobOut,
    ListOut,
    ModelDeletedOut,
    ModelOut,
)
from tuneyard.api.generation import collect, open_events
from tuneyard.api.jsonbody import StrictJSONRoute
from tuneyard.domain.errors import InvalidRequest, Problems
from tuneyard.inference.export import TRAINING_STATE  # the training state a download leaves out (no torch)

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




def _tarball(svc: Svc, root: Path, name: str, background: BackgroundTasks, skip: tuple[str, ...] = ()
             ) -> FileResponse:
    """``root`` as ``name.tar.gz`` (entries under ``name/``), removed once sent."""
    fd, tmp = tempfile.mkstemp(suffix=".tar.gz", dir=svc.settings.home)
    os.close(fd)
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not any(p.match(g) for g in skip):
                tar.add(p, arcname=f"{name}/{p.relative_to(root)}")
    background.add_task(os.unlink, tmp)
    return FileResponse(tmp, media_type="application/gzip", filename=f"{name}.tar.gz")


@router.get("/fine_tuning/jobs/{job_id}/artifacts", response_class=FileResponse)
def download_artifacts(svc: Svc, who: Caller, job_id: str, background: BackgroundTasks) -> FileResponse:
    """The trained adapter (or full model) with its tokenizer, as a .tar.gz archive."""
    return _tarball(svc, Path(svc.jobs.output_dir(who, job_id)), job_id, background)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint_id}/content", response_class=FileResponse)
def download_checkpoint(svc: Svc, who: Caller, job_id: str, checkpoint_id: str,
                        background: BackgroundTasks) -> FileResponse:
    """One checkpoint's adapter (or model) and tokenizer, as a .tar.gz archive (no optimizer state)."""
    return _tarball(svc, svc.jobs.checkpoint_dir(who, job_id, checkpoint_id), checkpoint_id, background,
                    TRAINING_STATE)


# ----- export (tuneyard's extension) ---------------------------------------------------------------
def _export_out(request: Request, e: Any) -> ExportOut:
    prefix = "/api/llm" if request.url.path.startswith("/api/llm") else "/v1"
    return ExportOut(id=e.id, created_at=int(e.created_at), fine_tuning_job_id=e.job_id, checkpoint_id=e.checkpoint_id,
                     merged=e.merged, bytes=e.bytes,
                     content_url=f"{prefix}/fine_tuning/jobs/{e.job_id}/exports/{e.id}/content",
                     hub={"repo_id": e.hub_repo_id, "url": e.hub_url} if e.hub_url else None)


@router.post("/fine_tuning/jobs/{job_id}/export", response_model=ExportOut)
async def create_export(request: Request, svc: Svc, who: Caller, job_id: str, body: ExportIn) -> ExportOut:
    """Export a succeeded job's model (or a checkpoint's): merged into its base or as the adapter, and pushed to a
    Hub repository when asked. Synchronous: the inference process does the work while the request waits."""
    hub = body.push_to_hub
    planned = await run_in_threadpool(
        lambda: svc.exports.plan(who, job_id, merged=body.merged, checkpoint_id=body.checkpoint,
                                 repo_id=hub.repo_id if hub else None, secret=hub.secret_id if hub else None,
                                 private=hub.private if hub else True))
    try:
        result = await request.app.state.inference.export(planned.payload)
    except BaseException:
        await run_in_threadpool(svc.exports.discard, planned)
        raise
    return _export_out(request, await run_in_threadpool(svc.exports.record, who, planned, result))


@router.get("/fine_tuning/jobs/{job_id}/exports/{export_id}", response_model=ExportOut)
def retrieve_export(request: Request, svc: Svc, who: Caller, job_id: str, export_id: str) -> ExportOut:
    return _export_out(request, svc.exports.get(who, job_id, export_id)[0])


@router.get("/fine_tuning/jobs/{job_id}/exports/{export_id}/content", response_class=FileResponse)
def download_export(svc: Svc, who: Caller, job_id: str, export_id: str, background: BackgroundTasks) -> FileResponse:
    """An export's model files as a .tar.gz archive (entries under <export id>/)."""
    return _tarball(svc, svc.exports.get(who, job_id, export_id)[1], export_id, background)


# ----- models --------------------------------------------------------------------------------------
@router.get("/models", response_model=ListOut)
def list_models(svc: Svc, who: Caller) -> ListOut:
    items = [ModelOut(id=m, created=int(c), owned_by=o) for m, c, o in svc.models.models(who)]
    return ListOut(data=items, has_more=False)


@router.get("/models/{model_id:path}", response_model=ModelOut)
def retrieve_model(svc: Svc, who: Caller, model_id: str) -> ModelOut:
    m, c, o = svc.models.model(who, model_id)
    return ModelOut(id=m, created=int(c), owned_by=o)


@router.delete("/models/{model_id:path}", response_model=ModelDeletedOut)
async def delete_model(request: Request, svc: Svc, who: Caller, model_id: str) -> ModelDeletedOut:
    """Delete a fine-tuned model: no longer listed or callable, its weights gone; its job stays."""
    for path in await run_in_threadpool(svc.models.delete, who, model_id):
        await request.app.state.inference.forget(str(path))
    return ModelDeletedOut(id=model_id, deleted=True)


# ----- inference -----------------------------------------------------------------------------------
def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _sse_error(message: str) -> bytes:
    # The openai SDK raises an APIError for a chunk that carries "error".
    return _sse({"error": {"message": message, "type": "server_error", "param": None, "code": "generation_failed"}})


@router.post("/chat/completions")
async def chat_completions(request: Request, svc: Svc, who: Caller, body: ChatCompletionIn) -> Any:
    """A chat completion by a fine-tuned model, one of its checkpoints or a base model; SSE with ``stream``."""
    gen = tr.chat_request(body)
    cid, created = tr.completion_id("chatcmpl"), int(time.time())
    events = await open_events(request, svc, who, body.model, gen)
    if not body.stream:
        return tr.chat_completion_out(cid, created, body.model, *await collect([events], gen.n))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def sse() -> AsyncIterator[bytes]:
        started: set[int] = set()

        def first(i: int) -> dict:
            if i in started:
                return {}
            started.add(i)
            return {"role": "assistant"}

        async for ev in events:
            if ev["type"] == "delta":
                yield _sse(tr.chat_chunk(cid, created, body.model, ev["index"],
                                         {**first(ev["index"]), "content": ev["text"]}))
            elif ev["type"] == "end":
                if ev["index"] not in started:
                    yield _sse(tr.chat_chunk(cid, created, body.model, ev["index"], {**first(ev["index"]),
                                                                                    "content": ""}))
                yield _sse(tr.chat_chunk(cid, created, body.model, ev["index"], {}, ev["finish_reason"]))
            elif ev["type"] == "usage" and include_usage:
                yield _sse(tr.chat_chunk(cid, created, body.model, usage=ev))
            elif ev["type"] == "error":
                yield _sse_error(ev["message"])
                return
        yield b"data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")


@router.post("/completions")
async def completions(request: Request, svc: Svc, who: Caller, body: CompletionIn) -> Any:
    """A (legacy) text completion of each prompt; SSE with ``stream``."""
    gens = tr.completion_requests(body)
    cid, created = tr.completion_id("cmpl"), int(time.time())
    n = gens[0].n
    prompts = [g.prompt or "" for g in gens]
    if not body.stream:
        streams = [await open_events(request, svc, who, body.model, g) for g in gens]
        texts, reasons, usage = await collect(streams, n)
        if body.echo:
            texts = {i: prompts[i // n] + texts.get(i, "") for i in reasons}
        return tr.completion_out(cid, created, body.model, texts, reasons, usage)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    head = await open_events(request, svc, who, body.model, gens[0])

    async def sse() -> AsyncIterator[bytes]:
        total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for k, gen in enumerate(gens):
            try:
                events = head if k == 0 else await open_events(request, svc, who, body.model, gen)
            except Exception as e:  # noqa: BLE001 - the status line is sent: the stream carries the error
                yield _sse_error(str(e))
                return
            echoed: set[int] = set()
            async for ev in events:
                i = k * n + ev.get("index", 0)
                if ev["type"] in ("delta", "end") and body.echo and i not in echoed:
                    echoed.add(i)
                    yield _sse(tr.completion_chunk(cid, created, body.model, i, prompts[k]))
                if ev["type"] == "delta":
                    yield _sse(tr.completion_chunk(cid, created, body.model, i, ev["text"]))
                elif ev["type"] == "end":
                    yield _sse(tr.completion_chunk(cid, created, body.model, i, "", ev["finish_reason"]))
                elif ev["type"] == "usage":
                    total = {key: total[key] + ev[key] for key in total}
                elif ev["type"] == "error":
                    yield _sse_error(ev["message"])
                    return
        if include_usage:
            yield _sse(tr.completion_chunk(cid, created, body.model, usage=total))
        yield b"data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")
