"""Mosaic TPU flash attention over block-sparse visiting lists (splash-attention style), forward and backward.

Algorithm: FlashAttention-2 online softmax. Each query block walks a *list* of kv blocks (only the non-empty ones of
the mask), keeping the running max ``m``, sum ``l`` and accumulator ``acc`` in f32 VMEM scratch. Backward recomputes
the probabilities from the saved log-sum-exp in two kernels: dq (same grid and lists as the forward) and dk/dv
(over the transposed lists: for each kv block, the query blocks that visit it).

Grids (the last axes are sequential, "arbitrary"; the others "parallel"):

- forward, dq: ``(B, H, nQ, K)``; step ``j`` of query block ``i`` reads kv block ``kv_index[b, h, i, j]``.
- dk/dv:       ``(B, G, nK, R, Kt)`` with ``R = H // G``; ``(r, j)`` walks the query heads of kv head ``g`` and, for
  each, the query blocks ``q_index[b, g * R + r, kb, j]``. The dk/dv scratch accumulates over the whole group, so
  GQA gradients are summed in-kernel and written once per kv block (no ``[B, S, H, D]`` intermediate).

Scalar prefetch (SMEM, flattened int32 1-D so nothing is padded): the kv block to fetch at every grid step, the
counts, the partial-tile id of every step and the tile to fetch. Steps past a row's count re-point every index map
to the block fetched last (the lists are "carried forward" in grid order), so the pipeline fetches nothing new, and
the body is skipped with ``pl.when(j < count)``. Full blocks run a body without tile masking (segment ids, if any,
still apply); partial blocks read their boolean pattern from ``tiles [U, bq, bk]`` (int8, deduplicated), whose block
is chosen by the tile id in the index map. A full block between two partial ones keeps the last tile resident, so
equal tiles (e.g. every causal diagonal block) are fetched once.

Layouts: a ``[B, L, N, F]`` operand with ``F % 128 == 0`` is read in place as ``[B, L, N * F]`` (block
``(bl, F)`` at column block ``n``: no transpose); other head dims use ``[B, N, L, F]``. Segment ids and lse/delta are
lane- or sublane-broadcast (``[B, Tp, 128]`` / ``[B, 8, Sp]``) so every block obeys the (8, 128) tiling rule.
Rows with no allowed key give output 0, lse ``-inf`` and zero gradients (no NaN: ``-inf`` maxima are shifted by 0).
T and S are zero-padded to whole blocks outside the kernels (``jnp.pad``); padded keys are masked in the forward and
dq kernels (by the tiles, or by an iota bound on the last kv block when lists come without tiles); padded query rows
are dropped, and zero padding contributes nothing to dk/dv.

Bias (optional, every kernel): an additive ``[Bb, Hb, T, S]`` bias (``Bb in {1, B}``, ``Hb in {1, H}`` query heads;
a size-1 dim is read at block 0 by the index maps, never materialised) is added after the scale and before the soft
cap, one ``(bq, bk)`` block per visited step (the dk/dv kernel transposes it in VMEM, so there ``block_k`` is a lane
dim of the bias block too). :func:`flash_attention_bwd_dq_dbias` also writes ``dS`` per visited block into a
``[B, H, Tp, Sp]`` output (:mod:`pallas_kernels.softmax.bias`).

VMEM per step (forward, bq = bk = 512, D = E = 128, bf16): q, k, v, out blocks double-buffered (~1 MiB), m / l
scratch ``(bq, 128)`` f32 and acc ``(bq, E)`` f32 (0.75 MiB), an int8 tile (0.5 MiB double-buffered) and the
``[bq, bk]`` f32 logits / probabilities (~2 MiB): well inside the default scoped VMEM limit.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import NT
from pallas_kernels.common.nonfinite import backward_operands, forward_operands
from pallas_kernels.softmax.bias import check_bias, pad_bias, zero_unvisited

NUM_LANES = 128
NUM_SUBLANES = 8
DEFAULT_BLOCK = 512

_F32 = jnp.float32


# ------------------------------------------------------------------------------------------------ block sizes
# (config field, axis, role, what): "lane" sizes are the minor dim of some block (multiple of 128), "sublane" sizes
# only the second-minor dim (multiple of 8); a size equal to the whole (clamped) axis is always legal.
TILE_ROLES = (
    ("block_q", "T", "sublane", "rows of the q / out / lse blocks"),
    ("block_k", "S", "lane", "lanes of the logits and kv segment-id blocks"),
    ("block_q_dq", "T", "sublane", "rows of the q / dq / lse blocks"),
    ("block_k_dq", "S", "lane", "lanes of the logits and kv segment-id blocks"),
    ("block_q_dkv", "T", "lane", "lanes of the transposed logits, lse / delta and q segment-id blocks"),
    ("block_k_dkv", "S", "sublane", "rows of the k / v / dk / dv blocks"),
)


def check_block(block: int, length: int, role: str, name: str = "block", axis: str = "L", what: str = "") -> int:
  """Clamps ``block`` to ``length`` and checks the (8, 128) rule for its role (``"lane"`` / ``"sublane"``)."""
  block = min(int(block), int(length))
  mult = NUM_LANES if role == "lane" else NUM_SUBLANES
  if block < length and block % mult:
    raise ValueError(
        f"{name}={block} breaks the TPU ({NUM_SUBLANES}, {NUM_LANES}) tiling rule: it is a {role} dim ({what}), so "
        f"it must be a multiple of {mult} or cover the whole axis ({axis}={length})")
  return block


# ------------------------------------------------------------------------------------------------ visiting lists
class VisitLists(NamedTuple):
  """Per query block (or, transposed, per kv block) the blocks to visit.

  ``index [Bl, Hl, n, K]`` int32 block ids (first ``count`` valid), ``count [Bl, Hl, n]``, ``tile [Bl, Hl, n, K]``
  (0 = full block, ``t >= 1`` = partial block with pattern ``tiles[t]``). ``Bl`` is 1 or B, ``Hl`` 1 or H (query
  heads). Entries past ``count`` are ignored.
  """

  index: Any
  count: Any
  tile: Any


@dataclasses.dataclass(frozen=True)
class _Geom:
  """Static shape of flattened lists: slot of grid step ``(b, h, i, j)``."""

  Bl: int
  Hl: int
  n: int
  K: int

  def row(self, b, h, i):
    bb = b if self.Bl > 1 else 0
    hh = h if self.Hl > 1 else 0
    return (bb * self.Hl + hh) * self.n + i

  def slot(self, b, h, i, j):
    return self.row(b, h, i) * self.K + j


def flatten_lists(lists: VisitLists, with_tiles: bool):
  """The scalar-prefetch operands: ``[fetch_index, count, (tile, fetch_tile)]`` as flat int32 arrays.

  ``fetch_index`` equals ``index`` on valid steps and carries the last valid entry (in grid order) forward over
  invalid ones; ``fetch_tile`` carries the last *partial* tile over full and invalid steps, so the pipeline does not
  refetch tiles it already holds. Works on numpy or traced lists.
  """
  index = jnp.asarray(lists.index, jnp.int32)
  count = jnp.asarray(lists.count, jnp.int32)
  K = index.shape[-1]
  valid = (jnp.arange(K, dtype=jnp.int32) < count[..., None]).reshape(-1)
  pos = jnp.arange(valid.size, dtype=jnp.int32)

  def carry(vals, ok):
    last = lax.cummax(jnp.where(ok, pos, -1), axis=0)
    return vals[jnp.where(last >= 0, last, jnp.argmax(ok))]

  out = [carry(index.reshape(-1), valid), count.reshape(-1)]
  if with_tiles:
    tile = jnp.where(valid, jnp.asarray(lists.tile, jnp.int32).reshape(-1), 0)
    out += [tile, carry(tile, tile > 0)]
  return out


def _geom(lists: VisitLists) -> _Geom:
  Bl, Hl, n, K = np.shape(lists.index)
  if np.shape(lists.count) != (Bl, Hl, n) or np.shape(lists.tile) != (Bl, Hl, n, K):
    raise ValueError(f"list shapes disagree: index {np.shape(lists.index)}, count {np.shape(lists.count)}, "
                     f"tile {np.shape(lists.tile)}")
  return _Geom(Bl, Hl, n, K)


def _check_lists(g: _Geom, B: int, H: int, n: int, what: str):
  if g.Bl not in (1, B) or g.Hl not in (1, H) or g.n != n:
    raise ValueError(f"{what} lists have shape [{g.Bl}, {g.Hl}, {g.n}, {g.K}], expected [1|{B}, 1|{H}, {n}, K]")


# ------------------------------------------------------------------------------------------------ layouts
@dataclasses.dataclass(frozen=True)
class _Operand:
  """How a ``[B, L, N, F]`` tensor sits in HBM for the kernel and the BlockSpec reading ``(block, F)`` tiles."""

  fused: bool  # [B, Lp, N * F] (F % 128 == 0) else [B, N, Lp, F]
  block: int
  feat: int

  def spec(self, index):
    """``index(*grid, *prefetch) -> (b, head, seq_block)``."""
    if self.fused:
      return pl.BlockSpec((None, self.block, self.feat), lambda *a: _fused_idx(*index(*a)))
    return pl.BlockSpec((None, None, self.block, self.feat), lambda *a: _split_idx(*index(*a)))

  def shape(self, B, Lp, N):
    return (B, Lp, N * self.feat) if self.fused else (B, N, Lp, self.feat)


def _fused_idx(b, n, s):
  return b, s, n


def _split_idx(b, n, s):
  return b, n, s, 0


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _to_kernel(x, block: int):
  """``[B, L, N, F] -> (kernel array, _Operand)``, padding L to a multiple of ``block``."""
  B, L, N, F = x.shape
  Lp = _round_up(L, block)
  if Lp != L:
    x = jnp.pad(x, ((0, 0), (0, Lp - L), (0, 0), (0, 0)))
  op = _Operand(F % NUM_LANES == 0, block, F)
  return (x.reshape(B, Lp, N * F) if op.fused else x.transpose(0, 2, 1, 3)), op


def _from_kernel(y, op: _Operand, B: int, L: int, N: int):
  """Inverse of :func:`_to_kernel` (drops the padding)."""
  if op.fused:
    return y.reshape(B, -1, N, op.feat)[:, :L]
  return y.transpose(0, 2, 1, 3)[:, :L]


def _pad_last(x, Lp: int, value=0):
  L = x.shape[-1]
  return x if Lp == L else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, Lp - L)], constant_values=value)


def _ids_cols(ids, Lp: int):
  """``[B, L] -> [B, Lp, 128]`` (ids down the sublanes, broadcast over lanes)."""
  ids = _pad_last(jnp.asarray(ids, jnp.int32), Lp)
  return jnp.broadcast_to(ids[:, :, None], (*ids.shape, NUM_LANES))


def _ids_rows(ids, Lp: int):
  """``[B, L] -> [B, 8, Lp]`` (ids along the lanes, broadcast over sublanes)."""
  ids = _pad_last(jnp.asarray(ids, jnp.int32), Lp)
  return jnp.broadcast_to(ids[:, None, :], (ids.shape[0], NUM_SUBLANES, Lp))


def _rows_cols(x, Lp: int):
  """``[B, H, L] f32 -> [B, H, Lp, 128]`` (``-inf`` -> 0, so masked rows give ``exp(-inf) = 0``, never NaN)."""
  x = _pad_last(jnp.where(jnp.isneginf(x), 0.0, x).astype(_F32), Lp)
  return jnp.broadcast_to(x[..., None], (*x.shape, NUM_LANES))


def _rows_rows(x, Lp: int):
  """``[B, H, L] f32 -> [B, H, 8, Lp]``."""
  x = _pad_last(jnp.where(jnp.isneginf(x), 0.0, x).astype(_F32), Lp)
  return jnp.broadcast_to(x[:, :, None, :], (*x.shape[:2], NUM_SUBLANES, Lp))


def lanes(x, n: int):
  """``[r, 128]`` lane-replicated values -> ``[r, n]``."""
  if n % NUM_LANES == 0:
    return x if n == NUM_LANES else jnp.tile(x, (1, n // NUM_LANES))
  if n < NUM_LANES:
    return x[:, :n]
  return jnp.broadcast_to(x[:, :1], (x.shape[0], n))


def _interpret(interpret):
  return pltpu.InterpretParams() if interpret is True else (interpret or False)


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _tiles(tiles, transpose: bool = False):
  t = np.asarray(tiles) if isinstance(tiles, np.ndarray) else tiles
  if isinstance(t, np.ndarray):
    t = (t != 0).astype(np.int8)
    return np.ascontiguousarray(t.transpose(0, 2, 1)) if transpose else t
  t = (jnp.asarray(t) != 0).astype(jnp.int8)
  return t.transpose(0, 2, 1) if transpose else t


def _logits(s, cap):
  """Soft cap ``cap * tanh(s / cap)``; returns ``(s, tanh)`` (tanh is None without a cap)."""
  if cap is None:
    return s, None
  t = jnp.tanh(s / cap)
  return cap * t, t


def _unpack(refs, *groups):
  """Splits the flat ref list into groups of given sizes (0-sized groups give None)."""
  out, k = [], 0
  for n in groups:
    if n == 0:
      out.append(None)
    elif n == 1:
      out.append(refs[k])
    else:
      out.append(tuple(refs[k:k + n]))
    k += n
  assert k == len(refs), (k, len(refs))
  return out


def _div(h, r: int):
  return h if r == 1 else lax.div(h, r)


def _bias_spec(name, bias, B, H, T, S, bq, bk, geom):
  """The ``(bq, bk)`` bias block of a grid ``(b, h, i, j)`` step (forward, dq): query block ``i``, the kv block of
  the step's list entry; a size-1 batch / head dim reads its block 0."""
  Bb, Hb = check_bias(name, bias, B, H, T, S)

  def index(b, h, i, j, idx_ref, *_):
    return (b if Bb > 1 else 0), (h if Hb > 1 else 0), i, idx_ref[geom.slot(b, h, i, j)]

  return pl.BlockSpec((None, None, bq, bk), index)


