"""``implementation="pallas_tpu"``: the Mosaic TPU flash-attention kernels (``pallas_kernels.softmax.tpu``) as a
softmax backend, plus their FLOP / HBM-byte counts and a TPU roofline estimate.

The static mask is compiled at trace time by :func:`~jaxattn.ops.softmax.mask_info.mask_info` into per-block
visiting lists (scalar-prefetched) and deduplicated partial-block tiles; the forward, dq and dk/dv kernels visit only
the non-empty blocks (``fwd`` puts the three plans into ``SoftmaxResiduals.extra``; ``bwd`` runs the dq and dk/dv
kernels on them). Supports masks, segment ids, GQA/MQA (no K/V repeat), soft cap, lse output and its gradient, an
additive bias ``[1|B, 1|H, T, S]`` (broadcast dims never materialised; its gradient, when asked for, from the dq
kernel writing ``dS`` per visited block, summed over the broadcast dims in XLA: :mod:`pallas_kernels.softmax.bias`;
with a bias ``block_k_dkv`` must also obey the lane rule). Refuses (``supports``): boolean mask arrays, per-head
masks, dropout; platforms other than TPU and CPU. On a CPU backend the kernels run in Pallas TPU
interpret mode (slow: for tests and users without the hardware); ``implementation=None`` never picks this on CPU.

Config: :class:`~jaxattn.ops.softmax.config.PallasTpuConfig` (default: per TPU generation, 512 x 512 on v4 and
1024 x 1024 on v5e / v5p / v6e with a ``vmem_limit_bytes`` of three quarters of the VMEM, see
:data:`DEFAULT_TILES`; 512 x 512 in interpret mode; clamped to T / S; the tiles must obey the TPU (8, 128) tiling
rule, ``ValueError`` otherwise, also in interpret mode; ``vmem_limit_bytes`` for Mosaic).

``block_sparse_attention`` reuses :func:`kernel_forward` / :func:`kernel_backward` with data-dependent
per-(batch, query head) lists built on device (one tile for all three kernels, so ``block_q`` must be a multiple of
128 or cover T: it is a lane dim of the dk/dv kernel).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import backend as backend_lib
from jaxattn.backend import Backend
from jaxattn.masks import Mask
from jaxattn.ops.softmax.config import (BlockSizes, PallasTpuConfig, SoftmaxCall, SoftmaxResiduals, config_error,
                                        dense_only_reason)
from jaxattn.ops.softmax.mask_info import MaskInfo, mask_info
from jaxattn.ops.softmax.xla import softmax_delta
from pallas_kernels.common import TPU_SPECS
from pallas_kernels.common.vmem import TPU_GENERATIONS, tpu_generation
from pallas_kernels.softmax import tpu as kernels
from pallas_kernels.softmax.bias import dbias_dtype, reduce_to

__all__ = ["BACKEND", "PallasTpuBackend", "resolve_tiles", "kernel_forward", "kernel_backward", "kernel_cost",
           "TPU_SPECS", "DEFAULT_TILES", "default_tiles", "default_config_for"]


def resolve_tiles(config: BlockSizes, T: int, S: int, owner: str | None = None) -> PallasTpuConfig:
  """``config`` with all six tiles filled in (backward ``None`` = forward), clamped to T / S and checked against the
  TPU (8, 128) rule.

  Raises:
    ValueError: ``"<owner>.<field>=<value> breaks the TPU (8, 128) tiling rule: ..."``.
  """
  owner = owner or f"pallas_tpu: {type(config).__name__}"
  (bq, bk), (bq_dq, bk_dq), (bq_dkv, bk_dkv) = config.fwd, config.dq, config.dkv
  vals = dict(block_q=bq, block_k=bk, block_q_dq=bq_dq, block_k_dq=bk_dq, block_q_dkv=bq_dkv, block_k_dkv=bk_dkv)
  lengths = {"T": T, "S": S}
  out = {name: kernels.check_block(vals[name], lengths[axis], role, f"{owner}.{name}", axis, what)
         for name, axis, role, what in kernels.TILE_ROLES}
  vmem = getattr(config, "vmem_limit_bytes", None)
  if vmem is not None and (not isinstance(vmem, (int, np.integer)) or isinstance(vmem, bool) or vmem < 1):
    raise config_error(owner, "vmem_limit_bytes", vmem, "must be None or a positive int")
  return PallasTpuConfig(**out, vmem_limit_bytes=vmem)


class Plan(NamedTuple):
  """One kernel's visiting lists and tiles (int arrays or None)."""

  lists: kernels.VisitLists
  tiles: Any  # [U, bq, bk] or None


