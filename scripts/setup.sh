#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the pinned
# dependencies, and this package built in it (with its C++ launcher).
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! command -v cc >/dev/null 2>&1; then
    echo "setup: a C compiler (cc) is needed to build the launcher and link kernels" >&2
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq gcc g++ >/dev/null
    else
        exit 1
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation -e .
.venv/bin/python -c "import torch_xegpu_attn, torch_xegpu_attn._C; print('torch-xegpu-attn', torch_xegpu_attn.__version__, 'ready')"
