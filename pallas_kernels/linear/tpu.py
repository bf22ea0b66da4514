"""Chunked linear attention with decay for TPUs: Pallas Mosaic kernels (forward, dq, dk/dv).

Raw kernels: jax only, no autodiff (``jaxattn.ops.linear.pallas_tpu`` joins them through
``jaxattn.backend.flash_vjp``). The math and its numerical safety are in :mod:`pallas_kernels.linear`;
``dO = scale * do``. Each grid step handles one chunk of ``C`` tokens of one head; the chunk axis is sequential
("arbitrary") and the f32 state lives in VMEM:

- forward, grid ``(B, H, N)``: scratch ``S [D, E]`` f32, zeroed (or loaded from the initial state) at chunk 0;
  ``o = scale ((Q K^T * W) V + e^{a} Q S)`` then ``S <- e^{A} S + (e^{A - a} K)^T V``; the final state is written
  at the last chunk.
- dq, grid ``(B, H, N)``: the same forward sweep recomputing ``S``;
  ``dq = scale ((dO V^T * W) K + e^{a} dO S^T)``, plus (with a decay) ``rq_i = e^{a_i} q_i^T S dO_i`` (f32, a
  log-decay-gradient term).
- dk/dv, grid ``(B, G, N, R)`` with ``R = H // G``, chunks visited in reverse: the ``R`` query heads of kv head
  ``g`` are the innermost axis, each with its own state cotangent ``dS [D, E]`` (kept in the resident
  ``d_initial_state`` output block ``[R, D, E]``, which ends as ``dS_0``), so dk and dv of a chunk are summed over
  the group in an f32 VMEM accumulator and written once (no per-query-head copy in HBM). The intra-chunk matrices
  are built transposed (keys on rows) so that ``dv = P^T dO`` and ``dk = dP^T Q`` are plain matmuls; the state
  terms are ``dv += e^{A - a} K dS``, ``dk += e^{A - a} (V dS^T)``, and ``dS <- e^{A} dS + (e^{a} Q)^T dO``.
  With a decay it also emits the log-decay term ``r`` per query head (intra-chunk ``q . dq`` minus ``k . dk``,
  from f32 values; see ``jaxattn.ops.linear.pallas_common``).

Here ``W_ij = exp(a_i - a_j)`` on ``i >= j`` (else 0), ``a`` the chunk-local cumulative log decays and ``A`` their
chunk total. The decay sums (``hi`` and ``lo`` of the double-float pairs) arrive lane-dense as ``[Ba, H, N8, C]``
arrays read in ``(8, C)`` blocks of 8 chunks (``N8``: N rounded up to 8); a step picks its row with a sublane
mask and makes the column copy with a diagonal mask and a lane reduction (no transposes, no ``[.., 1]``-shaped
arrays, whose HBM tiles would pad 128x). ``rq`` / ``r`` leave the same way.

Layouts: a ``[B, T, N, F]`` operand with ``F % 128 == 0`` is read in place as ``[B, Tp, N * F]`` (block ``(C, F)``
at column block ``n``, no transpose); other head dims use ``[B, N, Tp, F]`` (one XLA transpose each way). T is
zero-padded to whole chunks outside the kernels (zero q/k/v and zero log decay: padded tokens change nothing).

Tiling (checked by :func:`check_block_shapes` on every call, also in interpret mode, which does not enforce it):
the last two dims of every block are multiples of ``(8 * 4 / itemsize, 128)`` or span the array. Here that only
constrains the chunk: a multiple of 8 (f32) / 16 (bf16), or the whole padded sequence.

Matmul operands are the input dtype (the f32 state and the decay-weighted matrices are cast to it, as flash
attention casts P), except where the log-decay terms need f32 accuracy (the state products of the backward
kernels): there a bf16 operand is split into ``hi + lo`` (one more product, only when the log decay is
differentiated); f32 inputs use ``Precision.HIGHEST``. f16 inputs are refused (no f16 MXU path on TPU).

VMEM per step (C = 128, D = E = 128, bf16): q/k/v/o (or q/k/v/do and dq, dk, dv) blocks double-buffered
(< 0.5 MiB), the ``[D, E]`` f32 state (64 KiB; ``R`` of them for dk/dv), a few ``[C, C]`` and ``[C, D]`` f32
temporaries (< 0.5 MiB): far inside the scoped VMEM limit.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import NN, NT, TN
from pallas_kernels.common.nonfinite import backward_operands, forward_operands
from pallas_kernels.linear import chunk_log_decay, pair_difference

__all__ = ["linear_fwd", "linear_bwd_dq", "linear_bwd_dkv", "check_block_shapes", "sublane_multiple",
           "default_chunk", "DEFAULT_CHUNK"]

NUM_LANES = 128
NUM_SUBLANES = 8
DEFAULT_CHUNK = 128
_ROWS = NUM_SUBLANES  # chunks per block of the lane-dense decay sums and rq / r arrays
_F32 = jnp.float32


# ------------------------------------------------------------------------------------------------ tiling rules
def sublane_multiple(dtype) -> int:
  """Second-minor block multiple for ``dtype``: 8 for 32-bit, 16 for 16-bit types (packed sublanes)."""
  return NUM_SUBLANES * 4 // jnp.dtype(dtype).itemsize


def default_chunk(T: int, dtype) -> int:
  """128 tokens, or the whole (sublane-rounded) sequence when it is shorter."""
  m = sublane_multiple(dtype)
  return min(DEFAULT_CHUNK, -(-T // m) * m)


def check_block_shapes(name: str, block_shape, array_shape, dtype) -> None:
  """The Mosaic rule: the last two block dims are multiples of ``(8 * 4 / itemsize, 128)`` or span the array.

  Raises:
    ValueError: naming the operand, its block and array shapes and the offending dim.
  """
  if len(block_shape) != len(array_shape) or len(block_shape) < 2:
    raise ValueError(f"{name}: block {block_shape} does not match array {array_shape}")
  if block_shape[-1] is None or block_shape[-2] is None:
    raise ValueError(f"{name}: the last two dims of a TPU block cannot be squeezed, got {block_shape}")
  for b, a, mult, what in ((block_shape[-2], array_shape[-2], sublane_multiple(dtype), "second-minor (sublane)"),
                           (block_shape[-1], array_shape[-1], NUM_LANES, "minor (lane)")):
    if b != a and b % mult:
      raise ValueError(
          f"{name}: block {tuple(block_shape)} of array {tuple(array_shape)} ({jnp.dtype(dtype).name}) breaks the "
          f"TPU tiling rule: its {what} dim {b} must be a multiple of {mult} or equal the array's {a}")


def _pallas_call(kernel, *, name, grid, semantics, operands, in_specs, out_shapes, out_specs, scratch, interpret):
  """``pl.pallas_call`` after checking every block against the tiling rule (operands may be None: skipped)."""
  ops = [(x, s) for x, s in zip(operands, in_specs) if x is not None]
  for i, (x, s) in enumerate(ops):
    check_block_shapes(f"{name} input {i}", s.block_shape, x.shape, x.dtype)
  for i, (o, s) in enumerate(zip(out_shapes, out_specs)):
    check_block_shapes(f"{name} output {i}", s.block_shape, o.shape, o.dtype)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[s for _, s in ops],
      out_specs=out_specs,
      out_shape=out_shapes,
      scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
      interpret=pltpu.InterpretParams() if interpret is True else (interpret or False),
      name=name,
  )(*[x for x, _ in ops])


# ------------------------------------------------------------------------------------------------ layouts
@dataclasses.dataclass(frozen=True)
class _Operand:
  """A ``[B, L, N, F]`` tensor as the kernel reads it: fused ``[B, Lp, N * F]`` or split ``[B, N, Lp, F]``."""

  fused: bool
  chunk: int
  feat: int

  def spec(self, index):
    """``index(*grid) -> (b, head, chunk)``."""
    if self.fused:
      return pl.BlockSpec((None, self.chunk, self.feat), lambda *g: _fused_idx(*index(*g)))
    return pl.BlockSpec((None, None, self.chunk, self.feat), lambda *g: _split_idx(*index(*g)))

  def shape(self, B, Lp, N):
    return (B, Lp, N * self.feat) if self.fused else (B, N, Lp, self.feat)


def _fused_idx(b, n, c):
  return b, c, n


def _split_idx(b, n, c):
  return b, n, c, 0


def _to_kernel(x, Lp: int, chunk: int):
  """``[B, L, N, F] -> (kernel array, _Operand)``, zero-padding L to ``Lp``."""
  B, L, N, F = x.shape
  if Lp != L:
    x = jnp.pad(x, ((0, 0), (0, Lp - L), (0, 0), (0, 0)))
  op = _Operand(F % NUM_LANES == 0, chunk, F)
  return (x.reshape(B, Lp, N * F) if op.fused else x.transpose(0, 2, 1, 3)), op


def _from_kernel(y, op: _Operand, B: int, L: int, N: int):
  """Inverse of :func:`_to_kernel` (drops the padding)."""
  if op.fused:
    return y.reshape(B, -1, N, op.feat)[:, :L]
  return y.transpose(0, 2, 1, 3)[:, :L]


def _decay_rows(log_decay, B, T, H, chunk):
  """Lane-dense chunk decay sums ``(hi, lo)``, each ``[Ba, H, N8, C]`` (N rounded up to 8 chunks), or None."""
  a = chunk_log_decay(log_decay, B, T, H, chunk)  # ([Ba, H, N, C], [Ba, H, N, C])
  if a is None:
    return None
  N = a[0].shape[2]
  N8 = -(-N // _ROWS) * _ROWS
  return tuple(jnp.pad(x, ((0, 0), (0, 0), (0, N8 - N), (0, 0))) for x in a)


def _check(q, k, v, chunk: int):
  B, T, H, D = q.shape
  if k.shape[:2] != (B, T) or v.shape[:3] != k.shape[:3] or H % k.shape[2]:
    raise ValueError(f"linear tpu kernels: q {q.shape}, k {k.shape}, v {v.shape} are not [B, T, H, D], "
                     f"[B, T, G, D], [B, T, G, E] with H % G == 0")
  if q.dtype == jnp.float16:
    raise ValueError("linear tpu kernels take f32 or bf16 inputs, not float16")
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"chunk must be a positive int, got {chunk!r}")
  N = -(-T // chunk)
  m = sublane_multiple(q.dtype)
  if N > 1 and chunk % m:
    raise ValueError(f"chunk={chunk} breaks the TPU tiling rule for {jnp.dtype(q.dtype).name}: it is the "
                     f"second-minor dim of the q/k/v blocks, so it must be a multiple of {m} (T={T} spans "
                     f"{N} chunks)")
  return N


# ------------------------------------------------------------------------------------------------ in-kernel pieces
def _group(c):
  """The block of 8 chunks holding chunk ``c`` (``lax.div``: jnp's floor division lowers through ``sign``)."""
  return lax.div(c, _ROWS)


def _slot(c):
  """Chunk ``c``'s row in its block of 8."""
  return lax.rem(c, _ROWS)


def _row(ref_block, row, C):
  """Row ``row`` of an ``(8, C)`` block as ``(1, C)`` (sublane mask + reduction: no dynamic sublane slicing)."""
  sub = lax.broadcasted_iota(jnp.int32, (_ROWS, C), 0)
  return jnp.sum(jnp.where(sub == row, ref_block, 0.0), axis=0, keepdims=True)


def _col(x_row, C):
  """``(1, C) -> (C, 1)`` without a transpose: keep the diagonal of the broadcast, reduce over lanes."""
  i = lax.broadcasted_iota(jnp.int32, (C, C), 0)
  j = lax.broadcasted_iota(jnp.int32, (C, C), 1)
  return jnp.sum(jnp.where(i == j, x_row, 0.0), axis=1, keepdims=True)


def _to_row(x_col, C):
  """``(C, 1) -> (1, C)`` (diagonal mask, sublane reduction)."""
  i = lax.broadcasted_iota(jnp.int32, (C, C), 0)
  j = lax.broadcasted_iota(jnp.int32, (C, C), 1)
  return jnp.sum(jnp.where(i == j, x_col, 0.0), axis=0, keepdims=True)


def _put_row(ref, row, x_row, C):
  """Writes ``(1, C)`` into row ``row`` of an ``(8, C)`` output block (the others keep their contents)."""
  sub = lax.broadcasted_iota(jnp.int32, (_ROWS, C), 0)
  ref[...] = jnp.where(sub == row, x_row, ref[...])


class _Decays:
  """One chunk's decay factors from its ``(1, C)`` rows of chunk-local cumulative log decays ``a = hi + lo``.

  ``w [C, C]``: ``exp(a_i - a_j)`` for ``i >= j`` (queries on rows), else 0; ``wt``: the same with keys on rows;
  ``ea [C, 1] = exp(a_i)``; ``eb [C, 1] = exp(A - a_j)``; ``eA [1, 1] = exp(A)``. Differences of the double-float
  pairs are rounded once (:func:`pallas_kernels.linear.pair_difference`); exponents are clamped to ``<= 0`` (the
  used ones are) before the ``exp``, and the unused triangle is masked after it.
  """

  def __init__(self, hi_row, lo_row, C):
    hi_col, lo_col = _col(hi_row, C), _col(lo_row, C)  # [C, 1]
    lane = lax.broadcasted_iota(jnp.int32, (1, C), 1)
    last = lambda x: jnp.sum(jnp.where(lane == C - 1, x, 0.0), axis=1, keepdims=True)  # [1, 1]
    hA, lA = last(hi_row), last(lo_row)  # the chunk total
    i = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    j = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    L = lambda: pair_difference(hi_col, lo_col, hi_row, lo_row)  # [C, C]: a_i - a_j (queries on rows)
    self.w = lambda: jnp.where(i >= j, jnp.exp(jnp.minimum(L(), 0.0)), 0.0)
    self.wt = lambda: jnp.where(j >= i, jnp.exp(jnp.minimum(-L(), 0.0)), 0.0)  # [C(j), C(i)]: a_i - a_j at (j, i)
    self.ea = jnp.exp(hi_col + lo_col)
    self.eb = jnp.exp(jnp.minimum(pair_difference(hA, lA, hi_col, lo_col), 0.0))
    self.eA = jnp.exp(hA + lA)


def _causal(C, keys_on_rows=False):
  i = lax.broadcasted_iota(jnp.int32, (C, C), 0)
  j = lax.broadcasted_iota(jnp.int32, (C, C), 1)
  return j >= i if keys_on_rows else i >= j


def _dot(a, b, dims, prec):
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=_F32)


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == _F32 else lax.Precision.DEFAULT


