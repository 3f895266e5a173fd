#!/usr/bin/env bash
# Set up (if needed) and run the demo: attention on the default device next to SDPA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m torch_xegpu_attn.demo "$@"
