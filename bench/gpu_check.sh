#!/usr/bin/env bash
# The prepared GPU check (issue 17): bench/gpu_check.py, bounded to 8 minutes (each part also has its
# own time budget inside). Appends its table to bench/RESULTS_gpu.md.
#   bench/gpu_check.sh               on one H100/H200-class GPU
#   bench/gpu_check.sh --cpu-smoke   tiny sizes on the CPU (make test runs this, < ~60 s)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec timeout --kill-after=10 480 "$PY" bench/gpu_check.py "$@"
