"""Presets for ``python -m experiments dse``: DSE (Barkan et al., AAAI 2020; ``../shared/papers/cross.md`` §6) at toy
scale on the template-text paraphrase task (``experiments/substrates/text.py``).

A cross-encoder teacher reads each pair jointly; bi-encoder students embed each sentence alone and score a pair
with DSE's head on ``[u, v, u*v, |u-v|]``, trained on labels only (``alpha = 0``) or distilled from the teacher's
logits (``alpha`` in ``alphas``); an untrained and a contrastively trained (InfoNCE, cosine) bi-encoder, a lexical
overlap threshold and the majority class are the baselines. Throughput: all-pairs scoring of
``rank_n x rank_n`` sentences (encode once + head for the bi-encoder; one joint pass per pair for the teacher).

- ``cpu`` (default): 2 layers x 4 heads, d = 64; 4000 teacher steps (the joint encoder sits at chance for the
  first ~700 steps and was still learning at 2000), 2000 student steps; ~10-12 CPU-minutes.
- ``gpu``: 4 layers x 8 heads, d = 256, larger text space, 20000 steps (not run here).
- ``smoke``: 1 layer, 30 steps (tests).
"""

from __future__ import annotations

import dataclasses

from configs.common import AdamWConfig

__all__ = ["TextConfig", "ModelConfig", "DseConfig", "PRESETS", "get_config"]


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The template text (``experiments.substrates.text.TextSpec`` fields) and pair counts.

  Attributes:
    num_concepts, num_synonyms, num_topics, num_noise, test_fraction: the generator's vocabulary and split.
    train_pairs, test_pairs: labelled pairs per split (half paraphrases; train and test share no latent tuple).
    seed: data seed.
  """

  num_concepts: int = 12
  num_synonyms: int = 3
  num_topics: int = 4
  num_noise: int = 20
  test_fraction: float = 0.2
  train_pairs: int = 20000
  test_pairs: int = 2000
  seed: int = 0

  def __post_init__(self):
    if self.train_pairs < 16 or self.test_pairs < 16:
      raise ValueError(f"train_pairs and test_pairs must be >= 16, got {self.train_pairs}, {self.test_pairs}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Both encoders (:class:`jaxattn.nn.pair.TextBackbone` + :class:`~jaxattn.nn.pair.PairEncoder`).

  ``pooling`` is the bi-encoders' sentence pooling (DSE's student default is a mean); ``cross_pooling`` the
  cross-encoder's (the [CLS] state, as in BERT cross-encoders and Trans-Encoder's definition)."""

  features: int = 64
  num_heads: int = 4
  num_layers: int = 2
  mlp_ratio: int = 4
  pooling: str = "mean"
  cross_pooling: str = "cls"
  dse_hidden: int = 128

  def __post_init__(self):
    for f in ("pooling", "cross_pooling"):
      if getattr(self, f) not in ("mean", "cls", "last", "attention"):
        raise ValueError(f"model.{f} must be mean, cls, last or attention, got {getattr(self, f)!r}")


@dataclasses.dataclass(frozen=True)
class DseConfig:
  """One experiment.

  Attributes:
    name: preset id.
    text, model: data and encoder sizes.
    teacher, student: optimisation of the cross-encoder and of every bi-encoder student.
    alphas: distillation weights of the DSE students besides ``alpha = 0`` (labels only).
    temperature: InfoNCE temperature of the contrastive bi-encoder baseline.
    rank_n: all-pairs workload ``rank_n x rank_n`` for the bi-encoder throughput.
    cross_timing_pairs: pairs the cross-encoder is timed on (its rate is per pair, so it extrapolates).
    timing_repeats: timed repeats (median).
  """

  name: str
  text: TextConfig = TextConfig()
  model: ModelConfig = ModelConfig()
  teacher: AdamWConfig = AdamWConfig(steps=4000, batch_size=64, lr=1e-3, warmup_steps=100)
  student: AdamWConfig = AdamWConfig(steps=2000, batch_size=64, lr=1e-3, warmup_steps=100)
  alphas: tuple[float, ...] = (0.5, 1.0)
  temperature: float = 0.05
  rank_n: int = 1000
  cross_timing_pairs: int = 4096
  timing_repeats: int = 3

  def __post_init__(self):
    if not self.alphas or any(not 0.0 < a <= 1.0 for a in self.alphas):
      raise ValueError(f"alphas must be a non-empty tuple of values in (0, 1], got {self.alphas!r}")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
    if self.rank_n < 2 or self.cross_timing_pairs < 1 or self.timing_repeats < 1:
      raise ValueError("rank_n must be >= 2 and cross_timing_pairs, timing_repeats positive")


PRESETS: dict[str, DseConfig] = {
    "cpu": DseConfig("cpu"),
    "gpu": DseConfig("gpu", text=TextConfig(num_concepts=24, num_synonyms=4, train_pairs=200000, test_pairs=10000),
                     model=ModelConfig(features=256, num_heads=8, num_layers=4, dse_hidden=512),
                     teacher=AdamWConfig(steps=20000, batch_size=256, lr=5e-4, warmup_steps=1000),
                     student=AdamWConfig(steps=20000, batch_size=256, lr=5e-4, warmup_steps=1000),
                     rank_n=2000, cross_timing_pairs=65536),
    "smoke": DseConfig("smoke", text=TextConfig(train_pairs=512, test_pairs=128),
                       model=ModelConfig(features=32, num_heads=2, num_layers=1, dse_hidden=32),
                       teacher=AdamWConfig(steps=30, batch_size=32, warmup_steps=5),
                       student=AdamWConfig(steps=30, batch_size=32, warmup_steps=5),
                       alphas=(1.0,), rank_n=64, cross_timing_pairs=256, timing_repeats=1),
}


def get_config(preset: str) -> DseConfig:
  if preset not in PRESETS:
    raise ValueError(f"unknown dse preset {preset!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[preset]
