"""`tuneyard demo`, the README's first command: a real job through the HTTP API on the tiny model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_the_demo_trains_and_shows_the_result(tmp_path):
    home = tmp_path / "demo-home"
    proc = subprocess.run([sys.executable, "-m", "tuneyard.cli", "demo", "--home", str(home)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"ftjob-\w+ succeeded", out), out[-3000:]
    first, last = map(float, re.search(r"training loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < first / 10, out[-2000:]
    adapter = Path(re.search(r"adapter: (\S+)", out).group(1))
    assert (adapter / "adapter_model.safetensors").exists() or any(adapter.rglob("adapter_model.safetensors"))
    assert "'Paris.'" in out  # the tiny model learned the task: the sample question is answered after training
    assert re.search(r"done in \d+ s", out)
