"""Static attention masks: a small algebra of hashable, numpy-only objects.

Query ``i`` may attend key ``j`` iff ``mask.predicate(i, j)`` holds. Masks are frozen, hashable and compare by
value, so they can be passed to ``jax.jit`` as static arguments and compiled at trace time into block layouts
(which kv blocks each query block visits) without ever building a ``[T, S]`` array on the device.

=====================================  ============================================================================
class                                  predicate
=====================================  ============================================================================
``Full()``                             always
``Causal(offset=0)``                   ``j <= i + offset`` (causal cross-attention, bottom-right aligned: ``S - T``)
``Local(left, right=0, offset=0)``     ``i + offset - left <= j <= i + offset + right``
``Slices(slices)``                     union of ``(q_start, q_end, k_start, k_end, kind)`` half-open rectangles;
                                       with ``a = i - q_start``, ``b = j - k_start``, ``lq``/``lk`` the slice
                                       lengths: ``full`` always, ``causal`` ``b - lk <= a - lq``, ``inv_causal``
                                       ``b >= a``, ``bi_causal`` both
``BlockSparse(layout, block_q, block_k)``  ``layout[i // block_q, j // block_k]``
``a & b``, ``a | b``                   intersection, union
=====================================  ============================================================================

Every mask offers ``to_dense(T, S)``, ``block_layout(T, S, block_q, block_k)`` (int8, 0 empty / 1 partial /
2 full) and ``area(T, S)`` (the exact number of allowed pairs, computed blockwise without a dense mask).

The generators at the bottom build the mask zoo of the Long-Context Attention Benchmark (document masks,
share-question, prefix-LM, sliding windows, global + sliding window, block-causal documents).

Example:
  >>> from jaxattn import masks
  >>> m = masks.causal_document([3, 5]) & masks.sliding_window(4, causal=True)
  >>> int(m.area(8, 8)) == int(m.to_dense(8, 8).sum())
  True
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, Sequence

import numpy as np

__all__ = [
    "Mask", "Full", "Causal", "Local", "Slices", "BlockSparse", "And", "Or", "PerHead",
    "EMPTY", "PARTIAL", "FULL",
    "causal_document", "full_document", "share_question", "prefix_lm_causal", "prefix_lm_document",
    "sliding_window", "global_sliding_window", "block_causal_document", "random_block_sparse",
    "sample_document_lengths", "document_segment_ids",
]

EMPTY, PARTIAL, FULL = 0, 1, 2
SliceKind = Literal["full", "causal", "inv_causal", "bi_causal"]
_SLICE_KINDS = ("full", "causal", "inv_causal", "bi_causal")
# Tiles larger than this many elements are split when a mask is evaluated blockwise (area, refinement).
_TILE_BUDGET = 1 << 22


def _check_len(name: str, value: int) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


class Mask:
  """Base class. Subclasses define ``predicate`` and a conservative ``classify`` (and may override ``dense_tile``)."""

  def predicate(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Whether query ``i`` may attend key ``j`` (numpy, broadcasting; e.g. ``i [T, 1]``, ``j [1, S]``)."""
    raise NotImplementedError

  def classify(self, i0, i1, j0, j1) -> np.ndarray:
    """Block classes for rectangles ``[i0, i1) x [j0, j1)`` (broadcasting int arrays).

    Returns int8: EMPTY / FULL only when certain, PARTIAL when unknown (refined exactly by callers).
    """
    raise NotImplementedError

  # ----------------------------------------------------------------------------------------------- algebra
  def __and__(self, other: "Mask") -> "Mask":
    if not isinstance(other, Mask):
      return NotImplemented
    return And(self, other)

  def __or__(self, other: "Mask") -> "Mask":
    if not isinstance(other, Mask):
      return NotImplemented
    return Or(self, other)

  # ----------------------------------------------------------------------------------------------- queries
  def to_dense(self, T: int, S: int) -> np.ndarray:
    """The dense boolean mask, shape ``[T, S]``. Use only for small shapes (tests, plots)."""
    T, S = _check_len("T", T), _check_len("S", S)
    return np.broadcast_to(self.predicate(np.arange(T)[:, None], np.arange(S)[None, :]), (T, S)).copy()

  def block_layout(self, T: int, S: int, block_q: int, block_k: int) -> np.ndarray:
    """Exact block classes, int8 ``[ceil(T / block_q), ceil(S / block_k)]``: 0 empty, 1 partial, 2 full.

    Edge blocks are clipped to ``T`` and ``S``: a block is full when every in-range pair is allowed.
    """
    return _block_layout(self, _check_len("T", T), _check_len("S", S), _check_len("block_q", block_q),
                         _check_len("block_k", block_k))

  def area(self, T: int, S: int) -> int:
    """Exact number of allowed ``(i, j)`` pairs in a ``T x S`` problem (no dense mask is built)."""
    T, S = _check_len("T", T), _check_len("S", S)
    bq, bk = _area_blocks(T, S)
    layout = _block_layout(self, T, S, bq, bk)
    q_len = np.minimum(np.arange(layout.shape[0]) * bq + bq, T) - np.arange(layout.shape[0]) * bq
    k_len = np.minimum(np.arange(layout.shape[1]) * bk + bk, S) - np.arange(layout.shape[1]) * bk
    total = int((np.outer(q_len, k_len) * (layout == FULL)).sum())
    for qb, kb in zip(*np.nonzero(layout == PARTIAL)):
      total += int(self.dense_tile(qb * bq, min(qb * bq + bq, T), kb * bk, min(kb * bk + bk, S)).sum())
    return total

  def dense_tile(self, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
    """The exact bool pattern of the rectangle ``[i0, i1) x [j0, j1)`` (block layouts refine partial blocks)."""
    return np.broadcast_to(self.predicate(np.arange(i0, i1)[:, None], np.arange(j0, j1)[None, :]),
                           (i1 - i0, j1 - j0))


@functools.lru_cache(maxsize=256)
def _block_layout(mask: Mask, T: int, S: int, bq: int, bk: int) -> np.ndarray:
  nq, nk = -(-T // bq), -(-S // bk)
  i0 = (np.arange(nq) * bq)[:, None]
  j0 = (np.arange(nk) * bk)[None, :]
  i1, j1 = np.minimum(i0 + bq, T), np.minimum(j0 + bk, S)
  layout = np.broadcast_to(mask.classify(i0, i1, j0, j1), (nq, nk)).astype(np.int8).copy()
  for qb, kb in zip(*np.nonzero(layout == PARTIAL)):
    tile = mask.dense_tile(int(i0[qb, 0]), int(i1[qb, 0]), int(j0[0, kb]), int(j1[0, kb]))
    layout[qb, kb] = FULL if tile.all() else (PARTIAL if tile.any() else EMPTY)
  layout.setflags(write=False)
  return layout


def _area_blocks(T: int, S: int) -> tuple[int, int]:
  b = 256
  while b * b > _TILE_BUDGET:
    b //= 2
  return min(b, T), min(b, S)


def _full_or_empty(full, empty) -> np.ndarray:
  return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL)).astype(np.int8)


