"""Static (trace-time) planning for context parallelism: which local mask each device uses at each ring step.

A device's sequence shard is one contiguous chunk (``layout="contiguous"``) or two chunks ``r`` and ``2P - 1 - r``
(``layout="zigzag"``). For a (query shard, kv shard) pair the local mask is a grid of chunk cells; each cell is the
global mask restricted to one (query chunk, kv chunk) rectangle and is classified at trace time:

- ``"full"`` (every pair allowed: the cell needs no mask), ``"empty"`` (nothing allowed: skipped),
- or a partial mask in local coordinates. Shift-invariant masks (``Full``, ``Causal``, ``Local`` and their
  ``&`` / ``|``) are rewritten with a new offset, so the cells of different devices compare equal (a causal diagonal
  cell is ``Causal(0)`` on every device) and one compiled branch serves them all; other masks are wrapped in
  :class:`Offset`.

A grid whose cells are all full becomes ``None`` (no mask) and one whose cells are all empty becomes :data:`SKIP`
(no compute at all). :func:`ring_plan` and :func:`gather_plan` deduplicate the grids into a few branches and a table
``branch[step][device]`` that the kernels index with ``lax.axis_index`` inside ``lax.switch``; steps past the last
one any device needs are dropped from the ring altogether.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Union

import numpy as np

from jaxattn.masks import EMPTY, FULL, And, Causal, Full, Local, Mask, Or

__all__ = ["SKIP", "Offset", "ChunkGrid", "shift_mask", "chunk_starts", "local_mask", "RingPlan", "ring_plan",
           "GatherPlan", "gather_plan"]

SKIP = "skip"
Cell = Union[str, Mask]  # "full", "empty" or a partial mask in chunk-local coordinates


@dataclasses.dataclass(frozen=True)
class Offset(Mask):
  """``base`` seen from a rectangle starting at global ``(q_start, k_start)``: local ``(i, j)`` is global
  ``(i + q_start, j + k_start)``."""

  base: Mask
  q_start: int
  k_start: int

  def predicate(self, i, j):
    return self.base.predicate(np.asarray(i) + self.q_start, np.asarray(j) + self.k_start)

  def dense_tile(self, i0, i1, j0, j1):
    return self.base.dense_tile(i0 + self.q_start, i1 + self.q_start, j0 + self.k_start, j1 + self.k_start)

  def classify(self, i0, i1, j0, j1):
    qs, ks = self.q_start, self.k_start
    return self.base.classify(i0 + qs, i1 + qs, j0 + ks, j1 + ks)


def _shift(mask: Mask, d: int) -> Mask | None:
  """``mask`` with local coordinates ``i = gi - qs``, ``j = gj - ks`` for ``d = qs - ks``, if shift-invariant."""
  if isinstance(mask, Full):
    return mask
  if isinstance(mask, Causal):
    return Causal(mask.offset + d)
  if isinstance(mask, Local):
    return Local(mask.left, mask.right, mask.offset + d)
  if isinstance(mask, (And, Or)):
    a, b = _shift(mask.a, d), _shift(mask.b, d)
    if a is None or b is None:
      return None
    return And(a, b) if isinstance(mask, And) else Or(a, b)
  return None


def shift_mask(mask: Mask, q_start: int, k_start: int) -> Mask:
  """``mask`` restricted to the rectangle at global ``(q_start, k_start)``, in that rectangle's local coordinates."""
  shifted = _shift(mask, int(q_start) - int(k_start))
  return shifted if shifted is not None else Offset(mask, int(q_start), int(k_start))


def _cell(mask: Mask | None, qs: int, ks: int, C: int) -> Cell:
  if mask is None:
    return "full"
  local = shift_mask(mask, qs, ks)
  cls = int(np.asarray(local.classify(np.int64(0), np.int64(C), np.int64(0), np.int64(C))))
  if cls == EMPTY:
    return "empty"
  if cls == FULL:
    return "full"
  return local


@dataclasses.dataclass(frozen=True)
class ChunkGrid(Mask):
  """A local mask made of ``chunk x chunk`` cells: ``cells[a][b]`` covers local rows ``[a C, (a + 1) C)`` and
  columns ``[b C, (b + 1) C)`` and is ``"full"``, ``"empty"`` or a :class:`~jaxattn.masks.Mask` in cell
  coordinates."""

  cells: tuple[tuple[Cell, ...], ...]
  chunk: int

  def predicate(self, i, j):
    i, j = np.asarray(i), np.asarray(j)
    C = self.chunk
    ci, cj = i // C, j // C
    out = np.zeros(np.broadcast_shapes(i.shape, j.shape), dtype=bool)
    for a, row in enumerate(self.cells):
      for b, cell in enumerate(row):
        if cell == "empty":
          continue
        sel = (ci == a) & (cj == b)
        if not sel.any():
          continue
        out |= sel if cell == "full" else sel & cell.predicate(i - a * C, j - b * C)
    return out

  def classify(self, i0, i1, j0, j1):
    C = self.chunk
    shape = np.broadcast_shapes(np.shape(i0), np.shape(i1), np.shape(j0), np.shape(j1))
    nq, nk = len(self.cells), len(self.cells[0])
    full = (np.asarray(i1) <= nq * C) & (np.asarray(j1) <= nk * C) & np.ones(shape, bool)
    empty = np.ones(shape, bool)
    for a, row in enumerate(self.cells):
      I0, I1 = np.maximum(i0, a * C), np.minimum(i1, a * C + C)
      for b, cell in enumerate(row):
        J0, J1 = np.maximum(j0, b * C), np.minimum(j1, b * C + C)
        touch = (I0 < I1) & (J0 < J1)
        if cell == "full":
          cls = np.full(shape, FULL, np.int8)
        elif cell == "empty":
          cls = np.full(shape, EMPTY, np.int8)
        else:
          cls = np.broadcast_to(cell.classify(I0 - a * C, np.maximum(I1, I0 + 1) - a * C, J0 - b * C,
                                               np.maximum(J1, J0 + 1) - b * C), shape)
        full &= ~touch | (cls == FULL)
        empty &= ~touch | (cls == EMPTY)
    return np.where(full, FULL, np.where(empty, EMPTY, 1)).astype(np.int8)

  def __repr__(self):
    def short(c):
      return c if isinstance(c, str) else repr(c)
    return f"ChunkGrid(chunk={self.chunk}, cells={[[short(c) for c in row] for row in self.cells]})"


