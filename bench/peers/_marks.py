"""What a peer script reports back: wall-clock marks, the loop's process CPU time and the logged losses.

Imported by the peer scripts, which run in other virtual environments: standard library and transformers only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

# Taken at import, i.e. as the script starts (before torch and the peer's own imports).
_T0 = time.time()


class Marks:
    """Named time.time() marks, the training loop's CPU seconds and the losses of its logging steps."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {"start": _T0}
        self.cpu: dict[str, float] = {}
        self.losses: dict[int, float] = {}

    def mark(self, name: str) -> None:
        """Record that the script reached ``name`` now."""
        self.marks[name] = time.time()

    def callback(self) -> Any:
        """A transformers TrainerCallback recording train begin/end (wall and process CPU) and each loss."""
        from transformers import TrainerCallback

        outer = self

        class _Cb(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                outer.mark("train_begin")
                outer.cpu["train_begin"] = time.process_time()

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    outer.losses[int(state.global_step)] = float(logs["loss"])

            def on_train_end(self, args, state, control, **kw):
                outer.mark("train_end")
                outer.cpu["train_end"] = time.process_time()
                outer.steps = int(state.global_step)

        return _Cb()

    def write(self, path: str | Path, **extra: Any) -> None:
        """Write everything recorded (and ``extra``) as JSON to ``path``."""
        body = {"marks": self.marks, "cpu": self.cpu, "losses": self.losses,
                "steps": getattr(self, "steps", None), **extra}
        Path(path).write_text(json.dumps(body))


def load_config(argv: list[str]) -> tuple[dict[str, Any], Path]:
    """``SCRIPT CONFIG.json OUT.json``: the run's settings and where the marks go."""
    if len(argv) != 3:
        sys.exit(f"usage: {argv[0]} CONFIG.json OUT.json")
    return json.loads(Path(argv[1]).read_text()), Path(argv[2])
