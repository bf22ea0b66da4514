"""Static shared-memory budget of the GPU landmark kernels, and the tile chooser built on it.

Triton keeps in shared memory (per thread block) the operand tiles of every ``dot`` that are loaded once (the query
tile of the forward / dq kernels; the key / value block of the dk/dv kernel), ``num_stages`` buffers of each tile
its software pipeliner prefetches inside the key / query loop, and the transposed probability tiles the dk/dv kernel
feeds to ``a^T dO`` / ``dS^T Q``. With ``e`` the element size, ``Dp, Ep`` the padded head dims,
``bs`` the block size (key tile), ``bq`` the query tile and ``S = num_stages``, the model is

- forward: ``bq Dp e  +  S bs (Dp + Ep) e``  (q tile; k / v tiles per stage);
- dq: ``bq (Dp + Ep) e  +  S bs (Dp + Ep) e``  (q / dO tiles; k / v tiles per stage);
- dk/dv (``S >= 2``): ``bs (Dp + Ep) e  +  (S + 1) bq (Dp + Ep) e  +  8 (S - 1) bq  +  bq bs e``
  (k / v block; q / dO tiles per stage plus the unpipelined diagonal step's; lse / delta rows; a transposed
  ``[bq, bs]`` operand); with ``S = 1`` (no pipelining) one q / dO tile (two for blocks <= 32), plus ``32 bq`` of
  row scratch when the query tile holds several blocks (measured with GQA).

Float32 (IEEE f32 dots run on FMA units, not tensor cores) passes the ``[bq, bs]`` f32 probability tile through
shared memory: in the forward it reuses the q tile's buffer (``max`` of the two), in dq it adds to it.

Every term was calibrated against the allocation Triton reports for the kernels compiled for sm_90 without a GPU
(``python -m experiments gpu_compile``; table in ``tests/kernels/landmark/test_smem_budget.py``), so the model is
an upper bound there (equal on the large tiles that matter, e.g. bf16, D=128, bs=64, bq=128, S=2: forward 98304,
dq 131072, dk/dv 246784 bytes — the H200 failure).

:func:`choose_tiles` picks the largest query tile (up to 128 tokens) at which the three kernels fit the limit,
then the most pipeline stages (up to 2) for the forward and for the backward kernels separately (f32: one stage and
smaller tiles, which otherwise take minutes to compile);
:func:`refusal` says why a block size cannot run at all.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.common import padded_head_dim
from pallas_kernels.common.smem import HOPPER_SMEM_BYTES

__all__ = ["KERNELS", "Tiles", "kernel_smem", "smem_bytes", "fits", "choose_tiles", "refusal", "MAX_BLOCK_Q",
           "MAX_STAGES", "F32_MAX_TILE_ELEMS", "F32_NUM_WARPS"]

KERNELS = ("fwd", "dq", "dkv")
MAX_BLOCK_Q = 128  # largest default query tile (tokens; a block size above it uses one block)
MAX_STAGES = 2  # most pipeline stages a default config uses (f32: 1)
# f32 dots are unrolled FMA code: a [bq, bs] x [bs, D] product per step whose compile time grows with
# bq * bs * D (and with the stages); f32 backward builds took 30-120 s and more (issue 13), so f32 calls run one
# stage (FMA-bound: nothing to hide behind prefetching) and the chooser halves their query tile until
# bq * bs * D is at most this (or the tile is one block).
F32_MAX_TILE_ELEMS = 64 * 64 * 64
# f32 runs 8 warps at every head dim: half the unrolled FMA code per thread (D=64, block 64 fwd+bwd: XLA's sm_90
# compile 78 s instead of 316 s on 2 busy cores, same shared memory)
F32_NUM_WARPS = 8


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The tiles a landmark call runs with on GPU: the query tile (all three kernels) and the Triton pipeline stages
  of the forward kernel and of the two backward kernels (dq, dk/dv)."""

  block_q: int
  num_stages: int
  bwd_num_stages: int
  num_warps: int | None = None  # None: the kernels' default (4 for head dims <= 64, else 8)


