"""A small HTTP client for tuneyard's OpenAI dialect, used by the CLI and the demo."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


class ApiError(RuntimeError):
    """An error response from the server, with its OpenAI-style body."""

    def __init__(self, status: int, body: Any) -> None:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"HTTP {status}: {err.get('message') or body}")
        self.status = status
        self.body = body


class Client:
    """Calls /v1 endpoints with a bearer key."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 60.0) -> None:
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                                 headers={"Authorization": f"Bearer {api_key}"})

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = r.text
            raise ApiError(r.status_code, body)
        return r.json()

    def upload(self, path: Path, purpose: str = "fine-tune") -> dict:
        with Path(path).open("rb") as f:
            return self._call("POST", "/v1/files", files={"file": (Path(path).name, f)}, data={"purpose": purpose})

    def create_job(self, **body: Any) -> dict:
        return self._call("POST", "/v1/fine_tuning/jobs", json=body)

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/fine_tuning/jobs/{job_id}")

    def jobs(self, limit: int = 20) -> list[dict]:
        return self._call("GET", "/v1/fine_tuning/jobs", params={"limit": limit})["data"]

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")

    def events(self, job_id: str, limit: int = 100, after: str | None = None) -> dict:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        return self._call("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params=params)

    def all_events(self, job_id: str) -> list[dict]:
        """Every event of a job, oldest first."""
        out: list[dict] = []
        after = None
        while True:
            page = self.events(job_id, limit=1000, after=after)
            out.extend(page["data"])
            if not page["has_more"] or not page["data"]:
                break
            after = page["data"][-1]["id"]
        return list(reversed(out))

    def checkpoints(self, job_id: str) -> list[dict]:
        return self._call("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 100})["data"]

    def download_artifacts(self, job_id: str, dest: Path, checkpoint: str | None = None) -> Path:
        """Save the job's artifact archive (.tar.gz), or one checkpoint's, to ``dest``."""
        path = f"/v1/fine_tuning/jobs/{job_id}/" + (f"checkpoints/{checkpoint}/content" if checkpoint else "artifacts")
        with self.http.stream("GET", path) as r:
            if r.status_code >= 400:
                r.read()
                raise ApiError(r.status_code, r.json())
            with Path(dest).open("wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
        return Path(dest)

    def export(self, job_id: str, *, merged: bool, checkpoint: str | None = None,
               push_to_hub: dict[str, Any] | None = None) -> dict:
        """Export on the server (POST .../export): it waits while the server merges and pushes."""
        body: dict[str, Any] = {"merged": merged, "checkpoint": checkpoint, "push_to_hub": push_to_hub}
        return self._call("POST", f"/v1/fine_tuning/jobs/{job_id}/export", json=body, timeout=None)

    def follow(self, job_id: str, interval: float = 1.0) -> Iterator[tuple[dict, list[dict]]]:
        """Yield (job, new events oldest first) until the job reaches a final status."""
        seen: set[str] = set()
        while True:
            job = self.job(job_id)
            new = [e for e in self.all_events(job_id) if e["id"] not in seen]
            seen.update(e["id"] for e in new)
            yield job, new
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return
            time.sleep(interval)


def wait_healthy(base_url: str, timeout: float = 60.0, interval: float = 0.2) -> None:
    """Block until the server answers /healthz."""
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"{base_url.rstrip('/')}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"tuneyard server at {base_url} did not start within {timeout:.0f} s")
        time.sleep(interval)
