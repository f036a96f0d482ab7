#!/usr/bin/env bash
# Install the test dependencies into .venv (CPU torch first) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The dashboard's browser tests drive Debian's chromium (Playwright's own browser download is not used).
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -q && apt-get install -y -q chromium
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
ruff check tuneyard tests
# The slowest tests are printed: the suite is to stay under 20 minutes on 2 cores.
python -m pytest -q -p no:cacheprovider --durations=30 "$@"
