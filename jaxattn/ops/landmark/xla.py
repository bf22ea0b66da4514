"""``implementation="xla"``: blockwise landmark attention in pure JAX (memory linear in T).

Every (query tile, key tile) pair is one step of a FlashAttention-2 style online softmax whose items are:

- each earlier landmark block ``b`` of the key tile, as ONE logit (its landmark's ``s_{i, L_b}``) carrying the value
  ``u_ib = softmax_{regular keys of b}(s_i) @ v_b``;
- each regular key ``j <= i`` of the query's own block, as an ordinary logit carrying ``v_j``.

So a tile's contribution is ``P @ V_tile`` with ``P_ij = exp(s_{i,L_b} - m) * p_loc_ij / l_loc_ib`` (earlier blocks)
or ``exp(s_ij - m)`` (current block): one matmul per tile; the running ``(m, l, acc)`` are f32. Key tiles hold
whole landmark blocks (``block_k % block_size == 0``), so the intra-block softmax never spans two tiles. Query tiles
visit only key tiles up to their diagonal. Padding ``T`` to whole tiles needs no mask: padded keys are in the
future of every real query (and padded blocks are never "earlier" blocks of a real query).

Backward (``bwd``, run by :func:`jaxattn.backend.flash_vjp`; no ``T x T`` array and no per-tile residuals): with
the saved top-level lse and ``delta_i = sum_e dO_ie O_ie - dlse_i``, per tile

- ``a_ij`` as above with ``m = lse``; ``dP = dO V^T``; ``Dloc_ib = sum_{j in b} softmax_b(s_i)_j dP_ij``;
- ``dS_ij = a_ij (dP_ij - Dloc_ib)`` (regular key of an earlier block), ``p_top(L_b) (Dloc_ib - delta_i)`` (its
  landmark), ``a_ij (dP_ij - delta_i)`` (current block);
- ``dQ += dS K``, ``dK += dS^T Q``, ``dV += a^T dO``: a dq pass over query tiles and a dk/dv pass over key tiles.

Config: :class:`~jaxattn.ops.landmark.config.XlaConfig` (``block_q`` / ``block_k``: positive multiples of the block
size; default the multiples nearest 256 tokens, shrunk to the sequence).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
from jax import lax

from jaxattn._validation import first_order_only
from jaxattn._vma import match_vma, sum_to_vma
from jaxattn.backend import Backend
from jaxattn.ops.landmark.config import LandmarkCall, LandmarkResiduals, XlaConfig, check_tile
from jaxattn.ops.nonfinite import poison_rows, sanitize

_DEFAULT_TILE = 256


class XlaBackend(Backend):
  """Blockwise online grouped softmax in pure JAX: every block size, GQA/MQA, any ``T``, every dtype."""

  name = "xla"
  Config = XlaConfig

  def default_config(self, call: LandmarkCall) -> XlaConfig:
    bs = call.block_size
    tile = min(max(1, _DEFAULT_TILE // bs) * bs, -(-call.T // bs) * bs)
    return XlaConfig(block_q=tile, block_k=tile)

  def validate_config(self, call: LandmarkCall, config: XlaConfig) -> None:
    for field in ("block_q", "block_k"):
      check_tile(f"{self.name}: {type(config).__name__}", field, getattr(config, field), call.block_size)

  def fwd(self, call: LandmarkCall, config: XlaConfig, args):
    q, k, v = args
    out, lse = _forward(q, k, v, _Static(call, config.block_q, config.block_k))
    return (out, lse), LandmarkResiduals(q, k, v, out, lse)

  def bwd(self, call: LandmarkCall, config: XlaConfig, residuals: LandmarkResiduals, cotangents, needs):
    return _BACKWARD(_Static(call, config.block_q, config.block_k), residuals, tuple(cotangents))


@dataclasses.dataclass(frozen=True)
class _Static:
  cfg: LandmarkCall
  bq: int
  bk: int

  @property
  def Tp(self) -> int:
    step = math.lcm(self.bq, self.bk)
    return -(-self.cfg.T // step) * step


# ------------------------------------------------------------------------------------------------ layout helpers
def _blocks(x, b, Tp):
  """``[B, T, G, *rest, F] -> [n, B, G, *rest, b, F]`` (zero-padded to ``Tp``)."""
  B, T = x.shape[:2]
  x = jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(B, Tp // b, b, *x.shape[2:])
  perm = (1, 0) + tuple(range(3, x.ndim - 1)) + (2, x.ndim - 1)
  return x.transpose(perm)


def _unblocks(x, T):
  """Inverse of :func:`_blocks` for ``[n, B, G, R, b, F] -> [B, T, G, R, F]``."""
  n, B, G, R, b, F = x.shape
  return x.transpose(1, 0, 4, 2, 3, 5).reshape(B, n * b, G, R, F)[:, :T]


def _rows(x, B, T, G, R, bq, Tp):
  """``[B, H, T] -> [nQ, B, G, R, bq]`` for lse / delta."""
  x = x.reshape(B, G, R, T).transpose(0, 3, 1, 2)[..., None]  # [B, T, G, R, 1]
  return _blocks(x, bq, Tp)[..., 0]


class _Tile:
  """The grouped-softmax pieces of one (query tile, key tile) pair."""

  def __init__(self, st: _Static, dtype):
    self.bs, self.bq, self.bk, self.scale = st.cfg.block_size, st.bq, st.bk, st.cfg.scale
    self.prec = lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT

  def logits(self, qblk, kblk, qi, kj):
    """Returns ``(s, past, cur)``.

    ``s [B, G, R, bq, n, bs]`` f32 logits split into the ``n = bk / bs`` landmark blocks of the key tile;
    ``past [bq, n]``: the block is an earlier block of the query; ``cur [bq, n, bs]``: a regular key ``j <= i`` of
    the query's own block.
    """
    bs, bq, bk = self.bs, self.bq, self.bk
    n = bk // bs
    s = jnp.einsum("bgrqd,bgkd->bgrqk", qblk, kblk, preferred_element_type=jnp.float32,
                   precision=self.prec) * self.scale
    s = s.reshape(*s.shape[:-1], n, bs)
    qpos = qi * bq + lax.iota(jnp.int32, bq)  # [bq]
    kblk_id = kj * n + lax.iota(jnp.int32, n)  # [n]
    qb = qpos // bs
    past = kblk_id[None, :] < qb[:, None]  # [bq, n]
    kpos = kblk_id[:, None] * bs + lax.iota(jnp.int32, bs)[None, :]  # [n, bs]
    regular = lax.iota(jnp.int32, bs) < bs - 1
    cur = (kblk_id[None, :, None] == qb[:, None, None]) & regular & (kpos[None] <= qpos[:, None, None])
    return s, past, cur

  def local(self, s):
    """Intra-block softmax over each block's regular keys: ``p_loc [.., n, bs]`` (0 at the landmark), normalised."""
    bs = self.bs
    regular = lax.iota(jnp.int32, bs) < bs - 1
    s_reg = jnp.where(regular, s, -jnp.inf)
    m_loc = jnp.max(s_reg, axis=-1, keepdims=True)  # finite: every block has a regular key
    p = jnp.exp(s_reg - m_loc)
    return p / jnp.sum(p, axis=-1, keepdims=True)

  def flat(self, x):
    return x.reshape(*x.shape[:-2], self.bk)


