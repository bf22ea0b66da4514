#!/usr/bin/env bash
# One prepared GPU check (for the device machine: one H100/H200, jax 0.11.2 + CUDA, no network). Total <= ~8 min.
#
# Here, from the repo root, first:
#   echo '/.devshared/' >> .git/info/exclude; rm -rf .devshared; cp -r ../shared/device .devshared
#   bash .devshared/fetch_wheels.sh
# Then one device call with carry [".whl", ".devshared"] and the command:
#   bash experiments/device/gpu_check.sh
# Each step is a separate process with its own time bound; logs land under $OUT:
#   1. the hardware-only tests (pytest -m gpu), one process per file, -v, no -x: kernel correctness at real sizes and
#      the dispatch fallback on a kernel that does not fit (tests/hardware);
#   2. python -m experiments bench --preset gpu (our implementations + jax.nn xla/cudnn anchors, same process);
#   3. shared/device/anchor_jax.py (jax's Pallas ops, tokamax, cuDNN) in a separate process;
#   4. shared/device/anchor_fla.py (flash-linear-attention forward, PyTorch) in a separate process.
# Every timing is tied to the card it ran on (device_kind in the JSONL rows). STEPS="1 2" runs a subset.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
STEPS=${STEPS:-"1 2 3 4"}
site=$(mktemp -d)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || true
fi
export PYTHONPATH="$site:$PWD/.devshared/stubs:$PWD" PYTHONUNBUFFERED=1
export JAXATTN_GIT_SHA=${JAXATTN_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
has() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }
start=$(date +%s)

if has 1; then
  for f in tests/hardware/test_dispatch_gpu.py tests/kernels/softmax/test_pallas_gpu.py \
           tests/kernels/linear/test_pallas_linear.py tests/kernels/landmark/test_landmark_kernels.py; do
    timeout 120 python3 -m pytest -m gpu -v -s -p no:cacheprovider "$f" >> "$OUT/gpu_tests.log" 2>&1
    echo "$f rc=$? ($(( $(date +%s) - start )) s)" | tee -a "$OUT/summary.txt"
  done
fi
if has 2; then
  timeout 200 python3 -m experiments bench --preset gpu --budget-s 170 --no-progress --out "$OUT/bench" \
    > "$OUT/bench.log" 2>&1
  echo "bench rc=$? ($(( $(date +%s) - start )) s)" | tee -a "$OUT/summary.txt"
fi
if has 3 && [ -f .devshared/anchor_jax.py ]; then
  BUDGET_S=60 timeout 90 python3 .devshared/anchor_jax.py > "$OUT/anchors.log" 2>&1
  echo "anchors rc=$? ($(( $(date +%s) - start )) s)" | tee -a "$OUT/summary.txt"
fi
if has 4 && [ -f .devshared/anchor_fla.py ]; then
  timeout 60 python3 .devshared/anchor_fla.py > "$OUT/anchor_fla.log" 2>&1
  echo "fla rc=$? ($(( $(date +%s) - start )) s)" | tee -a "$OUT/summary.txt"
fi
cat "$OUT/gpu.txt" "$OUT/summary.txt"
grep -E "PASSED|FAILED|ERROR|fallback:|passed|failed" "$OUT/gpu_tests.log" 2>/dev/null | tail -40
tail -40 "$OUT/bench.log" 2>/dev/null; tail -25 "$OUT/anchors.log" 2>/dev/null; tail -8 "$OUT/anchor_fla.log" 2>/dev/null
