"""Mosaic TPU statistics kernels for softmax attention: row and column statistics of ``P`` without ``T x S``.

For ``P = softmax(s)`` with ``s = cap * tanh(scale * q.k / cap)`` (no cap: ``scale * q.k``) over the allowed keys of
each query row, two kernels over the block-sparse visiting lists of :mod:`pallas_kernels.softmax.tpu` (the same
scalar-prefetched lists, deduplicated partial-block tiles and segment-id masking as the forward kernel, so empty
blocks are never visited):

- :func:`row_stats`, grid ``(B, H, nQ, K)`` over the kv lists (the forward kernel's grid): an online pass keeping,
  per query row in f32 VMEM scratch, the running max ``m``, ``l = sum e^{s - m}``, ``u = sum e^{s - m} (s - m)``
  and the column of the first maximum. At the last step it writes ``lse = m + log l``, the row maximum of ``P``
  (``e^{m - lse} = 1 / l``), its argmax (smallest column on ties: blocks are visited in increasing order and a
  later block must be strictly larger) and the entropy ``-sum P log P = log l - u / l`` (nats). ``u`` is kept
  relative to the running max, so the entropy has no ``lse - E[s]`` cancellation when logits are large.
- :func:`col_stats`, grid ``(B, H, nK, Kt)`` over the transposed lists (for each kv block the query blocks that
  visit it): the normalised probabilities ``exp(s - lse)`` of each visited block summed over its rows into the
  ``(8, bk)`` column-sum output block, which stays resident across the (sequential) last grid axis; the same for
  the number of allowed rows per column.

Query head ``h`` reads kv head ``h // (H // G)`` through the index maps (GQA / MQA, K never repeated); statistics
are per query head. Rows with no allowed key give lse ``-inf``, row max 0, argmax -1 and entropy 0, never NaN.
T and S are zero-padded to whole blocks; padded keys and rows are masked by the tiles (static lists from
``jaxattn.ops.softmax.mask_info`` always mark the edge blocks partial) or, for lists without tiles, by iota bounds.

Layouts (as in the flash kernels): row statistics are lane-broadcast ``[B, H, Tp, 128]`` blocks ``(bq, 128)``, column
statistics sublane-broadcast ``[B, H, 8, Sp]`` blocks ``(8, bk)``; ``block_q`` is a sublane dim (multiple of 8 or all
of T), ``block_k`` a lane dim (multiple of 128 or all of S) in both kernels. Argmax is carried as an f32 column index
(exact below 2^24 keys) because float lane reductions are what Mosaic reduces natively. No backward: statistics
are not differentiated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import NT
from pallas_kernels.softmax.tpu import (NUM_LANES, NUM_SUBLANES, VisitLists, _check_lists, _Control, _div, _geom,
                                        _ids_cols, _ids_rows, _interpret, _logits, _precision, _row_mask_inputs,
                                        _rows_cols, _tiles, _to_kernel, _unpack, check_block, flatten_lists, lanes)

__all__ = ["row_stats", "col_stats", "check_tiles", "MAX_KEYS"]

MAX_KEYS = 1 << 24  # the f32 argmax column index is exact below this
_F32 = jnp.float32


def check_tiles(block_q: int, block_k: int, T: int, S: int, owner: str = "") -> tuple[int, int]:
  """``(block_q, block_k)`` clamped to ``(T, S)``; ``ValueError`` naming the value if one breaks the (8, 128) rule
  (``block_q`` is a sublane dim, ``block_k`` a lane dim in both kernels)."""
  pre = f"{owner}." if owner else ""
  bq = check_block(block_q, T, "sublane", pre + "block_q", "T", "rows of the q / row-statistics blocks")
  bk = check_block(block_k, S, "lane", pre + "block_k", "S", "lanes of the logits and column-statistics blocks")
  return bq, bk


# ------------------------------------------------------------------------------------------------ row pass
def _row_kernel(*refs, geom, has_seg: bool, has_tiles: bool, kv_len: int, scale: float, cap, prec):
  npf = 4 if has_tiles else 2
  (pref, (q_ref, k_ref), seg, tile_ref, (lse_ref, rmax_ref, am_ref, ent_ref),
   (m_scr, l_scr, u_scr, a_scr)) = _unpack(refs, npf, 2, 2 if has_seg else 0, int(has_tiles), 4, 4)
  b, h, i, j = (pl.program_id(a) for a in range(4))
  bk = k_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, _F32)
    l_scr[...] = jnp.zeros(l_scr.shape, _F32)
    u_scr[...] = jnp.zeros(u_scr.shape, _F32)
    a_scr[...] = jnp.full(a_scr.shape, -1.0, _F32)

  ctl = _Control(pref, geom.slot(b, h, i, j), geom.row(b, h, i), bk, kv_len)

  def step(masked: bool):
    s = lax.dot_general(q_ref[...], k_ref[...], NT, preferred_element_type=_F32, precision=prec) * scale
    s, _ = _logits(s, cap)  # [bq, bk]
    keep = ctl.keep(masked, s.shape, tile_ref, seg)
    if keep is not None:
      s = jnp.where(keep, s, -jnp.inf)
    bm = jnp.max(s, axis=-1, keepdims=True)  # [bq, 1]
    col = lax.broadcasted_iota(jnp.int32, s.shape, 1).astype(_F32)
    first = jnp.min(jnp.where(s == bm, col, float(bk)), axis=-1, keepdims=True)  # first max of the block
    m_prev, l_prev, u_prev = m_scr[...], l_scr[...], u_scr[...]  # [bq, 128]
    m_next = jnp.maximum(m_prev, bm)
    m_safe = jnp.where(jnp.isneginf(m_next), 0.0, m_next)  # all masked so far: shift by 0, p = 0
    alpha = jnp.exp(m_prev - m_safe)
    d = s - lanes(m_safe, bk)  # <= 0 (or -inf)
    p = jnp.exp(d)
    pd = jnp.where(p > 0, p * d, 0.0)
    # u is relative to the running max: moving the max from m_prev to m_safe adds (m_prev - m_safe) per unit of l.
    shift = jnp.where(jnp.isneginf(m_prev), 0.0, m_prev - m_safe)
    u_scr[...] = alpha * (u_prev + shift * l_prev) + jnp.sum(pd, axis=-1, keepdims=True)
    l_scr[...] = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
    m_scr[...] = m_next
    glob = first + (ctl.kv_blk * bk).astype(_F32)
    a_scr[...] = jnp.where(bm > m_prev, glob, a_scr[...])  # strict: an earlier block keeps a tie

  ctl.run(j, step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _end():
    l = l_scr[...]
    ok = l > 0
    l1 = jnp.where(ok, l, 1.0)
    inv = 1.0 / l1
    lse_ref[...] = jnp.where(ok, m_scr[...] + jnp.log(l1), -jnp.inf)
    rmax_ref[...] = jnp.where(ok, inv, 0.0)
    am_ref[...] = jnp.where(ok, a_scr[...], -1.0)
    ent_ref[...] = jnp.where(ok, jnp.log(l1) - u_scr[...] * inv, 0.0)


def row_stats(q, k, lists: VisitLists, tiles=None, *, q_segment_ids=None, kv_segment_ids=None, scale: float,
              soft_cap: float | None = None, block_q: int, block_k: int, interpret=False,
              vmem_limit_bytes: int | None = None):
  """Row statistics of ``P`` over the kv visiting lists: one online pass, never ``T x S``.

  Args:
    q: ``[B, T, H, D]``; k: ``[B, S, G, D]`` (``H % G == 0``).
    lists: per query block (``nQ = ceil(T / block_q)``) the kv blocks to visit, ``[1|B, 1|H, nQ, K]``
      (:class:`pallas_kernels.softmax.tpu.VisitLists`).
    tiles: ``[U, block_q, block_k]`` partial-block patterns (tile 0 unused) or None.
    q_segment_ids, kv_segment_ids: optional int ``[B, T]`` / ``[B, S]``.
    scale, soft_cap: the logits ``cap * tanh(scale * q.k / cap)``.
    block_q, block_k: tiles (checked against the (8, 128) rule; clamped to T / S).
    interpret: False (Mosaic) or True / ``pltpu.InterpretParams(...)``.
    vmem_limit_bytes: the Mosaic scoped-VMEM limit (None: the compiler's default).

  Returns:
    ``(lse, rowmax, argmax, entropy)``, each ``[B, H, T]``: lse f32 (``-inf`` for rows without keys), row maximum
    of ``P`` f32 (0), argmax int32 (-1), entropy in nats f32 (0).
  """
  B, T, H, D = q.shape
  _, S, G, _ = k.shape
  if S >= MAX_KEYS:
    raise ValueError(f"row_stats: S={S} keys exceed the f32 argmax index range ({MAX_KEYS})")
  R = H // G
  bq, bk = check_tiles(block_q, block_k, T, S)
  nq, nk = -(-T // bq), -(-S // bk)
  Tp, Sp = nq * bq, nk * bk
  geom = _geom(lists)
  _check_lists(geom, B, H, nq, "kv")
  has_tiles, has_seg = tiles is not None, q_segment_ids is not None
  pref = flatten_lists(lists, has_tiles)
  qk, qop = _to_kernel(q, bq)
  kk, kop = _to_kernel(k.astype(q.dtype), bk)

  def q_idx(b, h, i, j, *_):
    return b, h, i

  def kv_idx(b, h, i, j, idx_ref, *_):
    return b, _div(h, R), idx_ref[geom.slot(b, h, i, j)]

  in_specs = [qop.spec(q_idx), kop.spec(kv_idx)]
  operands = [qk, kk]
  specs, ops = _row_mask_inputs(geom, bq, bk, Tp, Sp, q_segment_ids, kv_segment_ids, tiles)
  in_specs += specs
  operands += ops
  row_spec = pl.BlockSpec((None, None, bq, NUM_LANES), lambda b, h, i, j, *_: (b, h, i, 0))
  kernel = functools.partial(_row_kernel, geom=geom, has_seg=has_seg, has_tiles=has_tiles, kv_len=S,
                             scale=float(scale), cap=soft_cap, prec=_precision(q.dtype))
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(pref), grid=(B, H, nq, geom.K), in_specs=in_specs, out_specs=[row_spec] * 4,
          scratch_shapes=[pltpu.VMEM((bq, NUM_LANES), _F32) for _ in range(4)]),
      out_shape=[jax.ShapeDtypeStruct((B, H, Tp, NUM_LANES), _F32)] * 4,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
                                           vmem_limit_bytes=vmem_limit_bytes),
      interpret=_interpret(interpret),
      name="jaxattn_softmax_row_stats",
  )(*pref, *operands)
  lse, rmax, am, ent = (o[:, :, :T, 0] for o in outs)
  return lse, rmax, am.astype(jnp.int32), ent


# ------------------------------------------------------------------------------------------------ column pass
def _col_kernel(*refs, geom, has_seg: bool, has_tiles: bool, q_len: int, kv_len: int, scale: float, cap, prec):
  npf = 4 if has_tiles else 2
  (pref, (q_ref, k_ref, lse_ref), seg, tile_ref, (cs_ref, cc_ref)) = _unpack(
      refs, npf, 3, 2 if has_seg else 0, int(has_tiles), 2)
  b, h, kb, j = (pl.program_id(a) for a in range(4))
  bq, bk = q_ref.shape[0], k_ref.shape[0]
  slot = geom.slot(b, h, kb, j)
  q_blk = pref[0][slot]

  @pl.when(j == 0)
  def _init():
    cs_ref[...] = jnp.zeros(cs_ref.shape, _F32)
    cc_ref[...] = jnp.zeros(cc_ref.shape, _F32)

  q_edge = (q_blk == q_len // bq) if q_len % bq else None
  k_edge = (kb == kv_len // bk) if kv_len % bk else None
  partial = pref[2][slot] > 0 if has_tiles else None

  def step(masked: bool):
    s = lax.dot_general(q_ref[...], k_ref[...], NT, preferred_element_type=_F32, precision=prec) * scale
    s, _ = _logits(s, cap)  # [bq, bk]
    keep = []
    if masked and has_tiles:  # the resident tile is this step's only if the step is partial
      keep.append((tile_ref[...].astype(jnp.int32) != 0) | jnp.broadcast_to(jnp.logical_not(partial), s.shape))
    if masked and q_edge is not None:
      keep.append(lax.broadcasted_iota(jnp.int32, s.shape, 0) + q_blk * bq < q_len)
    if masked and k_edge is not None:
      keep.append(lax.broadcasted_iota(jnp.int32, s.shape, 1) + kb * bk < kv_len)
    if seg is not None:
      keep.append(lanes(seg[0][...], bk) == seg[1][:1, :])
    keep = functools.reduce(jnp.logical_and, keep) if keep else None
    p = jnp.exp(s - lanes(lse_ref[...], bk))  # normalised probabilities of the block
    if keep is not None:  # exact zeros where masked (also for rows whose lse is NaN or was -inf)
      p = jnp.where(keep, p, 0.0)
      cnt = jnp.sum(keep.astype(_F32), axis=0, keepdims=True)
    else:
      cnt = jnp.full((1, bk), float(bq), _F32)
    cs_ref[...] += jnp.broadcast_to(jnp.sum(p, axis=0, keepdims=True), cs_ref.shape)
    cc_ref[...] += jnp.broadcast_to(cnt, cc_ref.shape)

  valid = j < pref[1][geom.row(b, h, kb)]
  need = [c for c in (partial, q_edge, k_edge) if c is not None]
  if need:
    need = functools.reduce(jnp.logical_or, need)
    pl.when(valid & need)(lambda: step(True))
    pl.when(valid & jnp.logical_not(need))(lambda: step(False))
  else:
    pl.when(valid)(lambda: step(False))


def col_stats(q, k, lse, lists_t: VisitLists, tiles=None, *, q_segment_ids=None, kv_segment_ids=None, scale: float,
              soft_cap: float | None = None, block_q: int, block_k: int, interpret=False,
              vmem_limit_bytes: int | None = None):
  """Column sums of ``P`` and allowed-row counts per key, from the row log-sum-exp.

  Args:
    q, k, segment ids, scale, soft_cap, block sizes, interpret, vmem_limit_bytes: as in :func:`row_stats`.
    lse: ``[B, H, T]`` f32 natural-log log-sum-exp of the same logits (:func:`row_stats` or the flash forward);
      ``-inf`` rows contribute nothing.
    lists_t: per kv block (``nK = ceil(S / block_k)``) the query blocks that visit it, ``[1|B, 1|H, nK, Kt]``.
    tiles: the same ``[U, block_q, block_k]`` patterns as the forward orientation, or None.

  Returns:
    ``(colsum [B, H, S] f32, colcount [B, H, S] int32)``: ``sum_i P_ij`` and the number of rows allowed to
    attend key ``j``.
  """
  B, T, H, D = q.shape
  _, S, G, _ = k.shape
  R = H // G
  bq, bk = check_tiles(block_q, block_k, T, S)
  nq, nk = -(-T // bq), -(-S // bk)
  Tp, Sp = nq * bq, nk * bk
  geom = _geom(lists_t)
  _check_lists(geom, B, H, nk, "transposed q")
  has_tiles, has_seg = tiles is not None, q_segment_ids is not None
  pref = flatten_lists(lists_t, has_tiles)
  qk, qop = _to_kernel(q, bq)
  kk, kop = _to_kernel(k.astype(q.dtype), bk)

  def q_idx(b, h, kb, j, idx_ref, *_):
    return b, h, idx_ref[geom.slot(b, h, kb, j)]

  def kv_idx(b, h, kb, j, *_):
    return b, _div(h, R), kb

  in_specs = [qop.spec(q_idx), kop.spec(kv_idx),
              pl.BlockSpec((None, None, bq, NUM_LANES), lambda b, h, kb, j, idx_ref, *_: (
                  b, h, idx_ref[geom.slot(b, h, kb, j)], 0))]
  operands = [qk, kk, _rows_cols(lse, Tp)]
  if has_seg:
    in_specs += [pl.BlockSpec((None, bq, NUM_LANES), lambda b, h, kb, j, idx_ref, *_: (
                     b, idx_ref[geom.slot(b, h, kb, j)], 0)),
                 pl.BlockSpec((None, NUM_SUBLANES, bk), lambda b, h, kb, j, *_: (b, 0, kb))]
    operands += [_ids_cols(q_segment_ids, Tp), _ids_rows(kv_segment_ids, Sp)]
  if has_tiles:
    in_specs.append(pl.BlockSpec((None, bq, bk), lambda b, h, kb, j, idx_ref, cnt_ref, tile_ref, fetch_ref: (
        fetch_ref[geom.slot(b, h, kb, j)], 0, 0)))
    operands.append(_tiles(tiles))
  col_spec = pl.BlockSpec((None, None, NUM_SUBLANES, bk), lambda b, h, kb, j, *_: (b, h, 0, kb))
  kernel = functools.partial(_col_kernel, geom=geom, has_seg=has_seg, has_tiles=has_tiles, q_len=T, kv_len=S,
                             scale=float(scale), cap=soft_cap, prec=_precision(q.dtype))
  cs, cc = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(pref), grid=(B, H, nk, geom.K), in_specs=in_specs, out_specs=[col_spec] * 2),
      out_shape=[jax.ShapeDtypeStruct((B, H, NUM_SUBLANES, Sp), _F32)] * 2,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
                                           vmem_limit_bytes=vmem_limit_bytes),
      interpret=_interpret(interpret),
      name="jaxattn_softmax_col_stats",
  )(*pref, *operands)
  return cs[:, :, 0, :S], cc[:, :, 0, :S].astype(jnp.int32)