@dataclasses.dataclass(frozen=True)
class Full(Mask):
  """Every query attends every key."""

  def predicate(self, i, j):
    return np.ones(np.broadcast_shapes(np.shape(i), np.shape(j)), dtype=bool)

  def classify(self, i0, i1, j0, j1):
    return np.full(np.broadcast_shapes(np.shape(i0), np.shape(j0)), FULL, np.int8)


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  """``j <= i + offset``. For causal cross-attention aligned at the bottom right use ``offset = S - T``."""

  offset: int = 0

  def __post_init__(self):
    if not isinstance(self.offset, (int, np.integer)) or isinstance(self.offset, bool):
      raise ValueError(f"Causal offset must be an int, got {self.offset!r}")

  def predicate(self, i, j):
    return j <= i + self.offset

  def classify(self, i0, i1, j0, j1):
    return _full_or_empty(j1 - 1 <= i0 + self.offset, j0 > i1 - 1 + self.offset)


@dataclasses.dataclass(frozen=True)
class Local(Mask):
  """Band ``i + offset - left <= j <= i + offset + right`` (sliding window; ``right=0`` is causal)."""

  left: int
  right: int = 0
  offset: int = 0

  def __post_init__(self):
    for name in ("left", "right", "offset"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
        raise ValueError(f"Local {name} must be an int, got {v!r}")
    if self.left < 0 or self.right < 0:
      raise ValueError(f"Local window sizes must be >= 0, got left={self.left}, right={self.right}")

  def predicate(self, i, j):
    c = i + self.offset
    return (j >= c - self.left) & (j <= c + self.right)

  def classify(self, i0, i1, j0, j1):
    o, l, r = self.offset, self.left, self.right
    full = (j0 >= i1 - 1 + o - l) & (j1 - 1 <= i0 + o + r)
    empty = (j1 - 1 < i0 + o - l) | (j0 > i1 - 1 + o + r)
    return _full_or_empty(full, empty)


@dataclasses.dataclass(frozen=True)
class Slices(Mask):
  """Union of rectangles ``(q_start, q_end, k_start, k_end, kind)`` (MagiAttention / LongCA-bench slices).

  ``kind`` is one of ``"full"``, ``"causal"`` (bottom-right aligned triangle), ``"inv_causal"`` (top-left aligned)
  and ``"bi_causal"`` (both: a band).
  """

  slices: tuple[tuple[int, int, int, int, str], ...]

  def __post_init__(self):
    norm = []
    for s in self.slices:
      if len(s) != 5:
        raise ValueError(f"a slice is (q_start, q_end, k_start, k_end, kind), got {s!r}")
      qs, qe, ks, ke, kind = s
      if kind not in _SLICE_KINDS:
        raise ValueError(f"slice kind must be one of {_SLICE_KINDS}, got {kind!r} in {s!r}")
      if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in (qs, qe, ks, ke)):
        raise ValueError(f"slice bounds must be ints, got {s!r}")
      if not (0 <= qs < qe and 0 <= ks < ke):
        raise ValueError(f"slice ranges must be non-empty and non-negative, got {s!r}")
      norm.append((int(qs), int(qe), int(ks), int(ke), str(kind)))
    object.__setattr__(self, "slices", tuple(norm))

  def __repr__(self):
    if len(self.slices) > 6:
      return f"Slices(<{len(self.slices)} slices: {self.slices[:3]} ... {self.slices[-1:]}>)"
    return f"Slices({self.slices})"

  def predicate(self, i, j):
    i, j = np.asarray(i), np.asarray(j)
    out = np.zeros(np.broadcast_shapes(i.shape, j.shape), dtype=bool)
    for qs, qe, ks, ke, kind in self.slices:
      out |= _slice_predicate(i, j, qs, qe, ks, ke, kind)
    return out

  def dense_tile(self, i0, i1, j0, j1):
    out = np.zeros((i1 - i0, j1 - j0), dtype=bool)
    i, j = np.arange(i0, i1)[:, None], np.arange(j0, j1)[None, :]
    for qs, qe, ks, ke, kind in self.slices:
      if qs < i1 and qe > i0 and ks < j1 and ke > j0:  # only slices that touch the tile
        out |= _slice_predicate(i, j, qs, qe, ks, ke, kind)
    return out

  def classify(self, i0, i1, j0, j1):
    shape = np.broadcast_shapes(np.shape(i0), np.shape(j0))
    any_full = np.zeros(shape, bool)
    all_empty = np.ones(shape, bool)
    for qs, qe, ks, ke, kind in self.slices:
      lq, lk = qe - qs, ke - ks
      I0, I1 = np.maximum(i0, qs), np.minimum(i1, qe)  # intersection with the slice rectangle
      J0, J1 = np.maximum(j0, ks), np.minimum(j1, ke)
      empty = (I0 >= I1) | (J0 >= J1)
      inside = (i0 >= qs) & (i1 <= qe) & (j0 >= ks) & (j1 <= ke)
      full = inside
      if kind in ("causal", "bi_causal"):
        empty = empty | ((J0 - ks) - lk > (I1 - 1 - qs) - lq)
        full = full & ((j1 - 1 - ks) - lk <= (i0 - qs) - lq)
      if kind in ("inv_causal", "bi_causal"):
        empty = empty | ((J1 - 1 - ks) < (I0 - qs))
        full = full & ((j0 - ks) >= (i1 - 1 - qs))
      any_full |= full
      all_empty &= empty
    return _full_or_empty(any_full, all_empty)


