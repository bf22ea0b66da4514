"""Presets for ``python -m experiments cab``: CAB's efficiency length and a mini CAB benchmark over the zoo of
:mod:`jaxattn.nn.efficient` (CAB, Zhang et al. 2023, arXiv:2210.07661; ``../shared/papers/efficient.md`` §5).

- ``cpu`` (default): efficiency length at N = 64..8192 (batch 1, d_model 128, 4 heads: CAB's D = 512, 8 heads and
  batch 4 do not fit 2 cores in minutes), and the mini benchmark: two synthetic tasks per pattern, one small model
  per (zoo member, pattern, task) trained for ``steps`` steps. About 10-14 minutes on 2 idle cores.
- ``gpu``: CAB's own efficiency-length settings (batch 4, D = 512, 8 heads, landmarks 16, window 16) at
  N = 128..32768, and the benchmark with longer sequences and more steps.
- ``smoke``: three lengths, two zoo members, one task for NS and CS, a few steps (the tests).
"""

from __future__ import annotations

import dataclasses

__all__ = ["EfficiencyConfig", "BenchConfig", "CabConfig", "PRESETS", "ALL_MODELS", "TASKS"]

# Every member of jaxattn.nn.efficient.ZOO (configs may not import jaxattn; a test checks the two agree).
ALL_MODELS = ("softmax", "local", "cosformer", "performer", "linear_elu", "nystrom", "lara", "probsparse", "abc",
              "s4d", "longshort")
# Two synthetic tasks per CAB pattern (see experiments/cab/metrics.py for their definitions).
TASKS = {"NS": ("reverse", "count"), "CS": ("recall", "count_prefix"), "NC": ("lookup", "src_count"),
         "CC": ("lookup_prev", "src_count")}


