"""The halo window as a static :mod:`jaxattn.masks` mask over a flattened image, and the shared geometry.

An image of ``height x width`` pixels is flattened row-major (pixel ``(y, x)`` is token ``y * width + x``). It is
cut into non-overlapping ``block x block`` query blocks; the queries of block ``(i, j)`` all attend the same
``w x w`` window, ``w = block + 2 * halo``, covering rows ``[i * block - halo, i * block + block + halo)`` and the
same columns (HaloNet, Vaswani et al. 2021, ``../shared/papers/efficient.md`` §7a). Pixels of the window outside
the image do not exist in the flattened sequence, so as a mask they are simply not attended ("masked padding").
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxattn.masks import EMPTY, PARTIAL, Mask

__all__ = ["HaloMask", "check_geometry", "num_rel_positions"]


def _int(name: str, value, minimum: int) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  return int(value)


def check_geometry(height, width, block, halo, pad: bool) -> tuple[int, int, int, int]:
  """Checked ``(height, width, block, halo)``.

  Raises:
    ValueError: a non-positive size or block, a negative halo, ``halo > block`` (a window would reach past the
      neighbouring block: use a bigger block instead), or an image side not divisible by ``block`` while
      ``pad`` is False — each naming the value.
  """
  height, width = _int("image height", height, 1), _int("image width", width, 1)
  block, halo = _int("block", block, 1), _int("halo", halo, 0)
  if halo > block:
    raise ValueError(f"halo ({halo}) must not exceed block ({block}): the window would reach beyond the "
                     f"neighbouring blocks; use a larger block")
  if not pad:
    for name, n in (("height", height), ("width", width)):
      if n % block:
        raise ValueError(f"image {name} {n} is not divisible by block {block}; pass pad=True to pad the image "
                         f"to a multiple of the block")
  return height, width, block, halo


def num_rel_positions(block: int, halo: int) -> int:
  """Rows of each relative-position table: offsets ``key - query`` per axis span ``[-(b+h-1), b+h-1]``."""
  return 2 * (block + halo) - 1


@dataclasses.dataclass(frozen=True)
class HaloMask(Mask):
  """Blocked local 2-D attention with halo, as a mask over the flattened ``height * width`` image.

  Predicate for query token ``i = (qy, qx)`` and key token ``j = (ky, kx)`` (both ``< height * width``)::

      (qy // block) * block - halo <= ky < (qy // block) * block + block + halo   and the same for x

  Usable as ``mask=`` of :func:`jaxattn.softmax_attention` with every implementation (it compiles into block
  layouts like the built-in masks). ``pad=True`` allows image sides that are not multiples of ``block`` (the last
  block row / column is then partial). Equality with the blocked implementation:
  :func:`jaxattn.ops.halo.halo_attention` with ``mask_padding=True``.

  Raises:
    ValueError: as :func:`check_geometry`.
  """

  height: int
  width: int
  block: int
  halo: int
  pad: bool = False

  def __post_init__(self):
    check_geometry(self.height, self.width, self.block, self.halo, self.pad)

  @property
  def num_tokens(self) -> int:
    return self.height * self.width

  def predicate(self, i, j):
    i, j = np.asarray(i), np.asarray(j)
    n, w, b, h = self.num_tokens, self.width, self.block, self.halo
    qy, qx = i // w, i % w
    ky, kx = j // w, j % w
    y0, x0 = (qy // b) * b, (qx // b) * b
    return ((i < n) & (j < n) & (ky >= y0 - h) & (ky < y0 + b + h) & (kx >= x0 - h) & (kx < x0 + b + h))

  def classify(self, i0, i1, j0, j1):
    # Conservative: EMPTY when the key rows of the rectangle lie outside every window of its query rows
    # (or the rectangle is past the image), else PARTIAL (callers refine partial blocks exactly).
    i0, i1, j0, j1 = (np.asarray(a) for a in (i0, i1, j0, j1))
    n, w, b, h = self.num_tokens, self.width, self.block, self.halo
    qy_lo, qy_hi = i0 // w, (i1 - 1) // w
    ky_lo, ky_hi = j0 // w, (j1 - 1) // w
    lo = (qy_lo // b) * b - h
    hi = (qy_hi // b) * b + b + h  # exclusive
    empty = (ky_hi < lo) | (ky_lo >= hi) | (i0 >= n) | (j0 >= n)
    return np.where(empty, EMPTY, PARTIAL).astype(np.int8)
