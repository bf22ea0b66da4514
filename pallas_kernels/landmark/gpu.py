"""Fused landmark attention for GPUs: Pallas kernels with the Triton lowering (forward, dq, dk/dv).

Raw kernels: jax only, no autodiff (``jaxattn.ops.landmark.pallas_gpu`` joins them through
``jaxattn.backend.flash_vjp``).
Layouts: ``q [B, T, H, D]``, ``k [B, T, G, D]``, ``v [B, T, G, E]``, ``H % G == 0`` (query head ``h`` reads kv head
``h // (H // G)`` through the BlockSpec index maps). Token ``j`` is a landmark iff ``(j + 1) % bs == 0``.

Tiles: a key tile is ONE landmark block (``bs`` keys, its landmark last); a query tile holds ``m`` whole blocks
(``block_q = m * bs``). For query tile ``qb`` the key blocks ``< qb * m`` are earlier blocks of every row
("past" tiles, no masking beyond the landmark column) and the ``m`` blocks from ``qb * m`` are the diagonal
(per row: earlier, current or future block). In a past tile each row's landmark logit ``lam`` enters the
FlashAttention-2 online softmax ``(m, l, acc)`` as a single logit whose value is the tile's intra-block softmax over
its regular keys: ``acc += exp(lam - m) / l_loc * (p_loc @ V)``, ``l += exp(lam - m)``. On the diagonal, current-
block regular keys ``j <= i`` enter as ordinary logits (the current block's landmark is masked for every row).
Landmark values are never mixed in (their ``p_loc`` is 0).

Backward, from the saved top-level ``lse`` and ``delta_i = sum_e dO_ie O_ie - dlse_i``, per tile:
``a = p_top(L_b) * softmax_b`` (past) or ``exp(s - lse)`` (current); ``dP = dO V^T``;
``Dloc_ib = sum_j softmax_b(s_i)_j dP_ij``; ``dS = a (dP - Dloc)`` on past regular keys, ``p_top(L_b) (Dloc -
delta)`` on their landmark, ``a (dP - delta)`` on current keys; ``dQ = scale dS K``, ``dK = scale dS^T Q``,
``dV = a^T dO``. The dq kernel walks the same tiles as the forward; the dk/dv kernel, per key block and kv head,
walks the ``H // G`` query heads and the query tiles from the one holding the block to the end (GQA sums in-kernel).

Numerics: f32 logits in base 2 (``exp2``), f32 accumulators, output in q's dtype, ``lse [B, H, T]`` natural log.
``T`` is zero-padded to whole query tiles: padded keys are in the future of every real query, so no mask is needed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import LN2, LOG2E, MAX_HEAD_DIM, NN, NT, TN, is_pow2, padded_head_dim
from pallas_kernels.common.nonfinite import backward_operands, forward_operands

__all__ = ["flash_landmark_forward", "flash_landmark_backward_dq", "flash_landmark_backward_dkv",
           "check_blocks", "padded_head_dim", "MAX_HEAD_DIM"]


def check_blocks(block_size: int, block_q: int) -> None:
  """Raises ValueError unless ``block_size`` is a power of two >= 16 and ``block_q`` a power-of-two multiple."""
  if not is_pow2(block_size) or block_size < 16:
    raise ValueError(f"the GPU landmark kernels need block_size to be a power of two >= 16 (a Triton tile), "
                     f"got {block_size}")
  if block_q % block_size or not is_pow2(block_q):
    raise ValueError(f"block_q={block_q} must be a power-of-two multiple of block_size={block_size}")


def _dot(a, b, dims):
  """f32-accumulating matmul; f32 inputs use IEEE f32 (Triton's default for them would be TF32)."""
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _pad_to(x, axis, size):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _warps(num_warps, dp):
  return num_warps if num_warps is not None else (4 if dp <= 64 else 8)


class _Tile:
  """The grouped-softmax pieces of one (query tile, key block) pair, in base 2 (``s2 = log2(e) * s``)."""

  def __init__(self, s2, q0: int | jax.Array, kb, bs: int, diag: bool):
    bq = s2.shape[0]
    col = lax.broadcasted_iota(jnp.int32, s2.shape, 1)
    self.is_lm = col == bs - 1
    self.lam = jnp.max(jnp.where(self.is_lm, s2, -jnp.inf), axis=1)  # [bq] landmark logit
    s_reg = jnp.where(self.is_lm, -jnp.inf, s2)
    m_loc = jnp.max(s_reg, axis=1)  # finite: bs - 1 >= 1 regular keys
    self.p_loc = jnp.exp2(s_reg - m_loc[:, None])  # [bq, bs], 0 at the landmark
    self.l_loc = jnp.sum(self.p_loc, axis=1)  # [bq]
    self.s_cur = self.past = self.cur = None
    if diag:
      qpos = q0 + lax.broadcasted_iota(jnp.int32, (bq,), 0)
      qblk = qpos // bs
      past = kb < qblk  # [bq]
      self.lam = jnp.where(past, self.lam, -jnp.inf)
      kpos = kb * bs + col
      cur = (kb == qblk)[:, None] & jnp.logical_not(self.is_lm) & (kpos <= qpos[:, None])
      self.s_cur = jnp.where(cur, s2, -jnp.inf)
      # kept for where(): a future block's p_loc is NaN when it holds a NaN key, and its weight is 0
      self.past, self.cur = past[:, None], cur

  def only(self, mask, x):
    """``x`` where ``mask`` (None: everywhere) else exact 0 (never 0 * NaN)."""
    return x if mask is None else jnp.where(mask, x, 0.0)


# ----------------------------------------------------------------------------------------------------- forward
def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, bs, m_blocks, num_q_blocks):
  qb = num_q_blocks - 1 - pl.program_id(0)  # heaviest query tiles first
  q = q_ref[...]  # [bq, Dp]
  bq = q.shape[0]
  q0 = qb * bq

  def step(kb, carry, diag):
    acc, m, l = carry
    ks = pl.ds(pl.multiple_of(kb * bs, bs), bs)
    s2 = _dot(q, k_ref[ks, :], NT) * (scale * LOG2E)  # [bq, bs]
    t = _Tile(s2, q0, kb, bs, diag)
    m_new = jnp.maximum(m, t.lam)
    if diag:
      m_new = jnp.maximum(m_new, jnp.max(t.s_cur, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_safe)
    w = jnp.exp2(t.lam - m_safe)  # [bq]: top-level weight of this block's landmark
    v = v_ref[ks, :]
    p = t.only(t.past, t.p_loc * (w / t.l_loc)[:, None])
    l = alpha * l + w
    if diag:
      p_cur = jnp.exp2(t.s_cur - m_safe[:, None])
      p = p + p_cur
      l = l + jnp.sum(p_cur, axis=1)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, NN)
    return acc, m_new, l

  carry = (jnp.zeros((bq, o_ref.shape[-1]), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  first_diag = qb * m_blocks
  carry = lax.fori_loop(0, first_diag, lambda kb, c: step(kb, c, False), carry)
  carry = lax.fori_loop(first_diag, first_diag + m_blocks, lambda kb, c: step(kb, c, True), carry)
  acc, m, l = carry
  l_safe = jnp.where(l != 0, l, 1.0)  # a NaN l (the row attends a non-finite input) keeps its NaN
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  lse_ref[...] = jnp.where(l != 0, (m_safe + jnp.log2(l_safe)) * LN2, -jnp.inf)


def flash_landmark_forward(q, k, v, *, block_size: int, block_q: int, scale: float, num_warps: int | None = None,
                           num_stages: int = 2, interpret: bool = False):
  """Forward pass.

  Args:
    q: ``[B, T, H, D]``; k: ``[B, T, G, D]``; v: ``[B, T, G, E]``.
    block_size: landmark block (= key tile), a power of two >= 16.
    block_q: query tile, a power-of-two multiple of ``block_size``.
    scale: logit scale.
    num_warps: None picks 4 for head dims <= 64, else 8.
    interpret: run in Pallas interpret mode (CPU).

  Returns:
    ``out [B, T, H, E]`` (q's dtype) and ``lse [B, H, T]`` f32 (natural log, top-level).
  """
  check_blocks(block_size, block_q)
  B, T, H, D = q.shape
  _, _, G, E = v.shape
  R = H // G
  nq = pl.cdiv(T, block_q)
  Tp, Dp, Ep = nq * block_q, padded_head_dim(D), padded_head_dim(E)
  # non-finite inputs reach only the pairs the grouped softmax uses; landmark values are never mixed in
  q, k, v = forward_operands(q, k, v, value_used=(jnp.arange(T) + 1) % block_size != 0)
  qp = _pad_to(_pad_to(q, 1, Tp), 3, Dp)
  kp = _pad_to(_pad_to(k, 1, Tp), 3, Dp)
  vp = _pad_to(_pad_to(v, 1, Tp), 3, Ep)
  qb = lambda i: nq - 1 - i
  kernel = functools.partial(_fwd_kernel, scale=scale, bs=block_size, m_blocks=block_q // block_size,
                             num_q_blocks=nq)
  out, lse = pl.pallas_call(
      kernel,
      grid=(nq, B * H),
      in_specs=[
          pl.BlockSpec((None, block_q, None, Dp), lambda i, bh: (bh // H, qb(i), bh % H, 0)),
          pl.BlockSpec((None, Tp, None, Dp), lambda i, bh: (bh // H, 0, (bh % H) // R, 0)),
          pl.BlockSpec((None, Tp, None, Ep), lambda i, bh: (bh // H, 0, (bh % H) // R, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, block_q, None, Ep), lambda i, bh: (bh // H, qb(i), bh % H, 0)),
          pl.BlockSpec((None, None, block_q), lambda i, bh: (bh // H, bh % H, qb(i))),
      ],
      out_shape=[jax.ShapeDtypeStruct((B, Tp, H, Ep), q.dtype), jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)],
      compiler_params=_params(_warps(num_warps, max(Dp, Ep)), num_stages),
      interpret=interpret,
      name="jaxattn_landmark_fwd",
  )(qp, kp, vp)
  return out[:, :T, :, :E], lse[:, :, :T]


# ---------------------------------------------------------------------------------------------------- backward
def _tile_grads(t: _Tile, lse2, delta, dp):
  """``(a, ds)`` ``[bq, bs]`` of one tile (see the module docstring); ``lse2`` in base 2."""
  p_top = jnp.exp2(t.lam - lse2)  # [bq]: 0 for rows whose block is not earlier
  p_loc = t.p_loc / t.l_loc[:, None]
  d_loc = jnp.sum(p_loc * dp, axis=1)  # [bq]
  a = t.only(t.past, p_loc * p_top[:, None])
  ds = t.only(t.past, a * (dp - d_loc[:, None]) + jnp.where(t.is_lm, (p_top * (d_loc - delta))[:, None], 0.0))
  if t.s_cur is not None:
    a_cur = t.only(t.cur, jnp.exp2(t.s_cur - lse2[:, None]))
    a = a + a_cur
    ds = ds + t.only(t.cur, a_cur * (dp - delta[:, None]))
  return a, ds


def _lse2(lse):
  return jnp.where(jnp.isneginf(lse), 0.0, lse * LOG2E).astype(jnp.float32)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, bs, m_blocks, num_q_blocks):
  qb = num_q_blocks - 1 - pl.program_id(0)
  q, do = q_ref[...], do_ref[...]  # [bq, Dp], [bq, Ep]
  lse2, delta = lse_ref[...], delta_ref[...]  # [bq]
  q0 = qb * q.shape[0]

  def step(kb, dq, diag):
    ks = pl.ds(pl.multiple_of(kb * bs, bs), bs)
    k, v = k_ref[ks, :], v_ref[ks, :]
    t = _Tile(_dot(q, k, NT) * (scale * LOG2E), q0, kb, bs, diag)
    _, ds = _tile_grads(t, lse2, delta, _dot(do, v, NT))
    return dq + _dot(ds.astype(k.dtype), k, NN)

  first_diag = qb * m_blocks
  dq = jnp.zeros(q.shape, jnp.float32)
  dq = lax.fori_loop(0, first_diag, lambda kb, c: step(kb, c, False), dq)
  dq = lax.fori_loop(first_diag, first_diag + m_blocks, lambda kb, c: step(kb, c, True), dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def flash_landmark_backward_dq(q, k, v, do, lse, delta, *, block_size: int, block_q: int, scale: float,
                               num_warps: int | None = None, num_stages: int = 2, interpret: bool = False):
  """``dq [B, T, H, D]`` (q's dtype).

  Args:
    do: ``[B, T, H, E]`` output cotangent.
    lse: ``[B, H, T]`` f32 from :func:`flash_landmark_forward`.
    delta: ``[B, H, T]`` f32, ``sum_e do * out - dlse``.
    Other args as :func:`flash_landmark_forward`.
  """
  check_blocks(block_size, block_q)
  B, T, H, D = q.shape
  _, _, G, E = v.shape
  R = H // G
  nq = pl.cdiv(T, block_q)
  Tp, Dp, Ep = nq * block_q, padded_head_dim(D), padded_head_dim(E)
  q, k, v = backward_operands(q, k, v)  # zeroed; poisoned rows carry NaN in lse / delta
  qp = _pad_to(_pad_to(q, 1, Tp), 3, Dp)
  kp = _pad_to(_pad_to(k, 1, Tp), 3, Dp)
  vp = _pad_to(_pad_to(v, 1, Tp), 3, Ep)
  dop = _pad_to(_pad_to(do, 1, Tp), 3, Ep)
  lse2 = _pad_to(_lse2(lse), 2, Tp)
  deltap = _pad_to(delta.astype(jnp.float32), 2, Tp)
  qb = lambda i: nq - 1 - i
  qspec = lambda d: pl.BlockSpec((None, block_q, None, d), lambda i, bh: (bh // H, qb(i), bh % H, 0))
  kvspec = lambda d: pl.BlockSpec((None, Tp, None, d), lambda i, bh: (bh // H, 0, (bh % H) // R, 0))
  rowspec = pl.BlockSpec((None, None, block_q), lambda i, bh: (bh // H, bh % H, qb(i)))
  kernel = functools.partial(_dq_kernel, scale=scale, bs=block_size, m_blocks=block_q // block_size,
                             num_q_blocks=nq)
  dq = pl.pallas_call(
      kernel,
      grid=(nq, B * H),
      in_specs=[qspec(Dp), kvspec(Dp), kvspec(Ep), qspec(Ep), rowspec, rowspec],
      out_specs=qspec(Dp),
      out_shape=jax.ShapeDtypeStruct((B, Tp, H, Dp), q.dtype),
      compiler_params=_params(_warps(num_warps, max(Dp, Ep)), num_stages),
      interpret=interpret,
      name="jaxattn_landmark_bwd_dq",
  )(qp, kp, vp, dop, lse2, deltap)
  return dq[:, :T, :, :D]


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale, bs, block_q, rep,
                num_q_blocks):
  kb = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]  # [bs, Dp], [bs, Ep]
  qb0 = kb * bs // block_q  # the query tile holding this key block (its diagonal tile)

  def one_head(r, carry):
    def step(qb, carry, diag):
      dk, dv = carry
      qs = pl.ds(pl.multiple_of(qb * block_q, block_q), block_q)
      q, do = q_ref[qs, r, :], do_ref[qs, r, :]
      lse2, delta = lse_ref[r, qs], delta_ref[r, qs]
      t = _Tile(_dot(q, k, NT) * (scale * LOG2E), qb * block_q, kb, bs, diag)
      a, ds = _tile_grads(t, lse2, delta, _dot(do, v, NT))
      dv = dv + _dot(a.astype(do.dtype), do, TN)
      dk = dk + _dot(ds.astype(q.dtype), q, TN)
      return dk, dv

    carry = step(qb0, carry, True)
    return lax.fori_loop(qb0 + 1, num_q_blocks, lambda qb, c: step(qb, c, False), carry)

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = one_head(0, init) if rep == 1 else lax.fori_loop(0, rep, one_head, init)
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def flash_landmark_backward_dkv(q, k, v, do, lse, delta, *, block_size: int, block_q: int, scale: float,
                                num_warps: int | None = None, num_stages: int = 2, interpret: bool = False):
  """``dk [B, T, G, D]``, ``dv [B, T, G, E]`` (k's / v's dtype).

  One program per (key block, batch x kv head) loops over the ``H // G`` query heads sharing the kv head and the
  query tiles that see the block. Args as :func:`flash_landmark_backward_dq`.
  """
  check_blocks(block_size, block_q)
  B, T, H, D = q.shape
  _, _, G, E = v.shape
  R = H // G
  nq = pl.cdiv(T, block_q)
  Tp, Dp, Ep = nq * block_q, padded_head_dim(D), padded_head_dim(E)
  nk = Tp // block_size
  q, k, v = backward_operands(q, k, v)  # zeroed; poisoned rows carry NaN in lse / delta
  qp = _pad_to(_pad_to(q, 1, Tp), 3, Dp)
  kp = _pad_to(_pad_to(k, 1, Tp), 3, Dp)
  vp = _pad_to(_pad_to(v, 1, Tp), 3, Ep)
  dop = _pad_to(_pad_to(do, 1, Tp), 3, Ep)
  lse2 = _pad_to(_lse2(lse), 2, Tp)
  deltap = _pad_to(delta.astype(jnp.float32), 2, Tp)
  # grid (key block, batch x kv head); query-side blocks cover the R query heads of kv head g: [Tp, R, d].
  qspec = lambda d: pl.BlockSpec((None, Tp, R, d), lambda j, bg: (bg // G, 0, bg % G, 0))
  kvspec = lambda d: pl.BlockSpec((None, block_size, None, d), lambda j, bg: (bg // G, j, bg % G, 0))
  rowspec = pl.BlockSpec((None, R, Tp), lambda j, bg: (bg // G, bg % G, 0))
  kernel = functools.partial(_dkv_kernel, scale=scale, bs=block_size, block_q=block_q, rep=R, num_q_blocks=nq)
  dk, dv = pl.pallas_call(
      kernel,
      grid=(nk, B * G),
      in_specs=[qspec(Dp), kvspec(Dp), kvspec(Ep), qspec(Ep), rowspec, rowspec],
      out_specs=[kvspec(Dp), kvspec(Ep)],
      out_shape=[jax.ShapeDtypeStruct((B, Tp, G, Dp), k.dtype), jax.ShapeDtypeStruct((B, Tp, G, Ep), v.dtype)],
      compiler_params=_params(_warps(num_warps, max(Dp, Ep)), num_stages),
      interpret=interpret,
      name="jaxattn_landmark_bwd_dkv",
  )(qp, kp, vp, dop, lse2, deltap)
  return dk[:, :T, :, :D], dv[:, :T, :, :E]
