"""Chunked linear attention with decay for GPUs: Pallas kernels with the Triton lowering (forward, dq, dk/dv).

Raw kernels: jax only, no autodiff (``jaxattn.ops.linear.pallas_gpu`` joins them through
``jaxattn.backend.flash_vjp``). Layouts follow the library: ``q [B, T, H, D]``, ``k [B, T, G, D]``,
``v [B, T, G, E]``, ``H % G == 0``; query head ``h`` reads kv head ``h // (H // G)`` through the BlockSpec index
maps (K/V are never repeated in memory). The math and its numerical safety are in :mod:`pallas_kernels.linear`;
``a [Ba, H, Tp]`` are the chunk-local cumulative log decays (:func:`pallas_kernels.linear.chunk_log_decay`,
flattened, as double-float pairs), ``dO = scale * do``.

Each program owns one (batch, query head) and one tile of the state, and walks every chunk in a ``lax.fori_loop``
carrying that tile in f32 registers:

- forward, grid ``(E / block_e, B * H)``: ``S[:, e-tile]`` (``[Dp, block_e]``); writes ``out[:, e-tile]`` and the
  final state tile.
- dq, grid ``(D / block_d, B * H)``: recomputes ``S[d-tile, :]`` in the same forward sweep;
  ``dq_i = sum_{j<=i} e^{a_i - a_j} (dO_i . v_j) k_j + e^{a_i} S_c dO_i`` is exact per D tile; with a decay it
  also emits ``rq_i = e^{a_i} q_i^T S_c dO_i`` (f32, a log-decay-gradient term).
- dk/dv, grid ``(E / block_e, B * H)``: reverse sweep over chunks carrying ``dS[:, e-tile]``, with
  ``dS_c = e^{A} dS_{c+1} + sum_i e^{a_i} q_i dO_i^T`` and ``dS_N`` the final-state cotangent;
  ``dv_j = sum_{i>=j} e^{a_i - a_j} (q_i . k_j) dO_i + e^{A - a_j} dS_{c+1}^T k_j`` is exact per E tile,
  ``dk_j = sum_{i>=j} e^{a_i - a_j} (dO_i . v_j) q_i + e^{A - a_j} dS_{c+1} v_j`` and, with a decay, the
  log-decay term ``r`` (intra-chunk ``q . dq`` minus ``k . dk``, from f32 values) are partial sums over E tiles,
  added here after the kernel. ``dS_0`` is the initial-state gradient. Outputs are per
  query head; the ``H // G`` heads of a kv head are summed after the kernel (in f32).

Head dims are zero-padded to powers of two >= 16 (Triton tile shapes), T to whole chunks (zero q/k/v and zero log
decay: padded tokens change nothing). Matmul operands are the input dtype (the f32 state is cast to it, as
flash-linear-attention does), except where the log-decay terms need the state to f32 accuracy: there a 16-bit
state operand is split into ``hi + lo`` (one more product); f32 inputs use IEEE f32 matmuls
(``Precision.HIGHEST``). Accumulation is f32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import MAX_HEAD_DIM, NN, NT, TN, is_pow2, next_pow2, padded_head_dim
from pallas_kernels.common.nonfinite import backward_operands, forward_operands
from pallas_kernels.linear import chunk_log_decay, pair_difference

__all__ = ["BlockSizes", "linear_fwd", "linear_bwd_dq", "linear_bwd_dkv", "padded_head_dim", "MAX_HEAD_DIM"]

DEFAULT_CHUNK = 64
DEFAULT_TILE = 64
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Chunk length, state tiles and launch parameters (frozen, validated, hashable).

  All sizes are powers of two >= 16 (Triton tile shapes; ``tl.dot`` needs 16). ``None`` tiles default to
  ``min(64, padded dim)``; :meth:`resolve` fills them in and clamps them to the problem.

  Attributes:
    chunk: tokens per chunk ``C`` (the intra-chunk matrices are ``C x C``).
    block_e: forward value tile (the state tile is ``[Dp, block_e]``).
    block_d_dq: dq-kernel key tile (state rows ``[block_d_dq, Ep]``).
    block_e_dkv: dk/dv-kernel value tile (``dS[:, tile]``); below ``Ep`` dk is summed over tiles afterwards.
    num_warps, num_stages: Triton launch parameters of all three kernels.
  """

  chunk: int = DEFAULT_CHUNK
  block_e: int | None = None
  block_d_dq: int | None = None
  block_e_dkv: int | None = None
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("chunk", "block_e", "block_d_dq", "block_e_dkv"):
      b = getattr(self, name)
      if b is None and name != "chunk":
        continue
      if not isinstance(b, int) or isinstance(b, bool) or b < 16 or not is_pow2(b):
        raise ValueError(f"linear gpu BlockSizes.{name} must be a power of two >= 16, got {b!r}")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"linear gpu BlockSizes.num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps!r}")
    if not isinstance(self.num_stages, int) or isinstance(self.num_stages, bool) or not 1 <= self.num_stages <= 8:
      raise ValueError(f"linear gpu BlockSizes.num_stages must be an int in [1, 8], got {self.num_stages!r}")

  def resolve(self, T: int, D: int, E: int) -> "BlockSizes":
    """Every size filled in: the chunk clamped to ``max(16, next_pow2(T))``, tiles to the padded head dims."""
    Dp, Ep = padded_head_dim(D), padded_head_dim(E)
    tile = lambda b, full: min(full, DEFAULT_TILE if b is None else b)
    return dataclasses.replace(self, chunk=min(self.chunk, max(16, next_pow2(T))), block_e=tile(self.block_e, Ep),
                               block_d_dq=tile(self.block_d_dq, Dp), block_e_dkv=tile(self.block_e_dkv, Ep))


