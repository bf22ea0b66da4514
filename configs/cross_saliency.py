"""Presets for ``python -m experiments cross_saliency``: cross-attention vs gradient saliency on a toy seq2seq task
(Papi et al., "Cross-Attention is Half Explanation in Speech-to-Text Models", 2025; ``../shared/papers/cross.md``
§2 and the CPU pilot §21-C).

Two variants (one trained encoder-decoder each): ``reverse`` (``y_i = x_{T-1-i}``, 2 encoder layers) and
``mix2`` (``y_i = (x_{T-1-i} + x_{T-2-i}) mod V``, 4 encoder layers: the encoder must mix two source tokens, the
pilot's "context-mixing" extension).

- ``cpu`` (default): T = 10, V = 16, d = 64, 4 heads, 2 decoder layers, 1500 steps per variant, 256 analysis
  sequences, 16-step integrated gradients.
- ``gpu``: T = 32, V = 64, d = 256, 8 heads, 4 decoder layers, 20000 steps, 2048 sequences (not run here).
- ``smoke``: tiny (tests).
"""

from __future__ import annotations

import dataclasses

from configs.common import AdamWConfig as TrainConfig

__all__ = ["Variant", "ModelConfig", "TrainConfig", "CrossSaliencyConfig", "PRESETS", "TASKS"]

TASKS = ("reverse", "mix2")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One trained model: ``task`` in :data:`TASKS` and its encoder depth."""

  task: str
  enc_layers: int

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
    if self.enc_layers < 1:
      raise ValueError(f"enc_layers must be positive, got {self.enc_layers}")

  @property
  def name(self) -> str:
    return f"{self.task}_enc{self.enc_layers}"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  d_model: int = 64
  num_heads: int = 4
  dec_layers: int = 2
  mlp_ratio: int = 4


@dataclasses.dataclass(frozen=True)
class CrossSaliencyConfig:
  """One experiment.

  Attributes:
    name: preset id.
    variants: the trained models.
    length: source (= target) length ``T``.
    vocab: symbol vocabulary ``V`` (ids 1..V; 0 is the decoder's BOS).
    model, train: architecture and optimisation.
    num_train: training sequences; num_test: analysis sequences (disjoint from training by construction).
    ig_steps: integrated-gradients quadrature intervals.
    seed: data seed.
  """

  name: str
  variants: tuple = (Variant("reverse", 2), Variant("mix2", 4))
  length: int = 10
  vocab: int = 16
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig(steps=1500, eval_every=500)
  num_train: int = 65536
  num_test: int = 256
  ig_steps: int = 16
  seed: int = 0

  def __post_init__(self):
    if not self.variants or len({v.name for v in self.variants}) != len(self.variants):
      raise ValueError(f"variants must be a non-empty tuple of distinct Variants, got {self.variants!r}")
    if self.length < 3 or self.vocab < 2:
      raise ValueError(f"length must be >= 3 and vocab >= 2, got {self.length}, {self.vocab}")
    if self.ig_steps < 1 or self.num_test < 2:
      raise ValueError("ig_steps must be >= 1 and num_test >= 2")


PRESETS: dict[str, CrossSaliencyConfig] = {
    "cpu": CrossSaliencyConfig("cpu", train=TrainConfig(steps=1500, eval_every=500)),
    "gpu": CrossSaliencyConfig("gpu", length=32, vocab=64, model=ModelConfig(d_model=256, num_heads=8, dec_layers=4),
                               variants=(Variant("reverse", 4), Variant("mix2", 6)),
                               train=TrainConfig(steps=20000, batch_size=128, lr=1e-3, eval_every=2000),
                               num_train=1 << 20, num_test=2048, ig_steps=32),
    "smoke": CrossSaliencyConfig("smoke", length=6, vocab=8, model=ModelConfig(d_model=32, num_heads=2, dec_layers=2),
                                 variants=(Variant("reverse", 1), Variant("mix2", 2)),
                                 train=TrainConfig(steps=40, batch_size=32, eval_every=20, eval_batch_size=32),
                                 num_train=512, num_test=16, ig_steps=4),
}