class _Control:
  """Per-step control of the forward / dq kernels: validity, which body to run, and the mask of a masked step.

  A step runs the masked body when its list entry is a partial tile or it is the last kv block and ``S`` is not a
  block multiple (padded keys have logit ``q . 0`` and must not enter the softmax; with static masks the tiles
  already mask them, data-dependent lists may come without tiles). Every other valid step runs unmasked.
  """

  def __init__(self, pref, slot, row, bk: int, kv_len: int):
    self.pref, self.slot, self.row, self.bk, self.kv_len = pref, slot, row, bk, kv_len
    self.has_tiles = len(pref) == 4
    self.kv_blk = pref[0][slot]
    self.partial = pref[2][slot] > 0 if self.has_tiles else None
    self.edge = (self.kv_blk == kv_len // bk) if kv_len % bk else None

  def run(self, j, step):
    valid = j < self.pref[1][self.row]
    need = [c for c in (self.partial, self.edge) if c is not None]
    if not need:
      pl.when(valid)(lambda: step(False))
      return
    need = functools.reduce(jnp.logical_or, need)
    pl.when(valid & need)(lambda: step(True))
    pl.when(valid & jnp.logical_not(need))(lambda: step(False))

  def keep(self, masked: bool, shape, tile_ref, seg):
    """Boolean ``[bq, bk]`` of allowed pairs (None: all allowed)."""
    keep = []
    if masked and self.has_tiles:
      # int8 in memory (bool would be i32); the resident tile belongs to this step only if it is partial.
      tile = tile_ref[...].astype(jnp.int32) != 0
      keep.append(tile | jnp.broadcast_to(jnp.logical_not(self.partial), shape))
    if masked and self.edge is not None:
      keep.append(lax.broadcasted_iota(jnp.int32, shape, 1) + self.kv_blk * self.bk < self.kv_len)
    if seg is not None:
      keep.append(lanes(seg[0][...], shape[1]) == seg[1][:1, :])
    return functools.reduce(jnp.logical_and, keep) if keep else None


# ------------------------------------------------------------------------------------------------ forward
def _fwd_kernel(*refs, geom: _Geom, has_seg: bool, has_tiles: bool, has_bias: bool, kv_len: int, with_lse: bool,
                scale: float, cap, prec):
  npf = 4 if has_tiles else 2
  (pref, (q_ref, k_ref, v_ref), seg, tile_ref, bias_ref, o_ref, lse_ref, (m_scr, l_scr, acc_scr)) = _unpack(
      refs, npf, 3, 2 if has_seg else 0, int(has_tiles), int(has_bias), 1, int(with_lse), 3)
  b, h, i, j = (pl.program_id(a) for a in range(4))
  bk, E = k_ref.shape[0], v_ref.shape[-1]

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, _F32)
    l_scr[...] = jnp.zeros(l_scr.shape, _F32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, _F32)

  ctl = _Control(pref, geom.slot(b, h, i, j), geom.row(b, h, i), bk, kv_len)

  def step(masked: bool):
    s = lax.dot_general(q_ref[...], k_ref[...], NT, preferred_element_type=_F32, precision=prec) * scale  # [bq, bk]
    if bias_ref is not None:
      s = s + bias_ref[...].astype(_F32)
    s, _ = _logits(s, cap)
    keep = ctl.keep(masked, s.shape, tile_ref, seg)
    if keep is not None:
      s = jnp.where(keep, s, -jnp.inf)
    m_prev, l_prev = m_scr[...], l_scr[...]  # [bq, 128]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    m_safe = jnp.where(jnp.isneginf(m_next), 0.0, m_next)  # all-masked so far: shift by 0, p = 0
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - lanes(m_safe, bk))
    l_scr[...] = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
    m_scr[...] = m_next
    v = v_ref[...]
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=_F32, precision=prec)
    acc_scr[...] = acc_scr[...] * lanes(alpha, E) + pv

  ctl.run(j, step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _end():
    l = l_scr[...]
    ok = l != 0  # a NaN l (the row attends a non-finite input) keeps its NaN output and lse
    inv = jnp.where(ok, 1.0 / jnp.where(ok, l, 1.0), 0.0)
    o_ref[...] = (acc_scr[...] * lanes(inv, E)).astype(o_ref.dtype)
    if with_lse:
      lse_ref[...] = jnp.where(ok, m_scr[...] + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf)


def _row_mask_inputs(geom, bq: int, bk: int, Tp: int, Sp: int, q_segment_ids, kv_segment_ids, tiles):
  """Block specs and operands of the mask inputs (segment ids, tile patterns) of a row-oriented grid
  ``(b, h, i, j)`` whose step ``j`` visits kv block ``idx_ref[geom.slot(b, h, i, j)]`` (forward, stats)."""
  specs, ops = [], []
  if q_segment_ids is not None:
    specs += [pl.BlockSpec((None, bq, NUM_LANES), lambda b, h, i, j, *_: (b, i, 0)),
              pl.BlockSpec((None, NUM_SUBLANES, bk), lambda b, h, i, j, idx_ref, *_: (
                  b, 0, idx_ref[geom.slot(b, h, i, j)]))]
    ops += [_ids_cols(q_segment_ids, Tp), _ids_rows(kv_segment_ids, Sp)]
  if tiles is not None:
    specs.append(pl.BlockSpec((None, bq, bk), lambda b, h, i, j, idx_ref, cnt_ref, tile_ref, fetch_ref: (
        fetch_ref[geom.slot(b, h, i, j)], 0, 0)))
    ops.append(_tiles(tiles))
  return specs, ops


def flash_attention_fwd(q, k, v, lists: VisitLists, tiles=None, *, q_segment_ids=None, kv_segment_ids=None,
                        scale: float, soft_cap: float | None = None, block_q: int, block_k: int,
                        return_lse: bool = True, interpret=False, vmem_limit_bytes: int | None = None, bias=None):
  """Forward flash attention over visiting lists.

  Args:
    q: ``[B, T, H, D]``; k: ``[B, S, G, D]``; v: ``[B, S, G, E]`` (``H % G == 0``; head ``h`` reads kv head
      ``h // (H // G)`` through the index map).
    lists: per query block (``nQ = ceil(T / block_q)``) the kv blocks (of ``block_k``) to visit,
      ``[1|B, 1|H, nQ, K]``.
    tiles: ``[U, block_q, block_k]`` bool/int partial-block patterns (tile 0 unused), or None when no list entry is
      partial. Padded keys (``S`` not a block multiple) are masked by the kernel itself; padded query rows are
      dropped.
    q_segment_ids, kv_segment_ids: optional int ``[B, T]`` / ``[B, S]``.
    scale: logit scale; soft_cap: optional ``cap`` for ``cap * tanh(s / cap)``.
    block_q, block_k: tiles, checked against the (8, 128) rule (block_k is a lane dim).
    return_lse: also write the log-sum-exp.
    interpret: False (compile with Mosaic), True / ``pltpu.InterpretParams(...)`` (TPU interpret mode).
    vmem_limit_bytes: the Mosaic scoped-VMEM limit (None: the compiler's default).
    bias: None or an additive ``[1|B, 1|H, T, S]`` float bias (after the scale, before the cap).

  Returns:
    ``out [B, T, H, E]`` in q's dtype and ``lse [B, H, T]`` f32 (``-inf`` for rows without allowed keys) or None.
  """
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  bq = check_block(block_q, T, "sublane", "block_q", "T", "rows of the q / out / lse blocks")
  bk = check_block(block_k, S, "lane", "block_k", "S", "lanes of the logits and kv segment-id blocks")
  nq, nk = -(-T // bq), -(-S // bk)
  Tp, Sp = nq * bq, nk * bk
  geom = _geom(lists)
  _check_lists(geom, B, H, nq, "kv")
  has_tiles, has_seg = tiles is not None, q_segment_ids is not None
  pref = flatten_lists(lists, has_tiles)

  q, k, v = forward_operands(q, k, v)  # non-finite inputs reach allowed pairs only (pallas_kernels.common.nonfinite)
  qk, qop = _to_kernel(q, bq)
  kk, kop = _to_kernel(k, bk)
  vk, vop = _to_kernel(v, bk)
  oop = _Operand(E % NUM_LANES == 0, bq, E)

  def q_idx(b, h, i, j, *_):
    return b, h, i

  def kv_idx(b, h, i, j, idx_ref, *_):
    return b, _div(h, R), idx_ref[geom.slot(b, h, i, j)]

  in_specs = [qop.spec(q_idx), kop.spec(kv_idx), vop.spec(kv_idx)]
  operands = [qk, kk, vk]
  specs, ops = _row_mask_inputs(geom, bq, bk, Tp, Sp, q_segment_ids, kv_segment_ids, tiles)
  in_specs += specs
  operands += ops
  has_bias = bias is not None
  if has_bias:
    in_specs.append(_bias_spec("flash_attention_fwd", bias, B, H, T, S, bq, bk, geom))
    operands.append(pad_bias(bias, Tp, Sp))
  out_specs = [oop.spec(q_idx)]
  out_shape = [jax.ShapeDtypeStruct(oop.shape(B, Tp, H), q.dtype)]
  if return_lse:
    out_specs.append(pl.BlockSpec((None, None, bq, NUM_LANES), lambda b, h, i, j, *_: (b, h, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((B, H, Tp, NUM_LANES), _F32))

  kernel = functools.partial(_fwd_kernel, geom=geom, has_seg=has_seg, has_tiles=has_tiles, has_bias=has_bias,
                             kv_len=S, with_lse=return_lse, scale=float(scale), cap=soft_cap, prec=_precision(q.dtype))
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(pref), grid=(B, H, nq, geom.K), in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((bq, NUM_LANES), _F32), pltpu.VMEM((bq, NUM_LANES), _F32),
                          pltpu.VMEM((bq, E), _F32)]),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
                                           vmem_limit_bytes=vmem_limit_bytes),
      interpret=_interpret(interpret),
      name="jaxattn_flash_fwd",
  )(*pref, *operands)
  out = _from_kernel(outs[0], oop, B, T, H)
  lse = outs[1][:, :, :T, 0] if return_lse else None
  return out, lse


