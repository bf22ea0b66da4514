"""``implementation="pallas_tpu"``: the Mosaic TPU flash-attention kernels (``pallas_kernels.softmax.tpu``) under a
``custom_vjp``, plus their FLOP / HBM-byte counts and a TPU roofline estimate.

The static mask is compiled at trace time by :func:`~jaxattn.ops.softmax.mask_info.mask_info` into per-block
visiting lists (scalar-prefetched) and deduplicated partial-block tiles; the forward, dq and dk/dv kernels visit only
the non-empty blocks. Supports masks, segment ids, GQA/MQA (no K/V repeat), soft cap, lse output and its gradient.
Not supported (``NotImplementedError``): ``bias``; platforms other than TPU and CPU. On a CPU backend the kernels run
in Pallas TPU interpret mode (slow: for tests and users without the hardware); ``implementation=None`` never picks
this on CPU.

Block sizes: ``cfg.block_sizes`` (:class:`jaxattn.ops.softmax.config.BlockSizes`) converted to the kernel's
:class:`pallas_kernels.softmax.tpu.BlockSizes` (default 512 x 512 for all three kernels), clamped to T / S and
checked against the TPU (8, 128) tiling rule (``ValueError`` otherwise, also in interpret mode).

The ``custom_vjp`` takes the visiting lists as (integer, non-differentiable) array inputs: the static-mask path
passes the ``mask_info`` lists (``[1, 1, ...]``, one tile per kernel); ``block_sparse_attention`` passes
data-dependent per-(batch, query head) lists built on device (:func:`block_sparse_static`,
:func:`block_sparse_attention_lists`; one tile for all three kernels, so ``block_q`` must be a multiple of 128 or
cover T: it is a lane dim of the dk/dv kernel).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import _dispatch
from jaxattn.masks import Mask
from jaxattn.ops.softmax.config import AttentionConfig
from jaxattn.ops.softmax.config import BlockSizes as _UserBlockSizes
from jaxattn.ops.softmax.mask_info import MaskInfo, mask_info
from pallas_kernels.softmax import tpu as kernels

__all__ = ["softmax_attention_pallas_tpu", "block_sparse_static", "block_sparse_attention_lists", "block_sizes",
           "kernel_cost", "TPU_SPECS"]


def block_sizes(cfg_blocks: _UserBlockSizes | None, T: int, S: int) -> kernels.BlockSizes:
  """The resolved (clamped, tiling-checked) kernel block sizes for a call."""
  if cfg_blocks is None:
    kb = kernels.BlockSizes.default()
  else:
    kb = kernels.BlockSizes(**{f.name: getattr(cfg_blocks, f.name) for f in dataclasses.fields(_UserBlockSizes)})
  return kb.resolve(T, S)


@dataclasses.dataclass(frozen=True)
class _Static:
  cfg: AttentionConfig
  blocks: kernels.BlockSizes  # resolved
  interpret: Any  # False on TPU, pltpu.InterpretParams() on CPU


def softmax_attention_pallas_tpu(q, k, v, bias, q_ids, kv_ids, cfg: AttentionConfig):
  """Masked softmax attention with the Pallas TPU kernels (see the module docstring).

  Args:
    q: ``[B, T, H, D]``; k: ``[B, S, G, D]``; v: ``[B, S, G, E]``.
    bias: must be None.
    q_ids, kv_ids: None or int ``[B, T]`` / ``[B, S]`` segment ids.
    cfg: the validated static configuration.

  Returns:
    ``out [B, T, H, E]`` in q's dtype and ``lse [B, H, T]`` f32 (None when ``cfg.return_lse`` is False: the
    forward then skips writing it).

  Raises:
    NotImplementedError: bias given, or the backend is neither TPU nor CPU.
    ValueError: block sizes that break the TPU tiling rule.
  """
  if bias is not None:
    raise NotImplementedError("pallas_tpu does not support bias")
  interpret = _dispatch.pallas_interpret("pallas_tpu")
  st = _Static(cfg, block_sizes(cfg.block_sizes, cfg.T, cfg.S), interpret)
  return _attention(q, k, v, q_ids, kv_ids, st)



# ------------------------------------------------------------------------------------------ dynamic block lists
def block_sparse_static(q, k, v, block_q: int, block_k: int, scale: float) -> _Static:
  """The static part of a ``block_sparse_attention`` call: the lists' tile for all three kernels.

  ``st.blocks.fwd`` is the tile clamped to ``(T, S)`` (same number of blocks): build the lists and tiles at it.

  Raises:
    NotImplementedError: a platform other than TPU / CPU, or list block sizes that break the (8, 128) tiling rule
      in one of the kernels (``block_k``: multiple of 128 unless it covers S; ``block_q``: multiple of 128 unless
      it covers T, as the dk/dv kernel's lane dim), so the caller falls back to another implementation.
  """
  interpret = _dispatch.pallas_interpret("pallas_tpu")
  T, S = q.shape[1], k.shape[1]
  try:
    blocks = kernels.BlockSizes(block_q, block_k, block_q, block_k, block_q, block_k).resolve(T, S)
  except ValueError as e:
    raise NotImplementedError(f"pallas_tpu cannot run lists of {block_q} x {block_k} blocks: {e}") from None
  return _Static(AttentionConfig(T=T, S=S, scale=float(scale)), blocks, interpret)


def block_sparse_attention_lists(q, k, v, lists, lists_t, tiles, st: _Static):
  """Attention over data-dependent visiting lists (the ``block_sparse_attention`` path), differentiable in q, k, v.

  Args:
    q, k, v: as in ``softmax_attention``.
    lists: ``(index, count, tile)`` int32 ``[B, H, nQ, K]``, ``[B, H, nQ]``, ``[B, H, nQ, K]``: per query block the
      distinct kv blocks to visit (sorted, padded by repeating the last valid one), their count and tile ids.
    lists_t: the transpose ``(index, count, tile)`` over the kv blocks: ``[B, H, nK, nQ]``, ``[B, H, nK]``, ...
    tiles: ``[U, bq, bk]`` partial-block patterns the tile ids index (at ``st.blocks.fwd``), or None when every id
      is 0.
    st: from :func:`block_sparse_static`.

  Returns:
    ``out [B, T, H, E]`` and None (no lse).
  """
  tiles = None if tiles is None else jnp.asarray(tiles)
  fwd = _Plan(kernels.VisitLists(*lists), tiles)
  return _attention_lists(q, k, v, None, None, (fwd, fwd, _Plan(kernels.VisitLists(*lists_t), tiles)), st)


# -------------------------------------------------------------------------------------------------- custom_vjp
def _lists(info: MaskInfo, transpose: bool = False):
  if transpose:
    return kernels.VisitLists(info.q_index[None, None], info.q_count[None, None], info.q_tile[None, None])
  return kernels.VisitLists(info.kv_index[None, None], info.kv_count[None, None], info.kv_tile[None, None])


class _Plan(NamedTuple):
  """One kernel's visiting lists and tiles (int arrays or None: non-differentiable ``custom_vjp`` inputs)."""

  lists: kernels.VisitLists
  tiles: Any  # [U, bq, bk] or None


def _static_plans(st: _Static) -> tuple[_Plan, _Plan, _Plan]:
  """The static mask's forward, dq and (transposed) dk/dv lists, each at its kernel's tile."""
  cfg = st.cfg
  plans = []
  for (bq, bk), transpose in ((st.blocks.fwd, False), (st.blocks.dq, False), (st.blocks.dkv, True)):
    info = mask_info(cfg.mask, cfg.T, cfg.S, bq, bk)
    plans.append(_Plan(jax.tree.map(jnp.asarray, _lists(info, transpose)),
                       jnp.asarray(info.tiles) if info.has_partial else None))
  return tuple(plans)


def _forward(q, k, v, q_ids, kv_ids, plan: _Plan, st: _Static, return_lse: bool):
  cfg = st.cfg
  bq, bk = st.blocks.fwd
  return kernels.flash_attention_fwd(
      q, k, v, plan.lists, plan.tiles, q_segment_ids=q_ids, kv_segment_ids=kv_ids, scale=cfg.scale,
      soft_cap=cfg.logits_soft_cap, block_q=bq, block_k=bk, return_lse=return_lse, interpret=st.interpret)


def _attention(q, k, v, q_ids, kv_ids, st: _Static):
  """The static-mask path: the kernels over the ``mask_info`` lists."""
  return _attention_lists(q, k, v, q_ids, kv_ids, _static_plans(st), st)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention_lists(q, k, v, q_ids, kv_ids, plans: tuple[_Plan, _Plan, _Plan], st: _Static):
  """``plans``: the forward, dq and transposed dk/dv lists with their tiles, at ``st.blocks``' tiles."""
  return _forward(q, k, v, q_ids, kv_ids, plans[0], st, st.cfg.return_lse)


def _attention_fwd(q, k, v, q_ids, kv_ids, plans, st: _Static):
  out, lse = _forward(q, k, v, q_ids, kv_ids, plans[0], st, True)
  return (out, lse if st.cfg.return_lse else None), (q, k, v, q_ids, kv_ids, plans, out, lse)


def _attention_bwd(st: _Static, res, g):
  q, k, v, q_ids, kv_ids, plans, out, lse = res
  dout, dlse = g
  cfg = st.cfg
  # delta_i = sum_e dO_ie O_ie - dlse_i: the row term of the softmax Jacobian (lse enters with -dlse).
  delta = jnp.einsum("bthe,bthe->bht", dout.astype(jnp.float32), out.astype(jnp.float32))
  if dlse is not None:
    delta = delta - dlse.astype(jnp.float32)
  common = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids, scale=cfg.scale, soft_cap=cfg.logits_soft_cap,
                interpret=st.interpret)
  _, dq_plan, dkv_plan = plans
  bq, bk = st.blocks.dq
  dq = kernels.flash_attention_bwd_dq(q, k, v, dout, lse, delta, *dq_plan, block_q=bq, block_k=bk, **common)
  bq, bk = st.blocks.dkv
  dk, dv = kernels.flash_attention_bwd_dkv(q, k, v, dout, lse, delta, *dkv_plan, block_q=bq, block_k=bk, **common)
  return dq, dk, dv, None, None, None


_attention_lists.defvjp(_attention_fwd, _attention_bwd)


# =================================================================================================== cost model
# Public spec-sheet peaks (Google Cloud TPU documentation): dense bf16 matmul FLOP/s and HBM bandwidth per chip.
TPU_SPECS: dict[str, tuple[float, float]] = {
    "v5e": (197e12, 819e9),
    "v5p": (459e12, 2765e9),
}


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
                dtype=jnp.bfloat16, mask: Mask | None = None, blocks: _UserBlockSizes | None = None,
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
  rb = block_sizes(blocks, T, S)
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
