"""Digit canvases: scikit-learn's bundled 8x8 digits pasted at random positions on a noisy canvas, with boxes.

A scene holds ``min_digits..max_digits`` digits of distinct classes (so "the 3" names one object; the others are
its distractors), placed without overlap at multiples of ``coord_step`` pixels. Every array is a pure function of
``(config, split, n, seed)``. Train and test scenes never share a digit *image*: the 1797 images are split by index
(``index % 5 == 0`` is the test pool), so a test score measures generalisation to unseen handwriting, not memory.

Record fields (``K = max_digits``; padding rows have label -1 and box 0):

- ``image`` f32 ``[S, S]``: the canvas (digit pixels in [0, 1] plus N(0, noise)).
- ``labels`` int32 ``[K]``: digit classes.
- ``boxes`` int32 ``[K, 4]``: ``(x0, y0, x1, y1)`` in pixels, half-open (``x1 = x0 + 8``); x is the column.
- ``objects`` f32 ``[K, 64]``: the 8x8 crop of the noisy canvas under each box (LXMERT-style region features).
- ``count`` int32: digits in the scene.
"""

from __future__ import annotations

import functools

import numpy as np

from configs.substrates import CanvasConfig
from experiments.common.data import GeneratedSource

__all__ = ["DIGIT", "SPLITS", "digit_pool", "make_scenes", "DigitCanvasSource", "iou"]

DIGIT = 8  # side of a sklearn digit in pixels
SPLITS = ("train", "test")


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits
  d = load_digits()
  return (d.images / 16.0).astype(np.float32), d.target.astype(np.int32)


def digit_pool(split: str) -> tuple[np.ndarray, np.ndarray]:
  """``(images [N, 8, 8] f32 in [0, 1], labels [N] int32)`` of one split (test: every fifth image)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  images, labels = _digits()
  keep = (np.arange(len(labels)) % 5 == 0) == (split == "test")
  return images[keep], labels[keep]


def _place(rng: np.random.Generator, cfg: CanvasConfig, k: int) -> list[tuple[int, int]]:
  """``k`` non-overlapping top-left corners ``(x0, y0)`` on the placement grid (rejection sampling)."""
  grid = np.arange(0, cfg.size - DIGIT + 1, cfg.coord_step)
  while True:
    corners: list[tuple[int, int]] = []
    for _ in range(200):
      x, y = int(rng.choice(grid)), int(rng.choice(grid))
      if all(abs(x - a) >= DIGIT + cfg.gap or abs(y - b) >= DIGIT + cfg.gap for a, b in corners):
        corners.append((x, y))
        if len(corners) == k:
          return corners


def make_scenes(cfg: CanvasConfig, n: int, seed: int, split: str = "train") -> dict[str, np.ndarray]:
  """``n`` scenes (see the module docstring for the fields)."""
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"n must be a positive int, got {n!r}")
  images, labels = digit_pool(split)
  by_class = [np.flatnonzero(labels == c) for c in range(10)]
  rng = np.random.default_rng([seed, SPLITS.index(split), 7919])
  K, S = cfg.max_digits, cfg.size
  out = dict(image=np.zeros((n, S, S), np.float32), labels=np.full((n, K), -1, np.int32),
             boxes=np.zeros((n, K, 4), np.int32), objects=np.zeros((n, K, DIGIT * DIGIT), np.float32),
             count=np.zeros((n,), np.int32))
  for i in range(n):
    k = int(rng.integers(cfg.min_digits, cfg.max_digits + 1))
    classes = rng.choice(10, size=k, replace=False)
    canvas = np.zeros((S, S), np.float32)
    for j, ((x, y), c) in enumerate(zip(_place(rng, cfg, k), classes)):
      img = images[rng.choice(by_class[c])]
      canvas[y:y + DIGIT, x:x + DIGIT] = img
      out["labels"][i, j] = c
      out["boxes"][i, j] = (x, y, x + DIGIT, y + DIGIT)
    canvas += rng.normal(0.0, cfg.noise, canvas.shape).astype(np.float32) if cfg.noise else 0.0
    out["image"][i] = canvas
    for j in range(k):
      x0, y0, x1, y1 = out["boxes"][i, j]
      out["objects"][i, j] = canvas[y0:y1, x0:x1].reshape(-1)
    out["count"][i] = k
  return out


class DigitCanvasSource(GeneratedSource):
  """Grain source of digit canvases (:func:`make_scenes`)."""

  PARAMS = ("cfg", "n", "seed", "split")

  def __init__(self, cfg: CanvasConfig, n: int, seed: int, split: str = "train"):
    self.cfg, self.n, self.seed, self.split = cfg, n, seed, split

  def generate(self):
    return make_scenes(self.cfg, self.n, self.seed, self.split)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Intersection over union of boxes ``[..., 4]`` ``(x0, y0, x1, y1)`` (0 where a box is empty)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = iw * ih
  area = lambda x: np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)
  union = area(a) + area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
