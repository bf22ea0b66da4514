"""``implementation="xla"``: blockwise online-softmax attention in pure JAX (FlashAttention-2 in XLA).

Forward: for each query block (``lax.map``), loop (``fori_loop`` with the block's visit count) over the kv blocks
the static mask leaves non-empty, keeping the running max ``m``, sum ``l`` and accumulator in f32. Partial blocks
apply their pattern from ``MaskInfo.tiles``; full blocks skip masking. Memory is ``O(T * block)``: no ``T x S``
array exists (unless the caller passes a ``T x S`` bias).

Backward (``bwd``, run by :func:`jaxattn.backend.flash_vjp`): recompute each visited block from the saved
log-sum-exp; a dq pass over query blocks (which also writes dbias) and a dk/dv pass over kv blocks using the
transposed visiting lists. Given the *global* ``out`` / ``lse`` in the residuals, each pass is exact for one block
of a ring step (context parallelism). Config: :class:`~jaxattn.ops.softmax.config.BlockSizes` (any positive tiles;
default 512 x 512, shrunk to a multiple of 8 for short sequences).

Also served here (the kernels refuse them): boolean mask arrays (``call.mask_array``: the bias carries ``-inf`` at
masked pairs, which are masked after the soft cap), per-head masks (:class:`~jaxattn.masks.PerHead`: the visiting
lists of the union of the heads' masks, each head's own deduplicated tiles on top, see :func:`head_tiles`) and
attention dropout (``call.dropout_rate``: the uint32 seed is the 7th argument and ``SoftmaxResiduals.extra``; the
keep bits of each tile are regenerated from it in the forward, dq and dk/dv passes by
:mod:`jaxattn.ops.softmax.dropout`, so any tiles drop the same entries as the reference).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn._validation import first_order_only
from jaxattn._vma import match_vma, sum_to_vma
from jaxattn.backend import Backend
from jaxattn.masks import EMPTY, PARTIAL, PerHead
from jaxattn.ops.nonfinite import poison_rows, sanitize
from jaxattn.ops.softmax import dropout
from jaxattn.ops.softmax.config import BlockSizes, SoftmaxCall, SoftmaxResiduals
from jaxattn.ops.softmax.mask_info import MaskInfo, mask_info

DEFAULT_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  cfg: SoftmaxCall
  blocks: BlockSizes


# ------------------------------------------------------------------------------------------------ layout helpers
def q_blocks(x, bq):
  """``[B, T, H, *] -> [nQ, B, G?, ..., bq, *]``: ``[B, T, G, R, D] -> [nQ, B, G, R, bq, D]`` etc."""
  B, T = x.shape[:2]
  nq = -(-T // bq)
  x = jnp.pad(x, [(0, 0), (0, nq * bq - T)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(B, nq, bq, *x.shape[2:])
  # move the block axis first and the in-block axis just before the last (feature) axis
  perm = (1, 0) + tuple(range(3, x.ndim - 1)) + (2, x.ndim - 1)
  return x.transpose(perm)


def unq_blocks(x, T):
  """Inverse of ``q_blocks`` for ``[nQ, B, G, R, bq, E] -> [B, T, G, R, E]``."""
  nq, B, G, R, bq, E = x.shape
  return x.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, G, R, E)[:, :T]


def ids_blocks(ids, b):
  """``[B, T] -> [nT, B, b]`` (padding with -1; padded positions are masked by the tiles anyway)."""
  B, T = ids.shape
  n = -(-T // b)
  return jnp.pad(ids, [(0, 0), (0, n * b - T)], constant_values=-1).reshape(B, n, b).transpose(1, 0, 2)


def bias_blocks(bias, R, bq, bk):
  """``[b, h, T, S] -> [nQ, nK, b, Gb, Rb, bq, bk]`` (h == 1 broadcasts over heads)."""
  b, h, T, S = bias.shape
  nq, nk = -(-T // bq), -(-S // bk)
  x = jnp.pad(bias, [(0, 0), (0, 0), (0, nq * bq - T), (0, nk * bk - S)])
  x = x.reshape(b, h, nq, bq, nk, bk).transpose(2, 4, 0, 1, 3, 5)
  return x.reshape(nq, nk, b, 1, 1, bq, bk) if h == 1 else x.reshape(nq, nk, b, h // R, R, bq, bk)


def softmax_delta(dout, out, dlse):
  """``delta [B, H, T]`` f32 of ``dout, out [B, T, H, E]`` and ``dlse [B, H, T]``: ``sum_e dO_ie O_ie - dlse_i``, the
  row term of the softmax Jacobian (lse enters as ``-dlse``), as the kernel backends' backward passes take it."""
  delta = jnp.einsum("bthe,bthe->bht", dout.astype(jnp.float32), out.astype(jnp.float32))
  return delta - dlse.astype(jnp.float32)


