"""Job process helpers: log rotation under a live writer, the memory a job's processes hold, the trainer's command."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tuneyard.jobdir import JobDir
from tuneyard.scheduler.joblogs import rotate_logs
from tuneyard.scheduler.launcher import Placement
from tuneyard.scheduler.local import LocalLauncher, resident_bytes


def test_a_log_over_its_size_is_rotated_while_its_writer_goes_on(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "train-1.log"
    writer = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "for i in range(400):\n"
                               "    print(f'line {i:04d} ' + 'x' * 100, flush=True); time.sleep(0.005)"],
                              stdout=log.open("ab"))
    rotated = 0
    while writer.poll() is None:
        rotated += len(rotate_logs(logs, 8 * 1024))
        time.sleep(0.05)
    rotated += len(rotate_logs(logs, 8 * 1024))
    assert rotated >= 2
    assert log.stat().st_size <= 64 * 1024  # never grows far past the limit
    old = (logs / "train-1.log.1").read_bytes()
    assert old.startswith(b"line ") and b"\0" not in old
    # Appending writers land at the new end after a truncation: no hole of zeros at the start.
    current = log.read_bytes()
    assert b"\0" not in current and (not current or current.startswith(b"line "))
    assert b"line 0399" in current + old


def test_resident_bytes_of_live_processes(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "x = bytearray(64 * 2**20); import time; time.sleep(30)"])
    try:
        deadline = time.time() + 20
        while resident_bytes([child.pid]) < 64 * 2**20:
            assert time.time() < deadline
            time.sleep(0.1)
        assert resident_bytes([child.pid, os.getpid()]) > resident_bytes([child.pid])
        assert resident_bytes([999_999_999]) == 0
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("nproc", [1, 2])
def test_one_process_runs_the_trainer_itself_several_run_under_torchrun(tmp_path, nproc):
    """A one-process job skips torchrun's own start-up; more processes need its rendezvous."""
    python = tmp_path / "python"  # stands in for the interpreter: records how it was called
    python.write_text('#!/bin/sh\necho "$@" > "$PWD/argv"\necho "$OMP_NUM_THREADS" > "$PWD/omp"\n')
    python.chmod(0o755)
    jd = JobDir(tmp_path / "ftjob-x").create()
    proc = LocalLauncher(python=str(python)).train("ftjob-x", jd, 1, Placement(cpu_ranks=nproc))
    assert proc.popen.wait(10) == 0
    argv = (jd.root / "argv").read_text().split()
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    assert argv == [*launcher, "-m", "tuneyard.trainer", str(jd.root)]
    assert int((jd.root / "omp").read_text()) == max(1, (os.cpu_count() or 1) // nproc)


def test_job_processes_inherit_no_tuneyard_setting(tmp_path, monkeypatch):
    """What a job needs of the settings is in its spec: the environment carries only what the worker hands over."""
    monkeypatch.setenv("TUNEYARD_MAX_TOKENS_PER_JOB", "5")
    monkeypatch.setenv("TUNEYARD_SECRET_KEY", "installation-key")
    jd = JobDir(tmp_path / "ftjob-env").create()
    probe = "import os, json; print(json.dumps(sorted(k for k in os.environ if k.startswith('TUNEYARD_'))))"
    proc = LocalLauncher()._spawn("ftjob-env", "probe", [sys.executable, "-c", probe], jd, 0,
                                  {"TUNEYARD_SOURCE_CREDENTIALS": "{}"})
    assert proc.popen.wait(60) == 0
    seen = (jd.logs / "probe-0.log").read_text().strip().splitlines()[-1]
    assert seen == '["TUNEYARD_JOB_ID", "TUNEYARD_SOURCE_CREDENTIALS"]'
