"""Statistics kernels for softmax attention on GPUs (Pallas, Triton lowering): row and column statistics of ``P``.

For ``P = softmax(s)`` with ``s = cap * tanh(scale * q.k / cap)`` (no cap: ``scale * q.k``) over each query row's
allowed keys, two kernels over the visiting lists of :mod:`pallas_kernels.softmax.gpu` (:class:`BlockLists`:
ordinary int32 inputs looped with ``lax.fori_loop(0, count, ...)``, per-block tile ids, deduplicated partial-block
patterns; segment ids mask every block), so empty blocks are never visited and no ``T x S`` array exists:

- :func:`row_stats`, grid ``(nQ, B * H)``: one program per query block walks its kv blocks with an online pass in
  base 2 keeping the running max ``m``, ``l = sum 2^{s - m}``, ``u = sum 2^{s - m} (s - m)`` and the column of the
  first maximum; it writes ``lse``, the row maximum of ``P`` (``1 / l``), the argmax (smallest column on ties) and the
  entropy ``-sum P ln P = (log2 l - u / l) ln 2``.
- :func:`col_stats`, grid ``(nK, B * H)``: one program per kv block walks the transposed lists (the query blocks
  that visit it), recomputes ``P = 2^{s - lse}`` of each visited block and sums it over the rows in registers; one
  write of the ``[block_k]`` column sums and allowed-row counts per program (no atomics: a program owns its columns).

Query head ``h`` reads kv head ``h // (H // G)`` through the index maps (GQA; K never repeated). Rows without an
allowed key give lse ``-inf``, row max 0, argmax -1, entropy 0 (never NaN). Padded keys and rows are masked by the
tiles (static lists always mark the edge blocks partial) or, without tiles, by iota bounds. Head dims are
zero-padded to a power of two. No backward: statistics are not differentiated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import LN2, padded_head_dim
from pallas_kernels.softmax.gpu import BlockLists, _allowed, _logits, _params, _prep_tiles, check_lists, pad_to

__all__ = ["row_stats", "col_stats"]

_F32 = jnp.float32


def _keep(shape, *, qid, kid, tiles_ref, tile_id, col0, row0, kv_len, q_len):
  """:func:`pallas_kernels.softmax.gpu._allowed` plus an iota bound on padded query rows (lists without tiles)."""
  keep = _allowed(shape, qid=qid, kid=kid, tiles_ref=tiles_ref, tile_id=tile_id, col0=col0, kv_len=kv_len)
  if q_len is not None:
    ok = row0 + lax.broadcasted_iota(jnp.int32, shape, 0) < q_len
    keep = ok if keep is None else keep & ok
  return keep


def _inputs(q, k, q_ids, kv_ids, Tp, Sp, Dp):
  has_ids = q_ids is not None
  qp = pad_to(pad_to(q, 1, Tp), 3, Dp)
  kp = pad_to(pad_to(k.astype(q.dtype), 1, Sp), 3, Dp)
  qid = pad_to(jnp.asarray(q_ids, jnp.int32), 1, Tp, -1) if has_ids else None
  kid = pad_to(jnp.asarray(kv_ids, jnp.int32), 1, Sp, -2) if has_ids else None
  return qp, kp, qid, kid


# ------------------------------------------------------------------------------------------------ row pass
def _row_kernel(q_ref, k_ref, qid_ref, kid_ref, idx_ref, cnt_ref, tid_ref, tiles_ref, lse_ref, rmax_ref, am_ref,
                ent_ref, *, scale, soft_cap, block_k, num_q_blocks, kv_len):
  qb = num_q_blocks - 1 - pl.program_id(0)
  q = q_ref[...]  # [bq, Dp]
  bq = q.shape[0]
  qid = None if qid_ref is None else qid_ref[...]

  def body(n, carry):
    m, l, u, am = carry
    col0 = pl.multiple_of(idx_ref[n] * block_k, block_k)
    ks = pl.ds(col0, block_k)
    s, _ = _logits(q, k_ref[ks, :], None, scale=scale, soft_cap=soft_cap)  # base-2 logits [bq, bk]
    keep = _allowed(s.shape, qid=qid, kid=None if kid_ref is None else kid_ref[ks], tiles_ref=tiles_ref,
                    tile_id=None if tid_ref is None else tid_ref[n], col0=col0, kv_len=kv_len)
    if keep is not None:
      s = jnp.where(keep, s, -jnp.inf)
    bm = s.max(axis=-1)
    cols = lax.broadcasted_iota(jnp.int32, s.shape, 1)
    first = jnp.min(jnp.where(s == bm[:, None], cols, block_k), axis=-1) + col0
    m_new = jnp.maximum(m, bm)
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_safe)
    d = s - m_safe[:, None]
    p = jnp.exp2(d)
    shift = jnp.where(m == -jnp.inf, 0.0, m - m_safe)  # u is relative to the running max
    u = alpha * (u + shift * l) + jnp.where(p > 0, p * d, 0.0).sum(axis=-1)
    l = alpha * l + p.sum(axis=-1)
    am = jnp.where(bm > m, first, am)  # strict: an earlier block keeps a tie
    return m_new, l, u, am

  init = (jnp.full((bq,), -jnp.inf, _F32), jnp.zeros((bq,), _F32), jnp.zeros((bq,), _F32),
          jnp.full((bq,), -1, jnp.int32))
  m, l, u, am = lax.fori_loop(0, cnt_ref[qb], body, init)
  ok = l > 0
  l1 = jnp.where(ok, l, 1.0)
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  lse_ref[...] = jnp.where(ok, (m_safe + jnp.log2(l1)) * LN2, -jnp.inf)
  rmax_ref[...] = jnp.where(ok, 1.0 / l1, 0.0)
  am_ref[...] = jnp.where(ok, am, -1)
  ent_ref[...] = jnp.where(ok, (jnp.log2(l1) - u / l1) * LN2, 0.0)


def row_stats(q, k, q_ids, kv_ids, lists: BlockLists, tiles, *, block_q: int, block_k: int, scale: float,
              soft_cap: float | None = None, num_warps: int | None = None, num_stages: int = 3,
              interpret: bool = False):
  """Row statistics of ``P`` over the kv visiting lists (one online pass).

  Args:
    q: ``[B, T, H, D]``; k: ``[B, S, G, D]`` (``H % G == 0``).
    q_ids, kv_ids: int32 ``[B, T]`` / ``[B, S]`` segment ids, or both None.
    lists: :class:`~pallas_kernels.softmax.gpu.BlockLists` over ``nQ = ceil(T / block_q)`` query blocks.
    tiles: ``[U, block_q, block_k]`` partial-block patterns (``tiles[0]`` unused), or None.
    block_q, block_k: the tile the lists were built for (powers of two >= 16).
    scale, soft_cap: the logits ``cap * tanh(scale * q.k / cap)``.
    num_warps: None picks 4 for head dims <= 64, else 8; num_stages: Triton pipelining.
    interpret: Pallas interpret mode (CPU).

  Returns:
    ``(lse, rowmax, argmax, entropy)``, each ``[B, H, T]``: lse f32 natural log (``-inf`` for rows without
    keys), row maximum of ``P`` f32 (0), argmax int32 (-1), entropy in nats f32 (0).
  """
  B, T, H, D = q.shape
  _, S, G, _ = k.shape
  R = H // G
  nq, nk = pl.cdiv(T, block_q), pl.cdiv(S, block_k)
  Tp, Sp, Dp = nq * block_q, nk * block_k, padded_head_dim(D)
  Bl, Hl = check_lists("row_stats", lists, B, H, nq, tiles, (block_q, block_k))
  K = lists.index.shape[-1]
  has_ids = q_ids is not None
  qp, kp, qid, kid = _inputs(q, k, q_ids, kv_ids, Tp, Sp, Dp)
  tiles = _prep_tiles(tiles)
  qb = lambda i: nq - 1 - i
  bsel = (lambda bh: bh // H) if Bl > 1 else (lambda bh: 0)
  hsel = (lambda bh: bh % H) if Hl > 1 else (lambda bh: 0)
  listspec = pl.BlockSpec((None, None, None, K), lambda i, bh: (bsel(bh), hsel(bh), qb(i), 0))
  in_specs = [
      pl.BlockSpec((None, block_q, None, Dp), lambda i, bh: (bh // H, qb(i), bh % H, 0)),
      pl.BlockSpec((None, Sp, None, Dp), lambda i, bh: (bh // H, 0, (bh % H) // R, 0)),
      None if not has_ids else pl.BlockSpec((None, block_q), lambda i, bh: (bh // H, qb(i))),
      None if not has_ids else pl.BlockSpec((None, Sp), lambda i, bh: (bh // H, 0)),
      listspec,
      pl.BlockSpec((None, None, nq), lambda i, bh: (bsel(bh), hsel(bh), 0)),
      None if tiles is None else listspec,
      None if tiles is None else pl.BlockSpec(tiles.shape, lambda i, bh: (0, 0, 0)),
  ]
  row_spec = pl.BlockSpec((None, None, block_q), lambda i, bh: (bh // H, bh % H, qb(i)))
  kernel = functools.partial(_row_kernel, scale=scale, soft_cap=soft_cap, block_k=block_k, num_q_blocks=nq,
                             kv_len=S if (tiles is None and S != Sp) else None)
  lse, rmax, am, ent = pl.pallas_call(
      kernel,
      grid=(nq, B * H),
      in_specs=in_specs,
      out_specs=[row_spec] * 4,
      out_shape=[jax.ShapeDtypeStruct((B, H, Tp), _F32), jax.ShapeDtypeStruct((B, H, Tp), _F32),
                 jax.ShapeDtypeStruct((B, H, Tp), jnp.int32), jax.ShapeDtypeStruct((B, H, Tp), _F32)],
      compiler_params=_params(num_warps if num_warps is not None else (4 if Dp <= 64 else 8), num_stages),
      interpret=interpret,
      name="jaxattn_softmax_row_stats",
  )(qp, kp, qid, kid, lists.index, lists.count, lists.tile, tiles)
  return lse[:, :, :T], rmax[:, :, :T], am[:, :, :T], ent[:, :, :T]


# ------------------------------------------------------------------------------------------------ column pass
def _col_kernel(q_ref, k_ref, lse_ref, qid_ref, kid_ref, idx_ref, cnt_ref, tid_ref, tiles_ref, cs_ref, cc_ref, *,
                scale, soft_cap, block_q, kv_len, q_len):
  kb = pl.program_id(0)
  k = k_ref[...]  # [bk, Dp]
  bk = k.shape[0]
  kid = None if kid_ref is None else kid_ref[...]
  col0 = kb * bk

  def body(n, carry):
    cs, cc = carry
    row0 = pl.multiple_of(idx_ref[n] * block_q, block_q)
    qs = pl.ds(row0, block_q)
    s, _ = _logits(q_ref[qs, :], k, None, scale=scale, soft_cap=soft_cap)  # base 2 [bq, bk]
    keep = _keep(s.shape, qid=None if qid_ref is None else qid_ref[qs], kid=kid, tiles_ref=tiles_ref,
                 tile_id=None if tid_ref is None else tid_ref[n], col0=col0, row0=row0, kv_len=kv_len,
                 q_len=q_len)
    p = jnp.exp2(s - lse_ref[qs][:, None])
    if keep is None:
      return cs + p.sum(axis=0), cc + block_q
    p = jnp.where(keep, p, 0.0)  # exact zeros where masked (also for rows whose lse is NaN or was -inf)
    return cs + p.sum(axis=0), cc + keep.astype(jnp.int32).sum(axis=0)

  init = (jnp.zeros((bk,), _F32), jnp.zeros((bk,), jnp.int32))
  cs, cc = lax.fori_loop(0, cnt_ref[kb], body, init)
  cs_ref[...] = cs
  cc_ref[...] = cc


def col_stats(q, k, lse, q_ids, kv_ids, lists_t: BlockLists, tiles, *, block_q: int, block_k: int, scale: float,
              soft_cap: float | None = None, num_warps: int | None = None, num_stages: int = 2,
              interpret: bool = False):
  """Column sums of ``P`` and allowed-row counts per key, from the row log-sum-exp.

  Args:
    lse: ``[B, H, T]`` f32 natural-log log-sum-exp of the same logits (``-inf`` rows contribute nothing).
    lists_t: per kv block (``nK = ceil(S / block_k)``) the query blocks that visit it, ``[1|B, 1|H, nK, Kt]``
      (per query head).
    tiles: the same ``[U, block_q, block_k]`` patterns as the forward orientation, or None.
    Other args as :func:`row_stats`.

  Returns:
    ``(colsum [B, H, S] f32, colcount [B, H, S] int32)``.
  """
  B, T, H, D = q.shape
  _, S, G, _ = k.shape
  R = H // G
  nq, nk = pl.cdiv(T, block_q), pl.cdiv(S, block_k)
  Tp, Sp, Dp = nq * block_q, nk * block_k, padded_head_dim(D)
  Bl, Hl = check_lists("col_stats", lists_t, B, H, nk, tiles, (block_q, block_k))
  K = lists_t.index.shape[-1]
  has_ids = q_ids is not None
  qp, kp, qid, kid = _inputs(q, k, q_ids, kv_ids, Tp, Sp, Dp)
  tiles = _prep_tiles(tiles)
  lse2 = pad_to(jnp.where(jnp.isneginf(lse), 0.0, lse * (1.0 / LN2)).astype(_F32), 2, Tp)
  bsel = (lambda bh: bh // H) if Bl > 1 else (lambda bh: 0)
  hsel = (lambda bh: bh % H) if Hl > 1 else (lambda bh: 0)
  listspec = pl.BlockSpec((None, None, None, K), lambda j, bh: (bsel(bh), hsel(bh), j, 0))
  in_specs = [
      pl.BlockSpec((None, Tp, None, Dp), lambda j, bh: (bh // H, 0, bh % H, 0)),
      pl.BlockSpec((None, block_k, None, Dp), lambda j, bh: (bh // H, j, (bh % H) // R, 0)),
      pl.BlockSpec((None, None, Tp), lambda j, bh: (bh // H, bh % H, 0)),
      None if not has_ids else pl.BlockSpec((None, Tp), lambda j, bh: (bh // H, 0)),
      None if not has_ids else pl.BlockSpec((None, block_k), lambda j, bh: (bh // H, j)),
      listspec,
      pl.BlockSpec((None, None, nk), lambda j, bh: (bsel(bh), hsel(bh), 0)),
      None if tiles is None else listspec,
      None if tiles is None else pl.BlockSpec(tiles.shape, lambda j, bh: (0, 0, 0)),
  ]
  col_spec = pl.BlockSpec((None, None, block_k), lambda j, bh: (bh // H, bh % H, j))
  kernel = functools.partial(_col_kernel, scale=scale, soft_cap=soft_cap, block_q=block_q,
                             kv_len=S if (tiles is None and S != Sp) else None,
                             q_len=T if (tiles is None and T != Tp) else None)
  cs, cc = pl.pallas_call(
      kernel,
      grid=(nk, B * H),
      in_specs=in_specs,
      out_specs=[col_spec] * 2,
      out_shape=[jax.ShapeDtypeStruct((B, H, Sp), _F32), jax.ShapeDtypeStruct((B, H, Sp), jnp.int32)],
      compiler_params=_params(num_warps if num_warps is not None else (4 if Dp <= 64 else 8), num_stages),
      interpret=interpret,
      name="jaxattn_softmax_col_stats",
  )(qp, kp, lse2, qid, kid, lists_t.index, lists_t.count, lists_t.tile, tiles)
  return cs[:, :, :S], cc[:, :, :S]
