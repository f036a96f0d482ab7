"""The control plane under load: a store of 100,000 jobs, 200 clients, submit rate, submit-to-running.

    python -m bench api_load                          # the issue's figures (about 2 minutes)
    python -m bench api_load --jobs 20000 --seconds 15 --open-seconds 15
    python -m bench api_load --api-workers 1          # one API process (the default is the server's own)

1. A real ``tuneyard serve`` (worker off) over a store seeded with ``--jobs`` jobs (copies of a real one,
   two events each, 50 metrics events for one job in a hundred). ``--clients`` clients on loopback hit
   retrieve (half the requests), list (a page after a random job) and events, two ways:

   a. **saturation** (closed loop, ``--seconds``): every client sends its next request as soon as the last
      is answered, with no pause. This measures the most requests/s the server answers. Its latencies are
      not a service level: with N clients always waiting, Little's law makes the mean latency N / throughput
      (200 clients at 1,000 requests/s wait 200 ms each, however fast one request is served).
   b. **latency under a realistic load** (open loop, ``--open-seconds``): each client polls like an SDK
      client following a job, one request every ``--poll-interval`` seconds on average (uniform jitter of
      +-50%), whether or not earlier answers were slow; 200 clients polling every 1.5 s offer ~133
      requests/s. Latency is measured from the moment a request was due, so a slow server cannot hide its
      queue by delaying the clients (no coordinated omission). The target, retrieve p99 < 50 ms, is set
      against this one.
2. Submit throughput: 50 clients create ``--submits`` jobs through the OpenAI API (jobs/s; target >= 200).
3. Submit to ``running`` on an idle server with its worker, on the tiny model and sample data: the
   prepare step (validate, tokenise) and the start of the trainer included (target < 2 s plus model load).

The clients run in a separate process, written against raw sockets (HTTP/1.1 keep-alive, one connection
per client) so that on a 2-core machine they take as little CPU from the server as a client can: an httpx
client costs about as much CPU per request as the server does. The figures still include the server
sharing the cores with them. ``--database-url`` runs it on PostgreSQL instead of the embedded SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import free_port, stop_process

REPO = Path(__file__).resolve().parent.parent
OPS = ("retrieve", "list", "events")


class _Server:
    def __init__(self, home: Path, env: dict[str, str]) -> None:
        from tuneyard.client import wait_healthy

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "TUNEYARD_HOME": str(home), "TUNEYARD_PORT": str(self.port),
                    "TUNEYARD_LOG_LEVEL": "warning", "TUNEYARD_RATE_LIMIT_PER_SECOND": "0",
                    "TUNEYARD_MAX_ACTIVE_JOBS_PER_ORG": "0", "HF_HUB_OFFLINE": "1",
                    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p), **env}
        self.log = (home / "server.log").open("ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "tuneyard.cli", "serve"], env=self.env, cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_healthy(self.url, timeout=120, interval=0.01)
        self.startup_s = time.perf_counter() - t0

    def key(self, org: str) -> str:
        out = subprocess.run([sys.executable, "-m", "tuneyard.cli", "keys", "create", "--org", org], env=self.env,
                             capture_output=True, text=True, check=True, cwd=REPO)
        return out.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        stop_process(self.proc, 60)
        self.log.close()


def _seed(db_url: str, template_id: str, n_jobs: int) -> list[str]:
    """Copy the job ``template_id`` ``n_jobs`` times (succeeded, two events each); the new ids."""
    from sqlalchemy import insert, select

    from tuneyard.ids import new_id
    from tuneyard.store.db import Store
    from tuneyard.store.models import Job, JobEvent

    store = Store(db_url)
    with store.session() as s:
        row = s.scalar(select(Job).where(Job.id == template_id))
        base = {c.key: getattr(row, c.key) for c in Job.__mapper__.column_attrs if c.key not in ("pk", "id")}
    now = time.time()
    ids = []
    for start in range(0, n_jobs, 5000):
        jobs, events = [], []
        for i in range(start, min(n_jobs, start + 5000)):
            job_id = new_id("ftjob")
            ids.append(job_id)
            t = now - (n_jobs - i)
            jobs.append({**base, "id": job_id, "status": "succeeded", "created_at": t, "updated_at": t,
                         "finished_at": t, "idempotency_key": None, "trained_steps": 60, "total_steps": 60,
                         "fine_tuned_model": f"ft:tiny:load::{job_id}"})
            events.append({"id": new_id("ftevent"), "job_id": job_id, "created_at": t, "level": "info",
                           "type": "message", "message": f"Created fine-tuning job: {job_id}", "data": None})
            events.append({"id": new_id("ftevent"), "job_id": job_id, "created_at": t, "level": "info",
                           "type": "message", "message": "The job has successfully completed", "data": None})
            if i % 100 == 0:
                events += [{"id": new_id("ftevent"), "job_id": job_id, "created_at": t, "level": "info",
                            "type": "metrics", "message": f"Step {k}/60", "data": {"step": k, "train_loss": 1.0}}
                           for k in range(1, 51)]
        with store.session() as s:
            s.execute(insert(Job), jobs)
            s.execute(insert(JobEvent), events)
    store.dispose()
    return ids


class _Conn:
    """One keep-alive HTTP/1.1 connection, as cheap a client as Python has (the load runs beside the server)."""

    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self.headers = f"host: 127.0.0.1:{port}\r\nauthorization: Bearer {key}\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> int:
        """Send one request and read the whole answer; its status code."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        extra = b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body) if body else b""
        self.writer.write(f"{method} {path} HTTP/1.1\r\n".encode() + self.headers + extra + b"\r\n" + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
            elif name == b"transfer-encoding":
                raise RuntimeError("chunked answers are not expected from these endpoints")
        await self.reader.readexactly(length)
        if close:
            self.writer.close()
            self.reader = self.writer = None
        return int(lines[0].split()[1])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _path(op: str, job: str) -> str:
    return {"retrieve": f"/v1/fine_tuning/jobs/{job}", "list": f"/v1/fine_tuning/jobs?limit=20&after={job}",
            "events": f"/v1/fine_tuning/jobs/{job}/events?limit=20"}[op]


async def _closed(port: int, key: str, ids: list[str], clients: int, seconds: float) -> dict[str, Any]:
    lat: dict[str, list[float]] = {op: [] for op in OPS}
    errors = 0
    deadline = time.perf_counter() + seconds

    async def one(rng: random.Random) -> None:
        nonlocal errors
        conn = _Conn(port, key)
        while time.perf_counter() < deadline:
            op = rng.choice(("retrieve", "retrieve", "list", "events"))
            t0 = time.perf_counter()
            status = await conn.request("GET", _path(op, rng.choice(ids)))
            lat[op].append(time.perf_counter() - t0)
            errors += status != 200
        conn.close()

    await asyncio.gather(*(one(random.Random(i)) for i in range(clients)))
    return {"lat": lat, "errors": errors, "seconds": seconds}


async def _open(port: int, key: str, ids: list[str], clients: int, seconds: float, interval: float
                ) -> dict[str, Any]:
    lat: dict[str, list[float]] = {op: [] for op in OPS}
    errors = 0
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.5
    deadline = start + seconds

    async def one(rng: random.Random) -> None:
        nonlocal errors
        conn = _Conn(port, key)
        due = start + rng.uniform(0, interval)
        while due < deadline:
            await asyncio.sleep(max(0.0, due - loop.time()))
            op = rng.choice(("retrieve", "retrieve", "list", "events"))
            status = await conn.request("GET", _path(op, rng.choice(ids)))
            # From when the request was due: a reply late enough to delay the next request still counts.
            lat[op].append(loop.time() - due)
            errors += status != 200
            due += rng.uniform(0.5 * interval, 1.5 * interval)
        conn.close()

    await asyncio.gather(*(one(random.Random(1000 + i)) for i in range(clients)))
    return {"lat": lat, "errors": errors, "seconds": seconds}


async def _submit(port: int, key: str, model: str, file_id: str, n: int, clients: int) -> dict[str, Any]:
    body = json.dumps({"model": model, "training_file": file_id}).encode()
    left = n
    failed = 0

    async def one() -> None:
        nonlocal left, failed
        conn = _Conn(port, key)
        while left > 0:
            left -= 1
            failed += await conn.request("POST", "/v1/fine_tuning/jobs", body) != 200
        conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    return {"seconds": time.perf_counter() - t0, "failed": failed}


def _in_client_process(kind: str, *args: Any) -> dict[str, Any]:
    """Run one load phase (closed, open, submit) to completion; called in the client process."""
    return asyncio.run({"closed": _closed, "open": _open, "submit": _submit}[kind](*args))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")


def _summary(prefix: str, res: dict[str, Any]) -> dict[str, Any]:
    lat = res["lat"]
    every = [x for op in OPS for x in lat[op]]
    return {f"{prefix}_requests_per_s": round(len(every) / res["seconds"]), f"{prefix}_errors": res["errors"],
            **{f"{prefix}_{op}_p50_ms": round(_pct(lat[op], 0.5), 1) for op in OPS},
            **{f"{prefix}_{op}_p99_ms": round(_pct(lat[op], 0.99), 1) for op in OPS},
            f"{prefix}_mean_ms": round(statistics.fmean(every) * 1000, 1) if every else float("nan")}


def bench(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the measurements; print and write bench/results/api_load.json."""
    import httpx

    from bench.common import print_table, write_result
    from tuneyard.demo.tiny import build_tiny_model, write_sample_jsonl

    ap = argparse.ArgumentParser(prog="python -m bench api_load")
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=30.0, help="saturation (closed loop) phase")
    ap.add_argument("--open-seconds", type=float, default=30.0, help="realistic-load (open loop) phase")
    ap.add_argument("--poll-interval", type=float, default=1.5, help="open loop: mean seconds between a client's "
                                                                     "requests")
    ap.add_argument("--submits", type=int, default=1000)
    ap.add_argument("--api-workers", type=int, default=None, help="TUNEYARD_API_WORKERS for the server")
    ap.add_argument("--database-url", default=None, help="e.g. postgresql+psycopg://postgres@127.0.0.1/bench")
    args = ap.parse_args(argv or [])

    workers_env = {} if args.api_workers is None else {"TUNEYARD_API_WORKERS": str(args.api_workers)}
    clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    clients.submit(time.sleep, 0).result()  # started before anything is measured
    with tempfile.TemporaryDirectory(prefix="tuneyard-bench-api-") as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "models" / "tiny-llama")
        data = write_sample_jsonl(work / "train.jsonl")
        home = work / "home"
        home.mkdir()
        env = {"TUNEYARD_LOCAL_ROOTS": str(work / "models"), "TUNEYARD_RUN_WORKER": "false", **workers_env}
        if args.database_url:
            env["TUNEYARD_DATABASE_URL"] = args.database_url
        server = _Server(home, env)
        key = server.key("load")
        h = {"Authorization": f"Bearer {key}"}
        f = httpx.post(f"{server.url}/v1/files", headers=h, files={"file": ("t.jsonl", data.read_bytes())},
                       data={"purpose": "fine-tune"}, timeout=60).json()
        first = httpx.post(f"{server.url}/v1/fine_tuning/jobs", headers=h, timeout=60,
                           json={"model": str(model), "training_file": f["id"]}).json()
        t0 = time.perf_counter()
        ids = _seed(args.database_url or f"sqlite:///{home / 'tuneyard.db'}", first["id"], args.jobs)
        seed_s = time.perf_counter() - t0
        closed = clients.submit(_in_client_process, "closed", server.port, key, ids, args.clients,
                                args.seconds).result()
        opened = clients.submit(_in_client_process, "open", server.port, key, ids, args.clients, args.open_seconds,
                                args.poll_interval).result()
        sub = clients.submit(_in_client_process, "submit", server.port, key, str(model), f["id"], args.submits,
                             50).result()
        startup_s = server.startup_s
        server.stop()

        # Submit to running on an idle server with its worker (a fresh home: nothing else queued).
        idle_home = work / "idle"
        idle_home.mkdir()
        idle = _Server(idle_home, {"TUNEYARD_LOCAL_ROOTS": str(work / "models"), **workers_env})
        ikey = idle.key("idle")
        ih = {"Authorization": f"Bearer {ikey}"}
        fi = httpx.post(f"{idle.url}/v1/files", headers=ih, files={"file": ("t.jsonl", data.read_bytes())},
                        data={"purpose": "fine-tune"}, timeout=60).json()
        # The worker's helpers (prepare process) may still be warming up just after start, as after any restart.
        time.sleep(3)
        t0 = time.perf_counter()
        job = httpx.post(f"{idle.url}/v1/fine_tuning/jobs", headers=ih, timeout=60,
                         json={"model": str(model), "training_file": fi["id"]}).json()
        while httpx.get(f"{idle.url}/v1/fine_tuning/jobs/{job['id']}", headers=ih).json()["status"] != "running":
            time.sleep(0.02)
        to_running = time.perf_counter() - t0
        httpx.post(f"{idle.url}/v1/fine_tuning/jobs/{job['id']}/cancel", headers=ih)
        idle.stop()
    clients.shutdown()

    offered = args.clients / args.poll_interval
    figures = {
        "jobs_in_store": args.jobs + 1, "clients": args.clients, "api_workers": args.api_workers or "default",
        "seed_seconds": round(seed_s, 1), "server_startup_s": round(startup_s, 2),
        "closed_seconds": args.seconds, **_summary("closed", closed),
        "open_seconds": args.open_seconds, "open_offered_per_s": round(offered), **_summary("open", opened),
        "submits": args.submits, "submit_failed": sub["failed"],
        "submit_jobs_per_s": round(args.submits / sub["seconds"], 1),
        "submit_to_running_s": round(to_running, 2),
    }
    targets = {"open_retrieve_p99_ms": "< 50", "submit_jobs_per_s": ">= 200",
               "submit_to_running_s": "< 2 + model load", "server_startup_s": "< 2"}
    write_result("api_load", figures, targets)
    print_table("api_load", [(k, v, targets.get(k)) for k, v in figures.items()])
    print(f"closed_*: saturation, {args.clients} clients with no pause (latency = clients / throughput, not a "
          f"service level); open_*: {args.clients} clients polling every ~{args.poll_interval:g} s "
          f"(~{offered:.0f} requests/s offered), latency from when each request was due: the < 50 ms target.")
    return {"figures": figures, "targets": targets}


if __name__ == "__main__":
    bench(sys.argv[1:])
