"""``python -m bench [NAME [ARGS...]]``: run every benchmark, or one with its own arguments."""

from __future__ import annotations

import importlib
import sys

# Each module exposes ``bench(argv) -> {"figures": {...}, "targets": {...}}`` and writes bench/results/NAME.json.
BENCHMARKS = ["train_throughput", "data_prep", "api_load", "time_to_first_step", "inference"]
# Run only when named: they take as long as they are told to (strategies: on a GPU machine only).
ON_DEMAND = ["soak", "fuzz", "spec_fuzz", "strategies"]
# The run of everything keeps to about 15 minutes on a 2-core machine: data_prep on 256 MB there (its
# 1 GB figure is `python -m bench data_prep`; the memory ratio is measured at 10x either way), and
# train_throughput one round of 400 rows against TRL only (the 3 rounds of 2,000 rows with every peer,
# their venvs built on first use, take about an hour: `python -m bench train_throughput`).
ALL_RUN_ARGS = {"data_prep": ["--mb", "256", "--sample-mb", "100"],
                "train_throughput": ["--rows", "400", "--rounds", "1", "--systems", "tuneyard,trl,trl_padding_free"]}


def main(argv: list[str]) -> int:
    """Run the named benchmark (with its arguments) or all of them in order."""
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nbenchmarks: " + ", ".join(BENCHMARKS) + "; when named: " + ", ".join(ON_DEMAND))
        return 0
    if argv:
        name, rest = argv[0], argv[1:]
        if name not in BENCHMARKS + ON_DEMAND:
            print(f"unknown benchmark '{name}'; known: {', '.join(BENCHMARKS + ON_DEMAND)}", file=sys.stderr)
            return 2
        importlib.import_module(f"bench.{name}").bench(rest)
        return 0
    for name in BENCHMARKS:
        importlib.import_module(f"bench.{name}").bench(ALL_RUN_ARGS.get(name, []))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