def _live(decay, x):
  """``x`` where the decay factor is non-zero, else an exact 0 (a NaN key or state behind a reset stays out)."""
  return jnp.where(decay > 0, x, jnp.zeros((), x.dtype))


def _scaled(x, factor, mm):
  """``x * factor`` in f32, cast to the matmul dtype."""
  return (x.astype(_F32) * factor).astype(mm)


# ----------------------------------------------------------------------------------------------------- forward
def _fwd_kernel(*refs, has_decay, has_s0, scale, n_chunks, prec):
  q_ref, k_ref, v_ref, *refs = refs
  a_refs = (refs.pop(0), refs.pop(0)) if has_decay else None  # (hi, lo)
  s0_ref = refs.pop(0) if has_s0 else None
  o_ref, st_ref, state_ref = refs
  n = pl.program_id(2)
  C = q_ref.shape[0]

  @pl.when(n == 0)
  def _init():
    state_ref[...] = s0_ref[...] if has_s0 else jnp.zeros(state_ref.shape, _F32)

  q, k, v = q_ref[...], k_ref[...], v_ref[...]  # [C, D], [C, D], [C, E]
  mm = q.dtype
  S = state_ref[...]  # [D, E] f32: the state entering this chunk
  s = _dot(q, k, NT, prec)  # [C, C]
  if has_decay:
    dec = _Decays(*(_row(x[...], _slot(n), C) for x in a_refs), C)
    # where(), never 0 * x: a zero decay (future key, a reset in between) drops a NaN key / state exactly
    w = dec.w()
    p = _live(w, s * w)
    inter = _live(dec.ea, _dot(_live(dec.ea, _scaled(q, dec.ea, mm)), S.astype(mm), NN, prec))
    S_next = _live(dec.eA, dec.eA * S) + _dot(_live(dec.eb, _scaled(k, dec.eb, mm)), v, TN, prec)
  else:
    p = jnp.where(_causal(C), s, 0.0)
    inter = _dot(q, S.astype(mm), NN, prec)
    S_next = S + _dot(k, v, TN, prec)
  o = _dot(p.astype(mm), v, NN, prec) + inter  # [C, E]
  o_ref[...] = (o * scale).astype(o_ref.dtype)
  state_ref[...] = S_next

  @pl.when(n == n_chunks - 1)
  def _end():
    st_ref[...] = S_next