# ---------------------------------------------------------------------------------------------- shared pieces
def _dot(a, b, dims):
  """f32-accumulating matmul; f32 inputs use IEEE f32 (Triton's default for them would be TF32)."""
  prec = lax.Precision.HIGHEST if a.dtype == _F32 else None
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=_F32)


def _pad_to(x, axis: int, size: int):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _decays(a_refs, rows, last, C):
  """``(exp(a_i - a_j) on i >= j else 0 [C, C], exp(a_i) [C], exp(A - a_j) [C], exp(A) scalar)`` of one chunk.

  ``a_refs = (hi_ref, lo_ref)``: the chunk sums as double-float pairs (differences rounded once).
  """
  hi_ref, lo_ref = a_refs
  hi, lo = hi_ref[rows], lo_ref[rows]  # [C], [C]
  hA, lA = hi_ref[last], lo_ref[last]  # scalars: the chunk's total log decay
  i = lax.broadcasted_iota(jnp.int32, (C, C), 0)
  j = lax.broadcasted_iota(jnp.int32, (C, C), 1)
  L = pair_difference(hi[:, None], lo[:, None], hi[None, :], lo[None, :])  # [C, C]: a_i - a_j
  # min(., 0): the used values are <= 0 (the clamp keeps rounding from giving exp(+eps) > 1); the upper triangle,
  # positive, is clamped to 0 before the exp and masked after it.
  w = jnp.where(i >= j, jnp.exp(jnp.minimum(L, 0.0)), 0.0)
  eb = jnp.exp(jnp.minimum(pair_difference(hA, lA, hi, lo), 0.0))
  return w, jnp.exp(hi + lo), eb, jnp.exp(hA + lA)


def _live(decay, x):
  """``x`` where the decay factor is non-zero, else an exact 0 (a NaN key or state behind a reset stays out)."""
  return jnp.where(decay > 0, x, 0.0)


def _causal(C):
  return lax.broadcasted_iota(jnp.int32, (C, C), 0) >= lax.broadcasted_iota(jnp.int32, (C, C), 1)