# ------------------------------------------------------------------------------------------------ backward: dq
def _dq_kernel(*refs, geom: _Geom, has_seg: bool, has_tiles: bool, has_bias: bool, with_dq: bool, with_dbias: bool,
               kv_len: int, scale: float, cap, prec):
  npf = 4 if has_tiles else 2
  (pref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), seg, tile_ref, bias_ref, dq_ref, db_ref,
   dq_scr) = _unpack(refs, npf, 6, 2 if has_seg else 0, int(has_tiles), int(has_bias), int(with_dq),
                     int(with_dbias), int(with_dq))
  b, h, i, j = (pl.program_id(a) for a in range(4))
  bk = k_ref.shape[0]
  ctl = _Control(pref, geom.slot(b, h, i, j), geom.row(b, h, i), bk, kv_len)

  if with_dq:
    @pl.when(j == 0)
    def _init():
      dq_scr[...] = jnp.zeros(dq_scr.shape, _F32)

  def step(masked: bool):
    k, v = k_ref[...], v_ref[...]
    s = lax.dot_general(q_ref[...], k, NT, preferred_element_type=_F32, precision=prec) * scale  # [bq, bk]
    if bias_ref is not None:
      s = s + bias_ref[...].astype(_F32)
    s, t = _logits(s, cap)
    keep = ctl.keep(masked, s.shape, tile_ref, seg)
    if keep is not None:
      s = jnp.where(keep, s, -jnp.inf)
    p = jnp.exp(s - lanes(lse_ref[...], bk))
    dp = lax.dot_general(do_ref[...], v, NT, preferred_element_type=_F32, precision=prec)  # [bq, bk]
    ds = p * (dp - lanes(delta_ref[...], bk))
    if t is not None:
      ds = ds * (1.0 - t * t)
    if keep is not None:  # masked entries are exact zeros, also in a row whose lse / delta is NaN
      ds = jnp.where(keep, ds, 0.0)
    if db_ref is not None:  # dS is the gradient of the pre-cap logits, i.e. of the bias (before any summing)
      db_ref[...] = ds.astype(db_ref.dtype)
    if dq_scr is not None:
      dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=_F32, precision=prec)

  ctl.run(j, step)

  if with_dq:
    @pl.when(j == pl.num_programs(3) - 1)
    def _end():
      dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def flash_attention_bwd_dq(q, k, v, do, lse, delta, lists: VisitLists, tiles=None, *, q_segment_ids=None,
                           kv_segment_ids=None, scale: float, soft_cap: float | None = None, block_q: int,
                           block_k: int, interpret=False, vmem_limit_bytes: int | None = None, bias=None):
  """dq of flash attention: ``dq_i = scale * sum_j P_ij (dP_ij - delta_i) (1 - tanh^2) k_j`` over visited blocks.

  Args:
    q, k, v: as in :func:`flash_attention_fwd`; do: ``[B, T, H, E]``.
    lse: ``[B, H, T]`` f32 from the forward; delta: ``[B, H, T]`` f32, ``sum_e dO * O`` minus the lse cotangent.
    lists, tiles, segment ids, scale, soft_cap, block sizes, interpret, bias: as in the forward (its own block
      sizes; the bias is not differentiated here: see :func:`flash_attention_bwd_dq_dbias`).

  Returns:
    ``dq [B, T, H, D]`` in q's dtype.
  """
  dq, _ = _dq_call(q, k, v, do, lse, delta, lists, tiles, bias, q_segment_ids=q_segment_ids,
                   kv_segment_ids=kv_segment_ids, scale=scale, soft_cap=soft_cap, block_q=block_q, block_k=block_k,
                   interpret=interpret, vmem_limit_bytes=vmem_limit_bytes, with_dq=True, dbias_dtype=None)
  return dq


