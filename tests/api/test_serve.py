"""`tuneyard serve` with several HTTP processes: one port, one job worker, key revocation seen by every process,
and no process left behind by SIGTERM or by kill -9 of the serving process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tuneyard.demo.tiny import write_sample_jsonl


def http_processes(pid: int) -> list[int]:
    """The HTTP processes `tuneyard serve` (pid) started."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    out = []
    for child in children:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"tuneyard.api.serve" in cmdline:
            out.append(int(child))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.time() + timeout
    while any(alive(p) for p in pids):
        assert time.time() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.1)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir):
    s = Server(tmp_path_factory.mktemp("serve-home"), {"TUNEYARD_API_WORKERS": "2",
                                                       "TUNEYARD_AUTH_CACHE_SECONDS": "1"})
    shutil.copytree(tiny_model_dir, s.local / "tiny-llama")
    yield s
    s.stop()


def test_several_http_processes_answer_on_one_port(srv):
    assert len(http_processes(srv.proc.pid)) == 2
    key = srv.key("acme")

    def get(_: int) -> int:
        # A new connection each time: the kernel hands them to either process.
        return httpx.get(f"{srv.base_url}/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {key}"}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(get, range(80))) == {200}


def test_a_revoked_key_stops_working_in_every_process_within_the_cache_time(srv):
    key = srv.key("revoked")
    h = {"Authorization": f"Bearer {key}"}
    for _ in range(10):
        assert httpx.get(f"{srv.base_url}/v1/fine_tuning/jobs", headers=h).status_code == 200
    key_id = key.split("-")[1]
    subprocess.run([sys.executable, "-m", "tuneyard.cli", "keys", "revoke", key_id, "--org", "revoked"],
                   env=srv.env, check=True, capture_output=True)
    time.sleep(1.2)  # TUNEYARD_AUTH_CACHE_SECONDS=1
    codes = {httpx.get(f"{srv.base_url}/v1/fine_tuning/jobs", headers=h).status_code for _ in range(20)}
    assert codes == {401}


def test_the_job_worker_runs_in_the_serving_process(srv, tmp_path):
    client = srv.openai(srv.key("work"))
    f = client.files.create(file=write_sample_jsonl(tmp_path / "t.jsonl").open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=str(srv.local / "tiny-llama"), training_file=f.id)
    deadline = time.time() + 120
    while (j := client.fine_tuning.jobs.retrieve(job.id)).status == "validating_files":
        assert time.time() < deadline, "no worker picked the job up"
        time.sleep(0.2)
    assert j.status in ("queued", "running", "succeeded"), j.error
    client.fine_tuning.jobs.cancel(job.id)


def test_sigterm_stops_every_http_process(tmp_path):
    s = Server(tmp_path / "home", {"TUNEYARD_API_WORKERS": "2", "TUNEYARD_RUN_WORKER": "false"})
    children = http_processes(s.proc.pid)
    assert len(children) == 2
    s.stop()
    assert s.proc.returncode == 0
    wait_gone(children, 10)
    assert port_free(s.port)


def test_kill_9_of_the_serving_process_takes_its_http_processes_down(tmp_path):
    s = Server(tmp_path / "home", {"TUNEYARD_API_WORKERS": "2", "TUNEYARD_RUN_WORKER": "false"})
    children = http_processes(s.proc.pid)
    assert len(children) == 2
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait()
    s.log.close()
    wait_gone(children, 10)
    assert port_free(s.port)
    # A new server takes the same home at once.
    s2 = Server(tmp_path / "home", {"TUNEYARD_API_WORKERS": "2", "TUNEYARD_RUN_WORKER": "false"})
    try:
        assert httpx.get(f"{s2.base_url}/healthz").status_code == 200
    finally:
        s2.stop()


def test_an_http_process_that_dies_is_started_again(tmp_path):
    s = Server(tmp_path / "home", {"TUNEYARD_API_WORKERS": "2", "TUNEYARD_RUN_WORKER": "false"})
    try:
        victim = http_processes(s.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.time() + 20
        while not (len(after := http_processes(s.proc.pid)) == 2 and victim not in after):
            assert time.time() < deadline, "the HTTP process was not replaced"
            time.sleep(0.1)
        assert httpx.get(f"{s.base_url}/healthz").status_code == 200
    finally:
        s.stop()
