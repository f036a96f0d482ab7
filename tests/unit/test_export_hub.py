"""A Hub push is refused before any work when this machine is offline by configuration (HF_HUB_OFFLINE=1) or the
Hub does not answer; real huggingface_hub in a fresh process (it reads its environment at import)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import free_port

PROBE = """
from tuneyard.inference.export import ExportError, HubPush, check_hub
push = HubPush(repo_id="me/m", token="hf_secret_value")
assert "hf_secret_value" not in repr(push) + str(push)
try:
    check_hub(push)
except ExportError as e:
    print(e.status, e.code, e.param, "|", e.message)
"""


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "closed"}])
def test_hub_push_is_refused_offline(env):
    if env.get("HF_ENDPOINT") == "closed":
        env = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    head, message = out.strip().split(" | ")
    assert head == "400 hub_unreachable push_to_hub"
    assert "cannot be reached" in message and "nothing was pushed to me/m" in message
    assert "hf_secret_value" not in out