def flash_attention_bwd_dq_dbias(q, k, v, do, lse, delta, lists: VisitLists, tiles, bias, *, q_segment_ids=None,
                                 kv_segment_ids=None, scale: float, soft_cap: float | None = None, block_q: int,
                                 block_k: int, with_dq: bool = True, dbias_dtype=jnp.float32, interpret=False,
                                 vmem_limit_bytes: int | None = None):
  """``(dq [B, T, H, D] or None, dS [B, H, T, S])``: the dq kernel also writing the bias gradient per visited block.

  ``dS = P * (dP - delta)`` (times ``1 - tanh^2`` with a soft cap) is the gradient of the pre-cap logits, so of an
  additive bias before summing over its broadcast dims (the caller sums, e.g. with
  :func:`pallas_kernels.softmax.bias.reduce_to`). Masked pairs and blocks the lists skip are 0.

  Args:
    bias: ``[1|B, 1|H, T, S]`` float.
    with_dq: False drops the ``dS @ K`` product, its scratch and the dq output.
    dbias_dtype: dtype of ``dS`` (f32 when it will be summed over broadcast dims).
    Other args as :func:`flash_attention_bwd_dq`.
  """
  return _dq_call(q, k, v, do, lse, delta, lists, tiles, bias, q_segment_ids=q_segment_ids,
                  kv_segment_ids=kv_segment_ids, scale=scale, soft_cap=soft_cap, block_q=block_q, block_k=block_k,
                  interpret=interpret, vmem_limit_bytes=vmem_limit_bytes, with_dq=with_dq,
                  dbias_dtype=jnp.dtype(dbias_dtype))


