"""A Hub push is refused before any work when this machine is offline by configuration (HF_HUB_OFFLINE=1) or the
Hub does not answer (real huggingface_hub in a fresh process: it reads its environment at import); a merge beyond
TUNEYARD_EXPORT_MAX_BYTES is refused before anything is loaded."""

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


def test_a_merge_beyond_the_size_bound_is_refused_before_loading(tiny_model_dir, tmp_path):
    from tuneyard.inference.export import ExportError, ExportJob, run

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")  # never read: the bound is checked first
    job = ExportJob(source=str(adapter), base=str(tiny_model_dir), out=str(tmp_path / "out"), merged=True,
                    max_bytes=1024)
    with pytest.raises(ExportError) as e:
        run(job)
    assert e.value.status == 413 and e.value.param == "merged" and e.value.code == "export_too_large"
    assert "TUNEYARD_EXPORT_MAX_BYTES" in e.value.message and not (tmp_path / "out").exists()
