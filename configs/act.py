"""Presets for ``python -m experiments act``: hidden attention sinks and ACT calibration (Yu et al., ICML 2024;
``../shared/papers/efficient.md`` §11) on a small decoder trained on in-context classification.

The task (few-shot label mapping): every sequence draws its own random bijection classes -> label tokens, then
shows ``shots`` demonstrations ``item : label ,`` and ends with a query ``item :``; the model must answer the label
the demonstrations gave the query's class. Items belong to classes by a fixed partition of the item vocabulary (the
model learns it in its weights); the mapping must be read from the context. Demonstration labels are flipped at
random with probability ``label_noise`` (the query answer never is), so the task has headroom.

- ``cpu`` (default): 4 layers x 4 heads, d = 64, 8 shots (35 tokens), 2400 steps; ~3-6 CPU-minutes in all.
- ``gpu``: 8 layers x 8 heads, d = 256, 16 shots, 20000 steps (not run here).
- ``smoke``: 2 layers x 2 heads, 60 steps (tests).
"""

from __future__ import annotations

import dataclasses

from configs.common import AdamWConfig as TrainConfig

__all__ = ["TaskConfig", "ModelConfig", "TrainConfig", "ActConfig", "PRESETS", "get_config"]


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """In-context classification data.

  Attributes:
    num_classes: classes (= label tokens; each sequence maps classes to labels by a random permutation).
    items_per_class: item tokens per class.
    shots: demonstrations per sequence.
    label_noise: probability that a demonstration's label is replaced by a random other label.
    num_train, num_calib, num_test: sequences (disjoint by construction: see ``experiments/act/run.py``).
    seed: data seed.
  """

  num_classes: int = 4
  items_per_class: int = 8
  shots: int = 8
  label_noise: float = 0.15
  num_train: int = 32768
  num_calib: int = 512
  num_test: int = 2048
  seed: int = 0

  def __post_init__(self):
    for f in ("num_classes", "items_per_class", "shots", "num_train", "num_calib", "num_test"):
      if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
        raise ValueError(f"{f} must be a positive int, got {getattr(self, f)!r}")
    if self.num_classes < 2:
      raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
    if not 0.0 <= self.label_noise < 1.0:
      raise ValueError(f"label_noise must lie in [0, 1), got {self.label_noise!r}")

  @property
  def seq_len(self) -> int:
    return 1 + 4 * self.shots + 2  # BOS, shots x (item : label ,), query item :

  @property
  def vocab_size(self) -> int:
    return 3 + self.num_classes + self.num_classes * self.items_per_class


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The decoder (:class:`experiments.cross_saliency.model.DecoderLM`)."""

  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 4
  mlp_ratio: int = 4


@dataclasses.dataclass(frozen=True)
class ActConfig:
  """One experiment.

  Attributes:
    name: preset id.
    task, model, train: data, architecture, optimisation.
    beta, tau: ACT's settings (official defaults 0.4 and 0.1).
    skip_first, skip_last: layers never calibrated at the bottom / top (the official search skips layers 0-1 and
      the last of 32; here the first and the last by default).
    random_draws: random head sets (as many heads as the search kept) averaged for the random baseline.
    stats_sequences: test sequences whose attention is captured for the sink statistics and pictures.
  """

  name: str
  task: TaskConfig = TaskConfig()
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  beta: float = 0.4
  tau: float = 0.1
  skip_first: int = 1
  skip_last: int = 1
  random_draws: int = 5
  stats_sequences: int = 256

  def __post_init__(self):
    if not 0.0 <= self.beta <= 1.0:
      raise ValueError(f"beta must lie in [0, 1], got {self.beta!r}")
    if self.skip_first < 0 or self.skip_last < 0 or self.skip_first + self.skip_last >= self.model.num_layers:
      raise ValueError(f"skip_first={self.skip_first} + skip_last={self.skip_last} must leave at least one of the "
                       f"{self.model.num_layers} layers to calibrate")
    if self.random_draws < 1 or self.stats_sequences < 1:
      raise ValueError("random_draws and stats_sequences must be positive")


PRESETS: dict[str, ActConfig] = {
    "cpu": ActConfig("cpu"),
    "gpu": ActConfig("gpu", task=TaskConfig(num_classes=8, items_per_class=16, shots=16, num_train=1 << 20,
                                            num_calib=900, num_test=8192),
                     model=ModelConfig(d_model=256, num_heads=8, num_layers=8),
                     train=TrainConfig(steps=20000, batch_size=128, lr=1e-3, eval_every=2000, eval_batch_size=512),
                     skip_first=2, random_draws=10, stats_sequences=512),
    "smoke": ActConfig("smoke", task=TaskConfig(shots=4, num_train=1024, num_calib=64, num_test=128),
                       model=ModelConfig(d_model=32, num_heads=2, num_layers=3),
                       train=TrainConfig(steps=60, batch_size=32, eval_every=30, eval_batch_size=64),
                       random_draws=2, stats_sequences=16),
}


def get_config(preset: str) -> ActConfig:
  if preset not in PRESETS:
    raise ValueError(f"unknown act preset {preset!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[preset]
