#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and installs pallas_attention (editable) with
# JAX 0.11.2, flax, chex and pytest. Safe to run again: reuses a good .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$candidate"; return
    fi
  done
  # pyenv installs that are not the active version (as on the CI machine).
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
    if [ -x "$candidate" ]; then echo "$candidate"; return; fi
  done
  echo "error: need Python >= 3.12 (JAX 0.11 requires it); set PYTHON=/path/to/python3.12" >&2
  exit 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  rm -rf .venv
  "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -c 'import jax, pallas_attention; print("jax", jax.__version__, "on", jax.default_backend(), "| pallas_attention", pallas_attention.__version__)'