def _safe(m):
  return jnp.where(jnp.isneginf(m), 0.0, m)


# ----------------------------------------------------------------------------------------------------- forward
def _forward(q, k, v, st: _Static):
  B, T, H, D = q.shape
  _, _, G, E = v.shape
  R = H // G
  bq, bk, Tp = st.bq, st.bk, st.Tp
  tile = _Tile(st, q.dtype)
  # Non-finite inputs (jaxattn.ops.nonfinite): zeroed values; a query row, or a key whose k (or, at a regular
  # position, v: landmark values are never mixed in) is non-finite, is all-NaN in the logits operands, so it
  # reaches only the (query, key) pairs the grouped softmax uses.
  (qs, bad_q), (ks, bad_k), (vs, bad_v) = sanitize(q), sanitize(k), sanitize(v)
  regular = (jnp.arange(T) + 1) % st.cfg.block_size != 0
  ks = poison_rows(ks, bad_k | (bad_v & regular[None, :, None]))
  qB = _blocks(poison_rows(qs, bad_q).reshape(B, T, G, R, D), bq, Tp)  # [nQ, B, G, R, bq, D]
  kB, vB = _blocks(ks, bk, Tp), _blocks(vs, bk, Tp)  # [nK, B, G, bk, D|E]
  nq = Tp // bq

  def one_q_block(qi):
    qblk = qB[qi]

    def body(kj, carry):
      m, l, acc = carry
      s, past, cur = tile.logits(qblk, kB[kj], qi, kj)
      lam = jnp.where(past, s[..., -1], -jnp.inf)  # [B, G, R, bq, n] landmark logits of earlier blocks
      s_cur = jnp.where(cur, s, -jnp.inf)  # [B, G, R, bq, n, bs]
      m_new = jnp.maximum(m, jnp.maximum(lam.max(-1), s_cur.max((-2, -1))))
      m_safe = _safe(m_new)
      alpha = jnp.exp(m - m_safe)
      w = jnp.exp(lam - m_safe[..., None])  # [.., bq, n]
      p_cur = jnp.exp(s_cur - m_safe[..., None, None])
      # where(): the local softmax of a future block holding a NaN key is NaN, and its weight w is 0
      p = tile.flat(p_cur + jnp.where(past[..., None], tile.local(s) * w[..., None], 0.0))  # [.., bq, bk]
      l = alpha * l + w.sum(-1) + p_cur.sum((-2, -1))
      acc = alpha[..., None] * acc + jnp.einsum("bgrqk,bgke->bgrqe", p.astype(v.dtype), vB[kj],
                                                preferred_element_type=jnp.float32, precision=tile.prec)
      return m_new, l, acc

    init = (jnp.full((B, G, R, bq), -jnp.inf, jnp.float32), jnp.zeros((B, G, R, bq), jnp.float32),
            jnp.zeros((B, G, R, bq, E), jnp.float32))
    m, l, acc = lax.fori_loop(0, ((qi + 1) * bq - 1) // bk + 1, body, match_vma(init, q, k, v))
    out = (acc / jnp.where(l == 0, 1.0, l)[..., None]).astype(q.dtype)
    lse = jnp.where(l == 0, -jnp.inf, _safe(m) + jnp.log(jnp.where(l == 0, 1.0, l)))  # NaN l stays NaN
    return out, lse

  outB, lseB = lax.map(one_q_block, jnp.arange(nq))  # [nQ, B, G, R, bq, E], [nQ, B, G, R, bq]
  out = _unblocks(outB, T).reshape(B, T, H, E)
  lse = _unblocks(lseB[..., None], T).reshape(B, T, H).transpose(0, 2, 1)
  return out, lse


# ---------------------------------------------------------------------------------------------------- backward
def _tile_grads(tile: _Tile, s, past, cur, lse, delta, dp):
  """``(a, ds)`` of one tile, both ``[B, G, R, bq, bk]`` f32 (see the module docstring)."""
  # Every term is selected with where() on its own structure (cur / past), so a row whose lse is NaN (it attends
  # a non-finite input) or a future block holding a NaN key adds exact zeros elsewhere.
  pastb = past[..., None]
  p_top = jnp.where(past, jnp.exp(jnp.where(past, s[..., -1], -jnp.inf) - lse[..., None]), 0.0)  # [.., bq, n]
  p_loc = tile.local(s)  # [.., bq, n, bs]
  a_cur = jnp.where(cur, jnp.exp(jnp.where(cur, s, -jnp.inf) - lse[..., None, None]), 0.0)
  a_past = jnp.where(pastb, p_loc * p_top[..., None], 0.0)
  dp = dp.reshape(s.shape)
  d_loc = jnp.sum(p_loc * dp, axis=-1)  # [.., bq, n]
  last = lax.iota(jnp.int32, tile.bs) == tile.bs - 1
  ds = (jnp.where(cur, a_cur * (dp - delta[..., None, None]), 0.0)
        + jnp.where(pastb, a_past * (dp - d_loc[..., None]), 0.0)
        + jnp.where(last & pastb, (p_top * (d_loc - delta[..., None]))[..., None], 0.0))
  return tile.flat(a_cur + a_past), tile.flat(ds)


def _backward(st: _Static, res, g):
  q, k, v, out, lse = res
  dout, dlse = g
  B, T, H, D = q.shape
  _, _, G, E = v.shape
  R = H // G
  bq, bk, Tp = st.bq, st.bk, st.Tp
  nq, nk = Tp // bq, Tp // bk
  tile = _Tile(st, q.dtype)
  # delta_i = sum_e dO_ie O_ie - dlse_i: the row term of the top-level softmax Jacobian.
  delta = jnp.einsum("bthe,bthe->bht", dout.astype(jnp.float32), out.astype(jnp.float32)) - dlse
  q, k, v = (sanitize(x)[0] for x in (q, k, v))  # non-finite inputs: their rows carry NaN in lse / delta
  qB = _blocks(q.reshape(B, T, G, R, D), bq, Tp)
  doB = _blocks(dout.reshape(B, T, G, R, E), bq, Tp)
  lseB, deltaB = _rows(_safe(lse), B, T, G, R, bq, Tp), _rows(delta, B, T, G, R, bq, Tp)
  kB, vB = _blocks(k, bk, Tp), _blocks(v, bk, Tp)
  mm = functools.partial(jnp.einsum, preferred_element_type=jnp.float32, precision=tile.prec)

  def tile_grads(qi, kj):
    s, past, cur = tile.logits(qB[qi], kB[kj], qi, kj)
    dp = mm("bgrqe,bgke->bgrqk", doB[qi], vB[kj])
    return _tile_grads(tile, s, past, cur, lseB[qi], deltaB[qi], dp)

  def one_q_block(qi):
    def body(kj, dq):
      _, ds = tile_grads(qi, kj)
      return dq + mm("bgrqk,bgkd->bgrqd", ds.astype(k.dtype), kB[kj])

    init = match_vma(jnp.zeros((B, G, R, bq, D), jnp.float32), q, k, v, dout)
    dq = lax.fori_loop(0, ((qi + 1) * bq - 1) // bk + 1, body, init)
    return dq * st.cfg.scale

  def one_kv_block(kj):
    def body(qi, carry):
      dk, dv = carry
      a, ds = tile_grads(qi, kj)
      dv = dv + mm("bgrqk,bgrqe->bgke", a.astype(dout.dtype), doB[qi])
      dk = dk + mm("bgrqk,bgrqd->bgkd", ds.astype(q.dtype), qB[qi])
      return dk, dv

    init = (jnp.zeros((B, G, bk, D), jnp.float32), jnp.zeros((B, G, bk, E), jnp.float32))
    dk, dv = lax.fori_loop((kj * bk) // bq, nq, body, match_vma(init, q, k, v, dout))
    return dk * st.cfg.scale, dv

  dq = _unblocks(lax.map(one_q_block, jnp.arange(nq)), T).reshape(B, T, H, D)
  dkB, dvB = lax.map(one_kv_block, jnp.arange(nk))  # [nK, B, G, bk, D|E]
  dk = dkB.transpose(1, 0, 3, 2, 4).reshape(B, Tp, G, D)[:, :T]
  dv = dvB.transpose(1, 0, 3, 2, 4).reshape(B, Tp, G, E)[:, :T]
  return sum_to_vma((dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)), (q, k, v))


# The backward's loops have data-dependent trip counts: forward-mode over it works (Hessian-vector products),
# reverse-mode over it raises a clear NotImplementedError.
_BACKWARD = first_order_only(_backward, op="landmark_attention", implementation="xla")

BACKEND = XlaBackend()
