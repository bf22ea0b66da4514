"""``implementation="pallas_gpu"``: block-sparse flash attention with Pallas (Triton lowering) on GPUs.

The static mask is compiled at trace time (:func:`~jaxattn.ops.softmax.mask_info.mask_info`) into per-query-block
lists of the non-empty kv blocks, a full/partial flag per visited block and the deduplicated partial-block
patterns; the kernels in :mod:`pallas_kernels.softmax.gpu` visit only those blocks, forward and backward:

- forward: out + lse (FlashAttention-2 online softmax, one program per query block and (batch, head));
- backward (``custom_vjp``): ``delta = rowsum(dO * O) - dlse`` in XLA, then a dq kernel over the query blocks'
  lists and a dk/dv kernel over the transposed lists (one program per kv block and (batch, kv head), summing the
  query heads of its group in-kernel).

Supports: every static mask, segment ids, GQA/MQA (K/V never repeated), soft cap, lse, T and S of any length,
head dims up to 256 (non powers of two are zero-padded), f32/bf16/f16. Refuses (``NotImplementedError``): bias,
platforms other than GPU and CPU, block sizes that are not powers of two >= 16. On a CPU backend it runs in Pallas
interpret mode (slow; for tests and users without a GPU); ``implementation=None`` never picks it there.

The ``custom_vjp`` takes the visiting lists as (integer, non-differentiable) array inputs: the static-mask path
passes the ``mask_info`` lists (``[1, 1, ...]``, one tile per kernel); ``block_sparse_attention`` passes
data-dependent per-(batch, query head) lists built on device (:func:`block_sparse_static`,
:func:`block_sparse_attention_lists`; one tile for all three kernels).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxattn import _dispatch
from jaxattn.ops.softmax.config import AttentionConfig
from jaxattn.ops.softmax.mask_info import MaskInfo, mask_info
from pallas_kernels.softmax import gpu


@dataclasses.dataclass(frozen=True)
class _Static:
  cfg: AttentionConfig
  blocks: gpu.BlockSizes
  interpret: bool


def gpu_block_sizes(cfg: AttentionConfig, head_dim: int = 128, itemsize: int = 2) -> gpu.BlockSizes:
  """The kernel tiles: the user's :class:`~jaxattn.BlockSizes` when given, else the GPU default.

  ``head_dim`` is ``max(D, E)`` and ``itemsize`` the input bytes per element (they size the default tiles).
  """
  if cfg.block_sizes is None:
    return gpu.BlockSizes.default(cfg.T, cfg.S, head_dim, itemsize)
  b = cfg.block_sizes
  try:
    return gpu.BlockSizes(block_q=b.block_q, block_k=b.block_k, block_q_dq=b.dq[0], block_k_dq=b.dq[1],
                          block_q_dkv=b.dkv[0], block_k_dkv=b.dkv[1])
  except ValueError as e:
    raise NotImplementedError(f"pallas_gpu cannot use {b}: {e}") from None


def _check_call(q, v) -> bool:
  """The kernels' ``interpret`` flag, after refusing (``NotImplementedError``) the platforms and head dims the
  kernels lack."""
  interpret = _dispatch.pallas_interpret("pallas_gpu")
  D, E = q.shape[-1], v.shape[-1]
  if not (gpu.supported_head_dim(D) and gpu.supported_head_dim(E)):
    raise NotImplementedError(f"pallas_gpu supports head dims up to {gpu.MAX_HEAD_DIM}, got D={D}, E={E}")
  return interpret


def softmax_attention_pallas_gpu(q, k, v, bias, q_ids, kv_ids, cfg: AttentionConfig):
  """Pallas GPU kernels (interpret mode on CPU). See the module docstring for what is supported."""
  if bias is not None:
    raise NotImplementedError("pallas_gpu does not support bias")
  interpret = _check_call(q, v)
  D, E = q.shape[-1], v.shape[-1]
  st = _Static(cfg, gpu_block_sizes(cfg, max(D, E), jnp.dtype(q.dtype).itemsize), interpret=interpret)
  return _attention(q, k, v, q_ids, kv_ids, st)


# ------------------------------------------------------------------------------------------ dynamic block lists
def block_sparse_static(q, k, v, block_q: int, block_k: int, scale: float) -> _Static:
  """The static part of a ``block_sparse_attention`` call: the lists' ``block_q x block_k`` tile for all kernels.

  Raises:
    NotImplementedError: a platform or head dim the kernels lack, or list block sizes that are not powers of
      two >= 16 (the caller then falls back to another implementation).
  """
  interpret = _check_call(q, v)
  try:
    blocks = gpu.BlockSizes(block_q=block_q, block_k=block_k, block_q_dq=block_q, block_k_dq=block_k,
                            block_q_dkv=block_q, block_k_dkv=block_k)
  except ValueError as e:
    raise NotImplementedError(f"pallas_gpu cannot run lists of {block_q} x {block_k} blocks: {e}") from None
  cfg = AttentionConfig(T=q.shape[1], S=k.shape[1], scale=float(scale))
  return _Static(cfg, blocks, interpret=interpret)


def block_sparse_attention_lists(q, k, v, lists, lists_t, tiles, st: _Static):
  """Attention over data-dependent visiting lists (the ``block_sparse_attention`` path), differentiable in q, k, v.

  Args:
    q, k, v: as in ``softmax_attention``.
    lists: ``(index, count, tile)`` int32 ``[B, H, nQ, K]``, ``[B, H, nQ]``, ``[B, H, nQ, K]``: per query block the
      distinct kv blocks to visit (sorted, padded by repeating the last valid one), their count and tile ids.
    lists_t: the transpose ``(index, count, tile)`` over the kv blocks: ``[B, H, nK, nQ]``, ``[B, H, nK]``, ...
    tiles: ``[U, block_q, block_k]`` partial-block patterns the tile ids index, or None when every id is 0.
    st: from :func:`block_sparse_static` (its tile is the lists' block size).

  Returns:
    ``out [B, T, H, E]`` and ``lse [B, H, T]``.
  """
  tiles = None if tiles is None else jnp.asarray(tiles).astype(jnp.int8)
  tile = lambda t: None if tiles is None else t
  fwd = _Plan(gpu.BlockLists(lists[0], lists[1], tile(lists[2])), tiles)
  dkv = _Plan(gpu.BlockLists(lists_t[0], lists_t[1], tile(lists_t[2])), tiles)
  return _attention_lists(q, k, v, None, None, (fwd, fwd, dkv), st)


# ------------------------------------------------------------------------------------------------- mask lists
def _lists(info: MaskInfo, transposed: bool = False) -> tuple[gpu.BlockLists, jax.Array | None]:
  """Static visiting lists as ``[1, 1, rows, K]`` kernel inputs, plus the int8 tiles (None without partials)."""
  if transposed:
    index, count, tile = info.q_index, info.q_count, info.q_tile
  else:
    index, count, tile = info.kv_index, info.kv_count, info.kv_tile
  lift = lambda a: jnp.asarray(a, jnp.int32)[None, None]
  if not info.has_partial:
    return gpu.BlockLists(lift(index), lift(count)), None
  return gpu.BlockLists(lift(index), lift(count), lift(tile)), jnp.asarray(info.tiles.astype("int8"))


class _Plan(NamedTuple):
  """One kernel's visiting lists and tiles (int arrays or None: non-differentiable ``custom_vjp`` inputs)."""

  lists: gpu.BlockLists
  tiles: jax.Array | None


def _static_plans(st: _Static) -> tuple[_Plan, _Plan, _Plan]:
  """The static mask's forward, dq and (transposed) dk/dv lists, each at its kernel's tile."""
  cfg, b = st.cfg, st.blocks
  info = lambda blocks: mask_info(cfg.mask, cfg.T, cfg.S, *blocks)
  return _Plan(*_lists(info(b.fwd))), _Plan(*_lists(info(b.dq))), _Plan(*_lists(info(b.dkv), transposed=True))


# -------------------------------------------------------------------------------------------------- custom_vjp
def _forward(q, k, v, q_ids, kv_ids, plan: _Plan, st: _Static):
  cfg, b = st.cfg, st.blocks
  return gpu.flash_forward(q, k, v, q_ids, kv_ids, plan.lists, plan.tiles, block_q=b.block_q, block_k=b.block_k,
                           scale=cfg.scale, soft_cap=cfg.logits_soft_cap, num_warps=b.warps(q.shape[-1]),
                           num_stages=b.num_stages, interpret=st.interpret)


def _attention(q, k, v, q_ids, kv_ids, st: _Static):
  """The static-mask path: the kernels over the ``mask_info`` lists."""
  return _attention_lists(q, k, v, q_ids, kv_ids, _static_plans(st), st)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention_lists(q, k, v, q_ids, kv_ids, plans: tuple[_Plan, _Plan, _Plan], st: _Static):
  """``plans``: the forward, dq and transposed dk/dv lists with their tiles, at ``st.blocks``' tiles."""
  return _forward(q, k, v, q_ids, kv_ids, plans[0], st)


def _attention_fwd(q, k, v, q_ids, kv_ids, plans, st):
  out, lse = _forward(q, k, v, q_ids, kv_ids, plans[0], st)
  return (out, lse), (q, k, v, q_ids, kv_ids, plans, out, lse)


def _attention_bwd(st: _Static, res, g):
  q, k, v, q_ids, kv_ids, plans, out, lse = res
  dout, dlse = g
  cfg, b = st.cfg, st.blocks
  # delta_i = sum_e dO_ie O_ie - dlse_i: the row term of the softmax Jacobian (lse enters as -dlse).
  delta = jnp.einsum("bthe,bthe->bht", dout.astype(jnp.float32), out.astype(jnp.float32)) - dlse
  common = dict(scale=cfg.scale, soft_cap=cfg.logits_soft_cap, num_warps=b.warps(max(q.shape[-1], v.shape[-1]), True),
                num_stages=b.num_stages_bwd, interpret=st.interpret)
  _, dq_plan, dkv_plan = plans
  dq = gpu.flash_backward_dq(q, k, v, q_ids, kv_ids, dout, lse, delta, *dq_plan, block_q=b.block_q_dq,
                             block_k=b.block_k_dq, **common)
  dk, dv = gpu.flash_backward_dkv(q, k, v, q_ids, kv_ids, dout, lse, delta, *dkv_plan,
                                  block_q=b.block_q_dkv, block_k=b.block_k_dkv, **common)
  return dq, dk, dv, None, None, None


_attention_lists.defvjp(_attention_fwd, _attention_bwd)
