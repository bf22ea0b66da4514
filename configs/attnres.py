"""Presets for ``python -m experiments attnres``: Attention Residuals (Kimi Team 2026; ``../shared/papers/
efficient.md`` §10) on a tiny byte-level LM over stdlib text (``configs/textlm.py``): standard pre-norm residuals vs
Full AttnRes vs Block AttnRes at equal width and depth (AttnRes adds 2 D parameters per sub-layer plus 2 D for the
output: +1152 at D = 64, L = 4, about 0.5 %).

Verdict rule (fixed before any run): for each AttnRes variant and seed, ``delta = test loss(variant) - test
loss(standard)`` in nats/byte, paired by seed. A variant *improves* when every seed's delta is negative and the mean
delta is <= -0.005 nats/byte (the paper's Table 4 gaps are -0.029 Full and -0.020 Block). ``reproduced``: both
variants improve and two-phase inference equals one-phase inference (max |logit difference| <= 1e-4);
``partly``: exactly one variant improves (and two-phase is exact); ``not reproduced``: neither improves, or
two-phase inference is not exact.

- ``cpu`` (default): D = 64, 4 layers (8 sub-layers), 4 heads, Block S = 4 sub-layers (2 blocks + embedding),
  64-byte windows, batch 16, 600 steps, 2 seeds, 3 residual kinds (6 runs) plus timing: ~10 CPU-minutes.
- ``gpu``: D = 512, 16 layers (32 sub-layers, Table 4's depth), S = 4 (8 blocks), 512-byte windows, 20000 steps.
- ``smoke``: D = 16, 2 layers, 6 steps, 1 seed (tests).
"""

from __future__ import annotations

import dataclasses

from configs.common import AdamWConfig
from configs.textlm import CorpusConfig

__all__ = ["ModelConfig", "TimingConfig", "AttnResConfig", "PRESETS", "MIN_GAIN", "MAX_TWO_PHASE_DIFF"]

MIN_GAIN = 0.005  # nats/byte: the smallest mean improvement that counts (see the verdict rule above)
MAX_TWO_PHASE_DIFF = 1e-4  # max |logits(two-phase) - logits(one-phase)| for "exact"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The LM (:class:`jaxattn.nn.AttnResLM`): width, layers (each = attention + MLP sub-layer), heads, MLP ratio, and
  ``block_size`` (sub-layers per block of Block AttnRes)."""

  features: int = 64
  num_layers: int = 4
  num_heads: int = 4
  mlp_ratio: int = 4
  block_size: int = 4

  def __post_init__(self):
    for f in ("features", "num_layers", "num_heads", "mlp_ratio", "block_size"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"model.{f} must be a positive int, got {v!r}")
    if self.features % self.num_heads:
      raise ValueError(f"model.features ({self.features}) must be a multiple of model.num_heads ({self.num_heads})")


@dataclasses.dataclass(frozen=True)
class TimingConfig:
  """Step-time, memory and two-phase inference measurements: batch, repeats (median)."""

  batch_size: int = 16
  repeats: int = 5


@dataclasses.dataclass(frozen=True)
class AttnResConfig:
  """One experiment: corpus, model, optimisation, seeds and the residual kinds compared (``"none"`` = standard
  pre-norm residual, the baseline, must come first)."""

  name: str
  corpus: CorpusConfig = CorpusConfig(seq_len=64, max_test_bytes=32_768)
  model: ModelConfig = ModelConfig()
  train: AdamWConfig = AdamWConfig(steps=600, batch_size=16, lr=3e-3, warmup_steps=50, eval_every=150,
                                   eval_batch_size=128)
  seeds: tuple[int, ...] = (0, 1)
  modes: tuple[str, ...] = ("none", "full", "block")
  timing: TimingConfig = TimingConfig()

  def __post_init__(self):
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds!r}")
    allowed = ("none", "full", "block")
    if not self.modes or self.modes[0] != "none" or any(m not in allowed for m in self.modes):
      raise ValueError(f"modes must start with 'none' (the baseline) and use {allowed}, got {self.modes!r}")


PRESETS: dict[str, AttnResConfig] = {
    "cpu": AttnResConfig("cpu"),
    "gpu": AttnResConfig(
        "gpu", corpus=CorpusConfig(seq_len=512, max_train_bytes=50_000_000, max_test_bytes=1_000_000, subdir=""),
        model=ModelConfig(features=512, num_layers=16, num_heads=8, block_size=4),
        train=AdamWConfig(steps=20000, batch_size=64, lr=1e-3, warmup_steps=1000, eval_every=2000,
                          eval_batch_size=64),
        seeds=(0, 1, 2), timing=TimingConfig(batch_size=64, repeats=20)),
    "smoke": AttnResConfig(
        "smoke", corpus=CorpusConfig(seq_len=16, max_train_bytes=20_000, max_test_bytes=1_000),
        model=ModelConfig(features=16, num_layers=2, num_heads=2, mlp_ratio=2, block_size=2),
        train=AdamWConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=3, eval_batch_size=64),
        seeds=(0,), timing=TimingConfig(batch_size=2, repeats=1)),
}
