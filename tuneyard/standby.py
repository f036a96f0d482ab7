"""The standby order: how the local launcher hands a job to a process that was started, imports done, before
the job existed (``python -m tuneyard.data.prepare --standby``, ``python -m tuneyard.trainer --standby``).

The order is one JSON line on the process's stdin: ``{"root": JOBDIR, "log": LOGFILE, "env": {...}}``. Both
sides of it are here, so that the launcher and the two standbys cannot drift apart.
"""

from __future__ import annotations

import json
import os
import sys


def order_line(root: str, log: str, env: dict[str, str]) -> bytes:
    """The order the launcher writes to a standby's stdin."""
    return (json.dumps({"root": root, "log": log, "env": env}) + "\n").encode()


def take_order() -> str | None:
    """Wait for the order, then become the job's process; its directory, or None when the launcher is gone.

    The job's environment (credentials, thread count) is set before any of it is read, output goes to the
    job's log, and the process works in the job's directory: that is how the worker knows it as the job's.
    """
    line = sys.stdin.readline()
    if not line.strip():
        return None
    order = json.loads(line)
    os.environ.update(order["env"])
    fd = os.open(order["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(order["root"])
    return order["root"]
