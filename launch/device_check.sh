#!/usr/bin/env bash
# One device check on a GPU or TPU host (about 8 minutes on one H100 / H200 or one TPU host):
# kernel correctness vs the reference in bf16, the attention benchmark, 1024 px 50-step
# text-to-image with random full-width weights, a 7B train step on a layer slice with MFU, peak
# memory. Writes OUT/device_check.json and OUT/device_check.md (default OUT: runs/device_check).
#   launch/device_check.sh [OUT] [extra args of python -m bagel_jax.bench device]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/device_check}"
shift || true
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
if [ "$("$PY" -c 'import jax; print(jax.default_backend())')" = gpu ]; then
  # the GPU-only numeric tests (cuDNN against the reference), deselected on CPU
  timeout 120 "$PY" -m pytest -q -m gpu tests/test_attention_api.py 2>&1 | tee "$OUT/gpu_tests.log" || true
fi
exec timeout 900 "$PY" -m bagel_jax.bench device --out "$OUT" "$@"