class Plans(NamedTuple):
  """The forward, dq and (transposed) dk/dv plans: ``SoftmaxResiduals.extra`` of this backend."""

  fwd: Plan
  dq: Plan
  dkv: Plan


def _lists(info: MaskInfo, transpose: bool = False):
  if transpose:
    return kernels.VisitLists(info.q_index[None, None], info.q_count[None, None], info.q_tile[None, None])
  return kernels.VisitLists(info.kv_index[None, None], info.kv_count[None, None], info.kv_tile[None, None])


def static_plans(call: SoftmaxCall, tiles: PallasTpuConfig) -> Plans:
  """The static mask's forward, dq and (transposed) dk/dv lists, each at its kernel's (resolved) tile."""
  plans = []
  for (bq, bk), transpose in ((tiles.fwd, False), (tiles.dq, False), (tiles.dkv, True)):
    info = mask_info(call.mask, call.T, call.S, bq, bk)
    plans.append(Plan(jax.tree.map(jnp.asarray, _lists(info, transpose)),
                      jnp.asarray(info.tiles) if info.has_partial else None))
  return Plans(*plans)


def kernel_forward(q, k, v, q_ids, kv_ids, plan: Plan, tiles: PallasTpuConfig, *, scale: float,
                   soft_cap: float | None, bias=None):
  """``(out, lse)`` of the forward kernel over ``plan`` at the resolved ``tiles``' forward tile (``bias``: None or
  ``[1|B, 1|H, T, S]``)."""
  bq, bk = tiles.fwd
  return kernels.flash_attention_fwd(
      q, k, v, plan.lists, plan.tiles, q_segment_ids=q_ids, kv_segment_ids=kv_ids, scale=scale, soft_cap=soft_cap,
      block_q=bq, block_k=bk, return_lse=True, interpret=backend_lib.interpret_mode("tpu"),
      vmem_limit_bytes=tiles.vmem_limit_bytes, bias=bias)


def kernel_backward(res: SoftmaxResiduals, cotangents, tiles: PallasTpuConfig, *, scale: float,
                    soft_cap: float | None, needs=(True,) * 6):
  """``(dq, dk, dv)`` from the residuals (``res.extra``: :class:`Plans`) and ``(dout, dlse)``."""
  return kernel_backward_bias(res, cotangents, tiles, scale=scale, soft_cap=soft_cap, needs=needs)[:3]


def kernel_backward_bias(res: SoftmaxResiduals, cotangents, tiles: PallasTpuConfig, *, scale: float,
                         soft_cap: float | None, needs=(True,) * 6):
  """``(dq, dk, dv, dbias)``; ``dbias`` (the bias's shape and dtype) only when ``res.bias`` is given and
  ``needs[3]``, else None. Unneeded gradients are None and their kernels do not run: without ``needs[3]`` there is
  no dbias work at all; with ``needs[3]`` but not ``needs[0]`` the dq kernel writes ``dS`` only."""
  q, k, v, bias, q_ids, kv_ids, out, lse, plans = res
  dout, dlse = cotangents
  delta = softmax_delta(dout, out, dlse)
  dout = dout.astype(q.dtype)
  common = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids, scale=scale, soft_cap=soft_cap,
                interpret=backend_lib.interpret_mode("tpu"), vmem_limit_bytes=tiles.vmem_limit_bytes)
  dq = dk = dv = dbias = None
  if bias is not None and len(needs) > 3 and needs[3]:
    bq, bk = tiles.dq
    dq, ds = kernels.flash_attention_bwd_dq_dbias(
        q, k, v, dout, lse, delta, *plans.dq, bias, block_q=bq, block_k=bk, with_dq=bool(needs[0]),
        dbias_dtype=dbias_dtype(bias.shape, q.shape[0], q.shape[2], bias.dtype), **common)
    dbias = reduce_to(ds, bias.shape, bias.dtype)
  elif needs[0]:
    bq, bk = tiles.dq
    dq = kernels.flash_attention_bwd_dq(q, k, v, dout, lse, delta, *plans.dq, block_q=bq, block_k=bk, bias=bias,
                                        **common)
  if needs[1] or needs[2]:
    bq, bk = tiles.dkv
    dk, dv = kernels.flash_attention_bwd_dkv(q, k, v, dout, lse, delta, *plans.dkv, block_q=bq, block_k=bk,
                                             bias=bias, **common)
  return dq, dk, dv, dbias


