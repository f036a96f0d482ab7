"""The job's log files: rotation of a running job's logs, whatever launcher started its processes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def rotate_logs(logs: Path, max_bytes: int) -> list[Path]:
    """Move each log over ``max_bytes`` to ``NAME.1`` (replacing the last one) and empty it; the rotated logs.

    The job's processes keep writing to their open file: it was opened for appending, so after the
    truncation their writes land at the new end (copy-then-truncate, as logrotate's copytruncate).
    """
    rotated = []
    for log in logs.glob("*.log"):
        try:
            if log.stat().st_size <= max_bytes:
                continue
            shutil.copyfile(log, log.with_name(log.name + ".1"))
            os.truncate(log, 0)
        except OSError:
            continue
        rotated.append(log)
    return rotated
