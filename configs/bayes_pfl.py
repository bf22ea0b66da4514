"""Presets for ``python -m experiments bayes_pfl``: zero-shot localisation on unseen digit classes with Bayes-PFL's
residual cross-modal attention (RCA; ``papers/cross.md`` section 1 in the shared notes) vs static prompts (plain
cosine-similarity maps), a patch-intensity heuristic and random maps.

- ``cpu`` (default): 24x24 canvases, 4x4 patches, 256 training canvases of digits 0-4, 256 test canvases of 5-9,
  3 seeds, 300 full-batch Adam steps.
- ``gpu``: larger canvases and sets, 10 seeds.
- ``smoke``: 32 canvases, 1 seed, 20 steps (tests).
"""

from __future__ import annotations

import dataclasses

__all__ = ["BayesPFLConfig", "PRESETS"]


@dataclasses.dataclass(frozen=True)
class BayesPFLConfig:
  """One sweep.

  Attributes:
    name: preset id.
    canvas: canvas side in pixels (a multiple of ``patch``).
    patch: patch side.
    noise: std of the Gaussian background noise.
    strokes: random clutter strokes per canvas.
    train_classes: digit classes seen in training (the rest are the unseen test classes).
    n_train, n_test: canvases.
    width: text / projected patch width ``C_t``; ``heads``: RCA heads.
    seeds, steps, lr: seeds, full-batch Adam steps and learning rate.
    seed: base seed (frozen backbone and data).
  """

  name: str
  canvas: int = 24
  patch: int = 4
  noise: float = 0.3
  strokes: int = 2
  train_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
  n_train: int = 256
  n_test: int = 256
  width: int = 32
  heads: int = 4
  seeds: int = 3
  steps: int = 300
  lr: float = 1e-2
  seed: int = 0

  def __post_init__(self):
    for f in ("canvas", "patch", "strokes", "n_train", "n_test", "width", "heads", "seeds", "steps"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < (0 if f == "strokes" else 1):
        raise ValueError(f"{f} must be a positive int, got {v!r}")
    if self.canvas % self.patch or self.canvas < 8 + self.patch:
      raise ValueError(f"canvas ({self.canvas}) must be a multiple of patch ({self.patch}) and hold an 8x8 digit")
    if not self.train_classes or not set(self.train_classes) < set(range(10)):
      raise ValueError(f"train_classes must be a proper subset of 0-9, got {self.train_classes!r}")
    if self.width % self.heads:
      raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")


PRESETS: dict[str, BayesPFLConfig] = {
    "cpu": BayesPFLConfig("cpu"),
    "gpu": BayesPFLConfig("gpu", canvas=48, n_train=4096, n_test=2048, width=128, seeds=10, steps=2000),
    "smoke": BayesPFLConfig("smoke", n_train=32, n_test=32, seeds=1, steps=20),
}