def linear_fwd(q, k, v, log_decay, initial_state, *, scale: float, chunk: int, interpret=False):
  """Forward pass: outputs and the final state.

  Args:
    q: ``[B, T, H, D]``; k: ``[B, T, G, D]``; v: ``[B, T, G, E]`` (f32 or bf16).
    log_decay: None, f32 ``[H]`` or ``[B, T, H]``, ``<= 0``.
    initial_state: None or f32 ``[B, H, D, E]``.
    scale: output scale.
    chunk: tokens per chunk (a multiple of 8 for f32 / 16 for bf16 unless it covers T).
    interpret: False (compile with Mosaic), True / ``pltpu.InterpretParams(...)`` (TPU interpret mode).

  Returns:
    ``out [B, T, H, E]`` in q's dtype and the final state ``[B, H, D, E]`` f32.

  Raises:
    ValueError: bad shapes, f16 inputs, or a chunk that breaks the tiling rule.
  """
  N = _check(q, k, v, chunk)
  B, T, H, D = q.shape
  G, E = v.shape[2], v.shape[3]
  R = H // G
  Tp = N * chunk
  # non-finite inputs (pallas_kernels.common.nonfinite): NaN rows of q / k, zeroed v
  (qk, qop), (kk, kop), (vk, vop) = (_to_kernel(x, Tp, chunk) for x in forward_operands(q, k, v))
  a = _decay_rows(log_decay, B, T, H, chunk)
  s0 = None if initial_state is None else initial_state.astype(_F32)
  ba = (lambda b: b) if (a is not None and a[0].shape[0] > 1) else (lambda b: 0)
  dspec = pl.BlockSpec((None, None, _ROWS, chunk), lambda b, h, n: (ba(b), h, _group(n), 0))  # 8 chunks' sums
  in_specs = [
      qop.spec(lambda b, h, n: (b, h, n)),
      kop.spec(lambda b, h, n: (b, lax.div(h, R), n)),
      vop.spec(lambda b, h, n: (b, lax.div(h, R), n)),
      dspec, dspec,  # decay sums (hi, lo)
      pl.BlockSpec((None, None, D, E), lambda b, h, n: (b, h, 0, 0)),
  ]
  oop = _Operand(vop.fused, chunk, E)
  out_specs = [oop.spec(lambda b, h, n: (b, h, n)), pl.BlockSpec((None, None, D, E), lambda b, h, n: (b, h, 0, 0))]
  out_shapes = [jax.ShapeDtypeStruct(oop.shape(B, Tp, H), q.dtype), jax.ShapeDtypeStruct((B, H, D, E), _F32)]
  kernel = functools.partial(_fwd_kernel, has_decay=a is not None, has_s0=s0 is not None, scale=float(scale),
                             n_chunks=N, prec=_precision(q.dtype))
  out, state = _pallas_call(
      kernel, name="jaxattn_linear_fwd", grid=(B, H, N), semantics=("parallel", "parallel", "arbitrary"),
      operands=[qk, kk, vk, *(a or (None, None)), s0], in_specs=in_specs, out_shapes=out_shapes, out_specs=out_specs,
      scratch=[pltpu.VMEM((D, E), _F32)], interpret=interpret)
  return _from_kernel(out, oop, B, T, H), state


