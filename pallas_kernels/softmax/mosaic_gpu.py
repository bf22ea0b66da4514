"""Block-sparse flash attention for Hopper: Pallas Mosaic GPU kernels (forward, dq, dk/dv).

Raw kernels: jax only, no autodiff (``jaxattn.ops.softmax.mosaic_gpu`` composes them into the one ``custom_vjp``).
Layouts as in :mod:`pallas_kernels.softmax.gpu`: ``q [B, T, H, D]``, ``k [B, S, G, D]``, ``v [B, S, G, E]``,
``H % G == 0`` (query head ``h`` reads kv head ``h // (H // G)``; K/V are never repeated), ``lse [B, H, T]`` f32
natural log, ``-inf`` for rows with no allowed key (their output and gradients are 0).

Structure (one CTA = ``num_compute_wgs`` compute warpgroups + one producer warpgroup, warp specialised):

- the producer warpgroup (40 registers) walks the CTA's visiting list and issues TMA copies of the next blocks into
  ``num_stages`` shared-memory slots (K/V for forward and dq; Q/dO/lse/delta for dk/dv), each slot guarded by a
  "filled" barrier (TMA completion) and a "consumed" barrier (one arrival per compute warpgroup);
- each compute warpgroup owns 64 rows (query rows for forward and dq, key rows for dk/dv) and runs its matmuls as
  ``wgmma`` from shared memory (the softmax probabilities / dS enter the second matmul from registers);
- forward: FlashAttention-3 style online softmax in base 2; with two compute warpgroups a "schedule" barrier
  ping-pongs them so one warpgroup's softmax overlaps the other's matmuls.

Sparsity: the same visiting lists as the Triton kernels (:class:`pallas_kernels.softmax.gpu.BlockLists`), built
for the CTA tile (``64 * num_compute_wgs`` rows x ``block_k`` / ``block_q`` columns). Both compute warpgroups of a
CTA visit the same blocks; a partial block (tile id ``t >= 1``) brings its pattern (``tiles[t]``, stored as 0/1
bf16 so it loads into the matmul-accumulator layout) through TMA and masks elementwise; full blocks skip all
masking. The producer reads the lists as scalars from global memory. Lists are shared (``[1, 1, ...]``) or per
(batch, query head) (``[B, H, ...]``); the dk/dv kernel takes them flattened per (batch, kv head) so a kv head's
query heads (GQA) are summed in-kernel.

Shapes: T and S are padded to whole CTA tiles and D, E to multiples of 64 (zeros; padding is dropped); f16 / bf16
only (wgmma on f32 would be TF32). Interpret mode (``interpret=`` an ``InterpretGPUParams``) runs everything on CPU:
TMA copies, barriers (it also checks that every waiting thread observes every phase, hence the producer's drain),
the pipeline, masking and the softmax; jax 0.10's interpreter has no ``run_state`` nor register / transposed
``wgmma`` operands, so there the matmuls (and register-layout annotations) are replaced by ``dot_general`` on the
same shared-memory tiles. The ``wgmma`` path is checked by lowering for sm_90 (``tests/kernels/softmax/
test_mosaic_gpu.py``, ``python -m experiments gpu_compile --preset mosaic``) and, on a Hopper GPU, by the
``gpu``-marked tests there.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import LN2, LOG2E, NN, NT
from pallas_kernels.common.nonfinite import backward_operands, forward_operands
from pallas_kernels.softmax.gpu import BlockLists, check_lists, pad_to

__all__ = ["ROWS_PER_WG", "MAX_HEAD_DIM", "SMEM_LIMIT", "interpret_params", "flash_forward", "flash_backward_dq",
           "flash_backward_dkv", "flatten_transposed_lists", "smem_bytes", "padded_dim"]

ROWS_PER_WG = 64  # wgmma M per warpgroup
MAX_HEAD_DIM = 256
SMEM_LIMIT = 232448  # bytes of shared memory per block on H100 / H200 (sm_90)
_NEG_INF = -jnp.inf


def interpret_params():
  """A Mosaic GPU interpreter parameter object (CPU execution), for jax 0.10 and 0.11 alike."""
  cls = getattr(plgpu, "InterpretGPUParams", None)
  if cls is None:
    from jax._src.pallas.mosaic_gpu.interpret import params as _params  # jax 0.10.x keeps it private
    cls = _params.InterpretGPUParams
  return cls()


def padded_dim(d: int) -> int:
  """Head dims run as multiples of 64 (one 128-byte swizzle row of f16 / bf16)."""
  return -(-d // 64) * 64


def smem_bytes(kind: str, *, D: int, E: int, block_q: int, block_k: int, stages: int, wgs: int, itemsize: int = 2,
               partial: bool = True, ids: bool = True) -> int:
  """Shared memory (bytes) one CTA of ``kind`` (``"fwd"``, ``"dq"``, ``"dkv"``) allocates (padded dims).

  ``block_q`` / ``block_k`` are the CTA tile (rows of all compute warpgroups together on the owned side). The
  buffers only: the lowering adds barriers and alignment (at D=128 bf16, causal, 2 stages: forward 128 x 64
  131584 here vs 134248 allocated, dq 128 x 64 164864 vs 165984; ``python -m experiments gpu_compile`` reports
  the allocated sizes).
  """
  Dp, Ep = padded_dim(D), padded_dim(E)
  if kind in ("fwd", "dq"):
    own = block_q * (Dp + (Ep if kind == "dq" else 0)) * itemsize + block_q * 4 * (2 if kind == "dq" else 1)
    if kind == "fwd" and Ep != Dp:
      own += block_q * Ep * itemsize
    stream = stages * block_k * (Dp + Ep) * itemsize
    if partial:
      stream += stages * block_q * block_k * 2
    if ids:
      stream += stages * block_k * 4
      own += block_q * 4
    return own + stream
  if kind == "dkv":
    own = block_k * (Dp + Ep) * itemsize + (block_k * 4 if ids else 0)
    stream = stages * block_q * ((Dp + Ep) * itemsize + 8 + (4 if ids else 0))
    if partial:
      stream += stages * block_q * block_k * 2
    return own + stream
  raise ValueError(f"kind must be 'fwd', 'dq' or 'dkv', got {kind!r}")


# ---------------------------------------------------------------------------------------------- shared pieces
def _swizzled(shape, dtype):
  """A shared-memory buffer in the wgmma operand layout (8 x 64 tiles, 128-byte swizzle)."""
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _bcast(x, shape, dim):
  return lax.broadcast_in_dim(x, shape, [dim])


def _logits2(s, *, scale, soft_cap):
  """Base-2 logits (f32) and the ``tanh`` of the capped logits (or None)."""
  if soft_cap is None:
    return s * (scale * LOG2E), None
  t = jnp.tanh(s * (scale / soft_cap))
  return t * (soft_cap * LOG2E), t


def _mask_block(s2, n, slot, wg, at, *, L, row_ids, col_ids, idx_ref, kv_len, tid_ref, tile_smem, t_bar):
  """The logits ``s2`` of list step ``n`` (streamed into ``slot``) with disallowed entries at ``-inf``.

  ``row_ids``: the owned rows' segment ids (array) compared with the slot's ``col_ids`` buffer, or None;
  ``kv_len``: the bound of padded columns of block ``idx_ref[*at, n]``, or None; ``tid_ref``: the tile ids
  (``tid_ref[*at, n] > 0``: await ``t_bar`` and apply warpgroup ``wg``'s pattern in ``tile_smem``), or None.
  """
  shape = s2.shape
  keep = []
  if row_ids is not None:
    cols = L.load(col_ids.at[slot], plgpu.Layout.WGMMA.reduce(0))
    keep.append(_bcast(row_ids, shape, 0) == _bcast(cols, shape, 1))
  if kv_len is not None:
    keep.append(L.iota(shape, 1) + idx_ref[(*at, n)] * shape[1] < kv_len)
  tid = tid_ref[(*at, n)] if tid_ref is not None else None
  for ok in keep:
    s2 = jnp.where(ok, s2, _NEG_INF)
  if tid is None:
    return s2

  def tile_fn(x):
    plgpu.barrier_wait(t_bar.at[slot])
    return jnp.where(tile_smem.at[slot, wg][...] != 0, x, _NEG_INF)

  return lax.cond(tid > 0, tile_fn, lambda x: x, s2)


def _ds(p, dp, delta, axis, t, masked, dtype):
  """``dS = p * (dP - delta)`` (times the soft cap's ``1 - tanh^2``), exact zeros where masked, in ``dtype``.

  ``delta`` runs along ``axis`` of the tile (0: query rows, dq; 1: query columns, dk/dv); the zeros also hold in a
  row whose lse / delta is NaN.
  """
  ds = p * (dp - _bcast(delta, dp.shape, axis))
  if t is not None:
    ds = ds * (1.0 - t * t)
  return jnp.where(masked, 0.0, ds).astype(dtype)


def _producer(total, fetch, used, stages: int):
  """The producer warpgroup: ``fetch(step, slot, wait_consumed)`` for every step, ``stages`` ahead.

  Afterwards it waits for the consumers' release (the ``used`` barriers) of each slot's last use, so the producer
  observes every phase of the "consumed" barriers (the interpreter checks this at deallocation; on the GPU a CTA's
  barriers die with it, so the wait only idles the producer at the end).
  """
  plgpu.set_max_registers(40, action="decrease")
  for i in range(stages):
    @pl.when(i < total)
    def _prologue():
      fetch(jnp.int32(i), i, False)

  def body(step, _):
    fetch(step, lax.rem(step, stages), True)
    return ()

  lax.fori_loop(jnp.int32(stages), jnp.maximum(total, stages), body, ())

  def tail(step, _):
    slot = lax.rem(step, stages)
    for bar in used:
      plgpu.barrier_wait(bar.at[slot])
    return ()

  lax.fori_loop(jnp.maximum(total - stages, 0), total, tail, ())


def _fetch_tile(tiles_ref, tile_smem, t_bar, tid, slot, wgs):
  """Copies partial tile ``tid`` (when > 0) into ``slot``: one copy per warpgroup's rows (TMA takes at most 5
  strided dims)."""
  @pl.when(tid > 0)
  def _tile():
    for w in range(wgs):
      plgpu.copy_gmem_to_smem(tiles_ref.at[tid, w], tile_smem.at[slot, w], t_bar.at[slot])


def _kv_producer(count, at, b, g, *, bk, wgs, stages, idx_ref, tid_ref, refs, bufs, bars):
  """The forward / dq producer: block ``idx_ref[*at, n]`` of K (with its kv ids and the step's partial tile) and V.

  ``refs`` = ``(k_ref, v_ref, kid_ref, tiles_ref)`` in global memory, ``bufs`` = ``(k_smem, v_smem, kid_smem,
  tile_smem)``, ``bars`` = ``(k_bar, v_bar, t_bar, k_used, v_used)``; ``kid_ref`` / ``tid_ref`` None without ids /
  tiles.
  """
  k_ref, v_ref, kid_ref, tiles_ref = refs
  k_smem, v_smem, kid_smem, tile_smem = bufs
  k_bar, v_bar, t_bar, k_used, v_used = bars

  def fetch(n, slot, wait):
    ks = pl.ds(idx_ref[(*at, n)] * bk, bk)
    if wait:
      plgpu.barrier_wait(k_used.at[slot])
    plgpu.copy_gmem_to_smem(k_ref.at[b, ks, g], k_smem.at[slot], k_bar.at[slot])
    if kid_ref is not None:
      plgpu.copy_gmem_to_smem(kid_ref.at[b, ks], kid_smem.at[slot], k_bar.at[slot])
    if tid_ref is not None:
      _fetch_tile(tiles_ref, tile_smem, t_bar, tid_ref[(*at, n)], slot, wgs)
    if wait:
      plgpu.barrier_wait(v_used.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[b, ks, g], v_smem.at[slot], v_bar.at[slot])

  _producer(count, fetch, (k_used, v_used), stages)


def _q_program(nq, R, Bl, Hl):
  """The forward / dq CTA's ``(b, h, wg, query block, kv head, list batch, list head)``; heaviest (causal) query
  blocks first."""
  b, h, wg = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")
  qb = nq - 1 - lax.axis_index("q")
  return b, h, wg, qb, lax.div(h, jnp.int32(R)), b if Bl > 1 else 0, h if Hl > 1 else 0


def _pad_operands(q, k, v, q_ids, kv_ids, Tp, Sp, Dp, Ep):
  """q, k, v padded to ``Tp`` / ``Sp`` rows and ``Dp`` / ``Ep`` features (zeros); ids (or None) padded with
  ``-1`` (queries) / ``-2`` (keys), which match nothing."""
  qp = pad_to(pad_to(q, 1, Tp), 3, Dp)
  kp = pad_to(pad_to(k, 1, Sp), 3, Dp)
  vp = pad_to(pad_to(v, 1, Sp), 3, Ep)
  if q_ids is None:
    return qp, kp, vp, None, None
  return qp, kp, vp, pad_to(q_ids.astype(jnp.int32), 1, Tp, -1), pad_to(kv_ids.astype(jnp.int32), 1, Sp, -2)


def _lse2(lse):
  """Natural-log lse -> base 2, with -inf (empty rows) replaced by 0 (their p is 0 anyway)."""
  return jnp.where(jnp.isneginf(lse), 0.0, lse * LOG2E).astype(jnp.float32)


def _pad_grads(do, lse, delta, dtype, Tp, Ep):
  """``dO`` (zero rows: padded queries contribute nothing), base-2 lse and delta padded to ``Tp`` rows."""
  dop = pad_to(pad_to(do.astype(dtype), 1, Tp), 3, Ep)
  return dop, pad_to(_lse2(lse), 2, Tp), pad_to(delta.astype(jnp.float32), 2, Tp)


def _slot_barriers(wgs, stages, has_tiles):
  """The pattern tiles' "filled" barriers (or None) and the two streams' "consumed" barriers."""
  used = lambda: plgpu.Barrier(num_arrivals=wgs, num_barriers=stages)
  return (used() if has_tiles else None, used(), used())


def _launch(kernel, out_type, bufs, bars, grid, grid_names, wgs, interpret, *args):
  """``plgpu.kernel`` with ``wgs`` compute warpgroups and one producer warpgroup per CTA."""
  return plgpu.kernel(
      kernel,
      out_type=out_type,
      scratch_types=(bufs, bars),
      grid=grid,
      grid_names=grid_names,
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=_params(),
      interpret=interpret,
  )(*args)


def _check_shapes(name, q, k, v, block_rows, stages):
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"{name}: q, k, v must all be bfloat16 or float16, got {q.dtype}, {k.dtype}, {v.dtype}")
  if H % G:
    raise ValueError(f"{name}: H={H} is not a multiple of G={G}")
  if max(D, E) > MAX_HEAD_DIM:
    raise ValueError(f"{name}: head dims up to {MAX_HEAD_DIM}, got D={D}, E={E}")
  if block_rows % ROWS_PER_WG or block_rows // ROWS_PER_WG not in (1, 2):
    raise ValueError(f"{name}: the CTA tile must be 64 or 128 rows (64 per compute warpgroup), got {block_rows}")
  if stages < 1:
    raise ValueError(f"{name}: num_stages must be >= 1, got {stages}")


def _tiles_bf16(tiles, wgs, transpose=False):
  """``[U, rows, cols]`` bool patterns -> 0/1 bf16 ``[U, wgs, rows / wgs, cols]`` (transposed first if asked)."""
  if tiles is None:
    return None
  t = jnp.asarray(tiles) != 0
  if transpose:
    t = jnp.swapaxes(t, 1, 2)
  U, rows, cols = t.shape
  return t.astype(jnp.bfloat16).reshape(U, wgs, rows // wgs, cols)


def _params(approx_math: bool = True):
  return plgpu.CompilerParams(approx_math=approx_math)


class _Layouts:
  """Register-layout annotations; dropped under the interpreter (jax 0.10's has no ``layout_cast``)."""

  def __init__(self, interpret):
    self.on = interpret is False or interpret is None

  def cast(self, x, layout):
    return plgpu.layout_cast(x, layout) if self.on else x

  def load(self, ref, layout):
    return plgpu.load(ref, (), layout=layout) if self.on else ref[...]

  def iota(self, shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA if self.on else None)


def _mma(a, b, shape, *, acc=None, trans_b: bool = False, hw: bool = True, between=None):
  """``acc + a @ b`` (``b.T`` with ``trans_b``), f32, as one ``wgmma``.

  ``a`` is a shared-memory ref or a register array (bf16 / f16), ``b`` a shared-memory ref. ``between`` runs after
  the wgmma is issued and before its result is awaited (the forward's schedule barrier). ``hw=False`` (the Mosaic
  GPU interpreter of jax 0.10, which lacks ``run_state``, transposed operands and register operands in its wgmma)
  computes the same product with ``lax.dot_general`` on the loaded tiles.
  """
  if not hw:
    av = a if not hasattr(a, "transforms") and not hasattr(jax.typeof(a), "inner_aval") else a[...]
    out = lax.dot_general(av, b[...], NT if trans_b else NN, preferred_element_type=jnp.float32)
    if between is not None:
      between()
    return out if acc is None else acc + out
  bop = plgpu.transpose_ref(b, (1, 0)) if trans_b else b
  if acc is not None:
    def body(acc_ref):
      plgpu.wgmma(acc_ref, a, bop)
      if between is not None:
        between()

    return pl.run_state(body)(plgpu.ACC.init(acc))

  def scoped(acc_ref):
    plgpu.wgmma(acc_ref, a, bop)
    if between is not None:
      between()
    return acc_ref[...]

  return pl.run_scoped(scoped, plgpu.ACC(shape, jnp.float32))


# ----------------------------------------------------------------------------------------------------- forward
def flash_forward(q, k, v, q_ids, kv_ids, lists: BlockLists, tiles, *, block_q: int, block_k: int, scale: float,
                  soft_cap: float | None = None, num_stages: int = 2, schedule_barrier: bool = True,
                  interpret=False):
  """Forward pass over the visited blocks.

  Args:
    q: ``[B, T, H, D]``; k: ``[B, S, G, D]``; v: ``[B, S, G, E]`` (bf16 / f16).
    q_ids, kv_ids: int32 ``[B, T]`` / ``[B, S]`` segment ids, or both None.
    lists: :class:`BlockLists` over ``ceil(T / block_q)`` query blocks (kv blocks of ``block_k``).
    tiles: ``[U, block_q, block_k]`` bool/int partial-block patterns (``tiles[0]`` unused), or None.
    block_q: the CTA's query tile: 64 (one compute warpgroup) or 128 (two, ping-ponged).
    block_k: the kv tile, a multiple of 64 up to 256.
    scale: logit scale; soft_cap: None or the cap.
    num_stages: shared-memory slots of the K/V pipeline (TMA copies in flight).
    schedule_barrier: with two compute warpgroups, alternate their matmuls and softmax (FlashAttention-3).
    interpret: False, or Mosaic GPU interpreter params (:func:`interpret_params`) to run on CPU.

  Returns:
    ``out [B, T, H, E]`` (q's dtype) and ``lse [B, H, T]`` f32 (natural log, ``-inf`` for empty rows).
  """
  _check_shapes("flash_forward", q, k, v, block_q, num_stages)
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  wgs = block_q // ROWS_PER_WG
  bq, bk = ROWS_PER_WG, block_k
  nq, nk = pl.cdiv(T, block_q), pl.cdiv(S, block_k)
  Tp, Sp, Dp, Ep = nq * block_q, nk * block_k, padded_dim(D), padded_dim(E)
  Bl, Hl = check_lists("flash_forward", lists, B, H, nq, tiles, (block_q, block_k))
  has_ids, has_tiles = q_ids is not None, tiles is not None
  kv_len = S if (not has_tiles and S != Sp) else None
  dtype = q.dtype
  stages = num_stages
  hw = interpret is False or interpret is None
  L = _Layouts(interpret)
  sched = schedule_barrier and wgs == 2

  qp, kp, vp, qid, kid = _pad_operands(*forward_operands(q, k, v), q_ids, kv_ids, Tp, Sp, Dp, Ep)
  tiles16 = _tiles_bf16(tiles, wgs)
  tid_arr = lists.tile if has_tiles else None

  def kernel(q_ref, k_ref, v_ref, qid_ref, kid_ref, idx_ref, cnt_ref, tid_ref, tiles_ref, o_ref, lse_ref, bufs,
             bars):
    q_smem, o_smem, lse_smem, qid_smem, k_smem, v_smem, kid_smem, tile_smem = bufs
    q_bar, k_bar, v_bar, t_bar, k_used, v_used, sched_bar = bars
    b, h, wg, qb, g, lb, lh = _q_program(nq, R, Bl, Hl)
    count = cnt_ref[lb, lh, qb]

    def schedule():
      plgpu.barrier_arrive(sched_bar)
      plgpu.barrier_wait(sched_bar)

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
      q0 = qb * block_q + wg * bq
      my_q = q_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h], my_q, q_bar.at[wg])
      if has_ids:
        plgpu.copy_gmem_to_smem(qid_ref.at[b, pl.ds(q0, bq)], qid_smem.at[wg], q_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])
      row = plgpu.Layout.WGMMA.reduce(1)
      qid = L.load(qid_smem.at[wg], row) if has_ids else None

      acc = L.cast(jnp.zeros((bq, Ep), jnp.float32), plgpu.Layout.WGMMA)
      m = L.cast(jnp.full((bq,), _NEG_INF, jnp.float32), row)
      l = L.cast(jnp.zeros((bq,), jnp.float32), row)
      if sched:
        pl.when(wg == 1)(schedule)

      def body(n, carry):
        acc, m, l = carry
        slot = lax.rem(n, jnp.int32(stages))
        plgpu.barrier_wait(k_bar.at[slot])

        s = _mma(my_q, k_smem.at[slot], (bq, bk), trans_b=True, hw=hw, between=schedule if sched else None)
        s2, _ = _logits2(s, scale=scale, soft_cap=soft_cap)
        s2 = _mask_block(s2, n, slot, wg, (lb, lh, qb), L=L, row_ids=qid, col_ids=kid_smem, idx_ref=idx_ref,
                         kv_len=kv_len, tid_ref=tid_ref if has_tiles else None, tile_smem=tile_smem, t_bar=t_bar)
        plgpu.barrier_arrive(k_used.at[slot])

        m_new = jnp.maximum(m, s2.max(axis=1))
        m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)  # fully masked so far: p stays exactly 0
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s2 - _bcast(m_safe, s2.shape, 0))
        l = l * alpha + p.sum(axis=1)
        acc = acc * _bcast(alpha, acc.shape, 0)
        p16 = p.astype(dtype)
        if sched:
          plgpu.barrier_arrive(sched_bar)
        plgpu.barrier_wait(v_bar.at[slot])
        if sched:
          plgpu.barrier_wait(sched_bar)

        acc = _mma(p16, v_smem.at[slot], acc.shape, acc=acc, hw=hw)
        plgpu.barrier_arrive(v_used.at[slot])
        return acc, m_new, l

      acc, m, l = lax.fori_loop(0, count, body, (acc, m, l))
      if sched:
        pl.when(wg == 0)(schedule)

      nonempty = l != 0.0  # a NaN l (the row attends a non-finite input) keeps its NaN output and lse
      l_safe = jnp.where(nonempty, l, 1.0)
      out = acc / _bcast(l_safe, acc.shape, 0)
      dst = o_smem.at[wg] if o_smem is not None else my_q
      dst[...] = out.astype(dtype)
      m_safe = jnp.where(m == _NEG_INF, 0.0, m)
      lse_smem.at[wg][...] = jnp.where(nonempty, m_safe * LN2 + jnp.log(l_safe), _NEG_INF)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dst, o_ref.at[b, pl.ds(q0, bq), h])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(q0, bq)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _producer_wg():
      _kv_producer(count, (lb, lh, qb), b, g, bk=bk, wgs=wgs, stages=stages, idx_ref=idx_ref,
                   tid_ref=tid_ref if has_tiles else None,
                   refs=(k_ref, v_ref, kid_ref if has_ids else None, tiles_ref),
                   bufs=(k_smem, v_smem, kid_smem, tile_smem), bars=(k_bar, v_bar, t_bar, k_used, v_used))

  bufs = (
      _swizzled((wgs, bq, Dp), dtype),  # q (reused for the output when E == D)
      None if Ep == Dp else _swizzled((wgs, bq, Ep), dtype),
      plgpu.SMEM((wgs, bq), jnp.float32),
      plgpu.SMEM((wgs, bq), jnp.int32) if has_ids else None,
      _swizzled((stages, bk, Dp), dtype),
      _swizzled((stages, bk, Ep), dtype),
      plgpu.SMEM((stages, bk), jnp.int32) if has_ids else None,
      _swizzled((stages, wgs, bq, bk), jnp.bfloat16) if has_tiles else None,
  )
  copies = 2 if has_ids else 1
  bars = (
      plgpu.Barrier(num_arrivals=copies, num_barriers=wgs),
      plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      *_slot_barriers(wgs, stages, has_tiles),
      plgpu.Barrier(num_arrivals=wgs) if sched else None,
  )
  out_type = (jax.ShapeDtypeStruct((B, Tp, H, Ep), dtype), jax.ShapeDtypeStruct((B, H, Tp), jnp.float32))
  out, lse = _launch(kernel, out_type, bufs, bars, (nq, H, B), ("q", "h", "b"), wgs, interpret,
                     qp, kp, vp, qid, kid, lists.index, lists.count, tid_arr, tiles16)
  return out[:, :T, :, :E], lse[:, :, :T]


