"""What kind of file system object a path is, so a message can say what is really wrong with it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def special_kind(path: str | Path) -> str | None:
    """``"a FIFO (named pipe)"``, ``"a socket"``... for a path that exists but is neither a regular file nor a
    directory (symlinks followed), else None. Reading such a path blocks or never ends, so it must not be opened."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return next((what for test, what in _KINDS if test(mode)), None)
