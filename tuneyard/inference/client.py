"""The API side of inference (no torch here): find the inference process by its address file, start it on first
need, and stream its events. Every API process of one home shares the one inference process."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from tuneyard.domain.errors import TuneyardError
from tuneyard.jobdir import write_json_atomic
from tuneyard.settings import Settings

log = logging.getLogger("tuneyard.api")
TOKEN_HEADER = "x-tuneyard-inference-token"


class Unavailable(TuneyardError):
    """503: no inference process answers (not started, or it could not start)."""

    status_code = 503


def address_file(settings: Settings) -> Path:
    """The inference process's address file (written by ``tuneyard.inference.server``)."""
    return settings.run_dir / "inference.json"


class InferenceClient:
    """One per API process: the connection to the inference process, which it starts when none answers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
        self._endpoint: tuple[str, str] | None = None
        self._starting = asyncio.Lock()
        self._proc: subprocess.Popen | None = None

    async def close(self) -> None:
        """Stop the inference process if this API process started it."""
        await self.http.aclose()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                await asyncio.to_thread(self._proc.wait, 15)
            except subprocess.TimeoutExpired:
                self._proc.kill()

    async def health(self) -> dict[str, Any] | None:
        """The inference process's /healthz, or None when none runs."""
        ep = await self._find()
        if ep is None:
            return None
        try:
            return (await self.http.get(f"{ep[0]}/healthz", timeout=2.0)).json()
        except (httpx.HTTPError, ValueError) as e:
            return {"status": "unreachable", "error": f"{type(e).__name__}: {e}"}

    async def events(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The generation's events; a refusal before the first one is raised as the TuneyardError it stands for."""
        r = None
        for _ in range(2):  # a process that went away since it was last seen: find (or start) its successor once
            url, token = await self._ensure()
            try:
                req = self.http.build_request("POST", f"{url}/v1/generate", json=payload,
                                              headers={TOKEN_HEADER: token})
                r = await self.http.send(req, stream=True)
                break
            except httpx.TransportError:
                self._endpoint = None
        if r is None:
            raise Unavailable("The inference process did not answer; try again", code="inference_unavailable")
        try:
            if r.status_code != 200:
                body = json.loads(await r.aread())
                err = body.get("error") or {}
                raise TuneyardError(err.get("message") or "inference failed", param=err.get("param"),
                                    code=err.get("code"), status_code=err.get("status") or r.status_code)
            try:
                async for line in r.aiter_lines():
                    if line:
                        yield json.loads(line)
            except httpx.HTTPError as e:
                # The inference process went away mid-generation (killed, crashed).
                self._endpoint = None
                yield {"type": "error", "message": f"the inference process stopped answering: {e}"}
        finally:
            await r.aclose()

    async def export(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Run one export in the inference process (it may take minutes); its refusal raised as a TuneyardError."""
        r = None
        for _ in range(2):
            url, token = await self._ensure()
            try:
                r = await self.http.post(f"{url}/v1/export", json=payload, headers={TOKEN_HEADER: token})
                break
            except httpx.TransportError:
                self._endpoint = None
        if r is None:
            raise Unavailable("The inference process did not answer; try again", code="inference_unavailable")
        body = r.json()
        if r.status_code != 200:
            err = body.get("error") or {}
            raise TuneyardError(err.get("message") or "export failed", param=err.get("param"),
                                code=err.get("code"), status_code=err.get("status") or r.status_code)
        return body

    async def forget(self, path: str) -> None:
        """Ask a running inference process to drop the model at ``path`` (nothing to do when none runs)."""
        ep = await self._find()
        if ep is not None:
            with contextlib.suppress(httpx.TransportError):
                await self.http.post(f"{ep[0]}/v1/forget", json={"path": path}, headers={TOKEN_HEADER: ep[1]})

    # ----- finding and starting the process ---------------------------------------------------
    async def _find(self) -> tuple[str, str] | None:
        if self._endpoint is not None:
            return self._endpoint
        try:
            info = json.loads(address_file(self.settings).read_text())
            r = await self.http.get(f"{info['url']}/healthz", timeout=2.0)
        except (OSError, ValueError, KeyError, httpx.HTTPError):
            return None
        if r.status_code == 200 and r.json().get("pid") == info.get("pid"):
            self._endpoint = (info["url"], info["token"])
        return self._endpoint

    async def _ensure(self) -> tuple[str, str]:
        if (ep := await self._find()) is not None:
            return ep
        if not self.settings.inference_autostart:
            raise Unavailable("No inference process runs (start one with `tuneyard infer`)",
                              code="inference_unavailable")
        async with self._starting:
            if (ep := await self._find()) is not None:
                return ep
            if self._proc is not None and self._proc.poll() is not None:
                self._proc = None  # ours, and dead: reaped, so that its pid no longer looks alive
            await asyncio.to_thread(self._start)
            deadline = time.monotonic() + self.settings.inference_start_seconds
            while time.monotonic() < deadline:
                if (ep := await self._find()) is not None:
                    return ep
                if self._proc is not None and self._proc.poll() is not None:
                    self._proc = None
                    if (ep := await self._find()) is not None:  # another API process's start won
                        return ep
                    break
                await asyncio.sleep(0.2)
        raise Unavailable("The inference process did not start; see run/inference.log under the server's home",
                          code="inference_unavailable")

    def _start(self) -> None:
        """Start the process, unless another API process of this home is starting one (an flock decides)."""
        run = self.settings.run_dir
        run.mkdir(parents=True, exist_ok=True)
        with (run / "inference.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for f in (address_file(self.settings), run / "inference.starting"):
                try:
                    os.kill(int(json.loads(f.read_text())["pid"]), 0)
                    return  # alive: it is starting or running
                except (OSError, ValueError, KeyError):
                    pass
            log.info("starting the inference process")
            with (run / "inference.log").open("ab") as out:
                self._proc = subprocess.Popen([sys.executable, "-m", "tuneyard.inference.server"],
                                              stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            # Until the process writes its address, its pid here keeps other API processes from starting another.
            write_json_atomic(run / "inference.starting", {"pid": self._proc.pid})
