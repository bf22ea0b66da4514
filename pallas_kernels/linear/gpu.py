"""Chunk-parallel linear attention with decay for GPUs: Pallas kernels with the Triton lowering.

Raw kernels: jax only, no autodiff (``jaxattn.ops.linear.pallas_gpu`` joins them through
``jaxattn.backend.flash_vjp``). Layouts follow the library: ``q [B, T, H, D]``, ``k [B, T, G, D]``,
``v [B, T, G, E]``, ``H % G == 0``; query head ``h`` reads kv head ``h // (H // G)`` through the BlockSpec index
maps (K/V are never repeated in memory). The math and its numerical safety are in :mod:`pallas_kernels.linear`;
``a`` are the chunk-local cumulative log decays (:func:`pallas_kernels.linear.chunk_log_decay`, as double-float
pairs), ``A`` a chunk's total, ``S_c`` the state entering chunk ``c``, ``dS_c`` its cotangent.

Why: a kernel in which each program walks every chunk for one (batch, head, value tile), computing the outputs as it
goes, launches only ``B * H * (E / 64)`` programs (64 at ``B * H = 32``, D = 128: half an H100 / H200) and each runs
a long, latency-bound chain of small steps. Here only the state recurrence is sequential, and it is cheap (one small
product per chunk); everything else runs one program per chunk (or per K chunks):

- **state pass** (forward), grid ``B * H * (Dp / bd) * (Ep / be)``: each program walks the chunks carrying one
  ``[bd, be]`` tile of the f32 state, ``S_{c+1} = e^A S_c + sum_j e^{A - a_j} k_j v_j^T`` (one ``[bd, C] x [C, be]``
  product per chunk), and writes the tile of every K-th chunk-entry state ``S_{Kg}`` to ``h [B, H, N / K, Dp, Ep]``
  (``K = state_interval``) and the final state (f32).
- **output pass**, grid ``B * H * (N / K) * (Ep / be)``: each program starts from ``S_{Kg}`` and walks its K chunks,
  ``o_i = scale * (sum_{j <= i} e^{a_i - a_j} (q_i . k_j) v_j + e^{a_i} q_i^T S_c)``, carrying the state tile in
  f32 (K = 4 quarters the state traffic of storing every chunk's state).
- **reverse state pass** (backward), the state pass run backwards over ``(q, do)``:
  ``dS_c = e^A dS_{c+1} + scale sum_i e^{a_i} q_i do_i^T`` from ``dS_N`` (the final-state cotangent); it writes
  ``dh[c] = dS_{c+1}`` (the cotangent of the state leaving chunk ``c``) and ``dS_0`` (the initial-state gradient).
  The backward's forward state pass stores every chunk's state (K = 1).
- **dq/dk pass**, grid ``B * H * N * (Dp / bd)``: with ``dP_ij = e^{a_i - a_j} (do_i . v_j)`` (``i >= j``),
  ``dq_i = scale (sum_j dP_ij k_j + e^{a_i} S_c do_i)``, ``dk_j = scale sum_i dP_ij q_i + e^{A - a_j} dS_{c+1} v_j``
  (exact per key-dim tile), and with a differentiated decay the per-token log-decay term
  ``r_t = (q_t . dq_t) - (k_t . dk_t)`` formed from f32 values (partial sums over key-dim tiles, summed here).
  With one key tile (``bd = Dp``) and ``block_e_dkv = Ep`` the dv pass is fused in (the default for small rows,
  :func:`small_rows`, without a 16-bit log-decay gradient).
- **dv pass**, grid ``B * H * N * (Ep / be)``:
  ``dv_j = scale sum_{i >= j} e^{a_i - a_j} (q_i . k_j) do_i + e^{A - a_j} dS_{c+1}^T k_j``.

The backward recomputes the states (one cheap state pass) rather than keeping them from the forward. dk/dv are per
query head; the ``H // G`` heads of a kv head are summed after the kernels (in f32).

State storage: ``h`` / ``dh`` are stored in the input dtype (bf16 / f16: half the traffic of f32, and the output
and gradient products round the state to the input dtype anyway, as flash-linear-attention does), except in the
backward with a differentiated decay and 16-bit inputs, where they are f32 and split into ``hi + lo`` operands so
the log-decay terms keep f32 accuracy (as do the state updates: ``x * f`` split likewise). f32 inputs use f32
states and IEEE f32 matmuls (``Precision.HIGHEST``). The carried state is always f32, and so is accumulation.

Launch defaults (``num_warps=None``): 8 warps for the output pass with K > 1, the fused dq/dk/dv pass and the dq/dk
pass of a 16-bit log-decay gradient, 4 for the rest; at bf16, D = 128 ptxas (sm_90a) then reports no register spills
in any pass (with 4 warps the K-chunk output pass and the fused pass spill).

Head dims are zero-padded to powers of two >= 16 (Triton tile shapes), T to whole multiples of ``K`` chunks (zero
q/k/v and zero log decay: padded tokens change nothing).
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

__all__ = ["BlockSizes", "linear_fwd", "linear_bwd", "padded_head_dim", "MAX_HEAD_DIM"]

DEFAULT_CHUNK = 64
DEFAULT_STATE_TILE = 64  # state passes: [64, 64] state tiles (B * H * (Dp / 64) * (Ep / 64) programs) ...
MIN_STATE_PROGRAMS = 256  # ... halved (value dim first, down to 32) until there are this many: ~2 per SM of an
# H100 / H200 (132 SMs), so the sequential walks of a few heads still fill the GPU (unmeasured heuristic)
DEFAULT_DQK_TILE = 64  # dq/dk pass key-dim tile
DEFAULT_STATE_INTERVAL = 4  # forward: one stored state per 4 chunks
_F32 = jnp.float32
_TILE_FIELDS = ("block_d_state", "block_e_state", "block_e", "block_d_dq", "block_e_dkv")


def small_rows(Dp: int, itemsize: int) -> bool:
  """Whether ``[*, Dp]`` rows of this dtype are at most 256 bytes (bf16 ``Dp <= 128``, f32 ``Dp <= 64``): then the
  dq/dk pass takes the whole key dim with the dv pass fused in, and the dv tile is 128 wide."""
  return Dp * itemsize <= 256


def default_value_tile(Dp: int, itemsize: int = 2) -> int:
  """dv pass value tile: 128 for small rows (:func:`small_rows`), else 64."""
  return 128 if small_rows(Dp, itemsize) else 64


def default_out_tile(Dp: int, itemsize: int = 2) -> int:
  """Output pass value tile: 64 (the f32 state carry ``[Dp, 64]`` stays in registers over K chunks), 32 for f32
  ``Dp = 256`` (whose 64-wide tile needs ~226 KiB of shared memory, more than an A100 has)."""
  return 64 if Dp * itemsize <= 512 else 32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Chunk length, tiles and launch parameters (frozen, validated, hashable).

  All sizes are powers of two >= 16 (Triton tile shapes; ``tl.dot`` needs 16). ``None`` tiles take the defaults
  below; :meth:`resolve` fills them in and clamps them to the padded head dims.

  Attributes:
    chunk: tokens per chunk ``C`` (the intra-chunk matrices are ``C x C``).
    block_d_state, block_e_state: the state passes' tile ``[bd, be]`` of the ``[Dp, Ep]`` state (default 64 x 64,
      halved, the value dim first, down to 32 x 32 while ``B * H * (Dp / bd) * (Ep / be) < MIN_STATE_PROGRAMS``).
    block_e: output-pass value tile (default 64; 32 for f32 at ``Dp = 256``).
    block_d_dq: dq/dk-pass key tile. Default (None, resolved per backward call): the whole padded key dim for
      :func:`small_rows` (bf16 ``Dp <= 128``, f32 ``Dp <= 64``) when no 16-bit log-decay gradient is needed (then
      ``block_e_dkv = Ep`` fuses the dv pass into this one), else 64. A tile of the whole ``Dp`` with
      ``block_e_dkv == Ep`` always fuses.
    block_e_dkv: dv-pass value tile (default 128 for small rows, else 64).
    num_warps: Triton warps of every pass, or None (default) for per-pass values: 8 for the output pass when it
      walks several chunks (``state_interval > 1``), for the fused dq/dk/dv pass and for the dq/dk pass of a 16-bit
      log-decay gradient; 4 otherwise (chosen so that ptxas spills nothing at D = 128, see the module docstring).
    num_stages: Triton pipelining stages of every pass.
    state_interval: ``K``, chunks per stored forward state (a power of two, default 4): the forward state pass
      writes every K-th chunk-entry state and each output program walks K chunks from it, carrying the state in
      f32 (``1 / K`` of the state traffic; T is padded to whole multiples of ``K * chunk``).
  """

  chunk: int = DEFAULT_CHUNK
  block_d_state: int | None = None
  block_e_state: int | None = None
  block_e: int | None = None
  block_d_dq: int | None = None
  block_e_dkv: int | None = None
  num_warps: int | None = None
  num_stages: int = 2
  state_interval: int = DEFAULT_STATE_INTERVAL

  def __post_init__(self):
    for name in ("chunk",) + _TILE_FIELDS:
      b = getattr(self, name)
      if b is None and name != "chunk":
        continue
      if not isinstance(b, int) or isinstance(b, bool) or b < 16 or not is_pow2(b):
        raise ValueError(f"linear gpu BlockSizes.{name} must be a power of two >= 16, got {b!r}")
    k = self.state_interval
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or not is_pow2(k):
      raise ValueError(f"linear gpu BlockSizes.state_interval must be a power of two >= 1, got {k!r}")
    if self.num_warps not in (None, 1, 2, 4, 8, 16):
      raise ValueError(f"linear gpu BlockSizes.num_warps must be None or one of 1, 2, 4, 8, 16, got "
                       f"{self.num_warps!r}")
    if not isinstance(self.num_stages, int) or isinstance(self.num_stages, bool) or not 1 <= self.num_stages <= 8:
      raise ValueError(f"linear gpu BlockSizes.num_stages must be an int in [1, 8], got {self.num_stages!r}")

  def resolve(self, T: int, D: int, E: int, heads: int | None = None, itemsize: int = 2) -> "BlockSizes":
    """Every size filled in: the chunk clamped to ``max(16, next_pow2(T))``, the state interval to
    ``next_pow2(ceil(T / chunk))``, tiles to the padded head dims.

    ``heads``: ``B * H`` (the state passes' default tiles shrink to give at least ``MIN_STATE_PROGRAMS`` programs);
    None keeps the 64 x 64 default. ``itemsize``: bytes per input element (the dtype-dependent tile defaults)."""
    Dp, Ep = padded_head_dim(D), padded_head_dim(E)
    tile = lambda b, full, default: min(full, default if b is None else b)
    bd, be = tile(self.block_d_state, Dp, DEFAULT_STATE_TILE), tile(self.block_e_state, Ep, DEFAULT_STATE_TILE)
    while heads is not None and heads * (Dp // bd) * (Ep // be) < MIN_STATE_PROGRAMS:
      if self.block_e_state is None and be > 32 and be >= bd:
        be //= 2
      elif self.block_d_state is None and bd > 32:
        bd //= 2
      else:
        break
    chunk = min(self.chunk, max(16, next_pow2(T)))
    return dataclasses.replace(
        self, chunk=chunk, state_interval=min(self.state_interval, next_pow2(-(-T // chunk))),
        block_d_state=bd, block_e_state=be,
        block_e=tile(self.block_e, Ep, default_out_tile(Dp, itemsize)),
        block_d_dq=None if self.block_d_dq is None else min(Dp, self.block_d_dq),
        block_e_dkv=tile(self.block_e_dkv, Ep, default_value_tile(Dp, itemsize)))


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


def _causal(C):
  return lax.broadcasted_iota(jnp.int32, (C, C), 0) >= lax.broadcasted_iota(jnp.int32, (C, C), 1)


def _live(decay, x):
  """``x`` where the decay factor is non-zero, else an exact 0 (a NaN key or state behind a reset stays out)."""
  return jnp.where(decay > 0, x, 0.0)


def _vector_decays(hi, lo, hA, lA):
  """``(exp(a_i) [C], exp(A - a_j) [C], exp(A))`` from the pairs of one chunk and its total."""
  # min(., 0): the used values are <= 0 (the clamp keeps rounding from giving exp(+eps) > 1)
  eb = jnp.exp(jnp.minimum(pair_difference(hA, lA, hi, lo), 0.0))
  return jnp.exp(hi + lo), eb, jnp.exp(hA + lA)


def _chunk_decays(a_refs, C, start=0):
  """``(exp(a_i - a_j) on i >= j else 0 [C, C], exp(a_i) [C], exp(A - a_j) [C], exp(A))`` of the chunk whose
  ``(hi, lo)`` sums are ``a_refs[start:start + C]``."""
  hi_ref, lo_ref = a_refs
  hi, lo = hi_ref[pl.ds(start, C)], lo_ref[pl.ds(start, C)]
  L = pair_difference(hi[:, None], lo[:, None], hi[None, :], lo[None, :])  # [C, C]: a_i - a_j
  # the upper triangle (positive) is clamped to 0 before the exp and masked after it
  w = jnp.where(_causal(C), jnp.exp(jnp.minimum(L, 0.0)), 0.0)
  return (w,) + _vector_decays(hi, lo, hi_ref[start + C - 1], lo_ref[start + C - 1])


def _state_dot(x, S, dims, mm, precise):
  """``x`` times the state ``S`` with matmul operands of dtype ``mm``. ``precise`` (an f32 ``S``, 16-bit inputs):
  ``S`` is split into ``hi + lo`` (two products), so the result keeps f32 accuracy in ``S``."""
  hi = S.astype(mm)
  if mm == _F32 or not precise:
    return _dot(x, hi, dims)
  return _dot(x, hi, dims) + _dot(x, (S.astype(_F32) - hi.astype(_F32)).astype(mm), dims)


def _weighted_dot(x, f, y, dims, mm, precise):
  """``(x * f) @ y`` (``f`` an f32 row weight; rows with ``f = 0`` exactly 0). ``precise`` (16-bit inputs): the f32
  product ``x * f`` is split into ``hi + lo`` so state updates keep f32 accuracy (one more product)."""
  xf = _live(f[:, None], x.astype(_F32) * f[:, None])
  hi = xf.astype(mm)
  if mm == _F32 or not precise:
    return _dot(hi, y, dims)
  return _dot(hi, y, dims) + _dot((xf - hi.astype(_F32)).astype(mm), y, dims)


def _prep(q, k, v, log_decay, chunk, forward: bool = False, interval: int = 1):
  """Pads T to whole multiples of ``interval`` chunks and head dims to powers of two; chunk-local log-decay sums
  ``(hi, lo) [Ba, H, Tp]``.

  Non-finite inputs (pallas_kernels.common.nonfinite): the forward gets NaN rows of q / k for a query / token with
  a non-finite q, k or v and zeroed v; the backward zeroed operands."""
  q, k, v = forward_operands(q, k, v) if forward else backward_operands(q, k, v)
  B, T, H, D = q.shape
  E = v.shape[-1]
  N = pl.cdiv(T, chunk * interval) * interval
  Tp, Dp, Ep = N * chunk, padded_head_dim(D), padded_head_dim(E)
  qp = _pad_to(_pad_to(q, 1, Tp), 3, Dp)
  kp = _pad_to(_pad_to(k, 1, Tp), 3, Dp)
  vp = _pad_to(_pad_to(v, 1, Tp), 3, Ep)
  a = chunk_log_decay(log_decay, B, T, H, chunk)
  if a is not None:
    a = tuple(_pad_to(x.reshape(x.shape[0], H, -1), 2, Tp) for x in a)  # zero log decay on the padding
  return qp, kp, vp, a, N, Tp, Dp, Ep


def _pad_state(s, Dp, Ep):
  return _pad_to(_pad_to(s.astype(_F32), 2, Dp), 3, Ep)


def _params(blocks: BlockSizes, default_warps: int = 4):
  """Launch parameters of one pass: ``blocks.num_warps`` or the pass's default."""
  warps = default_warps if blocks.num_warps is None else blocks.num_warps
  return plgpu.CompilerParams(num_warps=warps, num_stages=blocks.num_stages)


def _check(q, k, v, blocks: BlockSizes):
  B, T, H, D = q.shape
  if k.shape[:2] != (B, T) or v.shape[:3] != k.shape[:3] or H % k.shape[2]:
    raise ValueError(f"linear gpu kernels: q {q.shape}, k {k.shape}, v {v.shape} are not [B, T, H, D], "
                     f"[B, T, G, D], [B, T, G, E] with H % G == 0")
  if max(D, v.shape[-1]) > MAX_HEAD_DIM:
    raise ValueError(f"linear gpu kernels support head dims up to {MAX_HEAD_DIM}, got D={D}, E={v.shape[-1]}")
  if any(getattr(blocks, f) is None for f in _TILE_FIELDS if f != "block_d_dq"):
    raise ValueError(f"pass resolved BlockSizes (BlockSizes.resolve), got {blocks}")


# ------------------------------------------------------------------------------------------------ state passes
def _state_update(S, x, y, a_ref, start, C, *, reverse, scale, precise):
  """One chunk of the state recurrence on the f32 carry ``S [bd, be]``: forward
  ``S <- e^A S + sum_j e^{A - a_j} k_j y_j^T`` (``x = k``, ``y = v``); reverse ``dS <- e^A dS + scale sum_i e^{a_i}
  q_i do_i^T`` (``x = q``, ``y = do``). ``start``: the chunk's first row in ``a_ref`` (``(hi, lo)`` or None)."""
  mm = x.dtype
  if a_ref is None:
    upd = _dot(x, y, TN)
  else:
    hi_ref, lo_ref = a_ref
    rows, last = pl.ds(start, C), start + C - 1
    ea, eb, eA = _vector_decays(hi_ref[rows], lo_ref[rows], hi_ref[last], lo_ref[last])
    upd = _weighted_dot(x, ea if reverse else eb, y, TN, mm, precise)
    S = _live(eA, eA * S)  # a reset (e^A = 0) drops a NaN state exactly
  return S + (upd if scale == 1.0 else scale * upd)


def _state_kernel(x_ref, y_ref, a_ref, s0_ref, h_ref, st_ref, *, chunk, n_chunks, interval, reverse, scale,
                  precise):
  # x_ref [Tp, bd] (k; reverse: q), y_ref [Tp, be] (v; reverse: do); a_ref (hi, lo) [Tp] f32 or None;
  # s0_ref, st_ref [bd, be] f32; h_ref [N / K, bd, be]: the carry on entering every K-th chunk (K = interval; the
  # reverse pass: K = 1, the carry on entering each chunk in walking order, i.e. dS_{c+1} at c).
  C, K = chunk, interval
  assert K == 1 or not reverse

  def body(n, S):  # S f32 [bd, be]: S_c (forward) or dS_{c+1} (reverse)
    c = n_chunks - 1 - n if reverse else n
    if K == 1:
      h_ref[c] = S.astype(h_ref.dtype)
    else:
      @pl.when(lax.rem(c, K) == 0)  # (lax: c >= 0, and jnp's floor-mod does not lower to Triton)
      def _():
        h_ref[lax.div(c, K)] = S.astype(h_ref.dtype)

    start = pl.multiple_of(c * C, C)
    return _state_update(S, x_ref[pl.ds(start, C), :], y_ref[pl.ds(start, C), :], a_ref, start, C,
                         reverse=reverse, scale=scale, precise=precise)

  S0 = jnp.zeros(st_ref.shape, _F32) if s0_ref is None else s0_ref[...]
  st_ref[...] = lax.fori_loop(0, n_chunks, body, S0)


def _state_pass(x, y, a, s0, *, H, rx, ry, N, blocks, h_dtype, reverse, scale, precise, interpret, name,
                interval=1):
  """Runs :func:`_state_kernel` over ``x [B, Tp, Hx, Dp]``, ``y [B, Tp, Hy, Ep]`` (query head ``h`` reads head
  ``h // rx`` / ``h // ry``). Returns ``(h [B, H, N / interval, Dp, Ep] h_dtype, last carry [B, H, Dp, Ep] f32)``."""
  B, Tp, _, Dp = x.shape
  Ep = y.shape[-1]
  bd, be = blocks.block_d_state, blocks.block_e_state
  ND, NE = Dp // bd, Ep // be

  def ids(p):  # p -> (b, h, d, e), the tiles of one head adjacent
    bh, t = p // (ND * NE), p % (ND * NE)
    return bh // H, bh % H, t // NE, t % NE

  def spec(shape, f):
    return pl.BlockSpec(shape, lambda p: f(*ids(p)))

  in_specs = [
      spec((None, Tp, None, bd), lambda b, h, d, e: (b, 0, h // rx, d)),
      spec((None, Tp, None, be), lambda b, h, d, e: (b, 0, h // ry, e)),
      None if a is None else (spec((None, None, Tp), lambda b, h, d, e: (b if a[0].shape[0] > 1 else 0, h, 0)),) * 2,
      None if s0 is None else spec((None, None, bd, be), lambda b, h, d, e: (b, h, d, e)),
  ]
  NH = N // interval
  out_specs = [spec((None, None, NH, bd, be), lambda b, h, d, e: (b, h, 0, d, e)),
               spec((None, None, bd, be), lambda b, h, d, e: (b, h, d, e))]
  kernel = functools.partial(_state_kernel, chunk=blocks.chunk, n_chunks=N, interval=interval, reverse=reverse,
                             scale=scale, precise=precise)
  h, last = pl.pallas_call(
      kernel,
      grid=(B * H * ND * NE,),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct((B, H, NH, Dp, Ep), h_dtype), jax.ShapeDtypeStruct((B, H, Dp, Ep), _F32)],
      compiler_params=_params(blocks),
      interpret=interpret,
      name=name,
  )(x, y, a, s0)
  return h, last


def _chunk_ids(H, N, NT):
  """Parallel passes: program ``p -> (b, h, c, t)``, tiles ``t`` fastest, then chunks, then heads."""

  def ids(p):
    r, t = p // NT, p % NT
    bh, c = r // N, r % N
    return bh // H, bh % H, c, t

  return ids


def _decay_chunk_spec(spec, a, C):
  """BlockSpecs of ``C`` consecutive ``(hi, lo)`` decay sums (per-head decays: shared by the batch)."""
  if a is None:
    return None
  Ba = a[0].shape[0]
  s = spec((None, None, C), lambda b, h, c, t: (b if Ba > 1 else 0, h, c))
  return (s, s)


# ------------------------------------------------------------------------------------------------------ forward
def _out_kernel(q_ref, k_ref, v_ref, a_ref, h_ref, o_ref, *, scale, chunk, interval):
  # q_ref, k_ref [K C, Dp]; v_ref, o_ref [K C, be] (K = interval chunks); a_ref (hi, lo) [K C] or None;
  # h_ref [Dp, be]: the state entering the first of the K chunks (input dtype), carried in f32 over the others.
  C, K = chunk, interval
  mm = q_ref.dtype

  def body(u, S):  # S f32 [Dp, be]: the state entering chunk u of the K
    start = u * C if isinstance(u, int) else pl.multiple_of(u * C, C)
    rows = pl.ds(start, C)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    Sm = S.astype(mm)
    s = _dot(q, k, NT)  # [C, C]
    if a_ref is None:
      o = _dot(jnp.where(_causal(C), s, 0.0).astype(mm), v, NN) + _dot(q, Sm, NN)
    else:
      w, ea, _, _ = _chunk_decays(a_ref, C, start)
      # where(), never 0 * x: a zero decay (future key, a reset in between) drops a NaN key / state exactly
      qa = _live(ea[:, None], q.astype(_F32) * ea[:, None]).astype(mm)  # e^{a_i} q_i
      o = _dot(_live(w, s * w).astype(mm), v, NN) + _live(ea[:, None], _dot(qa, Sm, NN))
    o_ref[rows, :] = (o * scale).astype(o_ref.dtype)
    # (the last chunk's update is not needed: one [Dp, C] x [C, be] product of K wasted, no branch)
    return _state_update(S, k, v, a_ref, start, C, reverse=False, scale=1.0, precise=False)

  if K == 1:
    body(0, h_ref[...].astype(_F32))
  else:
    lax.fori_loop(0, K, body, h_ref[...].astype(_F32))


def linear_fwd(q, k, v, log_decay, initial_state, *, scale: float, blocks: BlockSizes, interpret: bool = False):
  """Forward pass (state pass + output pass): outputs and the final state.

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
  C, be, K = blocks.chunk, blocks.block_e, blocks.state_interval
  qp, kp, vp, a, N, Tp, Dp, Ep = _prep(q, k, v, log_decay, C, forward=True, interval=K)
  s0 = None if initial_state is None else _pad_state(initial_state, Dp, Ep)
  h, state = _state_pass(kp, vp, a, s0, H=H, rx=R, ry=R, N=N, blocks=blocks, h_dtype=q.dtype, reverse=False,
                         scale=1.0, precise=False, interpret=interpret, name="jaxattn_linear_fwd_state",
                         interval=K)
  NE, L = Ep // be, K * C
  ids = _chunk_ids(H, N // K, NE)  # one program per K chunks
  spec = lambda shape, f: pl.BlockSpec(shape, lambda p: f(*ids(p)))
  in_specs = [
      spec((None, L, None, Dp), lambda b, h, c, e: (b, c, h, 0)),
      spec((None, L, None, Dp), lambda b, h, c, e: (b, c, h // R, 0)),
      spec((None, L, None, be), lambda b, h, c, e: (b, c, h // R, e)),
      _decay_chunk_spec(spec, a, L),
      spec((None, None, None, Dp, be), lambda b, h, c, e: (b, h, c, 0, e)),
  ]
  out = pl.pallas_call(
      functools.partial(_out_kernel, scale=scale, chunk=C, interval=K),
      grid=(B * H * (N // K) * NE,),
      in_specs=in_specs,
      out_specs=spec((None, L, None, be), lambda b, h, c, e: (b, c, h, e)),
      out_shape=jax.ShapeDtypeStruct((B, Tp, H, Ep), q.dtype),
      compiler_params=_params(blocks, 8 if K > 1 else 4),
      interpret=interpret,
      name="jaxattn_linear_fwd_out",
  )(qp, kp, vp, a, h)
  return out[:, :T, :, :E], state[:, :, :D, :E]


# ----------------------------------------------------------------------------------------------------- backward
def _dqk_kernel(q_ref, k_ref, v_ref, do_ref, a_ref, h_ref, dh_ref, dq_ref, dk_ref, *rest, scale, chunk, with_dv,
                with_r):
  # q_ref, k_ref, dq_ref, dk_ref [C, bd] (one key-dim tile); v_ref, do_ref [C, Ep]; a_ref (hi, lo) [C] or None;
  # h_ref, dh_ref [bd, Ep]: rows of S_c and of dS_{c+1}; rest: dv_ref [C, Ep] (with_dv: bd = Dp, the dv pass fused
  # in), r_ref [C] f32 (with_r: this tile's part of dL/dG).
  dv_ref = rest[0] if with_dv else None
  r_ref = rest[-1] if with_r else None
  C = chunk
  q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
  mm = q.dtype
  precise = with_r
  dpv = _dot(do, v, NT)  # [C(i), C(j)]: do_i . v_j
  if a_ref is None:
    w = eb = None
    ds = jnp.where(_causal(C), dpv, 0.0)
    inter = _dot(do, h_ref[...].astype(mm), NT)  # [C, bd]: S_c do_i
    vds = _dot(v, dh_ref[...].astype(mm), NT)  # [C, bd]: dS_{c+1} v_j
  else:
    w, ea, eb, _ = _chunk_decays(a_ref, C)
    ds = dpv * w
    # e^{a_i} S_c do_i; where(): a state made NaN by garbage before a reset stays out of later rows
    inter = _live(ea[:, None], ea[:, None] * _state_dot(do, h_ref[...], NT, mm, precise))
    vds = eb[:, None] * _state_dot(v, dh_ref[...], NT, mm, precise)  # e^{A - a_j} dS_{c+1} v_j
  dsm = ds.astype(mm)
  dq_ref[...] = (scale * (_dot(dsm, k, NN) + inter)).astype(dq_ref.dtype)
  dk_ref[...] = (scale * _dot(dsm, q, TN) + vds).astype(dk_ref.dtype)
  s = _dot(q, k, NT) if (with_dv or with_r) else None  # [C(i), C(j)]: (this tile's part of) q_i . k_j
  if with_dv:
    _dv_store(dv_ref, s, k, do, dh_ref[...].astype(mm), w, eb, scale, C)
  if with_r:
    # dL/dG_t = q_t . dq_t - k_t . dk_t from f32 values (see jaxattn.ops.linear.pallas_common): the intra-chunk
    # parts are the row / column sums of scale (q_i . k_j) dP_ij, the state parts scale q_t . (e^{a_t} S_c do_t)
    # and k_t . (e^{A - a_t} dS_{c+1} v_t).
    m = s * ds
    r_ref[...] = (scale * (jnp.sum(m, axis=1) - jnp.sum(m, axis=0) + jnp.sum(q.astype(_F32) * inter, axis=1))
                  - jnp.sum(k.astype(_F32) * vds, axis=1))


def _dv_store(dv_ref, s, k, do, dS, w, eb, scale, C):
  """``dv_j = scale sum_{i >= j} e^{a_i - a_j} s_ij do_i + e^{A - a_j} dS_{c+1}^T k_j`` (``w``, ``eb`` None: no
  decay); ``s [C, C]`` the full ``q_i . k_j``, ``dS`` a ``[Dp, be]`` tile of ``dS_{c+1}`` in the input dtype."""
  mm = k.dtype
  if w is None:
    p, kb = jnp.where(_causal(C), s, 0.0), k
  else:
    p, kb = s * w, (k.astype(_F32) * eb[:, None]).astype(mm)  # e^{A - a_j} k_j
  dv_ref[...] = (scale * _dot(p.astype(mm), do, TN) + _dot(kb, dS, NN)).astype(dv_ref.dtype)


def _dv_kernel(q_ref, k_ref, do_ref, a_ref, dh_ref, dv_ref, *, scale, chunk):
  # q_ref, k_ref [C, Dp]; do_ref, dv_ref [C, be]; a_ref (hi, lo) [C] or None; dh_ref [Dp, be]: dS_{c+1}.
  C = chunk
  q, k = q_ref[...], k_ref[...]
  w = eb = None
  if a_ref is not None:
    w, _, eb, _ = _chunk_decays(a_ref, C)
  _dv_store(dv_ref, _dot(q, k, NT), k, do_ref[...], dh_ref[...].astype(q.dtype), w, eb, scale, C)


def linear_bwd(q, k, v, log_decay, initial_state, do, d_final_state, *, scale: float, blocks: BlockSizes,
               interpret: bool = False, log_decay_grad: bool = True, need_dv: bool = True):
  """Backward pass: state pass (recomputed), reverse state pass, dq/dk pass and dv pass.

  Args:
    do: ``[B, T, H, E]`` output cotangent.
    d_final_state: f32 ``[B, H, D, E]`` cotangent of the final state (zeros when it is unused).
    log_decay_grad: emit the log-decay term ``dG`` (with a decay; keeps the states f32 and splits 16-bit
      operands into ``hi + lo`` for it).
    need_dv: run the dv pass (else ``dv`` is None).
    Other args as :func:`linear_fwd`.

  Returns:
    ``dq [B, T, H, D]``, ``dk [B, T, G, D]``, ``dv [B, T, G, E]`` (q's / k's / v's dtype), ``d_initial_state
    [B, H, D, E]`` f32, and ``dG [B, H, T]`` f32 (None without a decay or with ``log_decay_grad=False``):
    ``q_t . dq_t - k_t . dk^{(h)}_t``, the key gradient restricted to query head ``h`` (see
    ``jaxattn.ops.linear.pallas_common``), formed from f32 values.
  """
  _check(q, k, v, blocks)
  B, T, H, D = q.shape
  G, E = v.shape[2], v.shape[3]
  R = H // G
  C = blocks.chunk
  mm = jnp.dtype(q.dtype)
  qp, kp, vp, a, N, Tp, Dp, Ep = _prep(q, k, v, log_decay, C)
  dop = _pad_to(_pad_to(do.astype(q.dtype), 1, Tp), 3, Ep)
  s0 = None if initial_state is None else _pad_state(initial_state, Dp, Ep)
  dst = _pad_state(d_final_state, Dp, Ep)
  with_r = a is not None and log_decay_grad
  precise = with_r and mm != _F32
  h_dtype = _F32 if (precise or mm == _F32) else mm
  common = dict(H=H, N=N, blocks=blocks, h_dtype=h_dtype, precise=precise, interpret=interpret)
  h, _ = _state_pass(kp, vp, a, s0, rx=R, ry=R, reverse=False, scale=1.0, name="jaxattn_linear_bwd_state",
                     **common)
  dh, ds0 = _state_pass(qp, dop, a, dst, rx=1, ry=1, reverse=True, scale=scale, name="jaxattn_linear_bwd_dstate",
                        **common)

  # dq / dk (and dG), per key-dim tile
  bd = blocks.block_d_dq
  if bd is None:
    bd = Dp if (small_rows(Dp, mm.itemsize) and not precise) else min(Dp, DEFAULT_DQK_TILE)
  ND = Dp // bd
  ids = _chunk_ids(H, N, ND)
  spec = lambda shape, f: pl.BlockSpec(shape, lambda p: f(*ids(p)))
  in_specs = [
      spec((None, C, None, bd), lambda b, h, c, d: (b, c, h, d)),
      spec((None, C, None, bd), lambda b, h, c, d: (b, c, h // R, d)),
      spec((None, C, None, Ep), lambda b, h, c, d: (b, c, h // R, 0)),
      spec((None, C, None, Ep), lambda b, h, c, d: (b, c, h, 0)),
      _decay_chunk_spec(spec, a, C),
      spec((None, None, None, bd, Ep), lambda b, h, c, d: (b, h, c, d, 0)),
      spec((None, None, None, bd, Ep), lambda b, h, c, d: (b, h, c, d, 0)),
  ]
  dk_dtype = _F32 if R > 1 else k.dtype  # per query head, summed over the R heads of a kv head below
  dv_dtype = _F32 if R > 1 else v.dtype
  out_specs = [spec((None, C, None, bd), lambda b, h, c, d: (b, c, h, d))] * 2
  out_shape = [jax.ShapeDtypeStruct((B, Tp, H, Dp), q.dtype), jax.ShapeDtypeStruct((B, Tp, H, Dp), dk_dtype)]
  fuse_dv = need_dv and ND == 1 and blocks.block_e_dkv == Ep  # one pass computes dq, dk and dv
  if fuse_dv:
    out_specs.append(spec((None, C, None, Ep), lambda b, h, c, d: (b, c, h, 0)))
    out_shape.append(jax.ShapeDtypeStruct((B, Tp, H, Ep), dv_dtype))
  if with_r:
    out_specs.append(spec((None, None, None, C), lambda b, h, c, d: (d, b, h, c)))
    out_shape.append(jax.ShapeDtypeStruct((ND, B, H, Tp), _F32))
  outs = pl.pallas_call(
      functools.partial(_dqk_kernel, scale=scale, chunk=C, with_dv=fuse_dv, with_r=with_r),
      grid=(B * H * N * ND,),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(blocks, 8 if (fuse_dv or precise) else 4),
      interpret=interpret,
      name="jaxattn_linear_bwd_dqk",
  )(qp, kp, vp, dop, a, h, dh)
  dq, dk = outs[0], outs[1]
  if R > 1:
    dk = dk.reshape(B, Tp, G, R, Dp).sum(3)
  dG = outs[-1].sum(0)[:, :, :T] if with_r else None

  dv = outs[2] if fuse_dv else None
  if need_dv and not fuse_dv:
    be = blocks.block_e_dkv
    NE = Ep // be
    ids = _chunk_ids(H, N, NE)
    spec = lambda shape, f: pl.BlockSpec(shape, lambda p: f(*ids(p)))
    in_specs = [
        spec((None, C, None, Dp), lambda b, h, c, e: (b, c, h, 0)),
        spec((None, C, None, Dp), lambda b, h, c, e: (b, c, h // R, 0)),
        spec((None, C, None, be), lambda b, h, c, e: (b, c, h, e)),
        _decay_chunk_spec(spec, a, C),
        spec((None, None, None, Dp, be), lambda b, h, c, e: (b, h, c, 0, e)),
    ]
    dv = pl.pallas_call(
        functools.partial(_dv_kernel, scale=scale, chunk=C),
        grid=(B * H * N * NE,),
        in_specs=in_specs,
        out_specs=spec((None, C, None, be), lambda b, h, c, e: (b, c, h, e)),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, Ep), dv_dtype),
        compiler_params=_params(blocks),
        interpret=interpret,
        name="jaxattn_linear_bwd_dv",
    )(qp, kp, dop, a, dh)
  if dv is not None:
    if R > 1:
      dv = dv.reshape(B, Tp, G, R, Ep).sum(3)
    dv = dv[:, :T, :, :E].astype(v.dtype)
  return (dq[:, :T, :, :D], dk[:, :T, :, :D].astype(k.dtype), dv, ds0[:, :, :D, :E], dG)
