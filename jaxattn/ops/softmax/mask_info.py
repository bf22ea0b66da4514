"""Compiles a static mask into block-sparse visiting lists (host side, numpy, cached).

For a ``T x S`` problem tiled ``block_q x block_k`` (padded up to whole blocks), ``MaskInfo`` holds

- ``kv_index [nQ, K]``  int32: the kv blocks query block ``qb`` visits, in increasing order, padded by repeating the
  last valid entry (so a kernel that prefetches one past the end reads a block it already has);
- ``kv_count [nQ]``     int32: how many entries of ``kv_index[qb]`` are valid (0 for an all-masked query block);
- ``kv_tile [nQ, K]``   int32: 0 when the block is fully allowed (no mask needed), else ``t >= 1`` indexing
  ``tiles[t]``, the block's boolean pattern;
- ``q_index / q_count / q_tile [nK, Kt]``: the transpose (which query blocks visit kv block ``kb``), for dk/dv;
- ``tiles [U, block_q, block_k]`` bool: deduplicated partial-block patterns; ``tiles[0]`` is all True;
- ``layout [nQ, nK]`` (0 empty / 1 partial / 2 full) and ``tile_of [nQ, nK]`` (tile id per block), dense per block.

Padding rows (``i >= T``) and columns (``j >= S``) are masked, so the last blocks become partial when T or S is not
a multiple of the block size. No ``T x S`` array is built: only partial blocks are evaluated.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jaxattn.masks import EMPTY, FULL, Full, Mask, Slices


@dataclasses.dataclass(frozen=True, eq=False)
class MaskInfo:
  block_q: int
  block_k: int
  num_q_blocks: int
  num_k_blocks: int
  kv_index: np.ndarray  # int32 [nQ, K]
  kv_count: np.ndarray  # int32 [nQ]
  kv_tile: np.ndarray  # int32 [nQ, K]
  q_index: np.ndarray  # int32 [nK, Kt]
  q_count: np.ndarray  # int32 [nK]
  q_tile: np.ndarray  # int32 [nK, Kt]
  tiles: np.ndarray  # bool [U, block_q, block_k]
  layout: np.ndarray  # int8 [nQ, nK] 0 empty / 1 partial / 2 full (padding included)
  tile_of: np.ndarray  # int32 [nQ, nK] tile id of every block (0 for full and empty blocks)

  @property
  def num_visited(self) -> int:
    return int(self.kv_count.sum())

  @property
  def has_partial(self) -> bool:
    return self.tiles.shape[0] > 1


@functools.lru_cache(maxsize=128)
def mask_info(mask: Mask | None, T: int, S: int, block_q: int, block_k: int) -> MaskInfo:
  """The visiting lists for ``mask`` on a ``T x S`` problem (``None`` = all allowed)."""
  nq, nk = -(-T // block_q), -(-S // block_k)
  Tp, Sp = nq * block_q, nk * block_k
  eff: Mask = mask if mask is not None else Full()
  if (Tp, Sp) != (T, S):
    eff = eff & Slices(((0, T, 0, S, "full"),))
  layout = eff.block_layout(Tp, Sp, block_q, block_k)

  tiles = [np.ones((block_q, block_k), bool)]
  tile_ids: dict[bytes, int] = {}
  tile_of = np.zeros((nq, nk), np.int32)
  for qb, kb in zip(*np.nonzero((layout != EMPTY) & (layout != FULL))):
    t = np.ascontiguousarray(eff.dense_tile(qb * block_q, qb * block_q + block_q, kb * block_k, kb * block_k + block_k))
    key = np.packbits(t).tobytes()
    if key not in tile_ids:
      tile_ids[key] = len(tiles)
      tiles.append(t)
    tile_of[qb, kb] = tile_ids[key]

  visit = layout != EMPTY
  kv_index, kv_count, kv_tile = _lists(visit, tile_of)
  q_index, q_count, q_tile = _lists(visit.T, tile_of.T)
  out = MaskInfo(block_q, block_k, nq, nk, kv_index, kv_count, kv_tile, q_index, q_count, q_tile,
                 np.stack(tiles), layout, tile_of)
  for f in dataclasses.fields(out):
    v = getattr(out, f.name)
    if isinstance(v, np.ndarray):
      v.setflags(write=False)
  return out


def _lists(visit: np.ndarray, tile_of: np.ndarray):
  """Row-wise lists of the visited column indices (padded by repeating the last), their counts and tiles."""
  counts = visit.sum(1).astype(np.int32)
  width = max(1, int(counts.max()))
  index = np.zeros((visit.shape[0], width), np.int32)
  tile = np.zeros((visit.shape[0], width), np.int32)
  for r in range(visit.shape[0]):
    cols = np.nonzero(visit[r])[0]
    if len(cols):
      index[r, :len(cols)] = cols
      index[r, len(cols):] = cols[-1]
      tile[r, :len(cols)] = tile_of[r, cols]
      tile[r, len(cols):] = tile_of[r, cols[-1]]
  return index, counts, tile
