"""Presets for ``python -m experiments crosstune``: few-shot topic classification over frozen features with a
label-description cross-attention head (CrossTune, LREC-COLING 2024; ``papers/cross.md`` section 3 in the shared
notes) against a linear probe, a nearest-centroid prototype and a zero-shot description-similarity baseline.

- ``cpu`` (default): 8 topics, 2/4/8/16 shots per class, 3 seeds, 300 full-batch Adam steps per head.
- ``gpu``: the paper-sized grid of the toy (16 topics, 1-32 shots, 10 seeds, wider features).
- ``smoke``: 4 topics, 2 shots, 2 seeds, 20 steps (tests).
"""

from __future__ import annotations

import dataclasses

__all__ = ["CrossTuneConfig", "PRESETS"]


@dataclasses.dataclass(frozen=True)
class CrossTuneConfig:
  """One sweep.

  Attributes:
    name: preset id.
    num_topics: classes ``C``.
    topic_words: vocabulary words per topic (label descriptions use ``desc_words`` of them).
    noise_words: shared function / noise words.
    desc_words: keywords per label description.
    seq_len: tokens per sentence.
    topic_tokens: tokens of the true topic per sentence (the rest: noise and one other-topic distractor word).
    features: width of the frozen random encoder's features.
    topic_strength: norm scale of the shared topic direction in each topic word's embedding (word embeddings
      are a random vector plus ``topic_strength`` times their topic's random centre: the semantic similarity a
      pretrained LM would give; 0 makes topic words unrelated, so few shots cannot generalise).
    heads: heads of the frozen encoder and of the trained head.
    shots: training examples per class.
    seeds: data / initialisation seeds per shot count.
    test_per_class: test sentences per class.
    steps, lr: full-batch Adam steps and learning rate of the trained heads.
    seed: base seed (vocabulary embedding and frozen encoder).
  """

  name: str
  num_topics: int = 8
  topic_words: int = 24
  noise_words: int = 200
  desc_words: int = 12
  seq_len: int = 16
  topic_tokens: int = 2
  features: int = 32
  topic_strength: float = 1.0
  heads: int = 4
  shots: tuple[int, ...] = (2, 4, 8, 16)
  seeds: int = 3
  test_per_class: int = 50
  steps: int = 300
  lr: float = 3e-3
  seed: int = 0

  def __post_init__(self):
    for f in ("num_topics", "topic_words", "noise_words", "desc_words", "seq_len", "topic_tokens", "features",
              "heads", "seeds", "test_per_class", "steps"):
      if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
        raise ValueError(f"{f} must be a positive int, got {getattr(self, f)!r}")
    if self.num_topics < 2:
      raise ValueError(f"num_topics must be >= 2, got {self.num_topics}")
    if self.desc_words > self.topic_words:
      raise ValueError(f"desc_words ({self.desc_words}) must be <= topic_words ({self.topic_words})")
    if self.topic_tokens + 1 >= self.seq_len:
      raise ValueError(f"topic_tokens + 1 distractor must leave room for noise in seq_len={self.seq_len}")
    if self.features % self.heads:
      raise ValueError(f"features ({self.features}) must be divisible by heads ({self.heads})")
    if not self.shots or any(not isinstance(s, int) or s < 1 for s in self.shots):
      raise ValueError(f"shots must be positive ints, got {self.shots!r}")
    if not self.topic_strength >= 0:
      raise ValueError(f"topic_strength must be >= 0, got {self.topic_strength!r}")
    if not self.lr > 0:
      raise ValueError(f"lr must be > 0, got {self.lr!r}")


PRESETS: dict[str, CrossTuneConfig] = {
    "cpu": CrossTuneConfig("cpu"),
    "gpu": CrossTuneConfig("gpu", num_topics=16, features=128, shots=(1, 2, 4, 8, 16, 32), seeds=10,
                           test_per_class=200, steps=1000),
    "smoke": CrossTuneConfig("smoke", num_topics=4, shots=(2,), seeds=2, test_per_class=10, steps=20,
                             noise_words=50),
}
