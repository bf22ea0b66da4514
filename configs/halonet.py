"""Presets for ``python -m experiments halonet``: HaloNet-tiny vs a plain conv net vs global attention on scikit-learn's
digits placed at random offsets on a 16 x 16 canvas (HaloNet, Vaswani et al. 2021, ``../shared/papers/efficient.md``
§7).

Every model: 3x3 conv stem, stage 1 (one residual block at 16 x 16), 2x2 average pool, stage 2 (one block at 8 x 8),
mean pool, linear head. A block is ``x + mixer(LN(x))`` then ``x + MLP(LN(x))``; the mixer is a 3x3 conv (``conv``),
halo attention (``halo``: block ``block``, halo ``halo``; ``halo_h0``: halo 0), or global attention (``global``:
one block covering the feature map, same 2-D relative positions). Widths are set so parameter counts agree within
10% (the tests check it).

- ``cpu`` (default): conv, halo and global x 2 seeds, 300 steps of 64 images each (~15 epochs); the halo-0
  ablation is left to ``gpu``. Measured: ~40 CPU-s per conv run, ~225 CPU-s per halo run (the blocked XLA path is
  gather- and small-einsum-bound on CPU); global runs were not finished in the reference run
  (``experiments/results/halonet/default/``: 4 of 6 runs, 503 CPU-s), so the whole sweep likely exceeds the
  15-minute CPU budget (~17 CPU-minutes estimated).
- ``gpu``: 3 seeds, more steps (the paper's ImageNet scale is out of reach; this is the same toy, longer).
- ``smoke``: seconds (tests).
"""

from __future__ import annotations

import dataclasses

__all__ = ["HaloNetConfig", "PRESETS", "MODELS"]

MODELS = ("conv", "halo", "halo_h0", "global")


@dataclasses.dataclass(frozen=True)
class HaloNetConfig:
  """One sweep (every model x every seed is one training run).

  Attributes:
    name: preset id.
    models: subset of :data:`MODELS`.
    seeds: training seeds (parameters and data order).
    canvas: canvas side (the 8 x 8 digit is placed at a random offset per image).
    conv_width, attn_width: channels of the conv net and of the attention nets.
    heads: attention heads.
    block, halo: halo attention geometry at both stages.
    steps, batch_size, lr, eval_batch_size: training.
    weight_decay, b1, b2, eps, warmup_steps, grad_clip: AdamW + cosine (``experiments.common.train``).
    data_seed: seed of the canvas offsets.
  """

  name: str
  models: tuple[str, ...] = MODELS
  seeds: tuple[int, ...] = (0, 1)
  canvas: int = 16
  conv_width: int = 32
  attn_width: int = 40
  heads: int = 4
  block: int = 4
  halo: int = 2
  steps: int = 500
  batch_size: int = 64
  lr: float = 3e-3
  eval_batch_size: int = 270
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.99
  eps: float = 1e-8
  warmup_steps: int = 25
  grad_clip: float | None = 1.0
  data_seed: int = 0

  def __post_init__(self):
    if not self.models or any(m not in MODELS for m in self.models):
      raise ValueError(f"models must be a non-empty subset of {MODELS}, got {self.models!r}")
    if not self.seeds:
      raise ValueError("seeds must not be empty")
    for f in ("canvas", "conv_width", "attn_width", "heads", "block", "steps", "batch_size", "eval_batch_size"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{f} must be a positive int, got {v!r}")
    if self.canvas < 8 or self.canvas % (2 * self.block):
      raise ValueError(f"canvas must be >= 8 and a multiple of 2 * block = {2 * self.block}, got {self.canvas}")
    if not 0 <= self.halo <= self.block:
      raise ValueError(f"halo must lie in [0, block={self.block}], got {self.halo}")
    if self.attn_width % self.heads:
      raise ValueError(f"attn_width ({self.attn_width}) must be a multiple of heads ({self.heads})")
    if not self.lr > 0:
      raise ValueError(f"lr must be > 0, got {self.lr!r}")


PRESETS: dict[str, HaloNetConfig] = {
    "cpu": HaloNetConfig("cpu", models=("conv", "halo", "global"), steps=300),
    "gpu": HaloNetConfig("gpu", seeds=(0, 1, 2), steps=3000),
    "smoke": HaloNetConfig("smoke", models=("conv", "halo"), seeds=(0,), conv_width=16, attn_width=20, heads=2,
                           steps=4, batch_size=16, eval_batch_size=540),
}
