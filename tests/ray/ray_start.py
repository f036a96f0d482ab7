"""``ray start`` with a longer wait for its raylet to register (``python -m tests.ray.ray_start ARGS``).

``ray start`` gives a new raylet a fixed 30 s (not configurable) to show up in the GCS; on the shared two-core
test machine the node's agents can take longer than that to start, and the node start fails for nothing. This
runs Ray's own CLI with that one wait stretched (the clock its start-up loop reads runs slower), nothing else
changed.
"""

from __future__ import annotations

import sys
import time
import types

import ray._private.node as node
from ray.scripts.scripts import main

SLOWER = 6  # 30 s of ray start's wait become 180 s


def _patched_time() -> types.SimpleNamespace:
    shim = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    shim.monotonic = lambda: time.monotonic() / SLOWER
    return shim


if __name__ == "__main__":
    node.time = _patched_time()
    sys.argv = ["ray", *sys.argv[1:]]
    sys.exit(main())
