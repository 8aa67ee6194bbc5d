#!/usr/bin/env bash
# The GPU proof, one command: the CUDA tests, then bench/gpu_proof.py's measurements. Runs with
# torch alone (PYTHONPATH=src; no MLflow, DVC or Optuna needed) and writes
#   $OUT_DIR/<device>.json, <device>.md   (default bench/results/)
#   $OUT_DIR/cuda-tests.xml               (the pytest -m cuda results)
# Usage: bash bench/gpu-proof.sh [--dev-archive cifar10-real-dev-subset.tar.gz] [--smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
out=${OUT_DIR:-bench/results}
mkdir -p "$out"
python - <<'PY'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (CPU)'}")
PY
# -o addopts=: the project's pytest options assume the dev install; -p no:cacheprovider: a
# read-only checkout is fine. The tests skip themselves where no CUDA device is visible.
status=0
python -m pytest -o addopts= -p no:cacheprovider -q -rs -m cuda tests/test_cuda.py \
  --junitxml "$out/cuda-tests.xml" || status=$?
python bench/gpu_proof.py --out "$out" "$@"
exit "$status"
