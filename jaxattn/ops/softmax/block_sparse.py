"""``block_sparse_attention``: softmax attention over data-dependent kv block lists (dynamic sparsity).

Each (batch, query head, query block) lists the kv blocks it visits; a static mask applies on top. This is the
index-driven form used by top-k block selection, landmark retrieval and random block masks.

The Pallas implementations run the softmax kernels of ``softmax_attention`` over per-(batch, query head) visiting
lists built on device by :func:`device_lists` (deduplicated, sorted, intersected with the static mask's non-empty
blocks, plus the transposed lists for dk/dv); the kernels' tile is the lists' ``block_q x block_k``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn import _dispatch
from jaxattn._validation import validate_qkv
from jaxattn.masks import Full, Mask
from jaxattn.ops.softmax import pallas_gpu, pallas_tpu
from jaxattn.ops.softmax.mask_info import MaskInfo, mask_info
from jaxattn.ops.softmax.reference import dense_attention


def block_sparse_attention(q, k, v, kv_block_indices, kv_block_counts, *, block_q: int, block_k: int,
                           mask: Mask | None = None, scale: float | None = None,
                           implementation: str | Sequence[str] | None = None):
  """Softmax attention where query block ``qb`` of head ``h`` sees only the kv blocks it lists.

  Query ``i`` (block ``qb = i // block_q``) may attend key ``j`` iff ``j // block_k`` is among the first
  ``kv_block_counts[b, h, qb]`` entries of ``kv_block_indices[b, h, qb]`` and the static ``mask`` allows
  ``(i, j)``. Repeated indices count once. Rows with no allowed key give output 0 (no NaN).

  Args:
    q: ``[B, T, H, D]``; k: ``[B, S, G, D]``; v: ``[B, S, G, E]`` (GQA as in ``softmax_attention``).
    kv_block_indices: int ``[B, H, ceil(T / block_q), K]``, values in ``[0, ceil(S / block_k))``.
    kv_block_counts: int ``[B, H, ceil(T / block_q)]``, values in ``[0, K]``.
    block_q, block_k: block sizes of the lists.
    mask: static mask applied on top (e.g. ``Causal()``).
    scale: default ``D ** -0.5``.
    implementation: ``"reference"`` (dense), ``"xla"`` (gathers the listed blocks per query block; memory
      ``O(B * H * K * block_k * (D + block_q))`` per step), ``"pallas_gpu"`` (block sizes powers of two >= 16) or
      ``"pallas_tpu"`` (``block_q`` and ``block_k`` multiples of 128 unless they cover T / S); the Pallas kernels
      run in interpret mode on CPU. None picks per platform, falling back to ``"xla"`` when the block sizes do
      not fit the kernels.

  Returns:
    ``out [B, T, H, E]``; differentiable with respect to q, k and v.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  validate_qkv(q, k, v)
  B, T, H, D = q.shape
  S = k.shape[1]
  for name, val in (("block_q", block_q), ("block_k", block_k)):
    if not isinstance(val, int) or isinstance(val, bool) or val < 1:
      raise ValueError(f"{name} must be a positive int, got {val!r}")
  nq, nk = -(-T // block_q), -(-S // block_k)
  idx, cnt = jnp.asarray(kv_block_indices), jnp.asarray(kv_block_counts)
  if not jnp.issubdtype(idx.dtype, jnp.integer) or idx.ndim != 4 or idx.shape[:3] != (B, H, nq):
    raise ValueError(f"kv_block_indices must be int [B, H, ceil(T / block_q), K] = [{B}, {H}, {nq}, K], "
                     f"got {idx.dtype} {idx.shape}")
  if not jnp.issubdtype(cnt.dtype, jnp.integer) or cnt.shape != (B, H, nq):
    raise ValueError(f"kv_block_counts must be int [B, H, ceil(T / block_q)] = {(B, H, nq)}, "
                     f"got {cnt.dtype} {cnt.shape}")
  if mask is not None and not isinstance(mask, Mask):
    raise ValueError(f"mask must be a jaxattn.masks.Mask or None, got {type(mask).__name__}")
  if isinstance(mask, Full):
    mask = None
  scale = float(D) ** -0.5 if scale is None else float(scale)
  # Out-of-range entries can only come from bad data: clamp them so no gather reads outside the array.
  idx = jnp.clip(idx.astype(jnp.int32), 0, nk - 1)
  cnt = jnp.clip(cnt.astype(jnp.int32), 0, idx.shape[-1])
  out, _ = _dispatch.dispatch("block_sparse_attention", REGISTRY, implementation, DEFAULTS,
                              q, k, v, idx, cnt, block_q, block_k, mask, scale)
  return out


def _block_sparse_reference(q, k, v, idx, cnt, block_q, block_k, mask, scale):
  """Dense: scatter the lists into a ``[B, H, nQ, nK]`` layout, expand, and intersect with the static mask."""
  B, T, H, _ = q.shape
  S, G = k.shape[1], k.shape[2]
  nq, nk = -(-T // block_q), -(-S // block_k)
  valid = jnp.arange(idx.shape[-1]) < cnt[..., None]  # [B, H, nQ, K]
  layout = jnp.zeros((B, H, nq, nk), bool)
  b, h, r, _ = jnp.indices(idx.shape)
  layout = layout.at[b, h, r, idx].max(valid)
  allowed = jnp.repeat(jnp.repeat(layout, block_q, 2), block_k, 3)[:, :, :T, :S]
  if mask is not None:
    allowed = allowed & jnp.asarray(mask.to_dense(T, S))
  return dense_attention(q, k, v, None, allowed.reshape(B, G, H // G, T, S), scale)


def _block_sparse_xla(q, k, v, idx, cnt, block_q, block_k, mask, scale):
  return _block_sparse_xla_impl(q, k, v, idx, cnt, block_q, block_k, mask, scale), None


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))
def _block_sparse_xla_impl(q, k, v, idx, cnt, bq, bk, mask, scale):
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  K = idx.shape[-1]
  info = mask_info(mask, T, S, bq, bk)  # static pattern (and padding) per (q block, kv block)
  nq, nk = info.num_q_blocks, info.num_k_blocks
  tile_of = jnp.asarray(info.tile_of)  # [nQ, nK]
  tiles = jnp.asarray(info.tiles)  # [U, bq, bk]
  layout = jnp.asarray(info.layout)  # [nQ, nK]
  kp = jnp.pad(k, [(0, 0), (0, nk * bk - S), (0, 0), (0, 0)]).reshape(B, nk, bk, G, D)
  vp = jnp.pad(v, [(0, 0), (0, nk * bk - S), (0, 0), (0, 0)]).reshape(B, nk, bk, G, E)
  qp = jnp.pad(q, [(0, 0), (0, nq * bq - T), (0, 0), (0, 0)]).reshape(B, nq, bq, G, R, D)
  head_g = jnp.arange(H) // R  # kv head of each query head

  @jax.checkpoint  # recompute the gathered blocks in the backward pass instead of saving them per query block
  def one_q_block(qi, qblk):
    ids = idx[:, :, qi]  # [B, H, K]
    bsel = jnp.arange(B)[:, None, None]
    kg = kp[bsel, ids, :, head_g[None, :, None]]  # [B, H, K, bk, D]
    vg = vp[bsel, ids, :, head_g[None, :, None]]  # [B, H, K, bk, E]
    valid = jnp.arange(K)[None, None, :] < cnt[:, :, qi, None]  # [B, H, K]
    # a block listed twice counts once: keep only its first valid occurrence
    dup = (ids[..., :, None] == ids[..., None, :]) & valid[..., None, :] & jnp.tri(K, k=-1, dtype=bool)
    valid = valid & ~dup.any(-1)
    allowed = valid[..., None, :, None] & (layout[qi][ids] != 0)[..., None, :, None]  # [B, H, 1, K, 1]
    allowed = allowed & tiles[tile_of[qi][ids]].transpose(0, 1, 3, 2, 4)  # [B, H, bq, K, bk]
    qh = qblk.reshape(B, bq, H, D)
    s = jnp.einsum("bqhd,bhkcd->bhqkc", qh, kg, preferred_element_type=jnp.float32) * scale
    s = jnp.where(allowed, s, -jnp.inf).reshape(B, H, bq, K * bk)
    m = lax.stop_gradient(s.max(-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = p.sum(-1, keepdims=True)
    o = jnp.einsum("bhqx,bhxe->bqhe", (p / jnp.where(l == 0, 1.0, l)).astype(v.dtype), vg.reshape(B, H, K * bk, E),
                   preferred_element_type=jnp.float32)
    return o.astype(q.dtype)

  out = lax.map(lambda a: one_q_block(*a), (jnp.arange(nq), qp.transpose(1, 0, 2, 3, 4, 5)))  # [nQ, B, bq, H, E]
  return out.transpose(1, 0, 2, 3, 4).reshape(B, nq * bq, H, E)[:, :T]


# ------------------------------------------------------------------------------------------------------ Pallas
class DeviceLists(NamedTuple):
  """Kernel visiting lists built on device from data-dependent block lists (int32).

  - ``index [B, H, nQ, Kw]``: per query block the distinct kv blocks to visit, sorted, first ``count`` valid, the
    rest repeating the last valid entry (0 when none); ``Kw = min(K, nK)``;
  - ``count [B, H, nQ]`` and ``tile [B, H, nQ, Kw]`` (``tile_of[qb, kb]``: 0 full, ``t >= 1`` = ``tiles[t]``);
  - ``index_t / count_t / tile_t``: the transpose, per kv block the sorted query blocks visiting it
    (``[B, H, nK, nQ]`` / ``[B, H, nK]`` / ``[B, H, nK, nQ]``).
  """

  index: jax.Array
  count: jax.Array
  tile: jax.Array
  index_t: jax.Array
  count_t: jax.Array
  tile_t: jax.Array


def device_lists(idx, cnt, info: MaskInfo) -> DeviceLists:
  """Compacts ``block_sparse_attention``'s lists for the kernels (pure jnp, jit-friendly).

  Drops the entries past the count, those naming a block that is empty under the static mask
  (``info.layout == 0``) and repeats; sorts the rest to the front.

  Args:
    idx: int32 ``[B, H, nQ, K]`` kv block ids in ``[0, nK)``; cnt: int32 ``[B, H, nQ]`` in ``[0, K]``.
    info: the static mask's :class:`MaskInfo` at the lists' block sizes (``nQ x nK`` blocks).
  """
  B, H, nq, K = idx.shape
  nk = info.num_k_blocks
  layout, tile_of = jnp.asarray(info.layout), jnp.asarray(info.tile_of)
  rows = jnp.arange(nq)[:, None]
  keep = (jnp.arange(K) < cnt[..., None]) & (layout[rows, idx] != 0)
  ids = jnp.sort(jnp.where(keep, idx, nk), axis=-1)  # nk: sentinel, sorts last
  repeat = jnp.concatenate([jnp.zeros_like(keep[..., :1]), ids[..., 1:] == ids[..., :-1]], axis=-1)
  ids = jnp.sort(jnp.where(repeat, nk, ids), axis=-1)[..., :min(K, nk)]
  index, count = _compact(ids, nk)
  # The transpose from the scattered [B, H, nQ, nK] visit pattern (sentinel entries fall outside and are dropped).
  b, h, r, _ = jnp.indices(ids.shape, sparse=True)
  visit = jnp.zeros((B, H, nq, nk), bool).at[b, h, r, ids].set(True, mode="drop")
  ids_t = jnp.sort(jnp.where(visit.swapaxes(2, 3), jnp.arange(nq, dtype=jnp.int32), nq), axis=-1)
  index_t, count_t = _compact(ids_t, nq)
  return DeviceLists(index, count, tile_of[rows, index], index_t, count_t,
                     tile_of.T[jnp.arange(nk)[:, None], index_t])


def _compact(ids, sentinel: int):
  """Sorted ids with ``sentinel`` past the valid ones -> (ids padded by the last valid one or 0, count)."""
  count = jnp.sum(ids < sentinel, axis=-1, dtype=jnp.int32)
  last = jnp.take_along_axis(ids, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  last = jnp.where(count[..., None] > 0, last, 0)
  return jnp.where(ids < sentinel, ids, last).astype(jnp.int32), count


def _block_sparse_pallas(backend, q, k, v, idx, cnt, block_q, block_k, mask, scale):
  """``backend``: the ``pallas_gpu`` or ``pallas_tpu`` wrapper module. Refuses block sizes the kernels cannot run."""
  st = backend.block_sparse_static(q, k, v, block_q, block_k, scale)  # NotImplementedError -> next implementation
  return _block_sparse_pallas_impl(q, k, v, idx, cnt, backend, st, mask), None


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _block_sparse_pallas_impl(q, k, v, idx, cnt, backend, st, mask):
  info = mask_info(mask, q.shape[1], k.shape[1], *st.blocks.fwd)  # at the kernels' (clamped) tile
  lists = device_lists(idx, cnt, info)
  out, _ = backend.block_sparse_attention_lists(q, k, v, lists[:3], lists[3:],
                                                info.tiles if info.has_partial else None, st)
  return out


REGISTRY = {
    "reference": _block_sparse_reference,
    "xla": _block_sparse_xla,
    "pallas_gpu": functools.partial(_block_sparse_pallas, pallas_gpu),
    "pallas_tpu": functools.partial(_block_sparse_pallas, pallas_tpu),
}
DEFAULTS = {"cpu": ("xla",), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")}
