"""Configuration pieces shared by several experiments' presets (imports nothing from ``experiments``)."""

from __future__ import annotations

import dataclasses

__all__ = ["AdamWConfig"]


@dataclasses.dataclass(frozen=True)
class AdamWConfig:
  """AdamW on a warmup-cosine schedule (``experiments.common.train.adamw_cosine``) for a small supervised model.

  Attributes:
    steps, batch_size, lr: optimizer steps, batch, peak learning rate.
    weight_decay, b1, b2, eps, warmup_steps, grad_clip: optimizer settings (``grad_clip=None``: no clipping).
    eval_every, eval_batch_size: held-out evaluation interval and batch.
    checkpoint_every: Orbax checkpoint interval (``None``: at each evaluation).
    seed: initialisation and batch-order seed.
  """

  steps: int = 2400
  batch_size: int = 64
  lr: float = 2e-3
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-8
  warmup_steps: int = 100
  grad_clip: float | None = 1.0
  eval_every: int = 400
  eval_batch_size: int = 256
  checkpoint_every: int | None = None
  seed: int = 0

  def __post_init__(self):
    for f in ("steps", "batch_size", "eval_every", "eval_batch_size"):
      if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
        raise ValueError(f"train.{f} must be a positive int, got {getattr(self, f)!r}")
    if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      raise ValueError(f"train.warmup_steps must be a non-negative int, got {self.warmup_steps!r}")
    if not 0.0 < self.lr < 1.0:
      raise ValueError(f"train.lr must lie in (0, 1), got {self.lr!r}")
