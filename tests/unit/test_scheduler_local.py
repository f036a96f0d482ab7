"""Job process helpers: log rotation under a live writer, and the memory a job's processes hold."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tuneyard.scheduler.local import resident_bytes, rotate_logs


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
