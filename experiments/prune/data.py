"""Canvases for the pruning experiment: one real digit among scrambled ones, optional padding, two question forms.

Record fields (``N = (size / patch)^2`` visual tokens, ``P = PROMPT`` text tokens):

- ``image`` f32 ``[S, S]``; ``pad`` bool ``[N]`` (padding patches: the bottom ``pad_rows`` patch rows of a padded
  canvas, exactly 0, no noise);
- ``target`` f32 ``[N]``: the fraction of each patch covered by the real digit's 8 x 8 box (the oracle's labels);
- ``tokens`` int32 ``[P]`` ``<bos> what digit ?`` or ``<bos> is it a <d> ?`` (right-padded), ``length`` int32,
  ``answer`` int32 (a word id: the digit, or ``yes`` / ``no``), ``label`` int32 (the real digit's class).

Scrambled distractors are digit images whose 64 pixels are permuted (one fixed permutation per draw): the same ink
as a digit, no digit shape. Train / calibration canvases use the training digit images, test canvases the held-out
fifth (:func:`experiments.substrates.canvas.digit_pool`), so a test score is on unseen handwriting.
"""

from __future__ import annotations

import numpy as np

from configs.prune import TaskConfig
from experiments.common.data import GeneratedSource
from experiments.substrates.canvas import DIGIT, digit_pool

__all__ = ["WORDS", "PROMPT", "word", "PruneSource", "make_records"]

WORDS = ("<pad>", "<bos>", "what", "digit", "?", "is", "it", "a", "yes", "no") + tuple(str(d) for d in range(10))
PROMPT = 6  # <bos> is it a d ?
_ID = {w: i for i, w in enumerate(WORDS)}


def word(w: str) -> int:
  return _ID[w]


def _corners(rng, task: TaskConfig, k: int, height: int) -> list[tuple[int, int]]:
  """``k`` non-overlapping 8 x 8 top-left corners (step 2 px) inside the top ``height`` pixel rows."""
  xs = np.arange(0, task.size - DIGIT + 1, 2)
  ys = np.arange(0, height - DIGIT + 1, 2)
  while True:
    out: list[tuple[int, int]] = []
    for _ in range(400):
      x, y = int(xs[rng.integers(len(xs))]), int(ys[rng.integers(len(ys))])
      if all(abs(x - a) >= DIGIT or abs(y - b) >= DIGIT for a, b in out):
        out.append((x, y))
        if len(out) == k:
          return out


def make_records(task: TaskConfig, n: int, split: str) -> dict[str, np.ndarray]:
  """``n`` records of ``split`` (``"train"``, ``"calib"`` or ``"test"``); see the module docstring."""
  if split not in ("train", "calib", "test"):
    raise ValueError(f"split must be 'train', 'calib' or 'test', got {split!r}")
  images, labels = digit_pool("test" if split == "test" else "train")
  rng = np.random.default_rng([task.seed, ("train", "calib", "test").index(split), 4099])
  S, p = task.size, task.patch
  g = S // p
  out = dict(image=np.zeros((n, S, S), np.float32), pad=np.zeros((n, g * g), bool),
             target=np.zeros((n, g * g), np.float32), tokens=np.zeros((n, PROMPT), np.int32),
             length=np.zeros(n, np.int32), answer=np.zeros(n, np.int32), label=np.zeros(n, np.int32))
  for i in range(n):
    padded = rng.random() < task.pad_prob
    height = S - task.pad_rows * p if padded else S
    corners = _corners(rng, task, 1 + task.num_distractors, height)
    canvas = np.zeros((S, S), np.float32)
    j = int(rng.integers(len(labels)))
    x, y = corners[0]
    canvas[y:y + DIGIT, x:x + DIGIT] = images[j]
    for (dx, dy) in corners[1:]:
      img = images[int(rng.integers(len(labels)))].reshape(-1)[rng.permutation(DIGIT * DIGIT)]
      canvas[dy:dy + DIGIT, dx:dx + DIGIT] = img.reshape(DIGIT, DIGIT)
    canvas[:height] += rng.normal(0.0, task.noise, (height, S)).astype(np.float32) if task.noise else 0.0
    out["image"][i] = canvas
    rows = np.repeat(np.arange(g), g)
    out["pad"][i] = padded & (rows >= g - task.pad_rows)
    # overlap of the real digit's box with each patch, as a fraction of the patch area
    px, py = np.arange(g) * p, np.arange(g) * p
    ox = np.clip(np.minimum(px + p, x + DIGIT) - np.maximum(px, x), 0, None)
    oy = np.clip(np.minimum(py + p, y + DIGIT) - np.maximum(py, y), 0, None)
    out["target"][i] = (oy[:, None] * ox[None, :]).reshape(-1) / (p * p)
    c = int(labels[j])
    out["label"][i] = c
    if rng.random() < 0.5:
      q, a = ["<bos>", "what", "digit", "?"], str(c)
    else:
      d = c if rng.random() < 0.5 else int((c + rng.integers(1, 10)) % 10)
      q, a = ["<bos>", "is", "it", "a", str(d), "?"], "yes" if d == c else "no"
    out["tokens"][i, :len(q)] = [_ID[w] for w in q]
    out["length"][i] = len(q)
    out["answer"][i] = _ID[a]
  return out


class PruneSource(GeneratedSource):
  """Grain source of :func:`make_records`."""

  PARAMS = ("task", "n", "split")

  def __init__(self, task: TaskConfig, n: int, split: str):
    self.task, self.n, self.split = task, n, split

  def generate(self):
    return make_records(self.task, self.n, self.split)