def _dq_call(q, k, v, do, lse, delta, lists: VisitLists, tiles, bias, *, q_segment_ids, kv_segment_ids, scale,
             soft_cap, block_q, block_k, interpret, vmem_limit_bytes, with_dq, dbias_dtype):
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  bq = check_block(block_q, T, "sublane", "block_q_dq", "T", "rows of the q / dq / lse blocks")
  bk = check_block(block_k, S, "lane", "block_k_dq", "S", "lanes of the logits and kv segment-id blocks")
  nq, nk = -(-T // bq), -(-S // bk)
  Tp, Sp = nq * bq, nk * bk
  geom = _geom(lists)
  _check_lists(geom, B, H, nq, "kv")
  has_tiles, has_seg = tiles is not None, q_segment_ids is not None
  with_dbias = dbias_dtype is not None
  name = "flash_attention_bwd_dq_dbias" if with_dbias else "flash_attention_bwd_dq"
  if with_dbias and bias is None:
    raise ValueError(f"{name}: the bias gradient needs the bias")
  pref = flatten_lists(lists, has_tiles)

  q, k, v = backward_operands(q, k, v)  # zeroed; poisoned rows carry NaN in lse / delta
  qk, qop = _to_kernel(q, bq)
  dok, doop = _to_kernel(do, bq)
  kk, kop = _to_kernel(k, bk)
  vk, vop = _to_kernel(v, bk)

  def q_idx(b, h, i, j, *_):
    return b, h, i

  def kv_idx(b, h, i, j, idx_ref, *_):
    return b, _div(h, R), idx_ref[geom.slot(b, h, i, j)]

  row_spec = pl.BlockSpec((None, None, bq, NUM_LANES), lambda b, h, i, j, *_: (b, h, i, 0))
  in_specs = [qop.spec(q_idx), kop.spec(kv_idx), vop.spec(kv_idx), doop.spec(q_idx), row_spec, row_spec]
  operands = [qk, kk, vk, dok, _rows_cols(lse, Tp), _rows_cols(delta, Tp)]
  specs, ops = _row_mask_inputs(geom, bq, bk, Tp, Sp, q_segment_ids, kv_segment_ids, tiles)
  in_specs += specs
  operands += ops
  has_bias = bias is not None
  if has_bias:
    in_specs.append(_bias_spec(name, bias, B, H, T, S, bq, bk, geom))
    operands.append(pad_bias(bias, Tp, Sp))
  dqop = _Operand(D % NUM_LANES == 0, bq, D)
  out_specs, out_shape, scratch = [], [], []
  if with_dq:
    out_specs.append(dqop.spec(q_idx))
    out_shape.append(jax.ShapeDtypeStruct(dqop.shape(B, Tp, H), q.dtype))
    scratch.append(pltpu.VMEM((bq, D), _F32))
  if with_dbias:
    # Per query head, the step's (bq, bk) block. Steps past the count keep the last visited block index, so nothing
    # is written back in between; blocks the lists skip (and a row with count 0) are selected to 0 afterwards.
    out_specs.append(pl.BlockSpec((None, None, bq, bk), lambda b, h, i, j, idx_ref, *_: (
        b, h, i, idx_ref[geom.slot(b, h, i, j)])))
    out_shape.append(jax.ShapeDtypeStruct((B, H, Tp, Sp), dbias_dtype))

  kernel = functools.partial(_dq_kernel, geom=geom, has_seg=has_seg, has_tiles=has_tiles, has_bias=has_bias,
                             with_dq=with_dq, with_dbias=with_dbias, kv_len=S, scale=float(scale), cap=soft_cap,
                             prec=_precision(q.dtype))
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(pref), grid=(B, H, nq, geom.K), in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
                                           vmem_limit_bytes=vmem_limit_bytes),
      interpret=_interpret(interpret),
      name="jaxattn_flash_bwd_dq" + ("_dbias" if with_dbias else ""),
  )(*pref, *operands)
  dq = _from_kernel(outs[0], dqop, B, T, H) if with_dq else None
  ds = zero_unvisited(outs[-1], lists.index, lists.count, bq, bk, T, S) if with_dbias else None
  return dq, ds


