#!/usr/bin/env bash
# The GPU proof, one command (docs/gpu.md "The GPU proof"): bench/gpu_proof.py's sections, the
# CUDA tests among them, with torch alone (PYTHONPATH=src; no MLflow, DVC or Optuna). Writes,
# section by section, into $OUT (what the GPU machine sends back; else $OUT_DIR, else
# bench/results):
#   gpu-proof.json, gpu-proof.md   every figure, the device and versions; the table
#   gpu-proof.log                  this command's output
#   cuda-tests.xml                 the pytest -m cuda results
# Usage: bash bench/gpu-proof.sh [--dev-archive gpu-data/cifar10-real-dev-subset.tar.gz]
#                                [--smoke] [--sections default,alexnet_paper] [...]
set -uo pipefail
cd "$(dirname "$0")/.."
# The GPU machine guarantees python3; `python` may not exist there.
py=$(command -v python3 || command -v python) || { echo "gpu-proof: no python3 or python" >&2; exit 127; }
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT:-${OUT_DIR:-bench/results}}
mkdir -p "$out"
"$py" bench/gpu_proof.py --out "$out" "$@" 2>&1 | tee "$out/gpu-proof.log"
exit "${PIPESTATUS[0]}"
