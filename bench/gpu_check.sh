#!/usr/bin/env bash
# One command on a lent GPU (issue #17): writes bench/results/gpu_check/gpu_check.md and .json (under 8 minutes on one GPU).
#   bench/gpu_check.sh                       # full size on CUDA
#   bench/gpu_check.sh --tiny --device cpu   # a few seconds on a CPU: checks that the script runs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
exec "$PY" bench/gpu_check.py "$@"