def platform_reason(name: str) -> str | None:
  """Why the TPU kernels cannot run here (None if they can)."""
  if backend_lib.platform() not in ("tpu", "cpu"):
    return f"{name} runs on TPU (or in interpret mode on CPU), not on {backend_lib.platform()!r}"
  return None


# Default tiles per TPU generation: the largest of 512 and 1024 whose three kernels (forward, dq, dk/dv) fit half the
# VMEM of one TensorCore, measured by ``python -m experiments tpu_compile --preset tiles`` (largest scoped VMEM of the
# three kernels; causal, B=1, T=8192, H=16, D=128, bf16):
#   tiles   v4 (16 MiB)         v5e (128 MiB)   v5p (64 MiB)   v6e (128 MiB)
#   512     5.2 MiB             4.2 MiB         4.2 MiB        4.7 MiB
#   1024    16.7 MiB: overflow  12.8 MiB        12.8 MiB       12.8 MiB
#   2048    49.0 MiB: overflow  41.8 MiB        41.8 MiB       41.8 MiB
# 2048 (within half the VMEM of v5e / v6e) is not used: a causal mask's diagonal blocks then cost a quarter more
# matmul FLOPs at T=8192 (10 visited 2048-tiles for 8 tiles' worth of area), and the forward is compute-bound there.
DEFAULT_TILES: dict[str, int] = {"v4": 512, "v5e": 1024, "v5p": 1024, "v6e": 1024}

def default_tiles(generation: str | None, D: int, E: int, dtype: str) -> int:
  """The default square tile on a TPU generation (None: no TPU or an unknown one: 512): :data:`DEFAULT_TILES`,
  halved when a row of q / k / v is wider than the generation's ``wide_row_bytes``
  (:class:`pallas_kernels.common.vmem.TpuGeneration`: f32 or head dims above 128 on v4, f32 with head dims above
  128 elsewhere)."""
  if generation is None:
    return kernels.DEFAULT_BLOCK
  tile = DEFAULT_TILES[generation]
  if max(D, E) * np.dtype(jnp.dtype(dtype)).itemsize > TPU_GENERATIONS[generation].wide_row_bytes:
    tile //= 2
  return tile


def default_config_for(call: SoftmaxCall, generation: str | None) -> PallasTpuConfig:
  """The default config of ``call`` on a TPU ``generation`` (``"v4"`` .. ``"v6e"``; None: no TPU or an unknown one).

  Tiles from :func:`default_tiles` for all three kernels; ``vmem_limit_bytes`` the generation's limit (three
  quarters of its VMEM, at least 16 MiB: :attr:`pallas_kernels.common.vmem.TpuGeneration.vmem_limit`), None without
  a known generation (interpret mode ignores it).
  """
  tile = default_tiles(generation, call.D, call.E, call.dtype)
  limit = None if generation is None else TPU_GENERATIONS[generation].vmem_limit
  return PallasTpuConfig(tile, tile, vmem_limit_bytes=limit)


class PallasTpuBackend(Backend):
  """The Mosaic TPU kernels over the static mask's visiting lists."""

  name = "pallas_tpu"
  Config = PallasTpuConfig
  kernel = True

  def supports(self, call: SoftmaxCall) -> str | None:
    if (reason := dense_only_reason(self.name, call)) is not None:
      return reason
    return platform_reason(self.name)

  def default_config(self, call: SoftmaxCall) -> PallasTpuConfig:
    """The generation's tiles (:data:`DEFAULT_TILES`, clamped to T / S) and VMEM limit; see :func:`default_tiles`."""
    return default_config_for(call, tpu_generation())

  def validate_config(self, call: SoftmaxCall, config: PallasTpuConfig) -> None:
    tiles = resolve_tiles(config, call.T, call.S)
    if call.bias is not None:  # the dk/dv kernel reads (block_q_dkv, block_k_dkv) bias blocks: block_k_dkv is a lane
      kernels.check_block(tiles.block_k_dkv, call.S, "lane", f"pallas_tpu: {type(config).__name__}.block_k_dkv",
                          "S", "with a bias, also lanes of the (block_q_dkv, block_k_dkv) bias block")

  def fwd(self, call: SoftmaxCall, config: PallasTpuConfig, args):
    q, k, v, bias, q_ids, kv_ids = args
    tiles = resolve_tiles(config, call.T, call.S)
    plans = static_plans(call, tiles)
    out, lse = kernel_forward(q, k, v, q_ids, kv_ids, plans.fwd, tiles, scale=call.scale,
                              soft_cap=call.logits_soft_cap, bias=bias)
    return (out, lse), SoftmaxResiduals(q, k, v, bias, q_ids, kv_ids, out, lse, plans)

  def residual_extra(self, call: SoftmaxCall, config: PallasTpuConfig) -> Plans:
    return static_plans(call, resolve_tiles(config, call.T, call.S))

  def bwd(self, call: SoftmaxCall, config: PallasTpuConfig, residuals: SoftmaxResiduals, cotangents, needs):
    tiles = resolve_tiles(config, call.T, call.S)
    dq, dk, dv, dbias = kernel_backward_bias(residuals, cotangents, tiles, scale=call.scale,
                                             soft_cap=call.logits_soft_cap, needs=needs)
    return dq, dk, dv, dbias, None, None


