#!/usr/bin/env bash
# GPU check (<= 8 minutes on one H100/H200, no downloads): a whole `dpfeta run` on a generated
# MNIST-shaped set with run.use_gpu (DP-SGD on Ray Train, sampling and evaluation on the GPU); prints
# per stage the wall time and the GPU-busy fraction, and the DP step's fraction of the fp32 matmul rate.
# Without a GPU it says so, checks the plan on the generated set, and exits 0. See bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
exec timeout 480 "$PY" bench/gpu_check.py "$@"
