#!/usr/bin/env bash
# The GPU checks of issue 9 as one script (under 8 minutes on one GPU): prints one table.
# Usage: bash bench/gpu.sh   (uses ./.venv when present, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 480 "$PYTHON" bench/gpu.py --device cuda "$@"