@dataclasses.dataclass(frozen=True)
class EfficiencyConfig:
  """Time and compiled memory of one attention layer (projections included) against sequence length.

  Attributes:
    lengths: sequence lengths N (increasing).
    batch, d_model, num_heads: the layer's shape.
    models: zoo members to measure (pattern NS, which every member supports); the dense baselines ``softmax``
      materialised (``implementation="reference"``) and blockwise (``"xla"``) are always measured.
    landmarks, window: landmarks / slots / projected rank and window sizes (CAB: 16 and 16).
    repeats: timed samples per cell (median reported).
    memory_limit_gb: a cell whose compiled temporaries exceed this is recorded as skipped, not run.
  """

  lengths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
  batch: int = 1
  d_model: int = 128
  num_heads: int = 4
  models: tuple[str, ...] = ALL_MODELS[1:]
  landmarks: int = 16
  window: int = 16
  repeats: int = 3
  memory_limit_gb: float = 6.0

  def __post_init__(self):
    if not self.lengths or list(self.lengths) != sorted(set(self.lengths)) or self.lengths[0] < 16:
      raise ValueError(f"lengths must be increasing ints >= 16, got {self.lengths!r}")
    if any(m not in ALL_MODELS or m == "softmax" for m in self.models):
      raise ValueError(f"models must be zoo members other than softmax (always measured), got {self.models!r}")
    for f in ("batch", "d_model", "num_heads", "landmarks", "window", "repeats"):
      if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
        raise ValueError(f"{f} must be a positive int, got {getattr(self, f)!r}")
    if not self.memory_limit_gb > 0:
      raise ValueError(f"memory_limit_gb must be positive, got {self.memory_limit_gb!r}")
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """The mini CAB benchmark: per pattern, every zoo member that supports it is trained on each task.

  Attributes:
    patterns: CAB patterns to run.
    tasks_per_pattern: how many of each pattern's tasks (from :data:`TASKS`) to run.
    models: zoo members (those not supporting a pattern are skipped for it); ``"none"`` (no attention layer,
      CAB's "benefit of attention" baseline) is always added.
    seq_len: self-attention length; for cross patterns the target length (the source is ``src_len``).
    src_len: source length of cross patterns.
    vocab: token values of the count tasks; the lookup/recall tasks use ``vocab`` keys and ``vocab`` values.
    d_model, num_heads, num_layers: the model (self patterns: ``num_layers`` blocks of the member; cross: a fixed
      softmax source encoder block, a fixed softmax target block, causal for CC, then one cross block of the
      member).
    steps, batch_size, lr: training (Adam, cosine decay).
    cross_steps: training steps of the cross patterns (NC, CC), whose lookup task needs longer (at 200 steps every
      model, softmax included, sits near 0.32 accuracy; at 600 softmax reaches 0.86).
    train_size, eval_size: examples (disjoint seeds).
    window, landmarks: the members' window / landmark sizes at this length.
    seed: data and initialisation seed.
  """

  patterns: tuple[str, ...] = ("NS", "CS", "NC", "CC")
  tasks_per_pattern: int = 2
  models: tuple[str, ...] = ALL_MODELS
  seq_len: int = 32
  src_len: int = 32
  vocab: int = 8
  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 2
  steps: int = 200
  cross_steps: int = 500
  batch_size: int = 32
  lr: float = 3e-3
  train_size: int = 4096
  eval_size: int = 512
  window: int = 5
  landmarks: int = 8
  seed: int = 0

  def __post_init__(self):
    if not self.patterns or any(p not in TASKS for p in self.patterns):
      raise ValueError(f"patterns must be a non-empty subset of {tuple(TASKS)}, got {self.patterns!r}")
    if self.tasks_per_pattern not in (1, 2):
      raise ValueError(f"tasks_per_pattern must be 1 or 2, got {self.tasks_per_pattern!r}")
    if not self.models or any(m not in ALL_MODELS for m in self.models):
      raise ValueError(f"models must be a non-empty subset of {ALL_MODELS}, got {self.models!r}")
    for f in ("seq_len", "src_len", "vocab", "d_model", "num_heads", "num_layers", "steps", "cross_steps",
              "batch_size", "train_size", "eval_size", "window", "landmarks"):
      if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
        raise ValueError(f"{f} must be a positive int, got {getattr(self, f)!r}")
    if self.seq_len < 8 or self.seq_len % 2:
      raise ValueError(f"seq_len must be an even int >= 8, got {self.seq_len!r}")
    if self.src_len < 2 * self.vocab:
      raise ValueError(f"src_len ({self.src_len}) must be >= 2 * vocab ({2 * self.vocab}) to hold every key")
    if not self.lr > 0:
      raise ValueError(f"lr must be positive, got {self.lr!r}")
    if self.batch_size > self.train_size:
      raise ValueError(f"batch_size {self.batch_size} exceeds train_size {self.train_size}")


@dataclasses.dataclass(frozen=True)
class CabConfig:
  """One run: ``efficiency`` and ``bench``."""

  name: str
  efficiency: EfficiencyConfig = EfficiencyConfig()
  bench: BenchConfig = BenchConfig()


PRESETS: dict[str, CabConfig] = {
    "cpu": CabConfig("cpu"),
    "gpu": CabConfig("gpu", EfficiencyConfig(lengths=(128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768),
                                             batch=4, d_model=512, num_heads=8, repeats=20, memory_limit_gb=60.0),
                     BenchConfig(seq_len=128, src_len=128, vocab=16, d_model=128, num_layers=2, steps=2000,
                                 cross_steps=4000, batch_size=64, train_size=32768, eval_size=2048, window=15,
                                 landmarks=16)),
    "smoke": CabConfig("smoke", EfficiencyConfig(lengths=(32, 64, 128), d_model=32, num_heads=2,
                                                 models=("local",), repeats=1),
                       BenchConfig(patterns=("NS", "CS"), tasks_per_pattern=1, models=("softmax", "local"),
                                   seq_len=16, src_len=16, d_model=16, num_heads=2, num_layers=1, steps=3,
                                   cross_steps=3, batch_size=8, train_size=64, eval_size=16)),
}
