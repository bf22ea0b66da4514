"""``implementation="xla"``: blockwise online-softmax attention in pure JAX (FlashAttention-2 in XLA).

Forward: for each query block (``lax.map``), loop (``fori_loop`` with the block's visit count) over the kv blocks
the static mask leaves non-empty, keeping the running max ``m``, sum ``l`` and accumulator in f32. Partial blocks
apply their pattern from ``MaskInfo.tiles``; full blocks skip masking. Memory is ``O(T * block)``: no ``T x S``
array exists (unless the caller passes a ``T x S`` bias).

Backward (``custom_vjp``): recompute each visited block from the saved log-sum-exp; a dq pass over query blocks
(which also writes dbias) and a dk/dv pass over kv blocks using the transposed visiting lists.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn._vma import match_vma, sum_to_vma
from jaxattn.ops.softmax.config import AttentionConfig, BlockSizes
from jaxattn.ops.softmax.mask_info import MaskInfo, mask_info

_DEFAULT_BLOCK = 512


def default_block_sizes(T: int, S: int) -> BlockSizes:
  """512 x 512 tiles, shrunk (to a multiple of 8) for short sequences."""
  return BlockSizes(min(_DEFAULT_BLOCK, -(-T // 8) * 8), min(_DEFAULT_BLOCK, -(-S // 8) * 8))


@dataclasses.dataclass(frozen=True)
class _Static:
  cfg: AttentionConfig
  blocks: BlockSizes


def softmax_attention_xla(q, k, v, bias, q_ids, kv_ids, cfg: AttentionConfig):
  blocks = cfg.block_sizes or default_block_sizes(cfg.T, cfg.S)
  return _attention(q, k, v, bias, q_ids, kv_ids, _Static(cfg, blocks))


# ------------------------------------------------------------------------------------------------ layout helpers
def _q_blocks(x, bq):
  """``[B, T, H, *] -> [nQ, B, G?, ..., bq, *]``: ``[B, T, G, R, D] -> [nQ, B, G, R, bq, D]`` etc."""
  B, T = x.shape[:2]
  nq = -(-T // bq)
  x = jnp.pad(x, [(0, 0), (0, nq * bq - T)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(B, nq, bq, *x.shape[2:])
  # move the block axis first and the in-block axis just before the last (feature) axis
  perm = (1, 0) + tuple(range(3, x.ndim - 1)) + (2, x.ndim - 1)
  return x.transpose(perm)


def _unq_blocks(x, T):
  """Inverse of ``_q_blocks`` for ``[nQ, B, G, R, bq, E] -> [B, T, G, R, E]``."""
  nq, B, G, R, bq, E = x.shape
  return x.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, G, R, E)[:, :T]


def _ids_blocks(ids, b):
  """``[B, T] -> [nT, B, b]`` (padding with -1; padded positions are masked by the tiles anyway)."""
  B, T = ids.shape
  n = -(-T // b)
  return jnp.pad(ids, [(0, 0), (0, n * b - T)], constant_values=-1).reshape(B, n, b).transpose(1, 0, 2)


def _bias_blocks(bias, R, bq, bk):
  """``[b, h, T, S] -> [nQ, nK, b, Gb, Rb, bq, bk]`` (h == 1 broadcasts over heads)."""
  b, h, T, S = bias.shape
  nq, nk = -(-T // bq), -(-S // bk)
  x = jnp.pad(bias, [(0, 0), (0, 0), (0, nq * bq - T), (0, nk * bk - S)])
  x = x.reshape(b, h, nq, bq, nk, bk).transpose(2, 4, 0, 1, 3, 5)
  return x.reshape(nq, nk, b, 1, 1, bq, bk) if h == 1 else x.reshape(nq, nk, b, h // R, R, bq, bk)


def _reduce_to_bias(ds, b, h):
  """``[B, G, R, bq, bk] -> [b, h, bq, bk]`` by summing over broadcast axes."""
  B, G, R, bq, bk = ds.shape
  ds = ds.reshape(B, G * R, bq, bk)
  if b == 1:
    ds = ds.sum(0, keepdims=True)
  if h == 1:
    ds = ds.sum(1, keepdims=True)
  return ds


class _Tile:
  """Evaluates one (query block, kv block) tile: logits, masking, soft-cap derivative."""

  def __init__(self, st: _Static, info: MaskInfo, dtype):
    self.cfg = st.cfg
    self.info = info
    self.tiles = jnp.asarray(info.tiles) if info.has_partial else None
    self.prec = lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT

  def logits(self, qblk, kblk, bias_blk, qid, kid, tile_id):
    """Returns ``(s, t)``: masked logits ``[B, G, R, bq, bk]`` and ``tanh`` of the capped logits (or None)."""
    cfg = self.cfg
    s = jnp.einsum("bgrqd,bgkd->bgrqk", qblk, kblk, preferred_element_type=jnp.float32,
                   precision=self.prec) * cfg.scale
    if bias_blk is not None:
      s = s + bias_blk.astype(jnp.float32)
    t = None
    if cfg.logits_soft_cap is not None:
      t = jnp.tanh(s / cfg.logits_soft_cap)
      s = cfg.logits_soft_cap * t
    if self.tiles is not None:
      tiles = self.tiles
      s = lax.cond(tile_id > 0, lambda s: jnp.where(tiles[tile_id], s, -jnp.inf), lambda s: s, s)
    if qid is not None:
      s = jnp.where((qid[:, :, None] == kid[:, None, :])[:, None, None], s, -jnp.inf)
    return s, t

  def ds(self, p, dp, delta, t):
    """``dL/d(pre-cap logits)`` from probabilities ``p`` and ``dp = dO V^T``."""
    ds = p * (dp - delta[..., None])
    if t is not None:
      ds = ds * (1.0 - t * t)
    return ds


def _safe(m):
  return jnp.where(jnp.isneginf(m), 0.0, m)


# ----------------------------------------------------------------------------------------------------- forward
def _forward(q, k, v, bias, q_ids, kv_ids, st: _Static):
  cfg = st.cfg
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  bq, bk = st.blocks.block_q, st.blocks.block_k
  info = mask_info(cfg.mask, T, S, bq, bk)
  tile = _Tile(st, info, q.dtype)
  qB = _q_blocks(q.reshape(B, T, G, R, D), bq)  # [nQ, B, G, R, bq, D]
  kB = _q_blocks(k, bk)  # [nK, B, G, bk, D]
  vB = _q_blocks(v, bk)  # [nK, B, G, bk, E]
  biasB = None if bias is None else _bias_blocks(bias, R, bq, bk)
  qidB = None if q_ids is None else _ids_blocks(q_ids, bq)
  kidB = None if kv_ids is None else _ids_blocks(kv_ids, bk)
  kv_index, kv_count, kv_tile = (jnp.asarray(a) for a in (info.kv_index, info.kv_count, info.kv_tile))

  def one_q_block(qi):
    qblk = qB[qi]
    qid = None if qidB is None else qidB[qi]

    def body(n, carry):
      m, l, acc = carry
      kj = kv_index[qi, n]
      s, _ = tile.logits(qblk, kB[kj], None if biasB is None else biasB[qi, kj], qid,
                         None if kidB is None else kidB[kj], kv_tile[qi, n])
      m_new = jnp.maximum(m, s.max(-1))
      m_safe = _safe(m_new)
      alpha = jnp.exp(m - m_safe)
      p = jnp.exp(s - m_safe[..., None])
      l = alpha * l + p.sum(-1)
      acc = alpha[..., None] * acc + jnp.einsum("bgrqk,bgke->bgrqe", p.astype(v.dtype), vB[kj],
                                                preferred_element_type=jnp.float32, precision=tile.prec)
      return m_new, l, acc

    init = (jnp.full((B, G, R, bq), -jnp.inf, jnp.float32), jnp.zeros((B, G, R, bq), jnp.float32),
            jnp.zeros((B, G, R, bq, E), jnp.float32))
    m, l, acc = lax.fori_loop(0, kv_count[qi], body, match_vma(init, q, k, v, bias, q_ids, kv_ids))
    out = (acc / jnp.where(l == 0, 1.0, l)[..., None]).astype(q.dtype)
    lse = jnp.where(l > 0, _safe(m) + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    return out, lse

  outB, lseB = lax.map(one_q_block, jnp.arange(info.num_q_blocks))  # [nQ, B, G, R, bq, E], [nQ, B, G, R, bq]
  out = _unq_blocks(outB, T).reshape(B, T, H, E)
  lse = _unq_blocks(lseB[..., None], T).reshape(B, T, H).transpose(0, 2, 1)
  return out, lse


# ---------------------------------------------------------------------------------------------------- backward
def _backward(st: _Static, res, g):
  q, k, v, bias, q_ids, kv_ids, out, lse = res
  dout, dlse = g
  # delta_i = sum_e dO_ie O_ie - dlse_i : the row term of the softmax Jacobian (lse enters as -dlse).
  delta = jnp.einsum("bthe,bthe->bth", dout.astype(jnp.float32), out.astype(jnp.float32))
  delta = delta - dlse.transpose(0, 2, 1)
  lse_t = lse.transpose(0, 2, 1)  # [B, T, H]
  dq, dbias = _dq_pass(st, q, k, v, bias, q_ids, kv_ids, dout, lse_t, delta)
  dk, dv = _dkv_pass(st, q, k, v, bias, q_ids, kv_ids, dout, lse_t, delta)
  grads = (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
           None if bias is None else dbias.astype(bias.dtype), None, None)
  return sum_to_vma(grads, (q, k, v, bias, q_ids, kv_ids))


def _row_blocks(x, B, T, G, R, bq):
  """``[B, T, H] -> [nQ, B, G, R, bq]`` for lse / delta."""
  return _q_blocks(x.reshape(B, T, G, R, 1), bq)[..., 0]


def _dq_pass(st, q, k, v, bias, q_ids, kv_ids, dout, lse, delta):
  cfg = st.cfg
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  bq, bk = st.blocks.dq
  info = mask_info(cfg.mask, T, S, bq, bk)
  tile = _Tile(st, info, q.dtype)
  qB = _q_blocks(q.reshape(B, T, G, R, D), bq)
  doB = _q_blocks(dout.reshape(B, T, G, R, E), bq)
  lseB, deltaB = _row_blocks(lse, B, T, G, R, bq), _row_blocks(delta, B, T, G, R, bq)
  kB, vB = _q_blocks(k, bk), _q_blocks(v, bk)
  biasB = None if bias is None else _bias_blocks(bias, R, bq, bk)
  qidB = None if q_ids is None else _ids_blocks(q_ids, bq)
  kidB = None if kv_ids is None else _ids_blocks(kv_ids, bk)
  kv_index, kv_count, kv_tile = (jnp.asarray(a) for a in (info.kv_index, info.kv_count, info.kv_tile))
  nk = info.num_k_blocks

  def one_q_block(qi):
    qblk, doblk, lse_b, delta_b = qB[qi], doB[qi], _safe(lseB[qi]), deltaB[qi]
    qid = None if qidB is None else qidB[qi]

    def body(n, carry):
      dq, dbias = carry
      kj = kv_index[qi, n]
      kblk, vblk = kB[kj], vB[kj]
      s, t = tile.logits(qblk, kblk, None if biasB is None else biasB[qi, kj], qid,
                         None if kidB is None else kidB[kj], kv_tile[qi, n])
      p = jnp.exp(s - lse_b[..., None])
      dp = jnp.einsum("bgrqe,bgke->bgrqk", doblk, vblk, preferred_element_type=jnp.float32, precision=tile.prec)
      ds = tile.ds(p, dp, delta_b, t)
      dq = dq + jnp.einsum("bgrqk,bgkd->bgrqd", ds.astype(k.dtype), kblk, preferred_element_type=jnp.float32,
                           precision=tile.prec)
      if dbias is not None:
        dbias = dbias.at[kj].set(_reduce_to_bias(ds, bias.shape[0], bias.shape[1]))
      return dq, dbias

    dbias0 = None if bias is None else jnp.zeros((nk, bias.shape[0], bias.shape[1], bq, bk), jnp.float32)
    init = match_vma((jnp.zeros((B, G, R, bq, D), jnp.float32), dbias0), q, k, v, bias, q_ids, kv_ids, dout, lse)
    dq, dbias = lax.fori_loop(0, kv_count[qi], body, init)
    return dq * cfg.scale, dbias

  dqB, dbiasB = lax.map(one_q_block, jnp.arange(info.num_q_blocks))
  dq = _unq_blocks(dqB, T).reshape(B, T, H, D)
  dbias = None
  if bias is not None:
    b, h = bias.shape[:2]
    nq = info.num_q_blocks
    dbias = dbiasB.transpose(2, 3, 0, 4, 1, 5).reshape(b, h, nq * bq, nk * bk)[:, :, :T, :S]
  return dq, dbias


def _dkv_pass(st, q, k, v, bias, q_ids, kv_ids, dout, lse, delta):
  cfg = st.cfg
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  bq, bk = st.blocks.dkv
  info = mask_info(cfg.mask, T, S, bq, bk)
  tile = _Tile(st, info, q.dtype)
  qB = _q_blocks(q.reshape(B, T, G, R, D), bq)
  doB = _q_blocks(dout.reshape(B, T, G, R, E), bq)
  lseB, deltaB = _safe(_row_blocks(lse, B, T, G, R, bq)), _row_blocks(delta, B, T, G, R, bq)
  kB, vB = _q_blocks(k, bk), _q_blocks(v, bk)
  biasB = None if bias is None else _bias_blocks(bias, R, bq, bk)
  qidB = None if q_ids is None else _ids_blocks(q_ids, bq)
  kidB = None if kv_ids is None else _ids_blocks(kv_ids, bk)
  q_index, q_count, q_tile = (jnp.asarray(a) for a in (info.q_index, info.q_count, info.q_tile))

  def one_kv_block(kj):
    kblk, vblk = kB[kj], vB[kj]
    kid = None if kidB is None else kidB[kj]

    def body(n, carry):
      dk, dv = carry
      qi = q_index[kj, n]
      qblk, doblk = qB[qi], doB[qi]
      s, t = tile.logits(qblk, kblk, None if biasB is None else biasB[qi, kj],
                         None if qidB is None else qidB[qi], kid, q_tile[kj, n])
      p = jnp.exp(s - lseB[qi][..., None])
      dv = dv + jnp.einsum("bgrqk,bgrqe->bgke", p.astype(dout.dtype), doblk, preferred_element_type=jnp.float32,
                           precision=tile.prec)
      dp = jnp.einsum("bgrqe,bgke->bgrqk", doblk, vblk, preferred_element_type=jnp.float32, precision=tile.prec)
      ds = tile.ds(p, dp, deltaB[qi], t)
      dk = dk + jnp.einsum("bgrqk,bgrqd->bgkd", ds.astype(q.dtype), qblk, preferred_element_type=jnp.float32,
                           precision=tile.prec)
      return dk, dv

    init = (jnp.zeros((B, G, bk, D), jnp.float32), jnp.zeros((B, G, bk, E), jnp.float32))
    dk, dv = lax.fori_loop(0, q_count[kj], body, match_vma(init, q, k, v, bias, q_ids, kv_ids, dout, lse))
    return dk * cfg.scale, dv

  dkB, dvB = lax.map(one_kv_block, jnp.arange(info.num_k_blocks))  # [nK, B, G, bk, D]
  dk = dkB.transpose(1, 0, 3, 2, 4).reshape(B, -1, G, D)[:, :S]
  dv = dvB.transpose(1, 0, 3, 2, 4).reshape(B, -1, G, E)[:, :S]
  return dk, dv


# --------------------------------------------------------------------------------------------------- custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, bias, q_ids, kv_ids, st: _Static):
  return _forward(q, k, v, bias, q_ids, kv_ids, st)


def _attention_fwd(q, k, v, bias, q_ids, kv_ids, st):
  out, lse = _forward(q, k, v, bias, q_ids, kv_ids, st)
  return (out, lse), (q, k, v, bias, q_ids, kv_ids, out, lse)


_attention.defvjp(_attention_fwd, _backward)