def side_blocks(bias, q_ids, kv_ids, R: int, bq: int, bk: int):
  """``(biasB, qidB, kidB)``: :func:`bias_blocks` and :func:`ids_blocks` of the optional operands (None if absent)."""
  return (None if bias is None else bias_blocks(bias, R, bq, bk), None if q_ids is None else ids_blocks(q_ids, bq),
          None if kv_ids is None else ids_blocks(kv_ids, bk))


def kv_lists(info: MaskInfo):
  """``(kv_index, kv_count, kv_tile)`` of ``info`` as device arrays: each query block's visited kv blocks."""
  return tuple(jnp.asarray(a) for a in (info.kv_index, info.kv_count, info.kv_tile))


def _reduce_to_bias(ds, b, h):
  """``[B, G, R, bq, bk] -> [b, h, bq, bk]`` by summing over broadcast axes."""
  B, G, R, bq, bk = ds.shape
  ds = ds.reshape(B, G * R, bq, bk)
  if b == 1:
    ds = ds.sum(0, keepdims=True)
  if h == 1:
    ds = ds.sum(1, keepdims=True)
  return ds


def visit_info(mask, T: int, S: int, block_q: int, block_k: int) -> MaskInfo:
  """The visiting lists of ``mask`` (of the union of the heads' masks for a :class:`~jaxattn.masks.PerHead`)."""
  return mask_info(mask.union() if isinstance(mask, PerHead) else mask, T, S, block_q, block_k)


