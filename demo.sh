#!/usr/bin/env bash
# Sets up .venv (first run only) and runs the demo: flash_attention against
# jax.nn.dot_product_attention, errors and (on a GPU) timings.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