# ------------------------------------------------------------------------------------------------------ dq pass
def flash_backward_dq(q, k, v, q_ids, kv_ids, do, lse, delta, lists: BlockLists, tiles, *, block_q: int,
                      block_k: int, scale: float, soft_cap: float | None = None, num_stages: int = 2,
                      interpret=False):
  """``dq [B, T, H, D]`` (q's dtype) over the visited blocks.

  Args:
    do: ``[B, T, H, E]`` output cotangent (q's dtype).
    lse: ``[B, H, T]`` f32 from :func:`flash_forward`.
    delta: ``[B, H, T]`` f32, ``sum_e do * out - dlse``.
    lists, tiles: as :func:`flash_forward` for the ``(block_q, block_k)`` dq tile (``block_q`` 64 or 128 =
      one or two compute warpgroups).
  """
  _check_shapes("flash_backward_dq", q, k, v, block_q, num_stages)
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  wgs = block_q // ROWS_PER_WG
  bq, bk = ROWS_PER_WG, block_k
  nq, nk = pl.cdiv(T, block_q), pl.cdiv(S, block_k)
  Tp, Sp, Dp, Ep = nq * block_q, nk * block_k, padded_dim(D), padded_dim(E)
  Bl, Hl = check_lists("flash_backward_dq", lists, B, H, nq, tiles, (block_q, block_k))
  has_ids, has_tiles = q_ids is not None, tiles is not None
  kv_len = S if (not has_tiles and S != Sp) else None
  dtype = q.dtype
  stages = num_stages
  hw = interpret is False or interpret is None
  L = _Layouts(interpret)

  qp, kp, vp, qid, kid = _pad_operands(*backward_operands(q, k, v), q_ids, kv_ids, Tp, Sp, Dp, Ep)
  dop, lse2, deltap = _pad_grads(do, lse, delta, dtype, Tp, Ep)
  tiles16 = _tiles_bf16(tiles, wgs)
  tid_arr = lists.tile if has_tiles else None

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qid_ref, kid_ref, idx_ref, cnt_ref, tid_ref,
             tiles_ref, dq_ref, bufs, bars):
    q_smem, do_smem, lse_smem, delta_smem, qid_smem, k_smem, v_smem, kid_smem, tile_smem = bufs
    q_bar, k_bar, v_bar, t_bar, k_used, v_used = bars
    b, h, wg, qb, g, lb, lh = _q_program(nq, R, Bl, Hl)
    count = cnt_ref[lb, lh, qb]

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
      q0 = qb * block_q + wg * bq
      rows = pl.ds(q0, bq)
      my_q, my_do = q_smem.at[wg], do_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], my_q, q_bar.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], my_do, q_bar.at[wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[wg], q_bar.at[wg])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[wg], q_bar.at[wg])
      if has_ids:
        plgpu.copy_gmem_to_smem(qid_ref.at[b, rows], qid_smem.at[wg], q_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])
      row = plgpu.Layout.WGMMA.reduce(1)
      lse2 = L.load(lse_smem.at[wg], row)
      dlt = L.load(delta_smem.at[wg], row)
      qid = L.load(qid_smem.at[wg], row) if has_ids else None
      dq = L.cast(jnp.zeros((bq, Dp), jnp.float32), plgpu.Layout.WGMMA)

      def body(n, dq):
        slot = lax.rem(n, jnp.int32(stages))
        plgpu.barrier_wait(k_bar.at[slot])

        s = _mma(my_q, k_smem.at[slot], (bq, bk), trans_b=True, hw=hw)
        s2, t = _logits2(s, scale=scale, soft_cap=soft_cap)
        s2 = _mask_block(s2, n, slot, wg, (lb, lh, qb), L=L, row_ids=qid, col_ids=kid_smem, idx_ref=idx_ref,
                         kv_len=kv_len, tid_ref=tid_ref if has_tiles else None, tile_smem=tile_smem, t_bar=t_bar)
        masked = s2 == _NEG_INF  # q, k are finite here: -inf only where masked
        p = jnp.exp2(s2 - _bcast(lse2, s2.shape, 0))
        plgpu.barrier_wait(v_bar.at[slot])

        dp = _mma(my_do, v_smem.at[slot], (bq, bk), trans_b=True, hw=hw)
        plgpu.barrier_arrive(v_used.at[slot])
        ds16 = _ds(p, dp, dlt, 0, t, masked, dtype)

        dq = _mma(ds16, k_smem.at[slot], dq.shape, acc=dq, hw=hw)
        plgpu.barrier_arrive(k_used.at[slot])
        return dq

      dq = lax.fori_loop(0, count, body, dq)
      my_q[...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(my_q, dq_ref.at[b, rows, h])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _producer_wg():
      _kv_producer(count, (lb, lh, qb), b, g, bk=bk, wgs=wgs, stages=stages, idx_ref=idx_ref,
                   tid_ref=tid_ref if has_tiles else None,
                   refs=(k_ref, v_ref, kid_ref if has_ids else None, tiles_ref),
                   bufs=(k_smem, v_smem, kid_smem, tile_smem), bars=(k_bar, v_bar, t_bar, k_used, v_used))

  bufs = (
      _swizzled((wgs, bq, Dp), dtype),
      _swizzled((wgs, bq, Ep), dtype),
      plgpu.SMEM((wgs, bq), jnp.float32),
      plgpu.SMEM((wgs, bq), jnp.float32),
      plgpu.SMEM((wgs, bq), jnp.int32) if has_ids else None,
      _swizzled((stages, bk, Dp), dtype),
      _swizzled((stages, bk, Ep), dtype),
      plgpu.SMEM((stages, bk), jnp.int32) if has_ids else None,
      _swizzled((stages, wgs, bq, bk), jnp.bfloat16) if has_tiles else None,
  )
  bars = (
      plgpu.Barrier(num_arrivals=4 + int(has_ids), num_barriers=wgs),
      plgpu.Barrier(num_arrivals=1 + int(has_ids), num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      *_slot_barriers(wgs, stages, has_tiles),
  )
  dq = _launch(kernel, jax.ShapeDtypeStruct((B, Tp, H, Dp), dtype), bufs, bars, (nq, H, B), ("q", "h", "b"), wgs,
               interpret, qp, kp, vp, dop, lse2, deltap, qid, kid, lists.index, lists.count, tid_arr, tiles16)
  return dq[:, :T, :, :D]


# --------------------------------------------------------------------------------------------------- dk/dv pass
def flatten_transposed_lists(lists_t: BlockLists, H: int, G: int) -> tuple[jax.Array, BlockLists]:
  """Per (batch, kv head) lists of ``(query head in group, query block, tile id)`` for the dk/dv kernel.

  ``lists_t`` is the transposed lists ``[Bl, Hl, nK, Kt]`` (``Hl`` query heads or 1). Returns ``head [Bl, Gl, nK,
  R * Kt]`` (the query head within the kv head's group) and ``BlockLists`` with the same leading dims
  (``Gl = G`` when the lists are per head, else 1), entries of every query head of the group in order.
  """
  R = H // G
  Bl, Hl, nk, Kt = lists_t.index.shape
  tile = lists_t.tile if lists_t.tile is not None else jnp.zeros_like(lists_t.index)
  if Hl == 1:
    index = jnp.broadcast_to(lists_t.index[:, :, None], (Bl, 1, R, nk, Kt))
    tile = jnp.broadcast_to(tile[:, :, None], (Bl, 1, R, nk, Kt))
    count = jnp.broadcast_to(lists_t.count[:, :, None], (Bl, 1, R, nk))
    Gl = 1
  else:
    index = lists_t.index.reshape(Bl, G, R, nk, Kt)
    tile = tile.reshape(Bl, G, R, nk, Kt)
    count = lists_t.count.reshape(Bl, G, R, nk)
    Gl = G
  # [Bl, Gl, nK, R, Kt] -> flat R * Kt with the valid entries first (stable order: head, then list position)
  index = jnp.moveaxis(index, 2, 3).reshape(Bl, Gl, nk, R * Kt)
  tile = jnp.moveaxis(tile, 2, 3).reshape(Bl, Gl, nk, R * Kt)
  heads = jnp.broadcast_to(jnp.repeat(jnp.arange(R, dtype=jnp.int32), Kt), index.shape)
  pos = jnp.broadcast_to(jnp.tile(jnp.arange(Kt, dtype=jnp.int32), R), index.shape)
  valid = pos < jnp.repeat(jnp.moveaxis(count, 2, 3), Kt, axis=-1)
  order = jnp.argsort(~valid, axis=-1, stable=True)
  take = lambda a: jnp.take_along_axis(a, order, axis=-1).astype(jnp.int32)
  total = valid.sum(-1).astype(jnp.int32)
  flat_tile = take(tile) if lists_t.tile is not None else None
  return take(heads), BlockLists(take(index), total, flat_tile)


def flash_backward_dkv(q, k, v, q_ids, kv_ids, do, lse, delta, lists_t: BlockLists, tiles, *, block_q: int,
                       block_k: int, scale: float, soft_cap: float | None = None, num_stages: int = 2,
                       interpret=False):
  """``dk [B, S, G, D]``, ``dv [B, S, G, E]`` over the visited blocks (query heads of a kv head summed in-kernel).

  Args:
    lists_t: transposed :class:`BlockLists`: ``index [Bl, Hl, nK, Kt]`` query blocks per kv block
      (``nK = ceil(S / block_k)``), ``Hl`` indexing query heads as in the forward lists.
    tiles: ``[U, block_q, block_k]`` (query rows x key columns, as in the forward), or None.
    block_q: the streamed query tile (a multiple of 64 up to 256); block_k: the CTA's kv tile, 64 or 128 (one or
      two compute warpgroups of 64 key rows).
    Other args as :func:`flash_backward_dq`.
  """
  _check_shapes("flash_backward_dkv", q, k, v, block_k, num_stages)
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  wgs = block_k // ROWS_PER_WG
  bq, bk = block_q, ROWS_PER_WG
  nq, nk = pl.cdiv(T, block_q), pl.cdiv(S, block_k)
  Tp, Sp, Dp, Ep = nq * block_q, nk * block_k, padded_dim(D), padded_dim(E)
  check_lists("flash_backward_dkv", lists_t, B, H, nk, tiles, (block_q, block_k))
  has_ids, has_tiles = q_ids is not None, tiles is not None
  dtype = q.dtype
  stages = num_stages
  hw = interpret is False or interpret is None
  L = _Layouts(interpret)
  heads, flat = flatten_transposed_lists(lists_t, H, G)
  Bl, Gl = heads.shape[:2]

  qp, kp, vp, qid, kid = _pad_operands(*backward_operands(q, k, v), q_ids, kv_ids, Tp, Sp, Dp, Ep)
  dop, lse2, deltap = _pad_grads(do, lse, delta, dtype, Tp, Ep)
  tiles16 = _tiles_bf16(tiles, wgs, transpose=True)  # [U, wgs, 64 key rows, block_q]
  tid_arr = flat.tile if has_tiles else None

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qid_ref, kid_ref, head_ref, idx_ref, cnt_ref,
             tid_ref, tiles_ref, dk_ref, dv_ref, bufs, bars):
    k_smem, v_smem, kid_smem, q_smem, do_smem, lse_smem, delta_smem, qid_smem, tile_smem = bufs
    kv_bar, q_bar, do_bar, t_bar, q_used, do_used = bars
    b, g, wg = lax.axis_index("b"), lax.axis_index("g"), lax.axis_index("wg")
    kb = lax.axis_index("k")
    lb = b if Bl > 1 else 0
    lg = g if Gl > 1 else 0
    count = cnt_ref[lb, lg, kb]

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
      k0 = kb * block_k + wg * bk
      rows = pl.ds(k0, bk)
      my_k, my_v = k_smem.at[wg], v_smem.at[wg]
      plgpu.copy_gmem_to_smem(k_ref.at[b, rows, g], my_k, kv_bar.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[b, rows, g], my_v, kv_bar.at[wg])
      if has_ids:
        plgpu.copy_gmem_to_smem(kid_ref.at[b, rows], kid_smem.at[wg], kv_bar.at[wg])
      plgpu.barrier_wait(kv_bar.at[wg])
      col = plgpu.Layout.WGMMA.reduce(0)
      kid = L.load(kid_smem.at[wg], plgpu.Layout.WGMMA.reduce(1)) if has_ids else None
      dk = L.cast(jnp.zeros((bk, Dp), jnp.float32), plgpu.Layout.WGMMA)
      dv = L.cast(jnp.zeros((bk, Ep), jnp.float32), plgpu.Layout.WGMMA)

      def body(n, carry):
        dk, dv = carry
        slot = lax.rem(n, jnp.int32(stages))
        plgpu.barrier_wait(q_bar.at[slot])

        sT = _mma(my_k, q_smem.at[slot], (bk, bq), trans_b=True, hw=hw)
        s2, t = _logits2(sT, scale=scale, soft_cap=soft_cap)
        s2 = _mask_block(s2, n, slot, wg, (lb, lg, kb), L=L, row_ids=kid, col_ids=qid_smem, idx_ref=idx_ref,
                         kv_len=None, tid_ref=tid_ref if has_tiles else None, tile_smem=tile_smem, t_bar=t_bar)
        masked = s2 == _NEG_INF
        lse2 = L.load(lse_smem.at[slot], col)
        pT = jnp.where(masked, 0.0, jnp.exp2(s2 - _bcast(lse2, s2.shape, 1)))
        pT16 = pT.astype(dtype)
        plgpu.barrier_wait(do_bar.at[slot])

        if hw:  # both matmuls in one wgmma group (one wait)
          def dv_dp(refs):
            dv_ref, dp_ref = refs
            plgpu.wgmma(dv_ref, pT16, do_smem.at[slot])
            plgpu.wgmma(dp_ref, my_v, plgpu.transpose_ref(do_smem.at[slot], (1, 0)))

          zeros = L.cast(jnp.zeros((bk, bq), jnp.float32), plgpu.Layout.WGMMA)
          dv, dpT = pl.run_state(dv_dp)((plgpu.ACC.init(dv), plgpu.ACC.init(zeros)))
        else:
          dv = _mma(pT16, do_smem.at[slot], dv.shape, acc=dv, hw=False)
          dpT = _mma(my_v, do_smem.at[slot], (bk, bq), trans_b=True, hw=False)
        dlt = L.load(delta_smem.at[slot], col)
        plgpu.barrier_arrive(do_used.at[slot])
        dsT16 = _ds(pT, dpT, dlt, 1, t, masked, dtype)

        dk = _mma(dsT16, q_smem.at[slot], dk.shape, acc=dk, hw=hw)
        plgpu.barrier_arrive(q_used.at[slot])
        return dk, dv

      dk, dv = lax.fori_loop(0, count, body, (dk, dv))
      my_k[...] = (dk * scale).astype(dtype)
      my_v[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(my_k, dk_ref.at[b, rows, g])
      plgpu.copy_smem_to_gmem(my_v, dv_ref.at[b, rows, g])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _producer_wg():
      def fetch(n, slot, wait):
        h = g * R + head_ref[lb, lg, kb, n]
        qs = pl.ds(idx_ref[lb, lg, kb, n] * bq, bq)
        if wait:
          plgpu.barrier_wait(q_used.at[slot])
        plgpu.copy_gmem_to_smem(q_ref.at[b, qs, h], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, h, qs], lse_smem.at[slot], q_bar.at[slot])
        if has_ids:
          plgpu.copy_gmem_to_smem(qid_ref.at[b, qs], qid_smem.at[slot], q_bar.at[slot])
        if has_tiles:
          _fetch_tile(tiles_ref, tile_smem, t_bar, tid_ref[lb, lg, kb, n], slot, wgs)
        if wait:
          plgpu.barrier_wait(do_used.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[b, qs, h], do_smem.at[slot], do_bar.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, h, qs], delta_smem.at[slot], do_bar.at[slot])

      _producer(count, fetch, (q_used, do_used), stages)

  bufs = (
      _swizzled((wgs, bk, Dp), dtype),
      _swizzled((wgs, bk, Ep), dtype),
      plgpu.SMEM((wgs, bk), jnp.int32) if has_ids else None,
      _swizzled((stages, bq, Dp), dtype),
      _swizzled((stages, bq, Ep), dtype),
      plgpu.SMEM((stages, bq), jnp.float32),
      plgpu.SMEM((stages, bq), jnp.float32),
      plgpu.SMEM((stages, bq), jnp.int32) if has_ids else None,
      _swizzled((stages, wgs, bk, bq), jnp.bfloat16) if has_tiles else None,
  )
  bars = (
      plgpu.Barrier(num_arrivals=2 + int(has_ids), num_barriers=wgs),
      plgpu.Barrier(num_arrivals=2 + int(has_ids), num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      *_slot_barriers(wgs, stages, has_tiles),
  )
  out_type = (jax.ShapeDtypeStruct((B, Sp, G, Dp), dtype), jax.ShapeDtypeStruct((B, Sp, G, Ep), dtype))
  dk, dv = _launch(kernel, out_type, bufs, bars, (nk, G, B), ("k", "g", "b"), wgs, interpret,
                   qp, kp, vp, dop, lse2, deltap, qid, kid, heads, flat.index, flat.count, tid_arr, tiles16)
  return dk[:, :S, :, :D], dv[:, :S, :, :E]
