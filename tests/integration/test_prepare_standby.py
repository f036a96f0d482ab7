"""The worker keeps a prepare process and a trainer process ready, imports done; a job's steps are handed to them."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tuneyard.demo.tiny import write_sample_jsonl
from tuneyard.scheduler.local import job_processes, pid_alive

TRAINER = b"tuneyard.trainer"


def standby_pids(parent: int, module: bytes = b"tuneyard.data.prepare") -> list[int]:
    """The waiting standby processes of ``module`` (the prepare step's by default) the server ``parent`` started."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            args = (p / "cmdline").read_bytes().split(b"\0")
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and module in args and b"--standby" in args and not _handed(p):
            out.append(int(p.name))
    return out


def _handed(proc: Path) -> bool:
    # A standby given a job works in the job's directory (and may still be winding down after it).
    try:
        return "/jobs/" in os.readlink(proc / "cwd")
    except OSError:
        return True


def wait_for(cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while not (value := cond()):
        assert time.time() < deadline, what
        time.sleep(0.1)
    return value


def test_a_jobs_prepare_step_runs_in_the_standby_process(server, tmp_path):
    pid = server.proc.pid
    client = server.openai(server.key("standby"))
    f = client.files.create(file=write_sample_jsonl(tmp_path / "t.jsonl").open("rb"), purpose="fine-tune")
    # The worker starts one when it has no prepare step running; give it time to import.
    ready = wait_for(lambda: standby_pids(pid), 60, "no standby prepare process")
    assert len(ready) == 1
    standby = ready[0]
    time.sleep(5)
    job = client.fine_tuning.jobs.create(model=server.model_dir, training_file=f.id,
                                         hyperparameters={"n_epochs": 1})
    jd = server.home / "jobs" / "standby" / job.id
    # The standby, given the job, works in its directory: the worker knows it as the job's process.
    wait_for(lambda: (jd / "prepare.pid").exists(), 30, "no prepare step started")
    assert int((jd / "prepare.pid").read_text()) == standby
    if pid_alive(standby, job.id):
        assert standby in job_processes(jd)
    deadline = time.time() + 60
    while (j := client.fine_tuning.jobs.retrieve(job.id)).status == "validating_files":
        assert time.time() < deadline
        time.sleep(0.1)
    assert j.status in ("queued", "running", "succeeded"), j.error
    log = (jd / "logs" / "prepare-0.log").read_text()
    assert "Validating training file" in log and "Resolved hyperparameters" in log, log
    # Another one is made ready for the next job.
    wait_for(lambda: [p for p in standby_pids(pid) if p != standby], 60, "no new standby")
    client.fine_tuning.jobs.cancel(job.id)


def test_a_cpu_jobs_trainer_runs_in_the_standby_trainer(server, tmp_path):
    pid = server.proc.pid
    client = server.openai(server.key("trainer-standby"))
    f = client.files.create(file=write_sample_jsonl(tmp_path / "t.jsonl").open("rb"), purpose="fine-tune")
    # Started while no trainer runs; imports transformers, TRL and PEFT before it is needed.
    ready = wait_for(lambda: standby_pids(pid, TRAINER), 60, "no standby trainer process")
    assert len(ready) == 1
    standby = ready[0]
    job = client.fine_tuning.jobs.create(model=server.model_dir, training_file=f.id,
                                         hyperparameters={"n_epochs": 2, "batch_size": 2,
                                                                          "learning_rate_multiplier": 10})
    jd = server.home / "jobs" / "trainer-standby" / job.id
    wait_for(lambda: (jd / "train.pid").exists(), 90, "no trainer started")
    assert int((jd / "train.pid").read_text()) == standby
    # In the job's directory, the worker knows it as the job's (memory limit, cancel, adoption after a restart).
    if pid_alive(standby, job.id):
        assert standby in job_processes(jd)
        # No second one imports beside a running trainer.
        assert standby_pids(pid, TRAINER) == []
    deadline = time.time() + 180
    while (j := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, j.status
        time.sleep(0.2)
    assert j.status == "succeeded", j.error
    log = (jd / "logs" / "train-1.log").read_text()
    assert "result: succeeded" in log, log[-2000:]
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000)
    rows = [e.data for e in events if e.type == "metrics" and e.data and e.data.get("train_loss") is not None]
    # It learns: the second pass over the same rows has the lower mean loss (single steps are too noisy to say).
    passes = [[r["train_loss"] for r in rows if (r["epoch"] > 1) == second] for second in (False, True)]
    assert all(passes) and sum(passes[1]) / len(passes[1]) < sum(passes[0]) / len(passes[0]), rows
    # The next one is made ready once the trainer is gone.
    wait_for(lambda: [p for p in standby_pids(pid, TRAINER) if p != standby], 60, "no new standby trainer")
