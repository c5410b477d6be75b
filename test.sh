#!/usr/bin/env bash
# Sets up .venv (first run only) and runs the test suite. GPU tests skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
