"""Constants and shape helpers shared by the kernel families (no Pallas imports: usable by every backend)."""

from __future__ import annotations

import math

from pallas_kernels.common.vmem import TPU_GENERATIONS as _TPU_GENERATIONS

__all__ = ["LOG2E", "LN2", "MAX_HEAD_DIM", "NT", "TN", "NN", "TPU_SPECS", "is_pow2", "next_pow2", "padded_head_dim"]

LOG2E = math.log2(math.e)  # exp(x) = exp2(x * LOG2E): the GPU kernels work in base 2
LN2 = math.log(2.0)
MAX_HEAD_DIM = 256  # largest head dim the GPU kernels take (padded to a power of two)

# lax.dot_general dimension numbers for 2-D tiles
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b
NN = (((1,), (0,)), ((), ()))  # a @ b


def is_pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def padded_head_dim(d: int) -> int:
  """The head dim the GPU kernels run with: the next power of two, at least 16 (inputs are zero-padded)."""
  return max(16, next_pow2(d))

# Public spec-sheet peaks per TPU chip (Google Cloud TPU documentation): (dense bf16 matmul FLOP/s, HBM bytes/s),
# for the kernels' roofline estimates (jaxattn.ops.softmax.pallas_tpu.kernel_cost, ...linear.pallas_tpu.kernel_cost);
# the generations' table with VMEM sizes is pallas_kernels.common.vmem.TPU_GENERATIONS.
TPU_SPECS: dict[str, tuple[float, float]] = {
    name: (g.peak_bf16_flops, g.hbm_bytes_per_s) for name, g in _TPU_GENERATIONS.items()}
