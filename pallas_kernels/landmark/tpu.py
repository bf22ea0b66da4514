"""Fused landmark attention for TPUs: Mosaic Pallas kernels (forward, dq, dk/dv).

Raw kernels: jax only, no autodiff (``jaxattn.ops.landmark.pallas_tpu`` joins them through
``jaxattn.backend.flash_vjp``). The algorithm is the one of :mod:`pallas_kernels.landmark.gpu` (read its docstring
for the formulas): a key tile is one landmark block of ``bs`` keys, a query tile ``m`` whole blocks
(``block_q = m * bs``); key blocks before the query tile's first block are "past" tiles (each row adds ONE top-level
logit, its landmark's, carrying the tile's intra-block softmax of the regular keys), the ``m`` blocks from there are
the diagonal (per row: earlier, current or future block; the current block's landmark is masked).

Grids (the last axes are sequential, "arbitrary"; the others "parallel"):

- forward, dq: ``(B, H, nQ, nKb)`` with ``nKb = Tp / bs`` key blocks. Query tile ``i`` needs key blocks
  ``0 .. (i + 1) m - 1``; later steps re-point the K/V index map at the last needed block (no new fetch) and skip
  the body. The running max / sum live in ``(bq, 128)`` lane-replicated f32 VMEM scratch, the accumulator in
  ``(bq, E)`` f32.
- dk/dv: ``(B, G, nKb, R, nQ)`` with ``R = H // G``: for key block ``kb`` the ``R`` query heads of its kv head and
  the query tiles from ``kb // m`` (the diagonal one) to the end; earlier steps re-point the index maps at the
  diagonal tile. dk/dv accumulate in f32 scratch over the whole group (GQA summed in-kernel).

Layouts: q / k / v / out are transposed to ``[B, N, Tp, F]`` outside the kernels (blocks ``(bq | bs, F)``; F is the
whole minor dim); lse / delta are lane-replicated ``[B, H, Tp, 128]`` (blocks ``(bq, 128)``), so every block obeys
the (8, 128) rule when ``bs`` and ``block_q`` are multiples of 8. Row vectors are ``(bq, 1)`` and broadcast
implicitly, block membership is tested with scalar multiplies only (no vector integer division).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import NT
from pallas_kernels.common.nonfinite import backward_operands, forward_operands

__all__ = ["flash_landmark_forward", "flash_landmark_backward_dq", "flash_landmark_backward_dkv", "check_blocks"]

NUM_LANES = 128
NUM_SUBLANES = 8
_F32 = jnp.float32


def check_blocks(block_size: int, block_q: int, T: int) -> None:
  """Raises ValueError unless the tiles obey the (8, 128) rule: ``block_size`` and ``block_q`` multiples of 8 (they
  are the sublane dims of the K/V and Q/O/lse blocks) and ``block_q`` a multiple of ``block_size``."""
  if block_size % NUM_SUBLANES:
    raise ValueError(f"the TPU landmark kernels need block_size to be a multiple of {NUM_SUBLANES} (the sublane dim "
                     f"of the K/V blocks), got {block_size}")
  if block_q % block_size:
    raise ValueError(f"block_q={block_q} must be a multiple of block_size={block_size}")
  del T


def _interpret(interpret):
  return pltpu.InterpretParams() if interpret is True else (interpret or False)


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _to_heads(x, Tp):
  """``[B, T, N, F] -> [B, N, Tp, F]`` (zero-padded)."""
  T = x.shape[1]
  if Tp != T:
    x = jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
  return x.transpose(0, 2, 1, 3)


def _rows(x, Tp):
  """``[B, H, T] f32 -> [B, H, Tp, 128]`` lane-replicated (``-inf`` -> 0)."""
  x = jnp.where(jnp.isneginf(x), 0.0, x).astype(_F32)
  if Tp != x.shape[-1]:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, Tp - x.shape[-1])))
  return jnp.broadcast_to(x[..., None], (*x.shape, NUM_LANES))


class _Tile:
  """The grouped-softmax pieces of one (query tile, key block) pair; row vectors are ``(bq, 1)``."""

  def __init__(self, s, q0, kb, bs: int, diag: bool):
    col = lax.broadcasted_iota(jnp.int32, s.shape, 1)
    self.is_lm = col == bs - 1
    self.lam = jnp.max(jnp.where(self.is_lm, s, -jnp.inf), axis=1, keepdims=True)  # landmark logit
    s_reg = jnp.where(self.is_lm, -jnp.inf, s)
    m_loc = jnp.max(s_reg, axis=1, keepdims=True)  # finite: bs - 1 >= 1 regular keys
    self.p_loc = jnp.exp(s_reg - m_loc)  # [bq, bs], 0 at the landmark
    self.l_loc = jnp.sum(self.p_loc, axis=1, keepdims=True)
    self.s_cur = self.past = self.cur = None
    if diag:
      qpos = q0 + lax.broadcasted_iota(jnp.int32, (s.shape[0], 1), 0)
      end = (kb + 1) * bs  # block kb is earlier than the query's block iff qpos >= end
      self.lam = jnp.where(qpos >= end, self.lam, -jnp.inf)
      cur = (qpos < end) & jnp.logical_not(self.is_lm) & (kb * bs + col <= qpos)
      self.s_cur = jnp.where(cur, s, -jnp.inf)
      # kept for where(): a future block's p_loc is NaN when it holds a NaN key, and its weight is 0
      self.past, self.cur = qpos >= end, cur

  def only(self, mask, x):
    """``x`` where ``mask`` (None: everywhere) else exact 0 (never 0 * NaN)."""
    return x if mask is None else jnp.where(mask, x, 0.0)


def _tile_grads(t: _Tile, lse, delta, dp):
  """``(a, ds)`` ``[bq, bs]`` of one tile; ``lse``, ``delta`` are ``(bq, 1)``."""
  p_top = jnp.exp(t.lam - lse)  # 0 for rows whose block is not earlier
  p_loc = t.p_loc / t.l_loc
  d_loc = jnp.sum(p_loc * dp, axis=1, keepdims=True)
  a = t.only(t.past, p_loc * p_top)
  ds = t.only(t.past, a * (dp - d_loc) + jnp.where(t.is_lm, p_top * (d_loc - delta), 0.0))
  if t.s_cur is not None:
    a_cur = t.only(t.cur, jnp.exp(t.s_cur - lse))
    a = a + a_cur
    ds = ds + t.only(t.cur, a_cur * (dp - delta))
  return a, ds


def _run_steps(j, first_diag, m_blocks, step):
  pl.when(j < first_diag)(lambda: step(False))
  pl.when((j >= first_diag) & (j < first_diag + m_blocks))(lambda: step(True))


# ----------------------------------------------------------------------------------------------------- forward
def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, scale, bs, m_blocks, prec):
  i, j = pl.program_id(2), pl.program_id(3)
  bq = q_ref.shape[0]
  first_diag = i * m_blocks

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, _F32)
    l_scr[...] = jnp.zeros(l_scr.shape, _F32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, _F32)

  def step(diag: bool):
    s = lax.dot_general(q_ref[...], k_ref[...], NT, preferred_element_type=_F32, precision=prec) * scale
    t = _Tile(s, i * bq, j, bs, diag)  # s: [bq, bs]
    m_prev, l_prev = m_scr[...][:, :1], l_scr[...][:, :1]  # [bq, 1]
    m_new = jnp.maximum(m_prev, t.lam)
    if diag:
      m_new = jnp.maximum(m_new, jnp.max(t.s_cur, axis=1, keepdims=True))
    m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    alpha = jnp.exp(m_prev - m_safe)
    w = jnp.exp(t.lam - m_safe)  # top-level weight of this block's landmark
    p = t.only(t.past, t.p_loc * (w / t.l_loc))
    l_new = alpha * l_prev + w
    if diag:
      p_cur = jnp.exp(t.s_cur - m_safe)
      p = p + p_cur
      l_new = l_new + jnp.sum(p_cur, axis=1, keepdims=True)
    v = v_ref[...]
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=_F32, precision=prec)  # [bq, E]
    acc_scr[...] = acc_scr[...] * alpha + pv
    m_scr[...] = jnp.broadcast_to(m_new, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l_new, l_scr.shape)

  _run_steps(j, first_diag, m_blocks, step)

  @pl.when(j == first_diag + m_blocks - 1)
  def _end():
    l = l_scr[...]
    ok = l != 0  # a NaN l (the row attends a non-finite input) keeps its NaN output and lse
    inv = jnp.where(ok, 1.0 / jnp.where(ok, l, 1.0), 0.0)
    o_ref[...] = (acc_scr[...] * inv[:, :1]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(ok, m_scr[...] + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf)


def flash_landmark_forward(q, k, v, *, block_size: int, block_q: int, scale: float, interpret=False):
  """Forward pass.

  Args:
    q: ``[B, T, H, D]``; k: ``[B, T, G, D]``; v: ``[B, T, G, E]``.
    block_size: landmark block (= key tile), a multiple of 8 (128 fills the lanes of the logits; 64 runs at half
      width).
    block_q: query tile, a multiple of ``block_size``.
    scale: logit scale.
    interpret: False (compile with Mosaic), True / ``pltpu.InterpretParams(...)`` (TPU interpret mode).

  Returns:
    ``out [B, T, H, E]`` (q's dtype) and ``lse [B, H, T]`` f32 (natural log, top-level).
  """
  check_blocks(block_size, block_q, q.shape[1])
  B, T, H, D = q.shape
  _, _, G, E = v.shape
  R = H // G
  bs, bq, m = block_size, block_q, block_q // block_size
  nq = pl.cdiv(T, bq)
  Tp = nq * bq

  def q_idx(b, h, i, j):
    return b, h, i, 0

  def kv_idx(b, h, i, j):
    return b, lax.div(h, R), jnp.minimum(j, (i + 1) * m - 1), 0

  kernel = functools.partial(_fwd_kernel, scale=float(scale), bs=bs, m_blocks=m, prec=_precision(q.dtype))
  out, lse = pl.pallas_call(
      kernel,
      grid=(B, H, nq, Tp // bs),
      in_specs=[pl.BlockSpec((None, None, bq, D), q_idx), pl.BlockSpec((None, None, bs, D), kv_idx),
                pl.BlockSpec((None, None, bs, E), kv_idx)],
      out_specs=[pl.BlockSpec((None, None, bq, E), q_idx), pl.BlockSpec((None, None, bq, NUM_LANES), q_idx)],
      out_shape=[jax.ShapeDtypeStruct((B, H, Tp, E), q.dtype), jax.ShapeDtypeStruct((B, H, Tp, NUM_LANES), _F32)],
      scratch_shapes=[pltpu.VMEM((bq, NUM_LANES), _F32), pltpu.VMEM((bq, NUM_LANES), _F32),
                      pltpu.VMEM((bq, E), _F32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_interpret(interpret),
      name="jaxattn_landmark_fwd",
  )(*(_to_heads(x, Tp) for x in forward_operands(q, k, v, value_used=(jnp.arange(T) + 1) % block_size != 0)))
  return out.transpose(0, 2, 1, 3)[:, :T], lse[:, :, :T, 0]


# ---------------------------------------------------------------------------------------------------- backward
def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr, *, scale, bs, m_blocks, prec):
  i, j = pl.program_id(2), pl.program_id(3)
  bq = q_ref.shape[0]
  first_diag = i * m_blocks

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, _F32)

  def step(diag: bool):
    k, v = k_ref[...], v_ref[...]
    s = lax.dot_general(q_ref[...], k, NT, preferred_element_type=_F32, precision=prec) * scale
    t = _Tile(s, i * bq, j, bs, diag)
    dp = lax.dot_general(do_ref[...], v, NT, preferred_element_type=_F32, precision=prec)  # [bq, bs]
    _, ds = _tile_grads(t, lse_ref[...][:, :1], delta_ref[...][:, :1], dp)
    dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=_F32, precision=prec)

  _run_steps(j, first_diag, m_blocks, step)

  @pl.when(j == first_diag + m_blocks - 1)
  def _end():
    dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def flash_landmark_backward_dq(q, k, v, do, lse, delta, *, block_size: int, block_q: int, scale: float,
                               interpret=False):
  """``dq [B, T, H, D]`` (q's dtype).

  Args:
    do: ``[B, T, H, E]`` output cotangent.
    lse: ``[B, H, T]`` f32 from :func:`flash_landmark_forward`.
    delta: ``[B, H, T]`` f32, ``sum_e do * out - dlse``.
    Other args as :func:`flash_landmark_forward`.
  """
  check_blocks(block_size, block_q, q.shape[1])
  B, T, H, D = q.shape
  _, _, G, E = v.shape
  R = H // G
  bs, bq, m = block_size, block_q, block_q // block_size
  nq = pl.cdiv(T, bq)
  Tp = nq * bq

  def q_idx(b, h, i, j):
    return b, h, i, 0

  def kv_idx(b, h, i, j):
    return b, lax.div(h, R), jnp.minimum(j, (i + 1) * m - 1), 0

  kernel = functools.partial(_dq_kernel, scale=float(scale), bs=bs, m_blocks=m, prec=_precision(q.dtype))
  dq = pl.pallas_call(
      kernel,
      grid=(B, H, nq, Tp // bs),
      in_specs=[pl.BlockSpec((None, None, bq, D), q_idx), pl.BlockSpec((None, None, bs, D), kv_idx),
                pl.BlockSpec((None, None, bs, E), kv_idx), pl.BlockSpec((None, None, bq, E), q_idx),
                pl.BlockSpec((None, None, bq, NUM_LANES), q_idx), pl.BlockSpec((None, None, bq, NUM_LANES), q_idx)],
      out_specs=pl.BlockSpec((None, None, bq, D), q_idx),
      out_shape=jax.ShapeDtypeStruct((B, H, Tp, D), q.dtype),
      scratch_shapes=[pltpu.VMEM((bq, D), _F32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_interpret(interpret),
      name="jaxattn_landmark_bwd_dq",
  )(*(_to_heads(x, Tp) for x in (*backward_operands(q, k, v), do)), _rows(lse, Tp), _rows(delta, Tp))
  return dq.transpose(0, 2, 1, 3)[:, :T]


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, scale, bs,
                m_blocks, prec):
  kb, r, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  bq = q_ref.shape[0]
  qb0 = lax.div(kb, m_blocks)  # the query tile holding this key block

  @pl.when((r == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, _F32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, _F32)

  def step(diag: bool):
    q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
    s = lax.dot_general(q, k, NT, preferred_element_type=_F32, precision=prec) * scale  # [bq, bs]
    t = _Tile(s, i * bq, kb, bs, diag)
    dp = lax.dot_general(do, v, NT, preferred_element_type=_F32, precision=prec)
    a, ds = _tile_grads(t, lse_ref[...][:, :1], delta_ref[...][:, :1], dp)
    dv_scr[...] += jnp.dot(a.T.astype(do.dtype), do, preferred_element_type=_F32, precision=prec)
    dk_scr[...] += jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=_F32, precision=prec)

  pl.when(i == qb0)(lambda: step(True))
  pl.when(i > qb0)(lambda: step(False))

  @pl.when((r == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
  def _end():
    dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def flash_landmark_backward_dkv(q, k, v, do, lse, delta, *, block_size: int, block_q: int, scale: float,
                                interpret=False):
  """``dk [B, T, G, D]``, ``dv [B, T, G, E]`` (k's / v's dtype); GQA groups summed in-kernel.

  Args as :func:`flash_landmark_backward_dq`.
  """
  check_blocks(block_size, block_q, q.shape[1])
  B, T, H, D = q.shape
  _, _, G, E = v.shape
  R = H // G
  bs, bq, m = block_size, block_q, block_q // block_size
  nq = pl.cdiv(T, bq)
  Tp = nq * bq

  def q_idx(b, g, kb, r, i):
    return b, g * R + r, jnp.maximum(i, lax.div(kb, m)), 0

  def kv_idx(b, g, kb, r, i):
    return b, g, kb, 0

  row = pl.BlockSpec((None, None, bq, NUM_LANES), q_idx)
  kernel = functools.partial(_dkv_kernel, scale=float(scale), bs=bs, m_blocks=m, prec=_precision(q.dtype))
  dk, dv = pl.pallas_call(
      kernel,
      grid=(B, G, Tp // bs, R, nq),
      in_specs=[pl.BlockSpec((None, None, bq, D), q_idx), pl.BlockSpec((None, None, bs, D), kv_idx),
                pl.BlockSpec((None, None, bs, E), kv_idx), pl.BlockSpec((None, None, bq, E), q_idx), row, row],
      out_specs=[pl.BlockSpec((None, None, bs, D), kv_idx), pl.BlockSpec((None, None, bs, E), kv_idx)],
      out_shape=[jax.ShapeDtypeStruct((B, G, Tp, D), k.dtype), jax.ShapeDtypeStruct((B, G, Tp, E), v.dtype)],
      scratch_shapes=[pltpu.VMEM((bs, D), _F32), pltpu.VMEM((bs, E), _F32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=_interpret(interpret),
      name="jaxattn_landmark_bwd_dkv",
  )(*(_to_heads(x, Tp) for x in (*backward_operands(q, k, v), do)), _rows(lse, Tp), _rows(delta, Tp))
  return dk.transpose(0, 2, 1, 3)[:, :T], dv.transpose(0, 2, 1, 3)[:, :T]
