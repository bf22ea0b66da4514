"""Block-sparse flash attention for GPUs: Pallas kernels with the Triton lowering (forward, dq, dk/dv).

Raw kernels: jax only, no autodiff (``jaxattn.ops.softmax.pallas_gpu`` composes them into a ``custom_vjp``).
Layouts follow the library: ``q [B, T, H, D]``, ``k [B, S, G, D]``, ``v [B, S, G, E]``, ``H % G == 0``; query head
``h`` reads kv head ``h // (H // G)`` through the BlockSpec index maps (K/V are never repeated in memory).

Sparsity comes from visiting lists (:class:`BlockLists`): query block ``qb`` visits the kv blocks
``index[.., qb, :count[.., qb]]``. The Triton backend cannot scalar-prefetch, so the lists are ordinary int32
inputs and each program loops ``lax.fori_loop(0, count, ...)`` over them, slicing K/V with ``pl.ds``. Each visited
block carries a tile id: 0 = fully allowed (no masking at all), ``t >= 1`` = partial block whose boolean pattern is
``tiles[t]`` (int8 ``[U, block_q, block_k]``, deduplicated, loaded only for partial blocks). No ``T x S`` array
exists. Segment ids mask every block; key columns past ``S`` are masked by the tiles or, without tiles, by an iota
bound; query rows past ``T`` are computed and dropped.

Lists may be shared or per (batch, query head): leading dims ``[Bl, Hl, ...]`` with ``Bl in {1, B}`` and
``Hl in {1, H}`` (a static mask gives ``[1, 1, ...]``; data-dependent block sparsity gives ``[B, H, ...]``). The
dk/dv kernel takes the transposed lists (which query blocks visit kv block ``kb``) with the same convention and
sums the ``H // G`` query heads of its kv head in-kernel.

Numerics: logits in f32, online softmax in base 2 (``exp2``), f32 accumulators, output in q's dtype,
``lse [B, H, T]`` natural log f32. A row with no allowed key gives output 0, lse ``-inf`` and zero gradients.
Soft cap: ``s = cap * tanh(scale * q.k / cap)``; the backward multiplies by ``1 - tanh^2``.

Bias (optional, every kernel): an additive ``[Bb, Hb, T, S]`` bias (``Bb in {1, B}``, ``Hb in {1, H}`` query
heads; size-1 dims are never materialised, the index maps read their block 0) enters after the scale and before
the soft cap: ``s = cap * tanh((scale * q.k + bias) / cap)``. Each visited tile loads its ``[bq, bk]`` bias slice.
:func:`flash_backward_dq_dbias` also writes ``dS`` (the pre-cap logits' gradient) per visited tile: see
:mod:`pallas_kernels.softmax.bias`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import LN2, LOG2E, MAX_HEAD_DIM, NN, NT, TN, is_pow2, padded_head_dim
from pallas_kernels.common.nonfinite import backward_operands, forward_operands
from pallas_kernels.softmax.bias import check_bias, pad_bias, zero_unvisited

__all__ = ["block_rule", "num_warps_rule", "num_stages_rule", "BlockLists", "flash_forward", "flash_backward_dq",
           "flash_backward_dq_dbias", "flash_backward_dkv", "supported_head_dim", "padded_head_dim"]


# ------------------------------------------------------------------------------ launch-parameter rules (plain ints)
NUM_WARPS = (1, 2, 4, 8, 16)
MAX_NUM_STAGES = 8


def block_rule(b) -> str | None:
  """None if ``b`` can tile a kernel (a power of two >= 16: Triton shapes are powers of two, ``tl.dot`` needs 16),
  else the rule it breaks."""
  if not isinstance(b, int) or isinstance(b, bool) or b < 16 or not is_pow2(b):
    return "must be a power of two >= 16"
  return None


def num_warps_rule(w) -> str | None:
  """None if ``w`` is None (pick per head dim) or a valid warp count, else the rule it breaks."""
  if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w not in NUM_WARPS):
    return f"must be None or one of {', '.join(map(str, NUM_WARPS))}"
  return None


def num_stages_rule(s) -> str | None:
  """None if ``s`` is a valid pipeline depth, else the rule it breaks."""
  if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= MAX_NUM_STAGES:
    return f"must be an int in [1, {MAX_NUM_STAGES}]"
  return None


class BlockLists(NamedTuple):
  """Visiting lists of one kernel (int32 arrays).

  For the forward and dq kernels (rows = query blocks, entries = kv blocks); for the dk/dv kernel the transpose
  (rows = kv blocks, entries = query blocks):

  - ``index [Bl, Hl, nRows, K]``: the blocks to visit, first ``count`` entries valid (the rest are ignored);
  - ``count [Bl, Hl, nRows]``: how many entries are valid (0 = skip the row: output 0, lse ``-inf``);
  - ``tile [Bl, Hl, nRows, K]`` or None: 0 = the block is fully allowed, ``t >= 1`` = apply ``tiles[t]``.
    None means every visited block is full (then ``tiles`` must be None too).

  ``Bl in {1, B}``, ``Hl in {1, H}`` (query heads): 1 broadcasts.
  """

  index: jax.Array
  count: jax.Array
  tile: jax.Array | None = None


def supported_head_dim(d: int) -> bool:
  return 1 <= d <= MAX_HEAD_DIM


# ---------------------------------------------------------------------------------------------- shared pieces
def _dot(a, b, dims):
  """f32-accumulating matmul; f32 inputs use IEEE f32 (Triton's default for them would be TF32)."""
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _logits(q, k, bias=None, *, scale, soft_cap):
  """Base-2 logits ``[bq, bk]`` (f32) and ``tanh`` of the capped logits (or None); ``bias`` (f32 ``[bq, bk]`` or
  None) is added after the scale, before the cap."""
  s = _dot(q, k, NT)
  if soft_cap is None:
    return (s * (scale * LOG2E) if bias is None else (s * scale + bias) * LOG2E), None
  t = jnp.tanh(s * (scale / soft_cap) if bias is None else (s * scale + bias) * (1.0 / soft_cap))
  return t * (soft_cap * LOG2E), t


def _allowed(shape, *, qid, kid, tiles_ref, tile_id, col0, kv_len):
  """Boolean ``[bq, bk]`` keep-mask of one visited block, or None when nothing is masked."""
  keep = None
  if qid is not None:
    keep = qid[:, None] == kid[None, :]
  if tiles_ref is not None:
    # Full blocks (tile id 0) predicate the load off: no memory traffic, all True.
    pat = plgpu.load(tiles_ref.at[tile_id], mask=jnp.full(shape, tile_id > 0), other=1) != 0
    keep = pat if keep is None else keep & pat
  elif kv_len is not None:
    cols = col0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    ok = cols < kv_len
    keep = ok if keep is None else keep & ok
  return keep


def check_lists(name, lists: BlockLists, B, H, rows, tiles, block):
  if lists.index.ndim != 4 or lists.count.ndim != 3:
    raise ValueError(f"{name}: index must be [Bl, Hl, {rows}, K] and count [Bl, Hl, {rows}], got "
                     f"{lists.index.shape} and {lists.count.shape}")
  Bl, Hl, n, _ = lists.index.shape
  if Bl not in (1, B) or Hl not in (1, H) or n != rows:
    raise ValueError(f"{name}: index shape {lists.index.shape} must be [1|{B}, 1|{H}, {rows}, K]")
  if lists.count.shape != (Bl, Hl, rows):
    raise ValueError(f"{name}: count shape {lists.count.shape} must be {(Bl, Hl, rows)}")
  if (lists.tile is None) != (tiles is None):
    raise ValueError(f"{name}: pass both tile ids and tiles, or neither")
  if lists.tile is not None and lists.tile.shape != lists.index.shape:
    raise ValueError(f"{name}: tile shape {lists.tile.shape} must equal index shape {lists.index.shape}")
  if tiles is not None and (tiles.ndim != 3 or tuple(tiles.shape[1:]) != block):
    raise ValueError(f"{name}: tiles must be [U, {block[0]}, {block[1]}], got {tiles.shape}")
  for a in (lists.index, lists.count) + (() if lists.tile is None else (lists.tile,)):
    if a.dtype != jnp.int32:
      raise ValueError(f"{name}: visiting lists must be int32, got {a.dtype}")
  return Bl, Hl


def pad_to(x, axis, size, value=0):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _prep_tiles(tiles):
  return None if tiles is None else jnp.asarray(tiles).astype(jnp.int8)


def _bias_rows(bias, name, B, H, T, S, Tp, Sp, block_q, qb):
  """``(BlockSpec, padded bias)`` of a grid ``(query block i, batch x head bh)`` kernel: the ``[block_q, Sp]``
  row strip of ``bias [Bb, Hb, T, S]`` (broadcast dims read block 0); ``(None, None)`` without a bias."""
  if bias is None:
    return None, None
  Bb, Hb = check_bias(name, bias, B, H, T, S)
  bsel = (lambda bh: bh // H) if Bb > 1 else (lambda bh: 0)
  hsel = (lambda bh: bh % H) if Hb > 1 else (lambda bh: 0)
  spec = pl.BlockSpec((None, None, block_q, Sp), lambda i, bh: (bsel(bh), hsel(bh), qb(i), 0))
  return spec, pad_bias(bias, Tp, Sp)


def _params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------------------------- forward
def _fwd_kernel(q_ref, k_ref, v_ref, qid_ref, kid_ref, idx_ref, cnt_ref, tid_ref, tiles_ref, bias_ref, o_ref,
                lse_ref, *, scale, soft_cap, block_k, num_q_blocks, kv_len):
  qb = num_q_blocks - 1 - pl.program_id(0)  # heaviest (causal) query blocks first
  q = q_ref[...]  # [bq, Dp]
  bq = q.shape[0]
  qid = None if qid_ref is None else qid_ref[...]  # [bq]

  # FlashAttention-2: the grid carries the query block, this loop the visited kv blocks. m, l: running max and
  # sum in base 2; m_safe replaces -inf by 0 so fully masked rows stay exactly 0 instead of NaN.
  def body(n, carry):
    acc, m, l = carry
    col0 = pl.multiple_of(idx_ref[n] * block_k, block_k)
    ks = pl.ds(col0, block_k)
    bias = None if bias_ref is None else bias_ref[:, ks].astype(jnp.float32)
    s, _ = _logits(q, k_ref[ks, :], bias, scale=scale, soft_cap=soft_cap)
    keep = _allowed(s.shape, qid=qid, kid=None if kid_ref is None else kid_ref[ks], tiles_ref=tiles_ref,
                    tile_id=None if tid_ref is None else tid_ref[n], col0=col0, kv_len=kv_len)
    if keep is not None:
      s = jnp.where(keep, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    l = alpha * l + p.sum(axis=-1)
    v = v_ref[ks, :]
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, NN)
    return acc, m_new, l

  init = (jnp.zeros((bq, o_ref.shape[-1]), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(0, cnt_ref[qb], body, init)
  nonempty = l != 0  # a NaN l (the row attends a non-finite input) keeps its NaN output and lse
  l_safe = jnp.where(nonempty, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  lse_ref[...] = jnp.where(nonempty, (m_safe + jnp.log2(l_safe)) * LN2, -jnp.inf)


def flash_forward(q, k, v, q_ids, kv_ids, lists: BlockLists, tiles, *, block_q: int, block_k: int, scale: float,
                  soft_cap: float | None = None, bias=None, num_warps: int | None = None, num_stages: int = 3,
                  interpret: bool = False):
  """Forward pass over the visited blocks.

  Args:
    q: ``[B, T, H, D]``; k: ``[B, S, G, D]``; v: ``[B, S, G, E]``.
    q_ids, kv_ids: int32 ``[B, T]`` / ``[B, S]`` segment ids, or both None.
    lists: :class:`BlockLists` over ``nQ = ceil(T / block_q)`` query blocks (kv blocks of ``block_k``).
    tiles: ``[U, block_q, block_k]`` bool/int8 partial-block patterns (``tiles[0]`` unused), or None.
    block_q, block_k: the tile the lists were built for.
    scale: logit scale; soft_cap: None or the cap.
    bias: None or an additive ``[1|B, 1|H, T, S]`` float bias (after the scale, before the cap).
    num_warps: None picks 4 for head dims <= 64, else 8.
    interpret: run the kernel in Pallas interpret mode (CPU).

  Returns:
    ``out [B, T, H, E]`` (q's dtype) and ``lse [B, H, T]`` f32 (natural log, ``-inf`` for empty rows).
  """
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  nq, nk = pl.cdiv(T, block_q), pl.cdiv(S, block_k)
  Tp, Sp, Dp, Ep = nq * block_q, nk * block_k, padded_head_dim(D), padded_head_dim(E)
  Bl, Hl = check_lists("flash_forward", lists, B, H, nq, tiles, (block_q, block_k))
  K = lists.index.shape[-1]
  has_ids = q_ids is not None
  bias_spec, bias = _bias_rows(bias, "flash_forward", B, H, T, S, Tp, Sp, block_q, lambda i: nq - 1 - i)

  q, k, v = forward_operands(q, k, v)  # non-finite inputs reach allowed pairs only (pallas_kernels.common.nonfinite)
  qp = pad_to(pad_to(q, 1, Tp), 3, Dp)
  kp = pad_to(pad_to(k, 1, Sp), 3, Dp)
  vp = pad_to(pad_to(v, 1, Sp), 3, Ep)
  qid = pad_to(q_ids, 1, Tp, -1) if has_ids else None
  kid = pad_to(kv_ids, 1, Sp, -2) if has_ids else None
  tiles = _prep_tiles(tiles)

  qb = lambda i: nq - 1 - i
  bsel = (lambda bh: bh // H) if Bl > 1 else (lambda bh: 0)
  hsel = (lambda bh: bh % H) if Hl > 1 else (lambda bh: 0)
  in_specs = [
      pl.BlockSpec((None, block_q, None, Dp), lambda i, bh: (bh // H, qb(i), bh % H, 0)),
      pl.BlockSpec((None, Sp, None, Dp), lambda i, bh: (bh // H, 0, (bh % H) // R, 0)),
      pl.BlockSpec((None, Sp, None, Ep), lambda i, bh: (bh // H, 0, (bh % H) // R, 0)),
      None if not has_ids else pl.BlockSpec((None, block_q), lambda i, bh: (bh // H, qb(i))),
      None if not has_ids else pl.BlockSpec((None, Sp), lambda i, bh: (bh // H, 0)),
      pl.BlockSpec((None, None, None, K), lambda i, bh: (bsel(bh), hsel(bh), qb(i), 0)),
      pl.BlockSpec((None, None, nq), lambda i, bh: (bsel(bh), hsel(bh), 0)),
      None if tiles is None else pl.BlockSpec((None, None, None, K), lambda i, bh: (bsel(bh), hsel(bh), qb(i), 0)),
      None if tiles is None else pl.BlockSpec(tiles.shape, lambda i, bh: (0, 0, 0)),
      bias_spec,
  ]
  out_specs = [
      pl.BlockSpec((None, block_q, None, Ep), lambda i, bh: (bh // H, qb(i), bh % H, 0)),
      pl.BlockSpec((None, None, block_q), lambda i, bh: (bh // H, bh % H, qb(i))),
  ]
  kernel = functools.partial(_fwd_kernel, scale=scale, soft_cap=soft_cap, block_k=block_k, num_q_blocks=nq,
                             kv_len=S if (tiles is None and S != Sp) else None)
  out, lse = pl.pallas_call(
      kernel,
      grid=(nq, B * H),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct((B, Tp, H, Ep), q.dtype), jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)],
      compiler_params=_params(num_warps if num_warps is not None else (4 if Dp <= 64 else 8), num_stages),
      interpret=interpret,
      name="jaxattn_flash_fwd",
  )(qp, kp, vp, qid, kid, lists.index, lists.count, lists.tile, tiles, bias)
  return out[:, :T, :, :E], lse[:, :, :T]


# ------------------------------------------------------------------------------------------------------ dq pass
def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qid_ref, kid_ref, idx_ref, cnt_ref, tid_ref,
               tiles_ref, bias_ref, *out_refs, scale, soft_cap, block_k, num_q_blocks, kv_len, with_dq, with_dbias):
  dq_ref = out_refs[0] if with_dq else None
  db_ref = out_refs[-1] if with_dbias else None
  qb = num_q_blocks - 1 - pl.program_id(0)
  q, do = q_ref[...], do_ref[...]  # [bq, Dp], [bq, Ep]
  lse2, delta = lse_ref[...], delta_ref[...]  # [bq] base-2 lse (-inf replaced by 0), [bq]
  qid = None if qid_ref is None else qid_ref[...]

  def body(n, dq):
    col0 = pl.multiple_of(idx_ref[n] * block_k, block_k)
    ks = pl.ds(col0, block_k)
    k, v = k_ref[ks, :], v_ref[ks, :]
    bias = None if bias_ref is None else bias_ref[:, ks].astype(jnp.float32)
    s, t = _logits(q, k, bias, scale=scale, soft_cap=soft_cap)
    keep = _allowed(s.shape, qid=qid, kid=None if kid_ref is None else kid_ref[ks], tiles_ref=tiles_ref,
                    tile_id=None if tid_ref is None else tid_ref[n], col0=col0, kv_len=kv_len)
    if keep is not None:
      s = jnp.where(keep, s, -jnp.inf)
    p = jnp.exp2(s - lse2[:, None])
    dp = _dot(do, v, NT)
    ds = p * (dp - delta[:, None])
    if t is not None:
      ds = ds * (1.0 - t * t)
    if keep is not None:  # masked entries are exact zeros, also in a row whose lse / delta is NaN
      ds = jnp.where(keep, ds, 0.0)
    if db_ref is not None:  # dS is the gradient of the pre-cap logits, i.e. of the bias
      db_ref[:, ks] = ds.astype(db_ref.dtype)
    if dq_ref is None:
      return dq
    return dq + _dot(ds.astype(k.dtype), k, NN)

  init = jnp.zeros(q.shape, jnp.float32) if with_dq else jnp.zeros((), jnp.float32)
  dq = lax.fori_loop(0, cnt_ref[qb], body, init)
  if dq_ref is not None:
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _lse2(lse):
  """Natural-log lse -> base 2, with -inf (empty rows) replaced by 0 (their p is 0 anyway)."""
  return jnp.where(jnp.isneginf(lse), 0.0, lse * LOG2E).astype(jnp.float32)


def _backward_inputs(q, k, v, do, lse, delta, q_ids, kv_ids, tiles, Tp, Sp, Dp, Ep, has_ids):
  """The backward kernels' operands padded to ``Tp`` / ``Sp`` rows and ``Dp`` / ``Ep`` columns (non-finite q / k / v
  zeroed: poisoned rows carry NaN in lse / delta), lse and delta in their kernel layout, ids padded apart."""
  q, k, v = backward_operands(q, k, v)
  return (pad_to(pad_to(q, 1, Tp), 3, Dp), pad_to(pad_to(k, 1, Sp), 3, Dp), pad_to(pad_to(v, 1, Sp), 3, Ep),
          pad_to(pad_to(do, 1, Tp), 3, Ep), pad_to(_lse2(lse), 2, Tp), pad_to(delta.astype(jnp.float32), 2, Tp),
          pad_to(q_ids, 1, Tp, -1) if has_ids else None, pad_to(kv_ids, 1, Sp, -2) if has_ids else None,
          _prep_tiles(tiles))


def flash_backward_dq(q, k, v, q_ids, kv_ids, do, lse, delta, lists: BlockLists, tiles, *, block_q: int,
                      block_k: int, scale: float, soft_cap: float | None = None, bias=None,
                      num_warps: int | None = None, num_stages: int = 2, interpret: bool = False):
  """``dq [B, T, H, D]`` (q's dtype) over the visited blocks.

  Args:
    do: ``[B, T, H, E]`` output cotangent.
    lse: ``[B, H, T]`` f32 from :func:`flash_forward`.
    delta: ``[B, H, T]`` f32, ``sum_e do * out - dlse`` (the softmax Jacobian's row term).
    lists, tiles: as :func:`flash_forward` for the ``(block_q, block_k)`` dq tile.
    bias: as :func:`flash_forward` (not differentiated here: see :func:`flash_backward_dq_dbias`).
    Other args as :func:`flash_forward`.
  """
  dq, _ = _dq_call(q, k, v, q_ids, kv_ids, do, lse, delta, lists, tiles, bias, block_q=block_q, block_k=block_k,
                   scale=scale, soft_cap=soft_cap, with_dq=True, dbias_dtype=None, num_warps=num_warps,
                   num_stages=num_stages, interpret=interpret)
  return dq


def flash_backward_dq_dbias(q, k, v, q_ids, kv_ids, do, lse, delta, lists: BlockLists, tiles, bias, *,
                            block_q: int, block_k: int, scale: float, soft_cap: float | None = None,
                            with_dq: bool = True, dbias_dtype=jnp.float32, num_warps: int | None = None,
                            num_stages: int = 2, interpret: bool = False):
  """``(dq [B, T, H, D] or None, dS [B, H, T, S])``: the dq kernel also writing the bias gradient per tile.

  ``dS = P * (dP - delta)`` (times ``1 - tanh^2`` with a soft cap) is the gradient of the pre-cap logits, hence of
  an additive bias before any summing over its broadcast dims (the caller sums, e.g. with
  :func:`pallas_kernels.softmax.bias.reduce_to`). Masked pairs and the blocks the lists skip are 0.

  Args:
    bias: ``[1|B, 1|H, T, S]`` float.
    with_dq: False skips the ``dS @ K`` product and the dq output (only the bias is differentiated).
    dbias_dtype: dtype of ``dS`` (f32 when it will be summed over broadcast dims).
    Other args as :func:`flash_backward_dq`.
  """
  return _dq_call(q, k, v, q_ids, kv_ids, do, lse, delta, lists, tiles, bias, block_q=block_q, block_k=block_k,
                  scale=scale, soft_cap=soft_cap, with_dq=with_dq, dbias_dtype=jnp.dtype(dbias_dtype),
                  num_warps=num_warps, num_stages=num_stages, interpret=interpret)


def _dq_call(q, k, v, q_ids, kv_ids, do, lse, delta, lists: BlockLists, tiles, bias, *, block_q, block_k, scale,
             soft_cap, with_dq, dbias_dtype, num_warps, num_stages, interpret):
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  nq, nk = pl.cdiv(T, block_q), pl.cdiv(S, block_k)
  Tp, Sp, Dp, Ep = nq * block_q, nk * block_k, padded_head_dim(D), padded_head_dim(E)
  name = "flash_backward_dq" if dbias_dtype is None else "flash_backward_dq_dbias"
  Bl, Hl = check_lists(name, lists, B, H, nq, tiles, (block_q, block_k))
  K = lists.index.shape[-1]
  has_ids = q_ids is not None
  with_dbias = dbias_dtype is not None
  if with_dbias and bias is None:
    raise ValueError(f"{name}: the bias gradient needs the bias")
  bias_spec, biasp = _bias_rows(bias, name, B, H, T, S, Tp, Sp, block_q, lambda i: nq - 1 - i)

  qp, kp, vp, dop, lse2, deltap, qid, kid, tiles = _backward_inputs(q, k, v, do, lse, delta, q_ids, kv_ids, tiles,
                                                                      Tp, Sp, Dp, Ep, has_ids)

  qb = lambda i: nq - 1 - i
  bsel = (lambda bh: bh // H) if Bl > 1 else (lambda bh: 0)
  hsel = (lambda bh: bh % H) if Hl > 1 else (lambda bh: 0)
  qspec = lambda d: pl.BlockSpec((None, block_q, None, d), lambda i, bh: (bh // H, qb(i), bh % H, 0))
  kvspec = lambda d: pl.BlockSpec((None, Sp, None, d), lambda i, bh: (bh // H, 0, (bh % H) // R, 0))
  rowspec = pl.BlockSpec((None, None, block_q), lambda i, bh: (bh // H, bh % H, qb(i)))
  listspec = pl.BlockSpec((None, None, None, K), lambda i, bh: (bsel(bh), hsel(bh), qb(i), 0))
  in_specs = [
      qspec(Dp), kvspec(Dp), kvspec(Ep), qspec(Ep), rowspec, rowspec,
      None if not has_ids else pl.BlockSpec((None, block_q), lambda i, bh: (bh // H, qb(i))),
      None if not has_ids else pl.BlockSpec((None, Sp), lambda i, bh: (bh // H, 0)),
      listspec,
      pl.BlockSpec((None, None, nq), lambda i, bh: (bsel(bh), hsel(bh), 0)),
      None if tiles is None else listspec,
      None if tiles is None else pl.BlockSpec(tiles.shape, lambda i, bh: (0, 0, 0)),
      bias_spec,
  ]
  out_specs, out_shape = [], []
  if with_dq:
    out_specs.append(qspec(Dp))
    out_shape.append(jax.ShapeDtypeStruct((B, Tp, H, Dp), q.dtype))
  if with_dbias:  # per query head, one [block_q, Sp] row strip per program (only visited tiles are written)
    out_specs.append(pl.BlockSpec((None, None, block_q, Sp), lambda i, bh: (bh // H, bh % H, qb(i), 0)))
    out_shape.append(jax.ShapeDtypeStruct((B, H, Tp, Sp), dbias_dtype))
  kernel = functools.partial(_dq_kernel, scale=scale, soft_cap=soft_cap, block_k=block_k, num_q_blocks=nq,
                             kv_len=S if (tiles is None and S != Sp) else None, with_dq=with_dq,
                             with_dbias=with_dbias)
  outs = pl.pallas_call(
      kernel,
      grid=(nq, B * H),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(num_warps if num_warps is not None else (4 if Dp <= 64 else 8), num_stages),
      interpret=interpret,
      name="jaxattn_flash_bwd_dq" + ("_dbias" if with_dbias else ""),
  )(qp, kp, vp, dop, lse2, deltap, qid, kid, lists.index, lists.count, lists.tile, tiles, biasp)
  dq = outs[0][:, :T, :, :D] if with_dq else None
  ds = zero_unvisited(outs[-1], lists.index, lists.count, block_q, block_k, T, S) if with_dbias else None
  return dq, ds


# --------------------------------------------------------------------------------------------------- dk/dv pass
def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qid_ref, kid_ref, idx_ref, cnt_ref, tid_ref,
                tiles_ref, bias_ref, dk_ref, dv_ref, *, scale, soft_cap, block_q, rep, per_head_lists, per_head_bias,
                kv_len):
  kb = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]  # [bk, Dp], [bk, Ep]
  bk = k.shape[0]
  kid = None if kid_ref is None else kid_ref[...]
  col0 = kb * bk

  def one_head(r, carry):
    lr = r if per_head_lists else 0

    def body(n, carry):
      dk, dv = carry
      qs = pl.ds(pl.multiple_of(idx_ref[lr, n] * block_q, block_q), block_q)
      q, do = q_ref[qs, r, :], do_ref[qs, r, :]
      lse2, delta = lse_ref[r, qs], delta_ref[r, qs]
      bias = None
      if bias_ref is not None:  # [bq, bk] of query head g * R + r (or of the broadcast head)
        bias = (bias_ref[r, qs, :] if per_head_bias else bias_ref[qs, :]).astype(jnp.float32)
      s, t = _logits(q, k, bias, scale=scale, soft_cap=soft_cap)
      keep = _allowed(s.shape, qid=None if qid_ref is None else qid_ref[qs], kid=kid, tiles_ref=tiles_ref,
                      tile_id=None if tid_ref is None else tid_ref[lr, n], col0=col0, kv_len=kv_len)
      if keep is not None:
        s = jnp.where(keep, s, -jnp.inf)
      p = jnp.exp2(s - lse2[:, None])  # [bq, bk]
      if keep is not None:  # masked entries are exact zeros, also in a row whose lse / delta is NaN
        p = jnp.where(keep, p, 0.0)
      dv = dv + _dot(p.astype(do.dtype), do, TN)
      dp = _dot(do, v, NT)
      ds = p * (dp - delta[:, None])
      if t is not None:
        ds = ds * (1.0 - t * t)
      if keep is not None:
        ds = jnp.where(keep, ds, 0.0)
      dk = dk + _dot(ds.astype(q.dtype), q, TN)
      return dk, dv

    return lax.fori_loop(0, cnt_ref[lr, kb], body, carry)

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = one_head(0, init) if rep == 1 else lax.fori_loop(0, rep, one_head, init)
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def flash_backward_dkv(q, k, v, q_ids, kv_ids, do, lse, delta, lists_t: BlockLists, tiles, *, block_q: int,
                       block_k: int, scale: float, soft_cap: float | None = None, bias=None,
                       num_warps: int | None = None, num_stages: int = 2, interpret: bool = False):
  """``dk [B, S, G, D]``, ``dv [B, S, G, E]`` (k's / v's dtype) over the visited blocks.

  One program per (kv block, batch x kv head) loops over the ``H // G`` query heads sharing the kv head and, for
  each, over the query blocks that visit this kv block.

  Args:
    lists_t: transposed :class:`BlockLists`: ``index [Bl, Hl, nK, Kt]`` query blocks per kv block
      (``nK = ceil(S / block_k)``), ``Hl`` indexing query heads as in the forward lists.
    tiles: ``[U, block_q, block_k]`` (same orientation as the forward: query rows x key columns), or None.
    bias: as :func:`flash_forward`; read as ``[Tp, block_k]`` column strips (the ``R`` query heads of the kv head,
      or the broadcast head).
    Other args as :func:`flash_backward_dq`.
  """
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  nq, nk = pl.cdiv(T, block_q), pl.cdiv(S, block_k)
  Tp, Sp, Dp, Ep = nq * block_q, nk * block_k, padded_head_dim(D), padded_head_dim(E)
  Bl, Hl = check_lists("flash_backward_dkv", lists_t, B, H, nk, tiles, (block_q, block_k))
  Kt = lists_t.index.shape[-1]
  has_ids = q_ids is not None
  Bb, Hb = (1, 1) if bias is None else check_bias("flash_backward_dkv", bias, B, H, T, S)

  qp, kp, vp, dop, lse2, deltap, qid, kid, tiles = _backward_inputs(q, k, v, do, lse, delta, q_ids, kv_ids, tiles,
                                                                      Tp, Sp, Dp, Ep, has_ids)

  # grid (kv block, batch x kv head); query-side blocks cover the R query heads of kv head g: [Tp, R, d].
  bsel = (lambda bg: bg // G) if Bl > 1 else (lambda bg: 0)
  hl = R if Hl > 1 else 1
  hsel = (lambda bg: bg % G) if Hl > 1 else (lambda bg: 0)  # block index in units of R heads
  qspec = lambda d: pl.BlockSpec((None, Tp, R, d), lambda j, bg: (bg // G, 0, bg % G, 0))
  kvspec = lambda d: pl.BlockSpec((None, block_k, None, d), lambda j, bg: (bg // G, j, bg % G, 0))
  rowspec = pl.BlockSpec((None, R, Tp), lambda j, bg: (bg // G, bg % G, 0))
  listspec = pl.BlockSpec((None, hl, None, Kt), lambda j, bg: (bsel(bg), hsel(bg), j, 0))
  in_specs = [
      qspec(Dp), kvspec(Dp), kvspec(Ep), qspec(Ep), rowspec, rowspec,
      None if not has_ids else pl.BlockSpec((None, Tp), lambda j, bg: (bg // G, 0)),
      None if not has_ids else pl.BlockSpec((None, block_k), lambda j, bg: (bg // G, j)),
      listspec,
      pl.BlockSpec((None, hl, nk), lambda j, bg: (bsel(bg), hsel(bg), 0)),
      None if tiles is None else listspec,
      None if tiles is None else pl.BlockSpec(tiles.shape, lambda j, bg: (0, 0, 0)),
      None,
  ]
  biasp = None
  if bias is not None:  # column strips [Tp, block_k]: the R query heads of kv head g, or block 0 of a size-1 dim
    bbsel = (lambda bg: bg // G) if Bb > 1 else (lambda bg: 0)
    if Hb > 1:
      in_specs[-1] = pl.BlockSpec((None, R, Tp, block_k), lambda j, bg: (bbsel(bg), bg % G, 0, j))
    else:
      in_specs[-1] = pl.BlockSpec((None, None, Tp, block_k), lambda j, bg: (bbsel(bg), 0, 0, j))
    biasp = pad_bias(bias, Tp, Sp)
  kernel = functools.partial(_dkv_kernel, scale=scale, soft_cap=soft_cap, block_q=block_q, rep=R,
                             per_head_lists=Hl > 1, per_head_bias=Hb > 1,
                             kv_len=S if (tiles is None and S != Sp) else None)
  dk, dv = pl.pallas_call(
      kernel,
      grid=(nk, B * G),
      in_specs=in_specs,
      out_specs=[kvspec(Dp), kvspec(Ep)],
      out_shape=[jax.ShapeDtypeStruct((B, Sp, G, Dp), k.dtype), jax.ShapeDtypeStruct((B, Sp, G, Ep), v.dtype)],
      compiler_params=_params(num_warps if num_warps is not None else (4 if max(Dp, Ep) <= 64 else 8),
                              num_stages),
      interpret=interpret,
      name="jaxattn_flash_bwd_dkv",
  )(qp, kp, vp, dop, lse2, deltap, qid, kid, lists_t.index, lists_t.count, lists_t.tile, tiles, biasp)
  return dk[:, :S, :, :D], dv[:, :S, :, :E]
