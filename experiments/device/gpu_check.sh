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
#   4. shared/device/anchor_fla.py (flash-linear-attention forward, PyTorch) in a separate process;
#   5. the explicit-only Hopper backend "mosaic_gpu" (jaxattn/ops/softmax/mosaic_gpu.py) next to cuDNN and pallas_gpu,
#      2x8192, H=16, D=128 bf16, full / causal / window 1024 / block-sparse 0.1, one case at a time (tables are
#      rewritten after each case, so a hang loses only the case it hangs in); step 2 leaves mosaic_gpu out;
#   6. python -m experiments decode_bench --preset gpu (decode_attention dense vs K = L/8 sparse, jax.nn beside).
# Every timing is tied to the card it ran on (device_kind in the JSONL rows). STEPS="1 2" runs a subset.
# Dry run of step 5 on a CPU machine (Mosaic GPU interpreter, 1x128 causal forward): STEPS=5 bash <this file>
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
STEPS=${STEPS:-"1 2 3 4 5 6"}
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
           tests/kernels/linear/test_pallas_linear.py tests/kernels/landmark/test_landmark_kernels.py \
           tests/kernels/softmax/test_mosaic_gpu.py; do
    timeout 120 python3 -m pytest -m gpu -v -s -p no:cacheprovider "$f" >> "$OUT/gpu_tests.log" 2>&1
    echo "$f rc=$? ($(( $(date +%s) - start )) s)" | tee -a "$OUT/summary.txt"
  done
fi
if has 2; then
  # every implementation here but mosaic_gpu (unproven on hardware: timed on its own in step 5)
  impls=$(timeout 60 python3 -c "from experiments.bench import run
print(','.join(i.name for i in run.available_impls() if i.name != 'mosaic_gpu'))" 2> "$OUT/bench_impls.log")
  timeout 200 python3 -m experiments bench --preset gpu --budget-s 170 --no-progress --out "$OUT/bench" \
    ${impls:+--impls "$impls"} > "$OUT/bench.log" 2>&1
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
if has 5; then
  timeout 150 python3 - "$OUT/bench_mosaic" > "$OUT/bench_mosaic.log" 2>&1 <<'EOF'
import sys
from configs.bench import CAUSAL, FULL, BenchPreset, BenchShape, MaskSpec
from experiments.bench import run
from jaxattn import backend
dry = backend.platform() == "cpu"  # no GPU: the Mosaic GPU interpreter at a tiny shape (plumbing only)
masks = (CAUSAL,) if dry else (FULL, CAUSAL, MaskSpec("sliding_window", window=1024),
                                    MaskSpec("block_sparse", density=0.1))
dims = (1, 128, 128, 2, 2, 64) if dry else (2, 8192, 8192, 16, 16, 128)
impls = run.available_impls(requested=["mosaic_gpu", "xla"] if dry else ["mosaic_gpu", "pallas_gpu", "jax.nn/cudnn"])
rows = []
for m in masks:  # one case per run_bench call; the outputs are rewritten after each
  shape = BenchShape(f"b{dims[0]}_t{dims[1]}", *dims, "bfloat16", (m,))
  rows += run.run_bench(BenchPreset("mosaic_gpu", (shape,), repeats=2 if dry else 20, warmup=0 if dry else 2),
                        modes=("fwd",) if dry else ("fwd", "fwd+bwd"), impls=impls, progress=False)
  table = run.write_outputs(rows, sys.argv[1], title=f"mosaic_gpu vs cuDNN and pallas_gpu, {rows[0]['device_kind']}")
print(table)
EOF
  echo "mosaic_gpu rc=$? ($(( $(date +%s) - start )) s)" | tee -a "$OUT/summary.txt"
fi
if has 6; then
  timeout 90 python3 -m experiments decode_bench --preset gpu --no-progress --out "$OUT/decode_bench" \
    > "$OUT/decode_bench.log" 2>&1
  echo "decode_bench rc=$? ($(( $(date +%s) - start )) s)" | tee -a "$OUT/summary.txt"
fi
cat "$OUT/gpu.txt" "$OUT/summary.txt"
grep -E "PASSED|FAILED|ERROR|fallback:|passed|failed" "$OUT/gpu_tests.log" 2>/dev/null | tail -40
tail -40 "$OUT/bench.log" 2>/dev/null; tail -25 "$OUT/anchors.log" 2>/dev/null; tail -8 "$OUT/anchor_fla.log" 2>/dev/null
tail -20 "$OUT/bench_mosaic.log" 2>/dev/null; tail -14 "$OUT/decode_bench.log" 2>/dev/null
