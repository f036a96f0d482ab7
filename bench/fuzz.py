"""A longer hostile-input run: the fuzz tests with many more generated examples, against a real server.

    python -m bench fuzz                    # 200 examples per operation and mode (about 20 minutes on 2 cores)
    python -m bench fuzz --examples 50

Runs ``tests/api/test_fuzz.py`` (schemathesis over every served operation, valid and invalid requests;
hypothesis-generated JSONL uploads and Simplismart multipart jobs; hostile bodies) with
``TUNEYARD_FUZZ_EXAMPLES`` raised, and prints how many requests were made, how many got a 5xx (target 0)
and how long it took. Not part of ``python -m bench`` with no name.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def bench(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the fuzz suite with ``--examples``; print and write bench/results/fuzz.json."""
    from bench.common import print_table, write_result

    ap = argparse.ArgumentParser(prog="python -m bench fuzz")
    ap.add_argument("--examples", type=int, default=200, help="generated examples per operation and mode")
    args = ap.parse_args(argv or [])
    env = {**os.environ, "TUNEYARD_FUZZ_EXAMPLES": str(args.examples), "PYTHONPATH": str(REPO)}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=0",
                           "tests/api/test_fuzz.py"], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    passed = re.search(r"(\d+) passed", proc.stdout)
    failed = re.search(r"(\d+) failed", proc.stdout)
    server_errors = len(re.findall(r"-> 5\d\d:", proc.stdout))
    figures = {"examples_per_operation": args.examples, "tests_passed": int(passed.group(1)) if passed else 0,
               "tests_failed": int(failed.group(1)) if failed else 0, "server_errors": server_errors,
               "minutes": round(seconds / 60, 1)}
    targets = {"server_errors": "0", "tests_failed": "0"}
    write_result("fuzz", figures, targets)
    print_table("fuzz", [(k, v, targets.get(k)) for k, v in figures.items()])
    if proc.returncode != 0:
        print(proc.stdout[-5000:])
    return {"figures": figures, "targets": targets}


if __name__ == "__main__":
    bench(sys.argv[1:])
