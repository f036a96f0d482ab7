"""The control plane under load: a store of 100,000 jobs, 200 concurrent clients, submit rate, submit-to-running.

    python -m bench api_load                          # the issue's figures (about 3 minutes)
    python -m bench api_load --jobs 20000 --seconds 20

1. A real ``tuneyard serve`` (worker off) over a store seeded with ``--jobs`` jobs (copies of a real one,
   two events each, 50 metrics events for one job in a hundred). ``--clients`` concurrent clients on
   loopback hit retrieve, list (a page after a random job) and events for ``--seconds``: p50/p99 latency
   per operation and requests/s. Targets: retrieve p99 < 50 ms.
2. Submit throughput: 50 clients create ``--submits`` jobs through the OpenAI API (jobs/s; target >= 200).
3. Submit to ``running`` on an idle server with its worker, on the tiny model and sample data: the
   prepare step (validate, tokenise) and the start of the trainer included (target < 2 s plus model load).

The clients run in this process (asyncio + httpx): on a 2-core machine they share the cores with the
server, so the figures are a floor for what the server does on its own. ``--database-url`` runs it on
PostgreSQL instead of the embedded SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import free_port

REPO = Path(__file__).resolve().parent.parent



class _Server:
    def __init__(self, home: Path, env: dict[str, str]) -> None:
        from tuneyard.client import wait_healthy

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "TUNEYARD_HOME": str(home), "TUNEYARD_PORT": str(self.port),
                    "TUNEYARD_LOG_LEVEL": "warning", "TUNEYARD_RATE_LIMIT_PER_SECOND": "0",
                    "TUNEYARD_MAX_ACTIVE_JOBS_PER_ORG": "0", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **env}
        self.log = (home / "server.log").open("ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "tuneyard.cli", "serve"], env=self.env, cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_healthy(self.url, timeout=120)
        self.startup_s = time.perf_counter() - t0

    def key(self, org: str) -> str:
        out = subprocess.run([sys.executable, "-m", "tuneyard.cli", "keys", "create", "--org", org], env=self.env,
                             capture_output=True, text=True, check=True, cwd=REPO)
        return out.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
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


async def _load(url: str, key: str, ids: list[str], clients: int, seconds: float) -> dict[str, list[float]]:
    import httpx

    lat: dict[str, list[float]] = {"retrieve": [], "list": [], "events": []}
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"{url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                 limits=limits) as client:
        async def one(rng: random.Random) -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                op = rng.choice(("retrieve", "retrieve", "list", "events"))
                job = rng.choice(ids)
                path, params = {"retrieve": (f"/fine_tuning/jobs/{job}", None),
                                "list": ("/fine_tuning/jobs", {"limit": 20, "after": job}),
                                "events": (f"/fine_tuning/jobs/{job}/events", {"limit": 20})}[op]
                t0 = time.perf_counter()
                r = await client.get(path, params=params)
                lat[op].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1

        await asyncio.gather(*(one(random.Random(i)) for i in range(clients)))
    lat["errors"] = [float(errors)]
    return lat


async def _submit(url: str, key: str, model: str, file_id: str, n: int, clients: int) -> tuple[float, int]:
    import httpx

    queue = list(range(n))
    failed = 0
    async with httpx.AsyncClient(base_url=f"{url}/v1", headers={"Authorization": f"Bearer {key}"},
                                 timeout=60) as client:
        async def one() -> None:
            nonlocal failed
            while queue:
                queue.pop()
                r = await client.post("/fine_tuning/jobs", json={"model": model, "training_file": file_id})
                if r.status_code != 200:
                    failed += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(clients)))
        return time.perf_counter() - t0, failed


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")


def bench(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the three measurements; print and write bench/results/api_load.json."""
    import httpx

    from bench.common import print_table, write_result
    from tuneyard.demo.tiny import build_tiny_model, write_sample_jsonl

    ap = argparse.ArgumentParser(prog="python -m bench api_load")
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--submits", type=int, default=1000)
    ap.add_argument("--database-url", default=None, help="e.g. postgresql+psycopg://postgres@127.0.0.1/bench")
    args = ap.parse_args(argv or [])

    with tempfile.TemporaryDirectory(prefix="tuneyard-bench-api-") as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "models" / "tiny-llama")
        data = write_sample_jsonl(work / "train.jsonl")
        home = work / "home"
        home.mkdir()
        env = {"TUNEYARD_LOCAL_ROOTS": str(work / "models"), "TUNEYARD_RUN_WORKER": "false"}
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
        lat = asyncio.run(_load(server.url, key, ids, args.clients, args.seconds))
        submit_s, submit_failed = asyncio.run(_submit(server.url, key, str(model), f["id"], args.submits, 50))
        startup_s = server.startup_s
        server.stop()

        # Submit to running on an idle server with its worker (a fresh home: nothing else queued).
        idle_home = work / "idle"
        idle_home.mkdir()
        idle = _Server(idle_home, {"TUNEYARD_LOCAL_ROOTS": str(work / "models")})
        ikey = idle.key("idle")
        ih = {"Authorization": f"Bearer {ikey}"}
        fi = httpx.post(f"{idle.url}/v1/files", headers=ih, files={"file": ("t.jsonl", data.read_bytes())},
                        data={"purpose": "fine-tune"}, timeout=60).json()
        t0 = time.perf_counter()
        job = httpx.post(f"{idle.url}/v1/fine_tuning/jobs", headers=ih, timeout=60,
                         json={"model": str(model), "training_file": fi["id"]}).json()
        while httpx.get(f"{idle.url}/v1/fine_tuning/jobs/{job['id']}", headers=ih).json()["status"] != "running":
            time.sleep(0.02)
        to_running = time.perf_counter() - t0
        httpx.post(f"{idle.url}/v1/fine_tuning/jobs/{job['id']}/cancel", headers=ih)
        idle.stop()

    total = sum(len(lat[k]) for k in ("retrieve", "list", "events"))
    figures = {
        "jobs_in_store": args.jobs + 1, "clients": args.clients, "seconds": args.seconds,
        "seed_seconds": round(seed_s, 1), "server_startup_s": round(startup_s, 2),
        "requests_per_s": round(total / args.seconds), "errors": int(lat["errors"][0]),
        **{f"{op}_p50_ms": round(_pct(lat[op], 0.5), 1) for op in ("retrieve", "list", "events")},
        **{f"{op}_p99_ms": round(_pct(lat[op], 0.99), 1) for op in ("retrieve", "list", "events")},
        "mean_ms": round(statistics.fmean(lat["retrieve"] + lat["list"] + lat["events"]) * 1000, 1),
        "submits": args.submits, "submit_failed": submit_failed,
        "submit_jobs_per_s": round(args.submits / submit_s, 1),
        "submit_to_running_s": round(to_running, 2),
    }
    targets = {"retrieve_p99_ms": "< 50", "submit_jobs_per_s": ">= 200", "submit_to_running_s": "< 2 + model load",
               "server_startup_s": "< 2"}
    write_result("api_load", figures, targets)
    print_table("api_load", [(k, v, targets.get(k)) for k, v in figures.items()])
    return {"figures": figures, "targets": targets}


if __name__ == "__main__":
    bench(sys.argv[1:])