@functools.lru_cache(maxsize=64)
def head_tiles(mask: PerHead, T: int, S: int, block_q: int, block_k: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-head block patterns of a :class:`~jaxattn.masks.PerHead` mask, deduplicated over heads and blocks.

  Returns ``(tiles [U, block_q, block_k] bool, tile_of [H, nQ, nK] int32)``: ``tiles[0]`` is all True (full
  blocks), ``tiles[1]`` all False (blocks a head leaves empty but another head visits).
  """
  tiles = [np.ones((block_q, block_k), bool), np.zeros((block_q, block_k), bool)]
  ids: dict[bytes, int] = {}
  tile_of = None
  for h, m in enumerate(mask.masks):
    info = mask_info(m, T, S, block_q, block_k)
    if tile_of is None:
      tile_of = np.zeros((mask.num_heads,) + info.layout.shape, np.int32)
    tile_of[h][info.layout == EMPTY] = 1
    for qb, kb in zip(*np.nonzero(info.layout == PARTIAL)):
      t = info.tiles[info.tile_of[qb, kb]]
      key = np.packbits(t).tobytes()
      if key not in ids:
        ids[key] = len(tiles)
        tiles.append(t)
      tile_of[h, qb, kb] = ids[key]
  return np.stack(tiles), tile_of


class Tile:
  """Evaluates one (query block, kv block) tile: logits, masking, dropout bits, soft-cap derivative."""

  def __init__(self, st: BlockPlan, info: MaskInfo, dtype, seed=None):
    cfg = self.cfg = st.cfg
    self.info = info
    self.head_tiles = self.head_tile_of = None
    if isinstance(cfg.mask, PerHead):
      ht, hto = head_tiles(cfg.mask, cfg.T, cfg.S, info.block_q, info.block_k)
      self.head_tiles, self.head_tile_of = jnp.asarray(ht), jnp.asarray(hto)
    self.tiles = jnp.asarray(info.tiles) if info.has_partial and self.head_tiles is None else None
    self.prec = lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT
    self.keys = None
    if cfg.dropout_rate:
      R = cfg.H // cfg.G
      self.keys = dropout.head_keys(seed, jnp.arange(cfg.B, dtype=jnp.uint32).reshape(cfg.B, 1, 1, 1, 1),
                                    jnp.arange(cfg.H, dtype=jnp.uint32).reshape(1, cfg.G, R, 1, 1))

  def keep(self, qi, kj):
    """The dropout keep mask ``[B, G, R, bq, bk]`` of tile ``(qi, kj)`` (None without dropout)."""
    if self.keys is None:
      return None
    bq, bk = self.info.block_q, self.info.block_k
    i = (qi * bq).astype(jnp.uint32) + jnp.arange(bq, dtype=jnp.uint32)[:, None]
    j = (kj * bk).astype(jnp.uint32) + jnp.arange(bk, dtype=jnp.uint32)[None, :]
    return dropout.keep_mask(self.keys, self.cfg.dropout_rate, i, j)

  def drop(self, x, keep):
    """``x`` with attention dropout applied (identity without dropout)."""
    return x if keep is None else dropout.apply(x, keep, self.cfg.dropout_rate)

  def logits(self, qblk, kblk, bias_blk, qid, kid, tile_id, qi=None, kj=None):
    """Returns ``(s, t)``: masked logits ``[B, G, R, bq, bk]`` and ``tanh`` of the capped logits (or None).

    ``qi`` / ``kj`` (the tile's block indices) are needed for per-head masks.
    """
    cfg = self.cfg
    s = jnp.einsum("bgrqd,bgkd->bgrqk", qblk, kblk, preferred_element_type=jnp.float32,
                   precision=self.prec) * cfg.scale
    if bias_blk is not None:
      s = s + bias_blk.astype(jnp.float32)
    t = None
    if cfg.logits_soft_cap is not None:
      t = jnp.tanh(s / cfg.logits_soft_cap)
      s = cfg.logits_soft_cap * t
    if cfg.mask_array and bias_blk is not None:
      # a boolean mask array arrives as -inf bias entries: masked after the soft cap, and whatever q / k hold
      s = jnp.where(bias_blk == -jnp.inf, -jnp.inf, s)
    if self.tiles is not None:
      tiles = self.tiles
      s = lax.cond(tile_id > 0, lambda s: jnp.where(tiles[tile_id], s, -jnp.inf), lambda s: s, s)
    if self.head_tiles is not None:
      _, G, R, bq, bk = s.shape
      allowed = self.head_tiles[self.head_tile_of[:, qi, kj]].reshape(G, R, bq, bk)
      s = jnp.where(allowed, s, -jnp.inf)
    if qid is not None:
      s = jnp.where((qid[:, :, None] == kid[:, None, :])[:, None, None], s, -jnp.inf)
    return s, t

  def ds(self, p, dp, delta, t):
    """``dL/d(pre-cap logits)`` from probabilities ``p`` and ``dp = dO V^T``."""
    ds = p * (dp - delta[..., None])
    if t is not None:
      ds = ds * (1.0 - t * t)
    return ds


def safe_max(m):
  return jnp.where(jnp.isneginf(m), 0.0, m)


# ----------------------------------------------------------------------------------------------------- forward
def _forward(q, k, v, bias, q_ids, kv_ids, st: BlockPlan, seed=None):
  cfg = st.cfg
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  bq, bk = st.blocks.block_q, st.blocks.block_k
  info = visit_info(cfg.mask, T, S, bq, bk)
  tile = Tile(st, info, q.dtype, seed)
  # Non-finite inputs (jaxattn.ops.nonfinite): v is zeroed where non-finite, and a query row / key whose q, k or v
  # has a non-finite entry becomes all-NaN in the logits operands, so it reaches only the pairs masking keeps.
  qs, bad_q = sanitize(q)
  ks, bad_k = sanitize(k)
  vs, bad_v = sanitize(v)
  qB = q_blocks(poison_rows(qs, bad_q).reshape(B, T, G, R, D), bq)  # [nQ, B, G, R, bq, D]
  kB = q_blocks(poison_rows(ks, bad_k | bad_v), bk)  # [nK, B, G, bk, D]
  vB = q_blocks(vs, bk)  # [nK, B, G, bk, E]
  biasB, qidB, kidB = side_blocks(bias, q_ids, kv_ids, R, bq, bk)
  kv_index, kv_count, kv_tile = kv_lists(info)

  def one_q_block(qi):
    qblk = qB[qi]
    qid = None if qidB is None else qidB[qi]

    def body(n, carry):
      m, l, acc = carry
      kj = kv_index[qi, n]
      s, _ = tile.logits(qblk, kB[kj], None if biasB is None else biasB[qi, kj], qid,
                         None if kidB is None else kidB[kj], kv_tile[qi, n], qi, kj)
      m_new = jnp.maximum(m, s.max(-1))
      m_safe = safe_max(m_new)
      alpha = jnp.exp(m - m_safe)
      p = jnp.exp(s - m_safe[..., None])
      l = alpha * l + p.sum(-1)  # the normaliser ignores dropout: it drops normalised probabilities
      pv = tile.drop(p, tile.keep(qi, kj))
      acc = alpha[..., None] * acc + jnp.einsum("bgrqk,bgke->bgrqe", pv.astype(v.dtype), vB[kj],
                                                preferred_element_type=jnp.float32, precision=tile.prec)
      return m_new, l, acc

    init = (jnp.full((B, G, R, bq), -jnp.inf, jnp.float32), jnp.zeros((B, G, R, bq), jnp.float32),
            jnp.zeros((B, G, R, bq, E), jnp.float32))
    m, l, acc = lax.fori_loop(0, kv_count[qi], body, match_vma(init, q, k, v, bias, q_ids, kv_ids))
    out = (acc / jnp.where(l == 0, 1.0, l)[..., None]).astype(q.dtype)
    # l == 0: no allowed key (lse -inf); a NaN l (the row attends a non-finite input) keeps lse NaN.
    lse = jnp.where(l == 0, -jnp.inf, safe_max(m) + jnp.log(jnp.where(l == 0, 1.0, l)))
    return out, lse

  outB, lseB = lax.map(one_q_block, jnp.arange(info.num_q_blocks))  # [nQ, B, G, R, bq, E], [nQ, B, G, R, bq]
  out = unq_blocks(outB, T).reshape(B, T, H, E)
  lse = unq_blocks(lseB[..., None], T).reshape(B, T, H).transpose(0, 2, 1)
  return out, lse


# ---------------------------------------------------------------------------------------------------- backward
def _backward(st: BlockPlan, res: SoftmaxResiduals, g, needs=(True,) * 6):
  q, k, v, bias, q_ids, kv_ids, out, lse = res[:8]
  seed = res.extra if st.cfg.dropout_rate else None  # dropout bits are regenerated per tile from the seed
  dout, dlse = g
  # delta_i = sum_e dO_ie O_ie - dlse_i : the row term of the softmax Jacobian (lse enters as -dlse).
  delta = jnp.einsum("bthe,bthe->bth", dout.astype(jnp.float32), out.astype(jnp.float32))
  delta = delta - dlse.transpose(0, 2, 1)
  lse_t = lse.transpose(0, 2, 1)  # [B, T, H]
  # Non-finite inputs: the backward works on zeroed operands; rows that attended a non-finite input carry NaN in
  # lse / delta, and the passes select masked pairs to exact zeros (jaxattn.ops.nonfinite).
  q, k, v = (sanitize(x)[0] for x in (q, k, v))
  dq = dbias = dk = dv = None
  if needs[0] or (bias is not None and needs[3]):
    dq, dbias = _dq_pass(st, q, k, v, bias, q_ids, kv_ids, dout, lse_t, delta, seed)
  if needs[1] or needs[2]:
    dk, dv = _dkv_pass(st, q, k, v, bias, q_ids, kv_ids, dout, lse_t, delta, seed)
  cast = lambda g, x: None if g is None else g.astype(x.dtype)
  grads = (cast(dq, q), cast(dk, k), cast(dv, v), None if bias is None else cast(dbias, bias), None, None)
  grads = sum_to_vma(grads, (q, k, v, bias, q_ids, kv_ids))
  return tuple(grads) + ((None,) if st.cfg.dropout_rate else ())


def row_blocks(x, B, T, G, R, bq):
  """``[B, T, H] -> [nQ, B, G, R, bq]`` for lse / delta."""
  return q_blocks(x.reshape(B, T, G, R, 1), bq)[..., 0]


def _dq_pass(st, q, k, v, bias, q_ids, kv_ids, dout, lse, delta, seed=None):
  cfg = st.cfg
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  bq, bk = st.blocks.dq
  info = visit_info(cfg.mask, T, S, bq, bk)
  tile = Tile(st, info, q.dtype, seed)
  qB = q_blocks(q.reshape(B, T, G, R, D), bq)
  doB = q_blocks(dout.reshape(B, T, G, R, E), bq)
  lseB, deltaB = row_blocks(lse, B, T, G, R, bq), row_blocks(delta, B, T, G, R, bq)
  kB, vB = q_blocks(k, bk), q_blocks(v, bk)
  biasB, qidB, kidB = side_blocks(bias, q_ids, kv_ids, R, bq, bk)
  kv_index, kv_count, kv_tile = kv_lists(info)
  nk = info.num_k_blocks

  def one_q_block(qi):
    qblk, doblk, lse_b, delta_b = qB[qi], doB[qi], safe_max(lseB[qi]), deltaB[qi]
    qid = None if qidB is None else qidB[qi]

    def body(n, carry):
      dq, dbias = carry
      kj = kv_index[qi, n]
      kblk, vblk = kB[kj], vB[kj]
      s, t = tile.logits(qblk, kblk, None if biasB is None else biasB[qi, kj], qid,
                         None if kidB is None else kidB[kj], kv_tile[qi, n], qi, kj)
      p = jnp.exp(s - lse_b[..., None])
      dp = jnp.einsum("bgrqe,bgke->bgrqk", doblk, vblk, preferred_element_type=jnp.float32, precision=tile.prec)
      dp = tile.drop(dp, tile.keep(qi, kj))  # d out / d P through the dropout scaling
      ds = jnp.where(s != -jnp.inf, tile.ds(p, dp, delta_b, t), 0.0)  # masked: exact 0 even for a NaN row
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
  dq = unq_blocks(dqB, T).reshape(B, T, H, D)
  dbias = None
  if bias is not None:
    b, h = bias.shape[:2]
    nq = info.num_q_blocks
    dbias = dbiasB.transpose(2, 3, 0, 4, 1, 5).reshape(b, h, nq * bq, nk * bk)[:, :, :T, :S]
  return dq, dbias


def _dkv_pass(st, q, k, v, bias, q_ids, kv_ids, dout, lse, delta, seed=None):
  cfg = st.cfg
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  bq, bk = st.blocks.dkv
  info = visit_info(cfg.mask, T, S, bq, bk)
  tile = Tile(st, info, q.dtype, seed)
  qB = q_blocks(q.reshape(B, T, G, R, D), bq)
  doB = q_blocks(dout.reshape(B, T, G, R, E), bq)
  lseB, deltaB = safe_max(row_blocks(lse, B, T, G, R, bq)), row_blocks(delta, B, T, G, R, bq)
  kB, vB = q_blocks(k, bk), q_blocks(v, bk)
  biasB, qidB, kidB = side_blocks(bias, q_ids, kv_ids, R, bq, bk)
  q_index, q_count, q_tile = (jnp.asarray(a) for a in (info.q_index, info.q_count, info.q_tile))

  def one_kv_block(kj):
    kblk, vblk = kB[kj], vB[kj]
    kid = None if kidB is None else kidB[kj]

    def body(n, carry):
      dk, dv = carry
      qi = q_index[kj, n]
      qblk, doblk = qB[qi], doB[qi]
      s, t = tile.logits(qblk, kblk, None if biasB is None else biasB[qi, kj],
                         None if qidB is None else qidB[qi], kid, q_tile[kj, n], qi, kj)
      p = jnp.where(s != -jnp.inf, jnp.exp(s - lseB[qi][..., None]), 0.0)  # masked: exact 0 even for a NaN row
      keep = tile.keep(qi, kj)
      dv = dv + jnp.einsum("bgrqk,bgrqe->bgke", tile.drop(p, keep).astype(dout.dtype), doblk,
                           preferred_element_type=jnp.float32, precision=tile.prec)
      dp = jnp.einsum("bgrqe,bgke->bgrqk", doblk, vblk, preferred_element_type=jnp.float32, precision=tile.prec)
      dp = tile.drop(dp, keep)
      ds = jnp.where(s != -jnp.inf, tile.ds(p, dp, deltaB[qi], t), 0.0)
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


# ------------------------------------------------------------------------------------------------------ backend
class XlaBackend(Backend):
  """Blockwise online softmax in pure JAX: every mask, segment ids, bias, soft cap, GQA, any T / S / dtype."""

  name = "xla"
  Config = BlockSizes

  def default_config(self, call: SoftmaxCall) -> BlockSizes:
    """512 x 512 tiles, shrunk (to a multiple of 8) for short sequences."""
    return BlockSizes(min(DEFAULT_BLOCK, -(-call.T // 8) * 8), min(DEFAULT_BLOCK, -(-call.S // 8) * 8))

  def fwd(self, call: SoftmaxCall, config: BlockSizes, args):
    q, k, v, bias, q_ids, kv_ids = args[:6]
    seed = args[6] if len(args) > 6 else None  # the dropout seed (call.dropout_rate > 0): saved, not a T x S mask
    out, lse = _forward(q, k, v, bias, q_ids, kv_ids, BlockPlan(call, config), seed)
    return (out, lse), SoftmaxResiduals(q, k, v, bias, q_ids, kv_ids, out, lse, seed)

  def bwd(self, call: SoftmaxCall, config: BlockSizes, residuals: SoftmaxResiduals, cotangents, needs):
    return _BACKWARD(BlockPlan(call, config), residuals, cotangents, needs)


# The backward's loops have data-dependent trip counts: forward-mode over it works (Hessian-vector products),
# reverse-mode over it raises a clear NotImplementedError.
_BACKWARD = first_order_only(_backward, op="softmax_attention", implementation="xla")
BACKEND = XlaBackend()
