"""Soak: many short jobs while the server and trainers are killed at random moments; nothing may be lost.

    python -m bench soak                            # 200 jobs, 10 minutes of faults (the issue's figure)
    python -m bench soak --jobs 20 --minutes 2      # a quick look

A real ``tuneyard serve`` (its own home, the tiny model, CPU) takes jobs through the OpenAI API. Jobs are
submitted at an even pace over the fault window, each with an ``Idempotency-Key`` and retried until the
server answers (so a submission that hit a dying server is retried, as the SDK would). Meanwhile, at
random intervals, the server is ``kill -9``ed and started again, or a random running trainer's process
group is ``kill -9``ed (an OOM kill, a node crash). After the window the server is left alone until every
job has ended (or ``--settle-minutes`` pass). Printed: jobs submitted, succeeded, failed (by error code),
lost (a submission the server does not know: must be 0), unfinished (still queued or running when the
settling time ran out: the machine was too slow for the load, see their events), duplicated (jobs
created twice for one submission, or a training step reported twice: must be 0), and the mean recovery
time after each kind of fault (server: kill to healthy again; trainer: kill to the job's next training
step, or its end).

Not part of ``python -m bench`` with no name: it runs for ``--minutes`` plus the settling time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import free_port, stop_process

REPO = Path(__file__).resolve().parent.parent



class _Server:
    """``tuneyard serve`` as a subprocess that can be killed and started again on the same home and port."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.port = free_port()
        self.env = {**os.environ, **env, "TUNEYARD_HOME": str(home), "TUNEYARD_PORT": str(self.port),
                    "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = (home / "soak-server.log").open("ab")

    def start(self) -> float:
        """Start it; seconds until it answers /healthz."""
        t0 = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "tuneyard.cli", "serve"], env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        import httpx

        while time.time() - t0 < 120:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return time.time() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not come up; see {self.log.name}")

    def kill(self) -> None:
        """``kill -9``, as a crash or an OOM kill would."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM (drains) and wait."""
        if self.proc is not None:
            stop_process(self.proc, 120)
        self.log.close()

    def cli(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "tuneyard.cli", *args], env=self.env, capture_output=True,
                             text=True, check=True, cwd=REPO)
        return out.stdout.strip().splitlines()[-1]


class _Api:
    def __init__(self, server: _Server, key: str) -> None:
        import httpx

        self.server = server
        self.client = httpx.Client(base_url=f"{server.url}/v1", headers={"Authorization": f"Bearer {key}"},
                                   timeout=20)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        """One request; None when the server is down or answers 5xx (the caller retries)."""
        import httpx

        try:
            r = self.client.request(method, path, **kw)
        except httpx.HTTPError:
            return None
        if r.status_code >= 500:
            return None
        r.raise_for_status()
        return r.json()

    def all_jobs(self) -> list[dict]:
        jobs, after = [], None
        while True:
            page = self.call("GET", "/fine_tuning/jobs", params={"limit": 100, **({"after": after} if after else {})})
            if page is None:
                time.sleep(1)
                continue
            jobs += page["data"]
            if not page["has_more"]:
                return jobs
            after = page["data"][-1]["id"]

    def events(self, job_id: str) -> list[dict]:
        while (page := self.call("GET", f"/fine_tuning/jobs/{job_id}/events", params={"limit": 1000})) is None:
            time.sleep(1)
        return page["data"]


def _running_trainers(home: Path) -> list[tuple[str, int]]:
    from tuneyard.scheduler.local import pid_alive

    found = []
    for pid_file in home.glob("jobs/*/*/train.pid"):
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            continue
        job_id = pid_file.parent.name
        if pid_alive(pid, job_id) and not (pid_file.parent / "result.json").exists():
            found.append((job_id, pid))
    return found