def _slice_predicate(i, j, qs, qe, ks, ke, kind):
  a, b = i - qs, j - ks
  ok = (a >= 0) & (i < qe) & (b >= 0) & (j < ke)
  if kind in ("causal", "bi_causal"):
    ok = ok & (b - (ke - ks) <= a - (qe - qs))
  if kind in ("inv_causal", "bi_causal"):
    ok = ok & (b >= a)
  return ok


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparse(Mask):
  """``layout[i // block_q, j // block_k]``: a boolean block layout (compared and hashed by value)."""

  layout: np.ndarray
  block_q: int
  block_k: int

  def __post_init__(self):
    layout = np.asarray(self.layout)
    if layout.ndim != 2 or layout.size == 0:
      raise ValueError(f"BlockSparse layout must be a non-empty 2-D array, got shape {layout.shape}")
    if layout.dtype != bool:
      if not np.isin(layout, (0, 1)).all():
        raise ValueError(f"BlockSparse layout must be boolean (or 0/1), got dtype {layout.dtype}")
      layout = layout.astype(bool)
    layout = layout.copy()
    layout.setflags(write=False)
    object.__setattr__(self, "layout", layout)
    _check_len("block_q", self.block_q)
    _check_len("block_k", self.block_k)
    # Prefix sums let classify count the allowed blocks of any rectangle in O(1).
    csum = np.zeros((layout.shape[0] + 1, layout.shape[1] + 1), np.int64)
    csum[1:, 1:] = layout.cumsum(0).cumsum(1)
    object.__setattr__(self, "_csum", csum)

  def __eq__(self, other):
    return (isinstance(other, BlockSparse) and (self.block_q, self.block_k) == (other.block_q, other.block_k)
            and self.layout.shape == other.layout.shape and bool((self.layout == other.layout).all()))

  def __hash__(self):
    return hash((self.block_q, self.block_k, self.layout.shape, np.packbits(self.layout).tobytes()))

  def __repr__(self):
    return (f"BlockSparse(layout={self.layout.shape} density={self.layout.mean():.3f}, "
            f"block_q={self.block_q}, block_k={self.block_k})")

  def predicate(self, i, j):
    i, j = np.asarray(i) // self.block_q, np.asarray(j) // self.block_k
    n, m = self.layout.shape
    ok = (i < n) & (j < m)
    return self.layout[np.minimum(i, n - 1), np.minimum(j, m - 1)] & ok

  def classify(self, i0, i1, j0, j1):
    n, m = self.layout.shape
    a0, a1 = np.minimum(i0 // self.block_q, n), np.minimum((i1 - 1) // self.block_q + 1, n)
    b0, b1 = np.minimum(j0 // self.block_k, m), np.minimum((j1 - 1) // self.block_k + 1, m)
    c = self._csum
    allowed = c[a1, b1] - c[a0, b1] - c[a1, b0] + c[a0, b0]
    covered = (a1 - a0) * (b1 - b0)
    # Rows/cols past the layout are masked, so "all allowed" needs the rectangle inside the layout too.
    inside = ((i1 - 1) // self.block_q < n) & ((j1 - 1) // self.block_k < m)
    return _full_or_empty((allowed == covered) & inside & (covered > 0), allowed == 0)


@dataclasses.dataclass(frozen=True)
class And(Mask):
  """Intersection of two masks (use ``a & b``)."""

  a: Mask
  b: Mask

  def predicate(self, i, j):
    return self.a.predicate(i, j) & self.b.predicate(i, j)

  def dense_tile(self, i0, i1, j0, j1):
    return self.a.dense_tile(i0, i1, j0, j1) & self.b.dense_tile(i0, i1, j0, j1)

  def classify(self, i0, i1, j0, j1):
    ca, cb = self.a.classify(i0, i1, j0, j1), self.b.classify(i0, i1, j0, j1)
    return _full_or_empty((ca == FULL) & (cb == FULL), (ca == EMPTY) | (cb == EMPTY))

  def __repr__(self):
    return f"({self.a!r} & {self.b!r})"


@dataclasses.dataclass(frozen=True)
class Or(Mask):
  """Union of two masks (use ``a | b``)."""

  a: Mask
  b: Mask

  def predicate(self, i, j):
    return self.a.predicate(i, j) | self.b.predicate(i, j)

  def dense_tile(self, i0, i1, j0, j1):
    return self.a.dense_tile(i0, i1, j0, j1) | self.b.dense_tile(i0, i1, j0, j1)

  def classify(self, i0, i1, j0, j1):
    ca, cb = self.a.classify(i0, i1, j0, j1), self.b.classify(i0, i1, j0, j1)
    return _full_or_empty((ca == FULL) | (cb == FULL), (ca == EMPTY) & (cb == EMPTY))

  def __repr__(self):
    return f"({self.a!r} | {self.b!r})"


# =================================================================================================== generators
@dataclasses.dataclass(frozen=True)
class PerHead(Mask):
  """One static mask per query head: head ``h`` attends with ``masks[h]`` (``softmax_attention(mask=...)`` also
  takes the plain sequence ``(m0, m1, ...)``).

  Supported by the ``"reference"`` and ``"xla"`` softmax backends (the xla path visits the union of the heads' block
  layouts and applies each head's own partial-block tiles; no ``[H, T, S]`` array is built); the kernel backends
  refuse it. A per-head mask has no single ``[T, S]`` predicate: ``predicate`` / ``to_dense`` raise ``TypeError``
  (use :meth:`to_dense_heads` or :meth:`union`), so code that only knows 2-D masks fails loudly. ``&`` / ``|`` with a
  mask or a PerHead of the same length combine head by head.
  """

  masks: tuple

  def __post_init__(self):
    masks = tuple(self.masks) if isinstance(self.masks, (list, tuple)) else self.masks
    if not isinstance(masks, tuple) or not masks:
      raise ValueError(f"PerHead takes a non-empty sequence of masks, got {self.masks!r}")
    for h, m in enumerate(masks):
      if not isinstance(m, Mask) or isinstance(m, PerHead):
        raise ValueError(f"PerHead mask {h} must be a (non per-head) jaxattn.masks.Mask, got {m!r}")
    object.__setattr__(self, "masks", masks)

  @property
  def num_heads(self) -> int:
    return len(self.masks)

  def union(self) -> Mask:
    """The mask allowing a pair iff some head allows it (its block layout is the visiting set of all heads)."""
    return functools.reduce(lambda a, b: a if a == b else a | b, self.masks)

  def to_dense_heads(self, T: int, S: int) -> np.ndarray:
    """The dense boolean masks of all heads, ``[H, T, S]``. Use only for small shapes."""
    return np.stack([m.to_dense(T, S) for m in self.masks])

  def predicate(self, i, j):
    raise TypeError("PerHead holds one mask per head and has no single predicate: use .masks[h], .union() or "
                    ".to_dense_heads(T, S)")

  def classify(self, i0, i1, j0, j1):
    return self.predicate(i0, j0)

  def __and__(self, other):
    return self._combine(other, lambda a, b: a & b)

  def __or__(self, other):
    return self._combine(other, lambda a, b: a | b)

  def _combine(self, other, op):
    if isinstance(other, PerHead):
      if other.num_heads != self.num_heads:
        raise ValueError(f"cannot combine PerHead masks of {self.num_heads} and {other.num_heads} heads")
      return PerHead(tuple(op(a, b) for a, b in zip(self.masks, other.masks)))
    if not isinstance(other, Mask):
      return NotImplemented
    return PerHead(tuple(op(a, other) for a in self.masks))

  def __rand__(self, other):
    return self._combine(other, lambda a, b: b & a)

  def __ror__(self, other):
    return self._combine(other, lambda a, b: b | a)


def _doc_bounds(doc_lens: Sequence[int], name: str = "doc_lens") -> list[tuple[int, int]]:
  lens = [int(x) for x in doc_lens]
  if not lens or any(x < 1 for x in lens):
    raise ValueError(f"{name} must be a non-empty list of positive lengths, got {list(doc_lens)!r}")
  starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
  return [(int(s), int(s + n)) for s, n in zip(starts, lens)]


def causal_document(doc_lens: Sequence[int]) -> Slices:
  """Causal attention inside each packed document (documents back to back, ``T = sum(doc_lens)``)."""
  return Slices(tuple((s, e, s, e, "causal") for s, e in _doc_bounds(doc_lens)))


def full_document(doc_lens: Sequence[int]) -> Slices:
  """Bidirectional attention inside each packed document."""
  return Slices(tuple((s, e, s, e, "full") for s, e in _doc_bounds(doc_lens)))


def share_question(question_len: int, answer_lens: Sequence[int]) -> Slices:
  """A shared question followed by answers: the question is causal; each answer sees the whole question and
  itself causally, never the other answers."""
  q = _check_len("question_len", question_len)
  out = [(0, q, 0, q, "causal")]
  for s, e in _doc_bounds(answer_lens, "answer_lens"):
    out += [(q + s, q + e, 0, q, "full"), (q + s, q + e, q + s, q + e, "causal")]
  return Slices(tuple(out))


def prefix_lm_causal(prefix_len: int, seq_len: int) -> Slices:
  """Prefix-LM: the first ``prefix_len`` tokens attend bidirectionally, later tokens causally."""
  p, t = _check_len("prefix_len", prefix_len), _check_len("seq_len", seq_len)
  if p > t:
    raise ValueError(f"prefix_len={p} exceeds seq_len={t}")
  out = [(0, t, 0, p, "full")]
  if p < t:
    out.append((p, t, p, t, "causal"))
  return Slices(tuple(out))


def prefix_lm_document(doc_lens: Sequence[int], prefix_lens: Sequence[int]) -> Slices:
  """Prefix-LM inside each packed document (``prefix_lens[d] <= doc_lens[d]``)."""
  bounds = _doc_bounds(doc_lens)
  if len(prefix_lens) != len(bounds):
    raise ValueError(f"need one prefix length per document: {len(prefix_lens)} prefixes, {len(bounds)} documents")
  out = []
  for (s, e), p in zip(bounds, prefix_lens):
    p = int(p)
    if not 0 <= p <= e - s:
      raise ValueError(f"prefix length {p} outside [0, {e - s}] for document [{s}, {e})")
    if p:
      out.append((s, e, s, s + p, "full"))
    if s + p < e:
      out.append((s + p, e, s + p, e, "causal"))
  return Slices(tuple(out))


def sliding_window(window: int, causal: bool = True) -> Local:
  """Sliding window of ``window`` keys: causal sees keys ``i - window + 1 .. i``; non-causal sees
  ``|i - j| <= window // 2``."""
  w = _check_len("window", window)
  return Local(w - 1, 0) if causal else Local(w // 2, w // 2)


def global_sliding_window(num_global: int, window: int, causal: bool = False) -> Mask:
  """Longformer-style: the first ``num_global`` tokens attend and are attended everywhere; the rest use a sliding
  window (causal or not). With ``causal=True`` the global tokens are still only attended causally."""
  g = _check_len("num_global", num_global)
  big = 1 << 40  # rectangles are clipped to the problem size, so "to the end" is any large bound
  local = sliding_window(window, causal)
  glob = Slices(((0, big, 0, g, "full"),) if causal else ((0, big, 0, g, "full"), (0, g, 0, big, "full")))
  return (local | glob) & Causal(0) if causal else local | glob


def block_causal_document(doc_lens: Sequence[int], block: int) -> Slices:
  """Inside each document, tokens form chunks of ``block``: a chunk sees itself fully and all earlier chunks of
  the same document."""
  b = _check_len("block", block)
  out = []
  for s, e in _doc_bounds(doc_lens):
    for cs in range(s, e, b):
      out.append((cs, min(cs + b, e), s, min(cs + b, e), "full"))
  return Slices(tuple(out))


def random_block_sparse(num_q_blocks: int, num_k_blocks: int, density: float, block_q: int, block_k: int,
                        seed: int = 0) -> BlockSparse:
  """Random block layout keeping ``round(density * n)`` blocks per query-block row (at least one)."""
  if not 0.0 < density <= 1.0:
    raise ValueError(f"density must be in (0, 1], got {density}")
  rng = np.random.default_rng(seed)
  nq, nk = _check_len("num_q_blocks", num_q_blocks), _check_len("num_k_blocks", num_k_blocks)
  keep = max(1, int(round(density * nk)))
  layout = np.zeros((nq, nk), bool)
  for r in range(nq):
    layout[r, rng.choice(nk, keep, replace=False)] = True
  return BlockSparse(layout, block_q, block_k)


def sample_document_lengths(total: int, mean: float, seed: int = 0, min_len: int = 1) -> list[int]:
  """Document lengths summing to ``total`` drawn from a log-normal around ``mean`` (varlen packing)."""
  total = _check_len("total", total)
  rng = np.random.default_rng(seed)
  out, left = [], total
  while left > 0:
    n = int(max(min_len, round(rng.lognormal(np.log(mean), 0.75))))
    out.append(min(n, left))
    left -= out[-1]
  return out


def document_segment_ids(doc_lens: Sequence[int]) -> np.ndarray:
  """Segment ids ``[T]`` (document index per token) for the data-dependent ``segment_ids=`` path."""
  bounds = _doc_bounds(doc_lens)
  return np.concatenate([np.full(e - s, d, np.int32) for d, (s, e) in enumerate(bounds)])
