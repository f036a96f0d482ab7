"""The inference process (``tuneyard infer``, or started by the API server on first need): an HTTP server on
127.0.0.1 that only the holder of its token (written with its address to ``$TUNEYARD_HOME/run/inference.json``,
mode 0600) may call. One generation runs at a time, so the cache's adapter switching needs no locks and the
machine's cores go to one forward pass; /healthz answers meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from tuneyard import __version__
from tuneyard.domain.generation import GenerationRequest
from tuneyard.inference.cache import ModelCache
from tuneyard.inference.client import address_file
from tuneyard.inference.export import ExportError, ExportJob
from tuneyard.inference.export import run as run_export
from tuneyard.inference.generate import GenerationError, encode, generate
from tuneyard.jobdir import write_json_atomic
from tuneyard.settings import Settings, get_settings

log = logging.getLogger("tuneyard.inference")


def vllm_status() -> dict[str, Any]:
    """Whether vLLM could serve here; this build always generates with transformers + PEFT."""
    import importlib.util

    installed = importlib.util.find_spec("vllm") is not None
    return {"installed": installed, "used": False,
            "reason": "tuneyard generates with transformers + PEFT; the vLLM backend is not built yet" if installed
            else "vllm is not installed"}


class ForgetIn(BaseModel):
    path: str


def _drop_address(path: Path) -> None:
    """Remove the address file if it is still this process's (a newer process may have replaced it)."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def create_app(settings: Settings, token: str, address: Path | None = None) -> FastAPI:
    """The inference process's app: /v1/generate (NDJSON events), /v1/forget, /healthz; on shutdown it removes
    its ``address`` file (in the app: uvicorn ends the process by re-raising the signal after shutdown)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = ModelCache(settings.inference_memory_bytes, device)
    # A semaphore, not a Lock: a streamed response's steps run on different threads of the pool.
    turn = threading.BoundedSemaphore(1)
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if address is not None:
            _drop_address(address)

    app = FastAPI(title="tuneyard inference", version=__version__, lifespan=lifespan)
    vllm = vllm_status()

    def refuse(x_token: str | None) -> JSONResponse | None:
        if x_token is None or not secrets.compare_digest(x_token, token):
            return JSONResponse({"error": {"message": "bad inference token", "status": 401}}, status_code=401)
        return None

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness, the backend, and the cache: what is loaded and how often each model was loaded."""
        return {"status": "ok", "version": __version__, "pid": os.getpid(), "backend": "transformers",
                "device": device, "vllm": vllm, "cache": cache.stats()}

    @app.post("/v1/forget")
    def forget(body: ForgetIn, x_tuneyard_inference_token: Annotated[str | None, Header()] = None) -> Any:
        """Drop a model whose files are going away."""
        if (bad := refuse(x_tuneyard_inference_token)) is not None:
            return bad
        with turn:
            return {"forgotten": cache.forget(body.path)}

    @app.post("/v1/export")
    def export(body: ExportJob, x_tuneyard_inference_token: Annotated[str | None, Header()] = None) -> Any:
        """Merge (or copy) a trained model into ``body.out`` and push it to the Hub if asked; synchronous, and it
        takes this process's turn: generations wait meanwhile."""
        if (bad := refuse(x_tuneyard_inference_token)) is not None:
            return bad
        with turn:
            try:
                return run_export(body)
            except ExportError as e:
                return JSONResponse(e.body(), status_code=e.status)
            except Exception as e:  # noqa: BLE001 - a model that does not load or merge, a failed upload: a 503
                log.error("export to %s failed: %s", body.out, type(e).__name__)
                return JSONResponse(ExportError(f"The export failed: {type(e).__name__}: {e}", code="export_failed",
                                                status=503).body(), status_code=503)

    @app.post("/v1/generate")
    def gen(body: GenerationRequest, x_tuneyard_inference_token: Annotated[str | None, Header()] = None) -> Any:
        """Load what the request needs, check its prompt, then stream its events as NDJSON lines."""
        if (bad := refuse(x_tuneyard_inference_token)) is not None:
            return bad
        turn.acquire()
        try:
            try:
                loaded = cache.get(body.base, body.adapter, trust_remote_code=body.trust_remote_code)
            except Exception as e:  # noqa: BLE001 - a model that does not load is the caller's 503, not a crash
                log.exception("loading %s (adapter %s) failed", body.base, body.adapter)
                raise GenerationError(f"The model could not be loaded: {type(e).__name__}: {e}", param="model",
                                      code="model_unavailable", status=503) from e
            ids, max_new = encode(loaded, body)
        except GenerationError as e:
            turn.release()
            return JSONResponse(e.body(), status_code=e.status)
        except BaseException:
            turn.release()
            raise

        def lines() -> Iterator[bytes]:
            try:
                yield (json.dumps({"type": "start", "prompt_tokens": len(ids)}) + "\n").encode()
                with closing(generate(loaded, body, ids, max_new)) as events:
                    for event in events:
                        yield (json.dumps(event) + "\n").encode()
            except Exception as e:  # noqa: BLE001 - reported in the stream: the status line is already sent
                log.exception("generation failed")
                yield (json.dumps({"type": "error", "message": f"{type(e).__name__}: {e}"}) + "\n").encode()
            finally:
                turn.release()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return app


def serve(settings: Settings | None = None, port: int | None = None) -> None:
    """Run the inference process until it is stopped; its address goes to ``address_file`` once it listens."""
    import uvicorn

    settings = settings or get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = secrets.token_urlsafe(32)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", settings.inference_port if port is None else port))
    sock.listen(128)
    bound = sock.getsockname()[1]
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    path = address_file(settings)
    app = create_app(settings, token, path)
    old = os.umask(0o077)
    try:
        write_json_atomic(path, {"url": f"http://127.0.0.1:{bound}", "token": token, "pid": os.getpid()})
    finally:
        os.umask(old)
    log.info("tuneyard inference listening on 127.0.0.1:%d", bound)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=settings.log_level.lower(), access_log=False)).run(
            sockets=[sock])
    finally:
        _drop_address(path)


if __name__ == "__main__":
    serve()