def bench(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the soak; print and write bench/results/soak.json."""
    from bench.common import print_table, write_result
    from tuneyard.demo.tiny import build_tiny_model, write_sample_jsonl

    ap = argparse.ArgumentParser(prog="python -m bench soak")
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long faults are injected")
    ap.add_argument("--settle-minutes", type=float, default=30.0, help="most time allowed for jobs to end after")
    ap.add_argument("--fault-every", type=float, default=30.0, help="mean seconds between faults")
    ap.add_argument("--slots", type=int, default=2, help="trainers at once (TUNEYARD_CPU_SLOTS)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv or [])
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory(prefix="tuneyard-soak-") as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "models" / "tiny-llama")
        home = work / "home"
        home.mkdir()
        server = _Server(home, {"TUNEYARD_LOCAL_ROOTS": str(work / "models"), "TUNEYARD_CPU_SLOTS": str(args.slots),
                                "TUNEYARD_MAX_ACTIVE_JOBS_PER_ORG": "0", "TUNEYARD_RATE_LIMIT_PER_SECOND": "0"})
        server.start()
        api = _Api(server, server.cli("keys", "create", "--org", "soak"))
        data = write_sample_jsonl(work / "train.jsonl")
        while (file := api.call("POST", "/files", files={"file": ("train.jsonl", data.read_bytes())},
                                data={"purpose": "fine-tune"})) is None:
            time.sleep(1)

        window = args.minutes * 60
        t_start = time.time()
        submit_at = [t_start + window * 0.8 * i / max(1, args.jobs) for i in range(args.jobs)]
        submitted: dict[int, str] = {}
        next_fault = t_start + rng.expovariate(1 / args.fault_every)
        server_recoveries: list[float] = []
        trainer_kills: list[tuple[str, float]] = []  # (job, when)
        trainer_recoveries: list[float] = []
        n_server_kills = 0
        while time.time() - t_start < window or len(submitted) < args.jobs:
            now = time.time()
            for i in range(len(submitted), args.jobs):
                if submit_at[i] > now:
                    break
                job = api.call("POST", "/fine_tuning/jobs", headers={"Idempotency-Key": f"soak-{i}"}, json={
                    "model": str(model), "training_file": file["id"], "suffix": f"soak{i}",
                    "metadata": {"soak": str(i)}, "hyperparameters": {"n_epochs": 2, "batch_size": 4}})
                if job is None:
                    break  # the server is down: retried, with the same key, on the next pass
                submitted[i] = job["id"]
            if now >= next_fault and now - t_start < window:
                trainers = _running_trainers(home)
                if trainers and rng.random() < 0.6:
                    job_id, pid = rng.choice(trainers)
                    try:
                        os.killpg(pid, signal.SIGKILL)
                        trainer_kills.append((job_id, time.time()))
                    except ProcessLookupError:
                        pass
                else:
                    t_kill = time.time()
                    server.kill()
                    n_server_kills += 1
                    time.sleep(rng.uniform(0.5, 3.0))
                    server.start()
                    server_recoveries.append(time.time() - t_kill)
                next_fault = time.time() + rng.expovariate(1 / args.fault_every)
            # Recovery of killed trainers: the job's next training step after the kill, or its end.
            for job_id, t_kill in list(trainer_kills):
                j = api.call("GET", f"/fine_tuning/jobs/{job_id}")
                if j is None:
                    continue
                later = [e for e in api.events(job_id) if e["created_at"] > t_kill and e["type"] == "metrics"]
                if later or j["status"] in ("succeeded", "failed", "cancelled"):
                    first = min((e["created_at"] for e in later), default=time.time())
                    trainer_recoveries.append(first - t_kill)
                    trainer_kills.remove((job_id, t_kill))
            time.sleep(0.5)

        deadline = time.time() + args.settle_minutes * 60
        terminal = ("succeeded", "failed", "cancelled")
        while time.time() < deadline:
            jobs = api.all_jobs()
            if all(j["status"] in terminal for j in jobs) and len(jobs) >= len(set(submitted.values())):
                break
            time.sleep(2)
        jobs = api.all_jobs()
        by_submission = Counter(j["metadata"]["soak"] for j in jobs if j.get("metadata", {}).get("soak"))
        known = {j["id"]: j for j in jobs}
        lost = [i for i, job_id in submitted.items() if job_id not in known]
        # Known but still going when the settling time ran out: slow, not lost (their events say where they are).
        unfinished = [i for i, job_id in submitted.items()
                      if job_id in known and known[job_id]["status"] not in terminal]
        duplicated_jobs = sum(n - 1 for n in by_submission.values() if n > 1)
        duplicated_steps = 0
        for j in jobs:
            steps = [e["data"]["step"] for e in api.events(j["id"])
                     if e["type"] == "metrics" and "train_loss" in (e.get("data") or {})]
            duplicated_steps += len(steps) - len(set(steps))
        failed = Counter((j.get("error") or {}).get("code") or "?" for j in jobs if j["status"] == "failed")
        server.stop()

    figures = {
        "jobs_submitted": len(submitted),
        "succeeded": sum(1 for j in jobs if j["status"] == "succeeded"),
        "failed": sum(failed.values()),
        "failed_by_reason": json.dumps(dict(failed)) if failed else "-",
        "lost": len(lost),
        "unfinished": len(unfinished),
        "duplicated_jobs": duplicated_jobs,
        "duplicated_steps": duplicated_steps,
        "server_kills": n_server_kills,
        "trainer_kills": len(trainer_recoveries) + len(trainer_kills),
        "mean_recovery_s_server": round(sum(server_recoveries) / len(server_recoveries), 1)
        if server_recoveries else None,
        "mean_recovery_s_trainer": round(sum(trainer_recoveries) / len(trainer_recoveries), 1)
        if trainer_recoveries else None,
        "minutes": args.minutes,
    }
    targets = {"lost": "0", "duplicated_jobs": "0", "duplicated_steps": "0"}
    write_result("soak", figures, targets, {"lost_submissions": lost})
    print_table("soak", [(k, v, targets.get(k)) for k, v in figures.items()])
    return {"figures": figures, "targets": targets}


if __name__ == "__main__":
    bench(sys.argv[1:])
