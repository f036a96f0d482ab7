"""Shared fixtures: a tiny random model + tokenizer built locally (no hub), and sample data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Code under test that reads the settings in-process (the prepare step, the CLI) must never touch the
# user's real ~/.tuneyard: give the whole session a throwaway home. Server fixtures set their own.
os.environ.setdefault("TUNEYARD_HOME", tempfile.mkdtemp(prefix="tuneyard-test-home-"))
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random Llama-shaped model with a ChatML tokenizer, saved with save_pretrained."""
    from tuneyard.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tmp_path_factory) -> Path:
    """A random Qwen2-VL-shaped model with its processor parts (tests/vision.py)."""
    from tests.vision import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2-vl")


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A random LLaVA model (tiny CLIP tower) with its processor (tests/vision.py)."""
    from tests.vision import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture()
def sample_jsonl(tmp_path) -> Path:
    from tuneyard.demo.tiny import write_sample_jsonl

    return write_sample_jsonl(tmp_path / "train.jsonl")


def free_port() -> int:
    """A loopback port nothing listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `tuneyard serve` process (with command-line ``args``) on a free loopback port (or ``port``), with its
    own state directory."""

    def __init__(self, home: Path, env: dict[str, str], args: tuple[str, ...] = (), port: int | None = None) -> None:
        import subprocess
        import sys

        self.port = port or free_port()
        self.home = home
        self.local = home / "local"
        self.local.mkdir(parents=True, exist_ok=True)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "TUNEYARD_HOME": str(home), "TUNEYARD_PORT": str(self.port),
                    "TUNEYARD_HOST": "127.0.0.1", "TUNEYARD_LOCAL_ROOTS": str(self.local),
                    "TUNEYARD_POLL_INTERVAL": "0.2", "TUNEYARD_LOG_LEVEL": "warning", **env}
        self.log = (home / "server.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tuneyard.cli", "serve", *args], env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        from tuneyard.client import wait_healthy

        wait_healthy(self.base_url, timeout=60)

    def key(self, org: str = "acme") -> str:
        import subprocess
        import sys

        out = subprocess.run([sys.executable, "-m", "tuneyard.cli", "keys", "create", "--org", org], env=self.env,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    def openai(self, key: str):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except Exception:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    """A server whose local roots contain the tiny model (as <local>/tiny-llama)."""
    import shutil

    home = tmp_path_factory.mktemp("home")
    srv = Server(home, {})
    shutil.copytree(tiny_model_dir, srv.local / "tiny-llama")
    srv.model_dir = str(srv.local / "tiny-llama")
    yield srv
    srv.stop()