def chunk_starts(r: int, P: int, T: int, layout: str) -> tuple[int, ...]:
  """Global start of each chunk of shard ``r`` (chunks of ``T / P`` contiguous, ``T / 2P`` zigzag)."""
  if layout == "zigzag":
    C = T // (2 * P)
    return (r * C, (2 * P - 1 - r) * C)
  return (r * (T // P),)


def local_mask(mask: Mask | None, q_starts, k_starts, C: int):
  """The local mask for query chunks at ``q_starts`` against kv chunks at ``k_starts`` (all of length ``C``):
  ``None`` (all allowed), :data:`SKIP` (nothing allowed) or a :class:`ChunkGrid` (or a single-cell mask)."""
  cells = tuple(tuple(_cell(mask, qs, ks, C) for ks in k_starts) for qs in q_starts)
  flat = [c for row in cells for c in row]
  if all(c == "full" for c in flat):
    return None
  if all(c == "empty" for c in flat):
    return SKIP
  if len(flat) == 1:
    return flat[0]
  return ChunkGrid(cells, C)


def _dedupe(keys):
  """``keys`` (masks, None or SKIP) -> (distinct non-skip masks, branch index per key; 0 = skip)."""
  masks: list = []
  index = []
  for key in keys:
    if isinstance(key, str) and key == SKIP:
      index.append(0)
      continue
    for n, m in enumerate(masks):
      if m == key:
        index.append(n + 1)
        break
    else:
      masks.append(key)
      index.append(len(masks))
  return tuple(masks), index


@dataclasses.dataclass(frozen=True)
class RingPlan:
  """What each device computes at each ring step.

  Attributes:
    T: global sequence length at the ring level; P: ring size; layout: ``"contiguous"`` or ``"zigzag"``.
    chunk: chunk length (``T / P`` or ``T / 2P``).
    num_steps: ring steps actually run (steps after the last one any device needs are dropped).
    masks: distinct local masks (``None`` = all allowed); branch ``n >= 1`` is ``masks[n - 1]``, branch 0 skips.
    table: ``table[step][device]`` branch index.
  """

  T: int
  P: int
  layout: str
  chunk: int
  num_steps: int
  masks: tuple
  table: tuple[tuple[int, ...], ...]

  @property
  def computed_steps(self) -> np.ndarray:
    """``[num_steps, P]`` bool: whether the device computes anything at that step."""
    return np.asarray(self.table) > 0


@functools.lru_cache(maxsize=256)
def ring_plan(mask: Mask | None, T: int, P: int, layout: str) -> RingPlan:
  """Plans a ring over ``P`` devices for a global ``T x T`` problem under ``mask``. At step ``s`` device ``r`` holds
  the kv shard of device ``(r - s) mod P``."""
  C = T // (2 * P) if layout == "zigzag" else T // P
  keys = [local_mask(mask, chunk_starts(r, P, T, layout), chunk_starts((r - s) % P, P, T, layout), C)
          for s in range(P) for r in range(P)]
  masks, index = _dedupe(keys)
  table = np.asarray(index, np.int32).reshape(P, P)
  used = np.nonzero(table.any(1))[0]
  num_steps = int(used[-1]) + 1 if len(used) else 1
  return RingPlan(T, P, layout, C, num_steps, masks, tuple(tuple(int(x) for x in row) for row in table[:num_steps]))


@dataclasses.dataclass(frozen=True)
class GatherPlan:
  """What each device computes against the all-gathered K/V.

  Attributes:
    masks: distinct local masks (branch ``n >= 1`` is ``masks[n - 1]``; 0 skips); table: branch per device.
  """

  T: int
  P: int
  masks: tuple
  table: tuple[int, ...]


@functools.lru_cache(maxsize=256)
def gather_plan(mask: Mask | None, T: int, P: int, q_layout: str, kv_layout: str) -> GatherPlan:
  """Plans all-gather attention: queries in ``q_layout`` shards, the gathered keys in ``kv_layout`` order."""
  zig = "zigzag" in (q_layout, kv_layout)
  C = T // (2 * P) if zig else T // P

  def starts(r, layout):
    if layout == "zigzag" or not zig:
      return chunk_starts(r, P, T, layout)
    return (2 * r * C, (2 * r + 1) * C)  # a contiguous shard seen as two chunks

  k_starts = tuple(s for p in range(P) for s in starts(p, kv_layout))
  masks, index = _dedupe([local_mask(mask, starts(r, q_layout), k_starts, C) for r in range(P)])
  return GatherPlan(T, P, masks, tuple(index))