# ------------------------------------------------------------------------------------------------------ dq pass
def _state_dot(x, S, dims, mm, prec, precise):
  """``x`` times the f32 state ``S`` with operands of dtype ``mm``; ``precise`` (16-bit inputs) splits ``S`` into
  ``hi + lo`` (one more product) so that the result keeps f32 accuracy in ``S`` (for the log-decay terms)."""
  hi = S.astype(mm)
  if mm == _F32 or not precise:
    return _dot(x, hi, dims, prec)
  return _dot(x, hi, dims, prec) + _dot(x, (S - hi.astype(_F32)).astype(mm), dims, prec)


def _weighted_dot(x, f, y, dims, mm, prec, precise):
  """``(x * f) @ y`` (``f [C, 1]`` f32); ``precise`` (16-bit inputs) splits the f32 ``x * f`` into ``hi + lo``."""
  xf = x.astype(_F32) * f
  hi = xf.astype(mm)
  if mm == _F32 or not precise:
    return _dot(hi, y, dims, prec)
  return _dot(hi, y, dims, prec) + _dot((xf - hi.astype(_F32)).astype(mm), y, dims, prec)


def _dq_kernel(*refs, has_decay, has_s0, with_r, scale, prec):
  q_ref, k_ref, v_ref, do_ref, *refs = refs
  a_refs = (refs.pop(0), refs.pop(0)) if has_decay else None  # (hi, lo)
  s0_ref = refs.pop(0) if has_s0 else None
  dq_ref = refs.pop(0)
  rq_ref = refs.pop(0) if with_r else None
  (state_ref,) = refs
  n = pl.program_id(2)
  C = q_ref.shape[0]

  @pl.when(n == 0)
  def _init():
    state_ref[...] = s0_ref[...] if has_s0 else jnp.zeros(state_ref.shape, _F32)

  q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]  # [C, D], [C, D], [C, E], [C, E]
  mm = q.dtype
  S = state_ref[...]  # [D, E] f32
  dpv = _dot(do, v, NT, prec)  # [C, C]: do_i . v_j
  if has_decay:
    dec = _Decays(*(_row(x[...], _slot(n), C) for x in a_refs), C)
    inter = _live(dec.ea, dec.ea * _state_dot(do, S, NT, mm, prec, with_r))  # [C, D]: e^{a_i} S do_i
    dq = _dot((dpv * dec.w()).astype(mm), k, NN, prec) + inter
    if with_r:
      # rq_i = e^{a_i} q_i^T S dO_i, the state part of q_i . dq_i from f32 values (see the dk/dv kernel for the rest)
      rq = scale * jnp.sum(q.astype(_F32) * inter, axis=1, keepdims=True)  # [C, 1]
      _put_row(rq_ref, _slot(n), _to_row(rq, C), C)
    state_ref[...] = _live(dec.eA, dec.eA * S) + _weighted_dot(k, dec.eb, v, TN, mm, prec, with_r)
  else:
    dq = _dot(jnp.where(_causal(C), dpv, 0.0).astype(mm), k, NN, prec) + _dot(do, S.astype(mm), NT, prec)
    state_ref[...] = S + _dot(k, v, TN, prec)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def linear_bwd_dq(q, k, v, log_decay, initial_state, do, *, scale: float, chunk: int, interpret=False,
                  log_decay_grad: bool = True):
  """``dq [B, T, H, D]`` (q's dtype) by a forward sweep, and the log-decay term ``rq [B, H, T]``.

  ``rq_t = e^{a_t} q_t^T S_c dO_t`` (f32): the inter-chunk part of ``q_t . dq_t`` (see
  ``jaxattn.ops.linear.pallas_common``); None without a decay or with ``log_decay_grad=False`` (which also skips
  the extra products that keep it f32-accurate for bf16 inputs).

  Args:
    do: ``[B, T, H, E]`` output cotangent.
    log_decay_grad: emit ``rq``.
    Other args as :func:`linear_fwd`.
  """
  N = _check(q, k, v, chunk)
  B, T, H, D = q.shape
  G, E = v.shape[2], v.shape[3]
  R = H // G
  Tp = N * chunk
  (qk, qop), (kk, kop), (vk, vop), (dok, doop) = (
      _to_kernel(x, Tp, chunk) for x in (*backward_operands(q, k, v), do.astype(q.dtype)))  # zeroed q, k, v
  a = _decay_rows(log_decay, B, T, H, chunk)
  with_r = a is not None and log_decay_grad
  N8 = -(-N // _ROWS) * _ROWS
  s0 = None if initial_state is None else initial_state.astype(_F32)
  ba = (lambda b: b) if (a is not None and a[0].shape[0] > 1) else (lambda b: 0)
  dspec = pl.BlockSpec((None, None, _ROWS, chunk), lambda b, h, n: (ba(b), h, _group(n), 0))  # 8 chunks' sums
  in_specs = [
      qop.spec(lambda b, h, n: (b, h, n)),
      kop.spec(lambda b, h, n: (b, lax.div(h, R), n)),
      vop.spec(lambda b, h, n: (b, lax.div(h, R), n)),
      doop.spec(lambda b, h, n: (b, h, n)),
      dspec, dspec,  # decay sums (hi, lo)
      pl.BlockSpec((None, None, D, E), lambda b, h, n: (b, h, 0, 0)),
  ]
  out_specs = [qop.spec(lambda b, h, n: (b, h, n))]
  out_shapes = [jax.ShapeDtypeStruct(qop.shape(B, Tp, H), q.dtype)]
  if with_r:
    out_specs.append(pl.BlockSpec((None, None, _ROWS, chunk), lambda b, h, n: (b, h, _group(n), 0)))
    out_shapes.append(jax.ShapeDtypeStruct((B, H, N8, chunk), _F32))
  kernel = functools.partial(_dq_kernel, has_decay=a is not None, has_s0=s0 is not None, with_r=with_r,
                             scale=float(scale), prec=_precision(q.dtype))
  outs = _pallas_call(
      kernel, name="jaxattn_linear_bwd_dq", grid=(B, H, N), semantics=("parallel", "parallel", "arbitrary"),
      operands=[qk, kk, vk, dok, *(a or (None, None)), s0], in_specs=in_specs, out_shapes=out_shapes,
      out_specs=out_specs, scratch=[pltpu.VMEM((D, E), _F32)], interpret=interpret)
  rq = outs[1][:, :, :N].reshape(B, H, Tp)[:, :, :T] if with_r else None
  return _from_kernel(outs[0], qop, B, T, H), rq


# --------------------------------------------------------------------------------------------------- dk/dv pass
def _dkv_kernel(*refs, has_decay, with_r, scale, n_chunks, rep, prec):
  q_ref, k_ref, v_ref, do_ref, *refs = refs
  a_refs = (refs.pop(0), refs.pop(0)) if has_decay else None  # (hi, lo)
  dst_ref, dk_ref, dv_ref, ds_ref, *refs = refs
  r_ref = refs.pop(0) if with_r else None
  acc = refs
  n, r = pl.program_id(2), pl.program_id(3)
  c = n_chunks - 1 - n  # reverse sweep
  C = q_ref.shape[0]

  @pl.when(n == 0)
  def _init():
    ds_ref[r] = dst_ref[r]  # the final-state cotangent of query head g * R + r

  q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]  # [C, D], [C, D], [C, E], [C, E]
  mm = q.dtype
  dS = ds_ref[r]  # [D, E] f32: cotangent of the state leaving this chunk
  dSm = dS.astype(mm)
  st = _dot(k, q, NT, prec)  # [C(j), C(i)]: k_j . q_i (keys on rows)
  dpvt = _dot(v, do, NT, prec)  # [C(j), C(i)]: v_j . do_i
  if has_decay:
    dec = _Decays(*(_row(x[r], _slot(c), C) for x in a_refs), C)
    wt = dec.wt()
    pt, dst = st * wt, dpvt * wt
    dv_state = _dot(_scaled(k, dec.eb, mm), dSm, NN, prec)  # e^{A - a_j} k_j^T dS
    dk_state = dec.eb * _state_dot(v, dS, NT, mm, prec, with_r)  # e^{A - a_j} dS v_j
    if with_r:
      # log-decay terms from f32 values: (q . dq)_intra - (k . dk)_intra - (k . dk)_state, the intra parts being
      # the column / row sums of scale * (k_j . q_i)(v_j . do_i) e^{a_i - a_j} (keys on rows).
      m = st * dst
      k_terms = scale * jnp.sum(m, axis=1, keepdims=True) + jnp.sum(k.astype(_F32) * dk_state, axis=1,
                                                                     keepdims=True)  # [C, 1]
      row = scale * jnp.sum(m, axis=0, keepdims=True) - _to_row(k_terms, C)  # [1, C]
      _put_row(r_ref.at[r], _slot(c), row, C)
    ds_ref[r] = dec.eA * dS + scale * _weighted_dot(q, dec.ea, do, TN, mm, prec, with_r)
  else:
    causal = _causal(C, keys_on_rows=True)
    pt, dst = jnp.where(causal, st, 0.0), jnp.where(causal, dpvt, 0.0)
    dv_state = _dot(k, dSm, NN, prec)
    dk_state = _dot(v, dSm, NT, prec)
    ds_ref[r] = dS + scale * _dot(q, do, TN, prec)
  dv = scale * _dot(pt.astype(mm), do, NN, prec) + dv_state  # [C, E]
  dk = scale * _dot(dst.astype(mm), q, NN, prec) + dk_state  # [C, D]

  if rep == 1:
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    return
  dk_acc, dv_acc = acc

  @pl.when(r == 0)
  def _first():
    dk_acc[...] = dk
    dv_acc[...] = dv

  @pl.when(r > 0)
  def _rest():
    dk_acc[...] += dk
    dv_acc[...] += dv

  @pl.when(r == rep - 1)
  def _write():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def linear_bwd_dkv(q, k, v, log_decay, do, d_final_state, *, scale: float, chunk: int, interpret=False,
                   log_decay_grad: bool = True):
  """``dk``, ``dv``, the initial-state gradient and the log-decay term ``r`` by a reverse sweep over the chunks.

  Args:
    do: ``[B, T, H, E]`` output cotangent.
    d_final_state: f32 ``[B, H, D, E]`` cotangent of the final state (zeros when it is unused).
    log_decay_grad: emit ``r``.
    Other args as :func:`linear_fwd`.

  Returns:
    ``dk [B, T, G, D]``, ``dv [B, T, G, E]`` (k's / v's dtype; the query heads of a group summed in-kernel in f32),
    ``d_initial_state [B, H, D, E]`` f32, and ``r [B, H, T]`` f32 (None without a decay or with
    ``log_decay_grad=False``): per query head ``h``, the intra-chunk part of ``q_t . dq_t`` minus ``k_t . dk_t``,
    the latter restricted to the key gradient flowing through head ``h`` (see ``jaxattn.ops.linear.pallas_common``).
  """
  N = _check(q, k, v, chunk)
  B, T, H, D = q.shape
  G, E = v.shape[2], v.shape[3]
  R = H // G
  Tp = N * chunk
  N8 = -(-N // _ROWS) * _ROWS
  (qk, qop), (kk, kop), (vk, vop), (dok, doop) = (
      _to_kernel(x, Tp, chunk) for x in (*backward_operands(q, k, v), do.astype(q.dtype)))  # zeroed q, k, v
  a = _decay_rows(log_decay, B, T, H, chunk)
  with_r = a is not None and log_decay_grad
  if a is not None:
    a = tuple(x.reshape(x.shape[0], G, R, N8, chunk) for x in a)
  ba = (lambda b: b) if (a is not None and a[0].shape[0] > 1) else (lambda b: 0)
  dst = d_final_state.astype(_F32).reshape(B, G, R, D, E)
  rev = lambda n: N - 1 - n
  rows = pl.BlockSpec((None, None, R, _ROWS, chunk), lambda b, g, n, r: (ba(b), g, 0, _group(rev(n)), 0))
  in_specs = [
      qop.spec(lambda b, g, n, r: (b, g * R + r, rev(n))),
      kop.spec(lambda b, g, n, r: (b, g, rev(n))),
      vop.spec(lambda b, g, n, r: (b, g, rev(n))),
      doop.spec(lambda b, g, n, r: (b, g * R + r, rev(n))),
      rows, rows,  # decay sums (hi, lo)
      pl.BlockSpec((None, None, R, D, E), lambda b, g, n, r: (b, g, 0, 0, 0)),
  ]
  dkop, dvop = _Operand(kop.fused, chunk, D), _Operand(vop.fused, chunk, E)
  out_specs = [
      dkop.spec(lambda b, g, n, r: (b, g, rev(n))),
      dvop.spec(lambda b, g, n, r: (b, g, rev(n))),
      pl.BlockSpec((None, None, R, D, E), lambda b, g, n, r: (b, g, 0, 0, 0)),
  ]
  out_shapes = [jax.ShapeDtypeStruct(dkop.shape(B, Tp, G), k.dtype),
                jax.ShapeDtypeStruct(dvop.shape(B, Tp, G), v.dtype), jax.ShapeDtypeStruct((B, G, R, D, E), _F32)]
  if with_r:
    out_specs.append(pl.BlockSpec((None, None, R, _ROWS, chunk), lambda b, g, n, r: (b, g, 0, _group(rev(n)), 0)))
    out_shapes.append(jax.ShapeDtypeStruct((B, G, R, N8, chunk), _F32))
  scratch = [] if R == 1 else [pltpu.VMEM((chunk, D), _F32), pltpu.VMEM((chunk, E), _F32)]
  kernel = functools.partial(_dkv_kernel, has_decay=a is not None, with_r=with_r, scale=float(scale), n_chunks=N,
                             rep=R, prec=_precision(q.dtype))
  outs = _pallas_call(
      kernel, name="jaxattn_linear_bwd_dkv", grid=(B, G, N, R),
      semantics=("parallel", "parallel", "arbitrary", "arbitrary"),
      operands=[qk, kk, vk, dok, *(a or (None, None)), dst], in_specs=in_specs, out_shapes=out_shapes,
      out_specs=out_specs, scratch=scratch, interpret=interpret)
  dk, dv, ds0 = outs[:3]
  r = outs[3].reshape(B, H, N8, chunk)[:, :, :N].reshape(B, H, Tp)[:, :, :T] if with_r else None
  return _from_kernel(dk, dkop, B, T, G), _from_kernel(dv, dvop, B, T, G), ds0.reshape(B, H, D, E), r
