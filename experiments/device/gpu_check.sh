#!/usr/bin/env bash
# One prepared GPU check (for the device machine: one H100/H200, jax 0.11.2 + CUDA, no network).
#
# Here, from the repo root, first:
#   echo '/.devshared/' >> .git/info/exclude; rm -rf .devshared; cp -r ../shared/device .devshared
#   bash .devshared/fetch_wheels.sh
# Then one device call with carry [".whl", ".devshared"] and the command:
#   bash experiments/device/gpu_check.sh
# It runs, each bounded in time, and writes logs under $OUT:
#   1. the hardware-only kernel tests (pytest -m "gpu"), correctness of the Pallas GPU kernels at real sizes;
#   2. python -m experiments bench --preset gpu (our implementations + jax.nn xla/cudnn anchors, same process);
#   3. shared/device/anchor_jax.py (jax's Pallas ops, tokamax, cuDNN) in a separate process.
# Every timing it prints is tied to the card it ran on (device_kind in the JSONL rows).
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
site=$(mktemp -d)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || true
fi
export PYTHONPATH="$site:$PWD/.devshared/stubs:$PWD" PYTHONUNBUFFERED=1
export JAXATTN_GIT_SHA=${JAXATTN_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1

timeout 180 python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/kernels > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"
timeout 300 python3 -m experiments bench --preset gpu --budget-s 240 --no-progress --out "$OUT/bench" \
  > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
if [ -f .devshared/anchor_jax.py ]; then
  BUDGET_S=90 timeout 120 python3 .devshared/anchor_jax.py > "$OUT/anchors.log" 2>&1
  echo "anchors rc=$?"
fi
cat "$OUT/gpu.txt"; tail -5 "$OUT/gpu_tests.log"; tail -60 "$OUT/bench.log"; tail -30 "$OUT/anchors.log" 2>/dev/null