BACKEND = PallasTpuBackend()


# =================================================================================================== cost model


def _fetches(*block_index) -> int:
  """How many times a block is (re)loaded over the grid: once, plus once per change of its block index.

  Each argument is an int array broadcast to the grid shape (row-major = execution order); the Pallas TPU pipeline
  skips the copy when consecutive steps name the same block.
  """
  shape = np.broadcast_shapes(*(np.shape(a) for a in block_index))
  idx = np.stack([np.broadcast_to(a, shape).reshape(-1) for a in block_index])
  return int(1 + np.any(idx[:, 1:] != idx[:, :-1], axis=0).sum())


def _flat_prefetch(lists: kernels.VisitLists, with_tiles: bool):
  return [np.asarray(a) for a in kernels.flatten_lists(lists, with_tiles)]


def kernel_cost(B: int, T: int, S: int, H: int, D: int, *, G: int | None = None, E: int | None = None,
                dtype=jnp.bfloat16, mask: Mask | None = None, blocks: BlockSizes | None = None,
                segment_ids: bool = False, logits_soft_cap: float | None = None,
                return_lse: bool = False) -> dict:
  """FLOPs, transcendentals and HBM bytes of the pallas_tpu kernels for one call, with a TPU roofline estimate.

  Counts follow the kernels exactly: every visited (query block, kv block) pair costs its full padded tile
  (``2 * bq * bk * (D + E)`` matmul FLOPs forward; ``2 * bq * bk * (2D + E)`` in the dq kernel and
  ``2 * bq * bk * (2D + 2E)`` in the dk/dv kernel, which both recompute ``Q K^T``); bytes count each block copy
  the Pallas pipeline issues (a block is re-copied only when its index changes between consecutive grid steps) plus
  the output writes. ``glue_bytes`` is the XLA work around the backward kernels (``delta = rowsum(dO * O)``, the
  lane/sublane broadcasts of lse/delta and segment ids) and is included in the backward roofline.
  ``model_flops`` counts only allowed pairs (``4 * area * D``-style, 2 matmuls forward, 5 backward).

  Roofline: ``time = max(FLOPs / peak, bytes / bandwidth)`` per kernel, summed, with the public spec numbers
  in :data:`TPU_SPECS` (v5e: 197 TFLOP/s bf16, 819 GB/s HBM; v5p: 459 TFLOP/s, 2765 GB/s). It ignores the exp/tanh
  throughput (EUP), VMEM/vreg pressure, pipeline bubbles and launch cost, so real kernels run slower; no TPU timing
  of these kernels exists.

  Returns:
    ``{"forward": {...}, "backward": {...}, "roofline": {"v5e": {...}, "v5p": {...}}}``; each pass holds
    ``flops``, ``model_flops``, ``transcendentals``, ``bytes``, and per-kernel entries.
  """
  G, E = G or H, E or D
  R = H // G
  it = jnp.dtype(dtype).itemsize
  rb = resolve_tiles(blocks or PallasTpuConfig(kernels.DEFAULT_BLOCK, kernels.DEFAULT_BLOCK), T, S)
  area = T * S if mask is None else int(mask.area(T, S))
  cap = logits_soft_cap is not None

  def fwd_like(bq, bk, lse_in: bool, kernel: str):
    """Forward and dq kernels: grid (B, H, nQ, K)."""
    info = mask_info(mask, T, S, bq, bk)
    nq = info.num_q_blocks
    pref = _flat_prefetch(_lists(info), info.has_partial)
    K = info.kv_index.shape[1]
    b = np.arange(B)[:, None, None, None]
    h = np.arange(H)[None, :, None, None]
    kv = np.broadcast_to(pref[0].reshape(1, 1, nq, K), (B, H, nq, K))
    kv_fetch = _fetches(b, h // R, kv)
    visited = B * H * info.num_visited
    rows = B * H * nq  # one q-side block per (b, h, i)
    if kernel == "fwd":
      flops = 2 * bq * bk * (D + E) * visited
      q_side = bq * D * it + bq * E * it + (bq * 128 * 4 if return_lse else 0)
    else:
      flops = 2 * bq * bk * (2 * D + E) * visited
      q_side = bq * D * it + bq * E * it + 2 * bq * 128 * 4 + bq * D * it  # q, do, lse, delta in; dq out
    nbytes = rows * q_side + kv_fetch * bk * (D + E) * it
    if segment_ids:
      nbytes += B * nq * H * bq * 128 * 4 + _fetches(b, h, kv) * 8 * bk * 4
    if info.has_partial:
      nbytes += _fetches(np.broadcast_to(pref[3].reshape(1, 1, nq, K), (B, H, nq, K))) * bq * bk
    trans = (1 + cap) * bq * bk * visited
    return dict(flops=flops, transcendentals=trans, bytes=nbytes, visited_blocks=visited, block=(bq, bk))

  def dkv(bq, bk):
    """dk/dv kernel: grid (B, G, nK, R, Kt)."""
    info = mask_info(mask, T, S, bq, bk)
    nk = info.num_k_blocks
    pref = _flat_prefetch(_lists(info, transpose=True), info.has_partial)
    Kt = info.q_index.shape[1]
    b = np.arange(B)[:, None, None, None, None]
    g = np.arange(G)[None, :, None, None, None]
    r = np.arange(R)[None, None, None, :, None]
    qi = np.broadcast_to(pref[0].reshape(1, 1, nk, 1, Kt), (B, G, nk, R, Kt))
    q_fetch = _fetches(b, g * R + r, qi)
    visited = B * H * info.num_visited
    flops = 2 * bq * bk * (2 * D + 2 * E) * visited
    nbytes = q_fetch * (bq * D * it + bq * E * it + 2 * 8 * bq * 4)  # q, do, lse, delta
    nbytes += B * G * nk * bk * 2 * (D + E) * it  # k, v in; dk, dv out
    if segment_ids:
      nbytes += _fetches(b, qi) * 8 * bq * 4 + B * G * nk * bk * 128 * 4
    if info.has_partial:
      nbytes += _fetches(np.broadcast_to(pref[3].reshape(1, 1, nk, 1, Kt), (B, G, nk, R, Kt))) * bq * bk
    trans = (1 + cap) * bq * bk * visited
    return dict(flops=flops, transcendentals=trans, bytes=nbytes, visited_blocks=visited, block=(bq, bk))

  fwd = fwd_like(*rb.fwd, False, "fwd")
  dq = fwd_like(*rb.dq, True, "dq")
  dkv_ = dkv(*rb.dkv)
  Tp_dq, Tp_dkv = _round_up(T, rb.dq[0]), _round_up(T, rb.dkv[0])
  glue = 2 * B * T * H * E * it + B * H * T * 4  # delta = rowsum(dO * O): read dO, O; write delta
  glue += 2 * B * H * Tp_dq * 128 * 4 + 2 * B * H * 8 * Tp_dkv * 4  # lse / delta broadcast layouts (writes)
  if segment_ids:
    glue += B * (Tp_dq * 128 + 8 * _round_up(S, rb.dq[1]) + 8 * Tp_dkv + _round_up(S, rb.dkv[1]) * 128) * 4
  bwd = dict(flops=dq["flops"] + dkv_["flops"], transcendentals=dq["transcendentals"] + dkv_["transcendentals"],
             bytes=dq["bytes"] + dkv_["bytes"] + glue, glue_bytes=glue, dq=dq, dkv=dkv_)
  fwd_out = dict(fwd, model_flops=2 * area * (D + E) * B * H)
  bwd["model_flops"] = 2 * area * (3 * D + 2 * E) * B * H

  def t(c, peak, bw):
    return max(c["flops"] / peak, c["bytes"] / bw)

  roof = {}
  for name, (peak, bw) in TPU_SPECS.items():
    tf = t(fwd, peak, bw)
    tb = t(dq, peak, bw) + t(dkv_, peak, bw) + glue / bw
    roof[name] = dict(forward_s=tf, backward_s=tb, forward_backward_s=tf + tb,
                      forward_bound="compute" if fwd["flops"] / peak >= fwd["bytes"] / bw else "memory",
                      forward_model_tflops=fwd_out["model_flops"] / tf / 1e12,
                      forward_backward_model_tflops=(fwd_out["model_flops"] + bwd["model_flops"]) / (tf + tb) / 1e12)
  return dict(forward=fwd_out, backward=bwd, roofline=roof)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m
