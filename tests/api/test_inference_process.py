"""The inference process's life: run apart with `tuneyard infer` (autostart off), on its configured port, its
address file private; a slow start is a 503 the client can retry, never a 500; the API process never loads torch."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time

import openai
import pytest

from tests.conftest import Server, free_port
from tuneyard.client import wait_healthy

MESSAGES = [{"role": "user", "content": "What is the capital of Japan?"}]


def _server(tmp_path_factory, tiny_model_dir, name: str, env: dict[str, str]) -> Server:
    home = tmp_path_factory.mktemp(name)
    base = home / "local" / "tiny-llama"
    srv = Server(home, {"TUNEYARD_RUN_WORKER": "false", "TUNEYARD_BASE_MODELS": str(base), **env})
    shutil.copytree(tiny_model_dir, base)
    srv.model_dir = str(base)
    return srv


def test_infer_run_apart_serves_the_server(tmp_path_factory, tiny_model_dir):
    port = free_port()
    srv = _server(tmp_path_factory, tiny_model_dir, "apart",
                  {"TUNEYARD_INFERENCE_AUTOSTART": "false", "TUNEYARD_INFERENCE_PORT": str(port)})
    infer = None
    try:
        client = srv.openai(srv.key("acme"))
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=srv.model_dir, messages=MESSAGES, max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "inference_unavailable"
        assert "tuneyard infer" in e.value.body["message"]
        infer = subprocess.Popen([sys.executable, "-m", "tuneyard.cli", "infer"], env=srv.env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_healthy(f"http://127.0.0.1:{port}", timeout=120)
        address = srv.home / "run" / "inference.json"
        assert stat.S_IMODE(address.stat().st_mode) == 0o600
        r = client.chat.completions.create(model=srv.model_dir, messages=MESSAGES, max_tokens=2)
        assert r.usage.completion_tokens >= 1
        with open(f"/proc/{srv.proc.pid}/maps") as f:
            assert "libtorch" not in f.read()  # the API process only forwarded the request
    finally:
        if infer is not None:
            infer.terminate()
            infer.wait(30)
        srv.stop()
    assert not (srv.home / "run" / "inference.json").exists()  # it removes its address on the way out


def test_a_slow_start_is_a_503_then_served(tmp_path_factory, tiny_model_dir):
    srv = _server(tmp_path_factory, tiny_model_dir, "slow", {"TUNEYARD_INFERENCE_START_SECONDS": "0.3"})
    try:
        client = srv.openai(srv.key("acme"))
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=srv.model_dir, messages=MESSAGES, max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "inference_unavailable"
        deadline = time.time() + 120
        while True:
            try:
                client.chat.completions.create(model=srv.model_dir, messages=MESSAGES, max_tokens=2)
                break
            except openai.APIStatusError as e:
                assert e.status_code == 503 and time.time() < deadline
                time.sleep(0.5)
        pid = int(__import__("json").loads((srv.home / "run" / "inference.json").read_text())["pid"])
    finally:
        srv.stop()
    deadline = time.time() + 20
    while time.time() < deadline:  # the server stops the inference process it started
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the inference process outlived its server")


def test_inference_process_killed_mid_generation_is_a_503_and_restarts(tmp_path_factory, tiny_model_dir):
    import json
    import signal

    srv = _server(tmp_path_factory, tiny_model_dir, "killed", {})
    try:
        client = srv.openai(srv.key("acme"))
        client.chat.completions.create(model=srv.model_dir, messages=MESSAGES, max_tokens=1)
        pid = json.loads((srv.home / "run" / "inference.json").read_text())["pid"]
        stream = client.chat.completions.create(model=srv.model_dir, messages=MESSAGES, max_tokens=1000,
                                                stream=True, stop=["<never>"])
        next(iter(stream))
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(openai.APIError) as e:  # the SDK raises on the stream's error chunk
            for _ in stream:
                pass
        assert "inference process stopped answering" in str(e.value.message)
        r = client.chat.completions.create(model=srv.model_dir, messages=MESSAGES, max_tokens=2)
        assert r.usage.completion_tokens >= 1  # a new inference process took over
        assert json.loads((srv.home / "run" / "inference.json").read_text())["pid"] != pid
    finally:
        srv.stop()


def test_rate_and_size_limits_apply_to_inference(tmp_path_factory, tiny_model_dir):
    srv = _server(tmp_path_factory, tiny_model_dir, "limits",
                  {"TUNEYARD_RATE_LIMIT_PER_SECOND": "0.01", "TUNEYARD_RATE_LIMIT_BURST": "2",
                   "TUNEYARD_MAX_REQUEST_BYTES": "2000"})
    try:
        client = srv.openai(srv.key("acme"))
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=srv.model_dir, messages=[{"role": "user", "content": "x" * 5000}])
        assert e.value.status_code == 413
        for _ in range(2):  # the burst
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model="nope", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="nope", prompt="hi")
    finally:
        srv.stop()


def test_several_api_processes_share_one_inference_process(tmp_path_factory, tiny_model_dir):
    import json
    from concurrent.futures import ThreadPoolExecutor

    home = tmp_path_factory.mktemp("workers")
    base = home / "local" / "tiny-llama"
    shutil.copytree(tiny_model_dir, base)
    srv = Server(home, {"TUNEYARD_RUN_WORKER": "false", "TUNEYARD_BASE_MODELS": str(base),
                        "TUNEYARD_RATE_LIMIT_PER_SECOND": "0"}, args=("--api-workers", "2"))
    try:
        client = srv.openai(srv.key("acme"))
        with ThreadPoolExecutor(8) as pool:  # spread over both HTTP processes, all asking at once
            done = list(pool.map(lambda _: client.chat.completions.create(
                model=str(base), messages=MESSAGES, max_tokens=2), range(8)))
        assert all(r.usage.completion_tokens >= 1 for r in done)
        pid = json.loads((home / "run" / "inference.json").read_text())["pid"]
        servers = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).endswith("tuneyard.inference.server")
                   and f"TUNEYARD_HOME={home}" in _environ(p)]
        assert servers == [str(pid)], servers
    finally:
        srv.stop()


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _environ(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""