def _prep(q, k, v, log_decay, chunk, forward: bool = False):
  """Pads T to whole chunks and head dims to powers of two; chunk-local log-decay sums ``[Ba, H, Tp]``.

  Non-finite inputs (pallas_kernels.common.nonfinite): the forward gets NaN rows of q / k for a query / token with
  a non-finite q, k or v and zeroed v; the backward zeroed operands."""
  q, k, v = forward_operands(q, k, v) if forward else backward_operands(q, k, v)
  B, T, H, D = q.shape
  E = v.shape[-1]
  N = pl.cdiv(T, chunk)
  Tp, Dp, Ep = N * chunk, padded_head_dim(D), padded_head_dim(E)
  qp = _pad_to(_pad_to(q, 1, Tp), 3, Dp)
  kp = _pad_to(_pad_to(k, 1, Tp), 3, Dp)
  vp = _pad_to(_pad_to(v, 1, Tp), 3, Ep)
  a = chunk_log_decay(log_decay, B, T, H, chunk)
  if a is not None:
    a = tuple(x.reshape(x.shape[0], H, Tp) for x in a)
  return qp, kp, vp, a, N, Tp, Dp, Ep


def _decay_specs(a, H, index):
  """BlockSpecs of the ``(hi, lo)`` decay sums ``[Ba, H, Tp]``; ``index(bh) -> (b, h)``."""
  if a is None:
    return None
  Ba, _, Tp = a[0].shape
  spec = pl.BlockSpec((None, None, Tp), lambda p, bh: (index(bh)[0] if Ba > 1 else 0, index(bh)[1], 0))
  return (spec, spec)


def _params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _check(q, k, v, blocks: BlockSizes):
  B, T, H, D = q.shape
  if k.shape[:2] != (B, T) or v.shape[:3] != k.shape[:3] or H % k.shape[2]:
    raise ValueError(f"linear gpu kernels: q {q.shape}, k {k.shape}, v {v.shape} are not [B, T, H, D], "
                     f"[B, T, G, D], [B, T, G, E] with H % G == 0")
  if max(D, v.shape[-1]) > MAX_HEAD_DIM:
    raise ValueError(f"linear gpu kernels support head dims up to {MAX_HEAD_DIM}, got D={D}, E={v.shape[-1]}")
  if any(getattr(blocks, f) is None for f in ("block_e", "block_d_dq", "block_e_dkv")):
    raise ValueError(f"pass resolved BlockSizes (BlockSizes.resolve), got {blocks}")


# ----------------------------------------------------------------------------------------------------- forward
def _fwd_kernel(q_ref, k_ref, v_ref, a_ref, s0_ref, o_ref, st_ref, *, scale, chunk, n_chunks):
  # q_ref, k_ref [Tp, Dp]; v_ref, o_ref [Tp, be]; a_ref (hi, lo) [Tp] f32 or None; s0_ref, st_ref [Dp, be] f32.
  C = chunk
  mm = q_ref.dtype

  def body(c, S):  # S = S_c[:, e-tile] f32 [Dp, be]
    rows = pl.ds(pl.multiple_of(c * C, C), C)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    s = _dot(q, k, NT)  # [C, C]
    if a_ref is None:
      p = jnp.where(_causal(C), s, 0.0)
      o = _dot(p.astype(mm), v, NN) + _dot(q, S.astype(mm), NN)
      S = S + _dot(k, v, TN)
    else:
      w, ea, eb, eA = _decays(a_ref, rows, c * C + C - 1, C)
      # where(), never 0 * x: a zero decay (future key, a reset in between) drops a NaN key / state exactly
      qa = _live(ea[:, None], q.astype(_F32) * ea[:, None]).astype(mm)  # e^{a_i} q_i
      o = _dot(_live(w, s * w).astype(mm), v, NN) + _live(ea[:, None], _dot(qa, S.astype(mm), NN))
      kb = _live(eb[:, None], k.astype(_F32) * eb[:, None]).astype(mm)  # e^{A - a_j} k_j
      S = _live(eA, eA * S) + _dot(kb, v, TN)
    o_ref[rows, :] = (o * scale).astype(o_ref.dtype)
    return S

  S0 = jnp.zeros(st_ref.shape, _F32) if s0_ref is None else s0_ref[...]
  st_ref[...] = lax.fori_loop(0, n_chunks, body, S0)