# ------------------------------------------------------------------------------------------------ backward: dk/dv
def _dkv_kernel(*refs, geom: _Geom, R: int, has_seg: bool, has_tiles: bool, has_bias: bool, scale: float, cap,
                prec):
  npf = 4 if has_tiles else 2
  (pref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), seg, tile_ref, bias_ref, (dk_ref, dv_ref),
   (dk_scr, dv_scr)) = _unpack(refs, npf, 6, 2 if has_seg else 0, int(has_tiles), int(has_bias), 2, 2)
  cnt_ref = pref[1]
  b, g, kb, r, j = (pl.program_id(a) for a in range(5))
  h = g * R + r
  slot = geom.slot(b, h, kb, j)
  bq = q_ref.shape[0]

  @pl.when((r == 0) & (j == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, _F32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, _F32)

  def step(masked: bool):
    # Transposed orientation ([bk, bq]: keys on sublanes) so dk/dv are plain (bk, bq) @ (bq, F) products.
    q, do = q_ref[...], do_ref[...]
    st = lax.dot_general(k_ref[...], q, NT, preferred_element_type=_F32, precision=prec) * scale  # [bk, bq]
    if bias_ref is not None:  # the (bq, bk) bias block, transposed in VMEM
      st = st + bias_ref[...].astype(_F32).T
    st, t = _logits(st, cap)
    keep = None
    if masked:
      keep = tile_ref[...].astype(jnp.int32) != 0  # int8 in memory (4x less than bool's i32)
    if has_seg:
      same = seg[0][:1, :] == lanes(seg[1][...], bq)
      keep = same if keep is None else keep & same
    if keep is not None:
      st = jnp.where(keep, st, -jnp.inf)
    pt = jnp.exp(st - lse_ref[:1, :])
    if keep is not None:  # masked entries are exact zeros, also in a row whose lse / delta is NaN
      pt = jnp.where(keep, pt, 0.0)
    dv_scr[...] += jnp.dot(pt.astype(do.dtype), do, preferred_element_type=_F32, precision=prec)
    dpt = lax.dot_general(v_ref[...], do, NT, preferred_element_type=_F32, precision=prec)  # [bk, bq]
    dst = pt * (dpt - delta_ref[:1, :])
    if t is not None:
      dst = dst * (1.0 - t * t)
    if keep is not None:
      dst = jnp.where(keep, dst, 0.0)
    dk_scr[...] += jnp.dot(dst.astype(q.dtype), q, preferred_element_type=_F32, precision=prec)

  # Padded keys (rows >= S of the last block) need no mask here: their dk / dv rows are dropped, and they add
  # nothing to real rows.
  valid = j < cnt_ref[geom.row(b, h, kb)]
  if has_tiles:
    partial = pref[2][slot] > 0
    pl.when(valid & partial)(lambda: step(True))
    pl.when(valid & jnp.logical_not(partial))(lambda: step(False))
  else:
    pl.when(valid)(lambda: step(False))

  @pl.when((r == R - 1) & (j == pl.num_programs(4) - 1))
  def _end():
    dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def flash_attention_bwd_dkv(q, k, v, do, lse, delta, lists_t: VisitLists, tiles=None, *, q_segment_ids=None,
                            kv_segment_ids=None, scale: float, soft_cap: float | None = None, block_q: int,
                            block_k: int, interpret=False, vmem_limit_bytes: int | None = None, bias=None):
  """dk, dv of flash attention over the transposed lists; GQA groups are summed inside the kernel.

  Args:
    q, k, v, do, lse, delta, segment ids, scale, soft_cap, interpret: as in :func:`flash_attention_bwd_dq`.
    lists_t: per kv block (``nK = ceil(S / block_k)``) the query blocks that visit it, ``[1|B, 1|H, nK, Kt]``
      (per *query* head: kv head ``g`` walks the lists of heads ``g * R .. g * R + R - 1``).
    tiles: the same ``[U, block_q, block_k]`` patterns as the forward orientation (transposed here), or None.
    block_q: lane dim here (multiple of 128 unless it covers T); block_k: sublane dim, and with a bias also the
      lane dim of the ``(block_q, block_k)`` bias block (so then a multiple of 128 unless it covers S).
    bias: as in the forward (read in the forward orientation and transposed in VMEM).

  Returns:
    ``dk [B, S, G, D]``, ``dv [B, S, G, E]`` in k's / v's dtype.
  """
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  bq = check_block(block_q, T, "lane", "block_q_dkv", "T",
                   "lanes of the transposed logits, lse / delta and q segment-id blocks")
  bk = check_block(block_k, S, "sublane", "block_k_dkv", "S", "rows of the k / v / dk / dv blocks")
  if bias is not None:
    check_block(bk, S, "lane", "block_k_dkv", "S", "with a bias, also lanes of the (block_q, block_k) bias block")
  nq, nk = -(-T // bq), -(-S // bk)
  Tp, Sp = nq * bq, nk * bk
  geom = _geom(lists_t)
  _check_lists(geom, B, H, nk, "transposed q")
  has_tiles, has_seg = tiles is not None, q_segment_ids is not None
  pref = flatten_lists(lists_t, has_tiles)

  q, k, v = backward_operands(q, k, v)  # zeroed; poisoned rows carry NaN in lse / delta
  qk, qop = _to_kernel(q, bq)
  dok, doop = _to_kernel(do, bq)
  kk, kop = _to_kernel(k, bk)
  vk, vop = _to_kernel(v, bk)

  def q_idx(b, g, kb, r, j, idx_ref, *_):
    h = g * R + r
    return b, h, idx_ref[geom.slot(b, h, kb, j)]

  def kv_idx(b, g, kb, r, j, *_):
    return b, g, kb

  def row_idx(b, g, kb, r, j, idx_ref, *_):
    h = g * R + r
    return b, h, 0, idx_ref[geom.slot(b, h, kb, j)]

  row_spec = pl.BlockSpec((None, None, NUM_SUBLANES, bq), row_idx)
  in_specs = [qop.spec(q_idx), kop.spec(kv_idx), vop.spec(kv_idx), doop.spec(q_idx), row_spec, row_spec]
  operands = [qk, kk, vk, dok, _rows_rows(lse, Tp), _rows_rows(delta, Tp)]
  if has_seg:
    in_specs += [pl.BlockSpec((None, NUM_SUBLANES, bq), lambda b, g, kb, r, j, idx_ref, *_: (
                     b, 0, idx_ref[geom.slot(b, g * R + r, kb, j)])),
                 pl.BlockSpec((None, bk, NUM_LANES), lambda b, g, kb, r, j, *_: (b, kb, 0))]
    operands += [_ids_rows(q_segment_ids, Tp), _ids_cols(kv_segment_ids, Sp)]
  if has_tiles:
    in_specs.append(pl.BlockSpec((None, bk, bq), lambda b, g, kb, r, j, idx_ref, cnt_ref, tile_ref, fetch_ref: (
        fetch_ref[geom.slot(b, g * R + r, kb, j)], 0, 0)))
    operands.append(_tiles(tiles, transpose=True))
  has_bias = bias is not None
  if has_bias:
    Bb, Hb = check_bias("flash_attention_bwd_dkv", bias, B, H, T, S)

    def bias_idx(b, g, kb, r, j, idx_ref, *_):
      h = g * R + r
      return (b if Bb > 1 else 0), (h if Hb > 1 else 0), idx_ref[geom.slot(b, h, kb, j)], kb

    in_specs.append(pl.BlockSpec((None, None, bq, bk), bias_idx))
    operands.append(pad_bias(bias, Tp, Sp))
  dkop, dvop = _Operand(D % NUM_LANES == 0, bk, D), _Operand(E % NUM_LANES == 0, bk, E)

  kernel = functools.partial(_dkv_kernel, geom=geom, R=R, has_seg=has_seg, has_tiles=has_tiles, has_bias=has_bias,
                             scale=float(scale), cap=soft_cap, prec=_precision(q.dtype))
  dk, dv = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(pref), grid=(B, G, nk, R, geom.K), in_specs=in_specs,
          out_specs=[dkop.spec(kv_idx), dvop.spec(kv_idx)],
          scratch_shapes=[pltpu.VMEM((bk, D), _F32), pltpu.VMEM((bk, E), _F32)]),
      out_shape=[jax.ShapeDtypeStruct(dkop.shape(B, Sp, G), k.dtype),
                 jax.ShapeDtypeStruct(dvop.shape(B, Sp, G), v.dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
          vmem_limit_bytes=vmem_limit_bytes),
      interpret=_interpret(interpret),
      name="jaxattn_flash_bwd_dkv",
  )(*pref, *operands)
  return _from_kernel(dk, dkop, B, S, G), _from_kernel(dv, dvop, B, S, G)
