"""Attention recall and realised sparsity of a sparse-prefill selection.

- :func:`attention_recall`: the fraction of the dense (causal) softmax mass that a selection covers, per
  (batch, query head) and averaged: ``recall = (1 / rows) * sum_i sum_{j selected} P[i, j]`` where ``P`` is the
  dense masked softmax and ``rows`` the query rows with at least one allowed key. 1 means the sparse output equals
  the dense one; it is the cheap proxy to track next to task accuracy.
- :func:`sparsity`: the fraction of causal query-key pairs a selection does *not* compute,
  ``s = 1 - computed / causal_area`` (the Sparse Frontier's prefill sparsity; compression ratio ``1 / (1 - s)``).

Both accept a :class:`~jaxattn.sparse.BlockIndex` (what the kernels compute: listed blocks & causal), a
:class:`~jaxattn.sparse.VerticalSlashSelection` (the exact token selection) or a dense bool mask
``[B|1, H|1, T, S]`` (small shapes).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn.masks import Causal, Mask
from jaxattn.sparse.index import (BlockIndex, VerticalSlashSelection, causal_count, check_qk, resolve_scale, vs_tile,
                                  causal_mask)

__all__ = ["Recall", "Sparsity", "attention_recall", "sparsity"]

_HI = lax.Precision.HIGHEST


class Recall(NamedTuple):
  """``per_head`` f32 ``[B, H]`` and ``mean`` f32 ``[]`` (the mean over batch and heads)."""

  per_head: jax.Array
  mean: jax.Array


class Sparsity(NamedTuple):
  """``per_head`` f32 ``[B, H]`` (fraction of causal pairs not computed) and ``mean`` (over batch and heads)."""

  per_head: jax.Array
  mean: jax.Array


def _kind(selection, T: int, S: int, H: int):
  if isinstance(selection, (BlockIndex, VerticalSlashSelection)):
    if (selection.T, selection.S) != (T, S):
      raise ValueError(f"selection was built for T={selection.T}, S={selection.S} but q, k have T={T}, S={S}")
    return "blocks" if isinstance(selection, BlockIndex) else "vs"
  sel = jnp.asarray(selection)
  if sel.dtype != jnp.bool_ or sel.ndim != 4 or sel.shape[2:] != (T, S) or sel.shape[1] not in (1, H):
    raise ValueError(f"selection must be a BlockIndex, a VerticalSlashSelection or a bool mask [B|1, H|1, T={T}, "
                     f"S={S}], got {type(selection).__name__} {getattr(sel, 'dtype', '')} "
                     f"{getattr(sel, 'shape', '')}")
  return "dense"


def attention_recall(q, k, selection, *, mask: Mask | None = None, scale: float | None = None,
                     chunk: int = 128) -> Recall:
  """Fraction of the dense softmax mass covered by ``selection``, per (batch, query head) and averaged.

  Computed per chunk of ``chunk`` query rows (``lax.map``): memory ``O(B * H * chunk * S)``, never ``T x S``
  for a block index or a vertical-slash selection (a dense bool selection is already ``T x S``). jit-able (q, k and
  the selection's arrays traced; ``mask``, ``scale``, ``chunk`` static).

  Args:
    q: ``[B, T, H, D]``; k: ``[B, S, G, D]`` (GQA: query head ``h`` reads kv head ``h // (H // G)``).
    selection: a :class:`BlockIndex`, a :class:`VerticalSlashSelection` or a bool ``[B|1, H|1, T, S]``.
    mask: the mask of the dense reference distribution, default ``Causal(offset=S - T)``; selected pairs outside
      it count nothing. A non-causal ``Mask`` is evaluated as a dense ``[T, S]`` constant (small shapes).
    scale: logit scale, default ``D ** -0.5``.
    chunk: query rows per step (a :class:`BlockIndex` uses its ``block_q``).

  Returns:
    :class:`Recall` ``(per_head [B, H], mean [])``, float32; 1.0 for a selection covering every allowed pair.
  """
  B, T, S, H, G, D = check_qk(q, k)
  kind = _kind(selection, T, S, H)
  mask = causal_mask(T, S) if mask is None else mask
  if not isinstance(mask, Mask):
    raise ValueError(f"mask must be a jaxattn.masks.Mask or None, got {type(mask).__name__}")
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
    raise ValueError(f"chunk must be a positive int, got {chunk!r}")
  bq = selection.block_q if kind == "blocks" else min(chunk, T)
  if kind == "dense":
    arrays = (jnp.asarray(selection),)
  elif kind == "blocks":
    arrays = (selection.indices, selection.counts)
  else:
    arrays = (selection.column_set(), selection.offset_set())
  per_head = _recall(jnp.asarray(q), jnp.asarray(k), arrays, kind=kind, mask=mask, scale=resolve_scale(scale, D), bq=bq,
                     bk=selection.block_k if kind == "blocks" else 0)
  return Recall(per_head, per_head.mean())


@functools.partial(jax.jit, static_argnames=("kind", "mask", "scale", "bq", "bk"))
def _recall(q, k, arrays, *, kind: str, mask: Mask, scale: float, bq: int, bk: int):
  B, T, H, D = q.shape
  S, G = k.shape[1], k.shape[2]
  R = H // G
  nq = -(-T // bq)
  shift = S - T
  qp = jnp.pad(q.astype(jnp.float32), [(0, 0), (0, nq * bq - T), (0, 0), (0, 0)]).reshape(B, nq, bq, G, R, D)
  kf = k.astype(jnp.float32)
  dense_mask = None
  if not (isinstance(mask, Causal)):
    dm = np.zeros((nq * bq, S), bool)
    dm[:T] = mask.to_dense(T, S)
    dense_mask = jnp.asarray(dm)
  if kind == "dense":
    sel_all = jnp.pad(arrays[0], [(0, 0), (0, 0), (0, nq * bq - T), (0, 0)])
  if kind == "blocks":
    nk = -(-S // bk)
    idx, cnt = arrays
    valid = jnp.arange(idx.shape[-1]) < cnt[..., None]

  def step(qi):
    rows = qi * bq + jnp.arange(bq)  # [bq]
    s = jnp.einsum("bqgrd,bsgd->bgrqs", qp[:, qi], kf, precision=_HI).reshape(B, H, bq, S) * scale
    if dense_mask is None:
      allowed = (jnp.arange(S)[None, :] <= rows[:, None] + mask.offset)
    else:
      allowed = lax.dynamic_slice_in_dim(dense_mask, qi * bq, bq, 0)
    allowed = allowed & (rows < T)[:, None]  # [bq, S]
    s = jnp.where(allowed, s, -jnp.inf)
    m = s.max(-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(allowed, jnp.exp(s - m), 0.0)
    l = p.sum(-1, keepdims=True)
    p = p / jnp.where(l == 0, 1.0, l)
    if kind == "blocks":
      ids = jnp.where(valid[:, :, qi], idx[:, :, qi], nk)  # [B, H, K]
      b, h, _ = jnp.indices(ids.shape, sparse=True)
      row = jnp.zeros((B, H, nk), bool).at[b, h, ids].set(True, mode="drop")
      sel = jnp.repeat(row, bk, axis=-1)[:, :, None, :S]
    elif kind == "vs":
      sel = vs_tile(arrays[0], arrays[1], rows + shift, S)
    else:
      sel = lax.dynamic_slice_in_dim(sel_all, qi * bq, bq, 2)
    covered = jnp.where(sel, p, 0.0).sum((-1, -2))  # [B, H]
    n_rows = jnp.sum(allowed.any(-1))
    return covered, n_rows

  covered, n_rows = lax.map(step, jnp.arange(nq))
  return covered.sum(0) / jnp.maximum(n_rows.sum(), 1).astype(jnp.float32)


def sparsity(selection, *, T: int | None = None, S: int | None = None) -> Sparsity:
  """The realised sparsity ``1 - computed / causal_area`` of a selection, per (batch, query head) and averaged.

  - :class:`BlockIndex`: computed = causal pairs of the distinct listed blocks (what ``block_sparse_attention``
    computes with the causal mask on top), exactly, in closed form per block (no dense mask).
  - :class:`VerticalSlashSelection`: computed = causal pairs on a selected column or diagonal, exactly:
    ``sum_c #rows seeing c + sum_d #rows with p >= d - #(c, d) with c + d a row position`` (no dense mask).
  - bool ``[B|1, H|1, T, S]`` (needs ``T`` and ``S`` only to check): the selected causal pairs.

  The causal mask is ``Causal(offset=S - T)``. jit-able.
  """
  if isinstance(selection, BlockIndex):
    return _finish(_block_computed(selection.indices, selection.counts, T=selection.T, S=selection.S,
                                   bq=selection.block_q, bk=selection.block_k), selection.T, selection.S)
  if isinstance(selection, VerticalSlashSelection):
    return _finish(_vs_computed(selection.columns, selection.column_valid, selection.offsets,
                                selection.offset_valid, T=selection.T, S=selection.S), selection.T, selection.S)
  sel = jnp.asarray(selection)
  if sel.dtype != jnp.bool_ or sel.ndim != 4:
    raise ValueError(f"selection must be a BlockIndex, a VerticalSlashSelection or a bool mask [B, H, T, S], got "
                     f"{type(selection).__name__} {getattr(sel, 'dtype', '')} {getattr(sel, 'shape', '')}")
  T_, S_ = sel.shape[2:]
  if (T is not None and T != T_) or (S is not None and S != S_):
    raise ValueError(f"mask shape {sel.shape} does not match T={T}, S={S}")
  if T_ > S_:
    raise ValueError(f"sparse prefill needs T <= S, got mask shape {sel.shape}")
  causal = jnp.asarray(causal_mask(T_, S_).to_dense(T_, S_))
  return _finish(jnp.sum(sel & causal, axis=(-1, -2)), T_, S_)


def _finish(computed, T: int, S: int) -> Sparsity:
  area = float(np.sum(np.arange(S - T, S, dtype=np.float64) + 1))
  per_head = 1.0 - computed.astype(jnp.float32) / np.float32(area)
  return Sparsity(per_head, per_head.mean())


@functools.partial(jax.jit, static_argnames=("T", "S", "bq", "bk"))
def _block_computed(idx, cnt, *, T: int, S: int, bq: int, bk: int):
  nk = -(-S // bk)
  K = idx.shape[-1]
  ids = jnp.sort(jnp.where(jnp.arange(K) < cnt[..., None], idx, nk), axis=-1)
  first = jnp.concatenate([jnp.ones_like(ids[..., :1], bool), ids[..., 1:] != ids[..., :-1]], axis=-1)
  keep = first & (ids >= 0) & (ids < nk)
  qb = jnp.arange(idx.shape[2])[:, None]
  area = causal_count(jnp, qb, ids, T, S, bq, bk)  # [B, H, nQ, K]
  return jnp.sum(jnp.where(keep, area, 0).astype(jnp.float32), axis=(-1, -2))  # f32: may exceed int32


@functools.partial(jax.jit, static_argnames=("T", "S"))
def _vs_computed(cols, col_valid, offs, off_valid, *, T: int, S: int):
  lo, hi = S - T, S - 1  # absolute positions of the query rows
  # rows seeing column c: positions p in [max(c, lo), hi]; rows on diagonal d: p in [max(d, lo), hi]
  f32 = jnp.float32
  n_col = jnp.where(col_valid, jnp.maximum(hi - jnp.maximum(cols, lo) + 1, 0), 0).astype(f32).sum(-1)
  n_off = jnp.where(off_valid, jnp.maximum(hi - jnp.maximum(offs, lo) + 1, 0), 0).astype(f32).sum(-1)
  # overlap: (column c, diagonal d) meet at row p = c + d when lo <= c + d <= hi
  meet = cols[..., :, None] + offs[..., None, :]
  both = col_valid[..., :, None] & off_valid[..., None, :] & (meet >= lo) & (meet <= hi)
  return n_col + n_off - both.sum((-1, -2)).astype(f32)