def linear_fwd(q, k, v, log_decay, initial_state, *, scale: float, blocks: BlockSizes, interpret: bool = False):
  """Forward pass: outputs and the final state.

  Args:
    q: ``[B, T, H, D]``; k: ``[B, T, G, D]``; v: ``[B, T, G, E]`` (f32, bf16 or f16).
    log_decay: None, f32 ``[H]`` or ``[B, T, H]``, ``<= 0``.
    initial_state: None or f32 ``[B, H, D, E]``.
    scale: output scale.
    blocks: resolved :class:`BlockSizes` (``BlockSizes(...).resolve(T, D, E)``).
    interpret: run in Pallas interpret mode (CPU).

  Returns:
    ``out [B, T, H, E]`` in q's dtype and the final state ``[B, H, D, E]`` f32.
  """
  _check(q, k, v, blocks)
  B, T, H, D = q.shape
  G, E = v.shape[2], v.shape[3]
  R = H // G
  C, be = blocks.chunk, blocks.block_e
  qp, kp, vp, a, N, Tp, Dp, Ep = _prep(q, k, v, log_decay, C, forward=True)
  s0 = None if initial_state is None else _pad_to(_pad_to(initial_state.astype(_F32), 2, Dp), 3, Ep)
  in_specs = [
      pl.BlockSpec((None, Tp, None, Dp), lambda e, bh: (bh // H, 0, bh % H, 0)),
      pl.BlockSpec((None, Tp, None, Dp), lambda e, bh: (bh // H, 0, (bh % H) // R, 0)),
      pl.BlockSpec((None, Tp, None, be), lambda e, bh: (bh // H, 0, (bh % H) // R, e)),
      _decay_specs(a, H, lambda bh: (bh // H, bh % H)),
      None if s0 is None else pl.BlockSpec((None, None, Dp, be), lambda e, bh: (bh // H, bh % H, 0, e)),
  ]
  out_specs = [
      pl.BlockSpec((None, Tp, None, be), lambda e, bh: (bh // H, 0, bh % H, e)),
      pl.BlockSpec((None, None, Dp, be), lambda e, bh: (bh // H, bh % H, 0, e)),
  ]
  kernel = functools.partial(_fwd_kernel, scale=scale, chunk=C, n_chunks=N)
  out, state = pl.pallas_call(
      kernel,
      grid=(Ep // be, B * H),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct((B, Tp, H, Ep), q.dtype), jax.ShapeDtypeStruct((B, H, Dp, Ep), _F32)],
      compiler_params=_params(blocks.num_warps, blocks.num_stages),
      interpret=interpret,
      name="jaxattn_linear_fwd",
  )(qp, kp, vp, a, s0)
  return out[:, :T, :, :E], state[:, :, :D, :E]


# ------------------------------------------------------------------------------------------------------ dq pass
def _state_dot(x, S, dims, mm, precise):
  """``x`` times the f32 state ``S`` with matmul operands of dtype ``mm``. ``precise`` (16-bit inputs): ``S`` is
  split into ``hi + lo`` (two products), so the result keeps f32 accuracy in ``S`` (for the log-decay terms)."""
  hi = S.astype(mm)
  if mm == _F32 or not precise:
    return _dot(x, hi, dims)
  return _dot(x, hi, dims) + _dot(x, (S - hi.astype(_F32)).astype(mm), dims)


def _weighted_dot(x, f, y, dims, mm, precise):
  """``(x * f) @ y`` (``f`` an f32 row weight). ``precise`` (16-bit inputs): the f32 product ``x * f`` is split
  into ``hi + lo``, so state updates that feed the log-decay terms keep f32 accuracy (one more product)."""
  xf = x.astype(_F32) * f[:, None]
  hi = xf.astype(mm)
  if mm == _F32 or not precise:
    return _dot(hi, y, dims)
  return _dot(hi, y, dims) + _dot((xf - hi.astype(_F32)).astype(mm), y, dims)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, a_ref, s0_ref, dq_ref, rq_ref=None, *, scale, chunk, n_chunks):
  # q_ref, k_ref, dq_ref [Tp, bd] (one key-dim tile); v_ref, do_ref [Tp, Ep]; s0_ref [bd, Ep] f32;
  # rq_ref [Tp] f32 (with a decay only).
  C = chunk
  mm = q_ref.dtype

  def body(c, S):  # S = S_c[d-tile, :] f32 [bd, Ep]
    rows = pl.ds(pl.multiple_of(c * C, C), C)
    q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
    dpv = _dot(do, v, NT)  # [C, C]: do_i . v_j
    if a_ref is None:
      inter = _dot(do, S.astype(mm), NT)  # [C, bd]: S_c do_i
      dq = _dot(jnp.where(_causal(C), dpv, 0.0).astype(mm), k, NN) + inter
      S = S + _dot(k, v, TN)
    else:
      w, ea, eb, eA = _decays(a_ref, rows, c * C + C - 1, C)
      precise = rq_ref is not None
      inter = _live(ea[:, None], ea[:, None] * _state_dot(do, S, NT, mm, precise))  # [C, bd]: e^{a_i} S_c do_i
      dq = _dot((dpv * w).astype(mm), k, NN) + inter
      if precise:
        # rq_i = e^{a_i} q_i^T S_c dO_i: the state part of q_i . dq_i, from f32 values (the intra-chunk part comes
        # from the dk/dv kernel's f32 matrices).
        rq_ref[rows] = scale * jnp.sum(q.astype(_F32) * inter, axis=1)
      S = _live(eA, eA * S) + _weighted_dot(k, eb, v, TN, mm, precise)
    dq_ref[rows, :] = (dq * scale).astype(dq_ref.dtype)
    return S

  S0 = jnp.zeros((q_ref.shape[-1], v_ref.shape[-1]), _F32) if s0_ref is None else s0_ref[...]
  lax.fori_loop(0, n_chunks, body, S0)


def linear_bwd_dq(q, k, v, log_decay, initial_state, do, *, scale: float, blocks: BlockSizes,
                  interpret: bool = False, log_decay_grad: bool = True):
  """``dq [B, T, H, D]`` (q's dtype) by a forward sweep, and the log-decay term ``rq [B, H, T]``.

  ``rq_t = e^{a_t} q_t^T S_c dO_t`` (f32): the inter-chunk part of ``q_t . dq_t`` (see
  ``jaxattn.ops.linear.pallas_common``); None without a decay or with ``log_decay_grad=False`` (which also skips
  the extra products that keep it f32-accurate for 16-bit inputs).

  Args:
    do: ``[B, T, H, E]`` output cotangent (q's dtype).
    log_decay_grad: emit ``rq``.
    Other args as :func:`linear_fwd`.
  """
  _check(q, k, v, blocks)
  B, T, H, D = q.shape
  G = v.shape[2]
  R = H // G
  C, bd = blocks.chunk, blocks.block_d_dq
  qp, kp, vp, a, N, Tp, Dp, Ep = _prep(q, k, v, log_decay, C)
  dop = _pad_to(_pad_to(do.astype(q.dtype), 1, Tp), 3, Ep)
  s0 = None if initial_state is None else _pad_to(_pad_to(initial_state.astype(_F32), 2, Dp), 3, Ep)
  ND = Dp // bd
  in_specs = [
      pl.BlockSpec((None, Tp, None, bd), lambda d, bh: (bh // H, 0, bh % H, d)),
      pl.BlockSpec((None, Tp, None, bd), lambda d, bh: (bh // H, 0, (bh % H) // R, d)),
      pl.BlockSpec((None, Tp, None, Ep), lambda d, bh: (bh // H, 0, (bh % H) // R, 0)),
      pl.BlockSpec((None, Tp, None, Ep), lambda d, bh: (bh // H, 0, bh % H, 0)),
      _decay_specs(a, H, lambda bh: (bh // H, bh % H)),
      None if s0 is None else pl.BlockSpec((None, None, bd, Ep), lambda d, bh: (bh // H, bh % H, d, 0)),
  ]
  out_specs = [pl.BlockSpec((None, Tp, None, bd), lambda d, bh: (bh // H, 0, bh % H, d))]
  out_shape = [jax.ShapeDtypeStruct((B, Tp, H, Dp), q.dtype)]
  with_r = a is not None and log_decay_grad
  if with_r:
    out_specs.append(pl.BlockSpec((None, None, None, Tp), lambda d, bh: (d, bh // H, bh % H, 0)))
    out_shape.append(jax.ShapeDtypeStruct((ND, B, H, Tp), _F32))
  kernel = functools.partial(_dq_kernel, scale=scale, chunk=C, n_chunks=N)
  outs = pl.pallas_call(
      kernel,
      grid=(ND, B * H),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(blocks.num_warps, blocks.num_stages),
      interpret=interpret,
      name="jaxattn_linear_bwd_dq",
  )(qp, kp, vp, dop, a, s0)
  rq = outs[1].sum(0)[:, :, :T] if with_r else None
  return outs[0][:, :T, :, :D], rq


# --------------------------------------------------------------------------------------------------- dk/dv pass
def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, a_ref, dst_ref, dk_ref, dv_ref, ds0_ref, r_ref=None, *, scale, chunk,
                n_chunks):
  # q_ref, k_ref, dk_ref [Tp, Dp]; v_ref, do_ref, dv_ref [Tp, be]; a_ref (hi, lo) [Tp] or None;
  # dst_ref, ds0_ref [Dp, be]; r_ref [Tp] f32 (with a decay only). dk and r are this E tile's partial sums.
  C = chunk
  mm = q_ref.dtype

  def body(n, dS):  # dS = dS_{c+1}[:, e-tile] f32 [Dp, be]
    c = n_chunks - 1 - n
    rows = pl.ds(pl.multiple_of(c * C, C), C)
    q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
    s = _dot(q, k, NT)  # [C(i), C(j)]: q_i . k_j
    dpv = _dot(do, v, NT)  # [C(i), C(j)]: do_i . v_j
    dSm = dS.astype(mm)
    if a_ref is None:
      causal = _causal(C)
      p, ds = jnp.where(causal, s, 0.0), jnp.where(causal, dpv, 0.0)
      dv = scale * _dot(p.astype(mm), do, TN) + _dot(k, dSm, NN)
      dk = scale * _dot(ds.astype(mm), q, TN) + _dot(v, dSm, NT)
      dS = dS + scale * _dot(q, do, TN)
    else:
      w, ea, eb, eA = _decays(a_ref, rows, c * C + C - 1, C)
      kb = (k.astype(_F32) * eb[:, None]).astype(mm)  # e^{A - a_j} k_j
      p, ds = s * w, dpv * w
      dv = scale * _dot(p.astype(mm), do, TN) + _dot(kb, dSm, NN)
      precise = r_ref is not None
      vds = eb[:, None] * _state_dot(v, dS, NT, mm, precise)  # [C, Dp]: e^{A - a_j} dS_{c+1} v_j
      dk = scale * _dot(ds.astype(mm), q, TN) + vds
      if precise:
        # log-decay terms from f32 values: (q_i . dq_i)_intra - (k_j . dk_j)_intra - (k_j . dk_j)_state, the
        # intra parts being the row / column sums of scale * (q_i . k_j)(do_i . v_j) e^{a_i - a_j}.
        m = s * ds
        r_ref[rows] = scale * (jnp.sum(m, axis=1) - jnp.sum(m, axis=0)) - jnp.sum(k.astype(_F32) * vds, axis=1)
      dS = eA * dS + scale * _weighted_dot(q, ea, do, TN, mm, precise)  # + sum_i e^{a_i} q_i dO_i^T
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    return dS

  ds0_ref[...] = lax.fori_loop(0, n_chunks, body, dst_ref[...])


def linear_bwd_dkv(q, k, v, log_decay, do, d_final_state, *, scale: float, blocks: BlockSizes,
                   interpret: bool = False, log_decay_grad: bool = True):
  """``dk``, ``dv``, the initial-state gradient and (with a decay) the log-decay term ``r`` by a reverse sweep.

  Args:
    do: ``[B, T, H, E]`` output cotangent.
    d_final_state: f32 ``[B, H, D, E]`` cotangent of the final state (zeros when it is unused).
    log_decay_grad: emit ``r``.
    Other args as :func:`linear_fwd`.

  Returns:
    ``dk [B, T, G, D]``, ``dv [B, T, G, E]`` (k's / v's dtype), ``d_initial_state [B, H, D, E]`` f32, and
    ``r [B, H, T]`` f32 (None without a decay or with ``log_decay_grad=False``): per query head ``h``, the
    intra-chunk part of ``q_t . dq_t`` minus ``k_t . dk_t``, the latter restricted to the key gradient flowing
    through head ``h`` (see ``jaxattn.ops.linear.pallas_common``).
  """
  _check(q, k, v, blocks)
  B, T, H, D = q.shape
  G, E = v.shape[2], v.shape[3]
  R = H // G
  C, be = blocks.chunk, blocks.block_e_dkv
  qp, kp, vp, a, N, Tp, Dp, Ep = _prep(q, k, v, log_decay, C)
  dop = _pad_to(_pad_to(do.astype(q.dtype), 1, Tp), 3, Ep)
  dst = _pad_to(_pad_to(d_final_state.astype(_F32), 2, Dp), 3, Ep)
  NE = Ep // be
  in_specs = [
      pl.BlockSpec((None, Tp, None, Dp), lambda e, bh: (bh // H, 0, bh % H, 0)),
      pl.BlockSpec((None, Tp, None, Dp), lambda e, bh: (bh // H, 0, (bh % H) // R, 0)),
      pl.BlockSpec((None, Tp, None, be), lambda e, bh: (bh // H, 0, (bh % H) // R, e)),
      pl.BlockSpec((None, Tp, None, be), lambda e, bh: (bh // H, 0, bh % H, e)),
      _decay_specs(a, H, lambda bh: (bh // H, bh % H)),
      pl.BlockSpec((None, None, Dp, be), lambda e, bh: (bh // H, bh % H, 0, e)),
  ]
  # Partial sums (over E tiles or over the query heads of a kv head) are kept in f32 until summed.
  dk_dtype = _F32 if (NE > 1 or R > 1) else k.dtype
  dv_dtype = _F32 if R > 1 else v.dtype
  out_specs = [
      pl.BlockSpec((None, None, Tp, None, Dp), lambda e, bh: (e, bh // H, 0, bh % H, 0)),
      pl.BlockSpec((None, Tp, None, be), lambda e, bh: (bh // H, 0, bh % H, e)),
      pl.BlockSpec((None, None, Dp, be), lambda e, bh: (bh // H, bh % H, 0, e)),
  ]
  out_shape = [jax.ShapeDtypeStruct((NE, B, Tp, H, Dp), dk_dtype), jax.ShapeDtypeStruct((B, Tp, H, Ep), dv_dtype),
               jax.ShapeDtypeStruct((B, H, Dp, Ep), _F32)]
  with_r = a is not None and log_decay_grad
  if with_r:
    out_specs.append(pl.BlockSpec((None, None, None, Tp), lambda e, bh: (e, bh // H, bh % H, 0)))
    out_shape.append(jax.ShapeDtypeStruct((NE, B, H, Tp), _F32))
  kernel = functools.partial(_dkv_kernel, scale=scale, chunk=C, n_chunks=N)
  outs = pl.pallas_call(
      kernel,
      grid=(NE, B * H),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(blocks.num_warps, blocks.num_stages),
      interpret=interpret,
      name="jaxattn_linear_bwd_dkv",
  )(qp, kp, vp, dop, a, dst)
  dk, dv, ds0 = outs[:3]
  dk = dk.sum(0) if NE > 1 else dk[0]  # [B, Tp, H, Dp]
  if R > 1:
    dk = dk.reshape(B, Tp, G, R, Dp).sum(3)
    dv = dv.reshape(B, Tp, G, R, Ep).sum(3)
  r = outs[3].sum(0)[:, :, :T] if with_r else None
  return dk[:, :T, :, :D].astype(k.dtype), dv[:, :T, :, :E].astype(v.dtype), ds0[:, :, :D, :E], r