def kernel_smem(kernel: str, *, D: int, E: int, dtype, block_size: int, block_q: int, num_stages: int) -> int:
  """Modelled shared memory (bytes) of one kernel (``"fwd"``, ``"dq"`` or ``"dkv"``) with its default warps."""
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
  e = jnp.dtype(dtype).itemsize
  dp, ep = padded_head_dim(D), padded_head_dim(E)
  bs, bq, s = block_size, block_q, max(1, num_stages)
  kv = bs * (dp + ep) * e  # one key block of k and v
  p32 = bq * bs * 4 if e == 4 else 0  # f32 (FMA) dots: the [bq, bs] probabilities pass through shared memory
  if kernel == "fwd":  # (f32: the q tile's buffer is reused by the probabilities; 512 bytes of reduction scratch)
    return s * kv + (max(bq * dp * e, p32) + 512 if p32 else bq * dp * e)
  if kernel == "dq":
    return bq * (dp + ep) * e + s * kv + p32
  qt = bq * (dp + ep) * e  # one query tile of q and dO
  rows = 8 * bq  # its lse and delta (f32)
  tr = bq * bs * e  # a transposed [bq, bs] probability / dS operand
  if s == 1:
    # small blocks keep two q / dO tiles; a query tile of several blocks (GQA: the head loop) adds row scratch
    return kv + max(qt + tr + (4 * rows if bq >= 2 * bs else 0), 2 * qt + rows if bs <= 32 else 0)
  return kv + (s + 1) * qt + (s - 1) * rows + tr


def smem_bytes(*, D: int, E: int, dtype, block_size: int, block_q: int, num_stages: int) -> dict[str, int]:
  """``{"fwd": bytes, "dq": bytes, "dkv": bytes}`` (see :func:`kernel_smem`)."""
  return {k: kernel_smem(k, D=D, E=E, dtype=dtype, block_size=block_size, block_q=block_q, num_stages=num_stages)
          for k in KERNELS}


def fits(*, D: int, E: int, dtype, block_size: int, block_q: int, num_stages: int,
         limit: int = HOPPER_SMEM_BYTES, kernels: tuple[str, ...] = KERNELS) -> bool:
  """Whether ``kernels`` (default: all three) fit ``limit`` bytes of shared memory per block."""
  return all(kernel_smem(k, D=D, E=E, dtype=dtype, block_size=block_size, block_q=block_q,
                         num_stages=num_stages) <= limit for k in kernels)


def _candidates(dtype, D: int, E: int, block_size: int, T: int | None, max_block_q: int):
  """Query tiles from the largest wanted down to one block."""
  bq = max(block_size, max_block_q)
  if T is not None:  # short sequences are not padded to a long tile
    while bq // 2 >= max(block_size, T):
      bq //= 2
  if jnp.dtype(dtype) == jnp.float32:
    while bq > block_size and bq * block_size * max(padded_head_dim(D), padded_head_dim(E)) > F32_MAX_TILE_ELEMS:
      bq //= 2
  while bq >= block_size:
    yield bq
    bq //= 2


def choose_tiles(*, D: int, E: int, dtype, block_size: int, T: int | None = None,
                 limit: int = HOPPER_SMEM_BYTES, max_block_q: int = MAX_BLOCK_Q) -> Tiles | None:
  """The largest query tile at which all three kernels fit ``limit``, with the most stages (<= :data:`MAX_STAGES`)
  that fit for the forward kernel and for the backward kernels separately.

  Query tiles run from ``max_block_q`` tokens (or one block, if larger; shrunk to cover a short ``T`` without
  padding) down to one block; stages from :data:`MAX_STAGES` down to 1 (the dk/dv kernel, whose q / dO tiles are
  pipelined, is usually the one that needs fewer: bf16, D=128, block 64 runs the forward with 2 and the backward
  with 1). f32 calls use one stage and start from a tile under :data:`F32_MAX_TILE_ELEMS` (compile time). Returns
  None when not even one block with one stage fits (see :func:`refusal`).
  """
  max_stages = 1 if jnp.dtype(dtype) == jnp.float32 else MAX_STAGES
  kw = dict(D=D, E=E, dtype=dtype, block_size=block_size, limit=limit)
  for bq in _candidates(dtype, D, E, block_size, T, max_block_q):
    fwd = [s for s in range(max_stages, 0, -1) if fits(block_q=bq, num_stages=s, kernels=("fwd",), **kw)]
    bwd = [s for s in range(max_stages, 0, -1) if fits(block_q=bq, num_stages=s, kernels=("dq", "dkv"), **kw)]
    if fwd and bwd:
      return Tiles(bq, fwd[0], bwd[0], F32_NUM_WARPS if max_stages == 1 else None)
  return None


def refusal(*, D: int, E: int, dtype, block_size: int, limit: int = HOPPER_SMEM_BYTES) -> str | None:
  """None if some tiles fit ``limit``, else why not (the smallest config's per-kernel bytes)."""
  if choose_tiles(D=D, E=E, dtype=dtype, block_size=block_size, limit=limit) is not None:
    return None
  need = smem_bytes(D=D, E=E, dtype=dtype, block_size=block_size, block_q=block_size, num_stages=1)
  worst = max(need, key=need.get)
  return (f"block_size={block_size} with D={D}, E={E}, {jnp.dtype(dtype).name} needs up to {need[worst]} bytes of "
          f"shared memory (static estimate) in its {worst} kernel at the smallest tiles (block_q={block_size}, "
          f"num_stages=1); the GPU allows {limit}")
