"""Presets for ``python -m experiments posir``: KaLM-Embedding-V2-style contrastive retrievers (``../shared/papers/
cross.md`` §20) and PosIR's position-bias diagnosis (§14) on template-text documents of 64-512 tokens with one
planted evidence sentence at a controlled relative position (``experiments/substrates/text.py``).

A small decoder LM is pre-trained causally on the training documents, then converted into each retriever of the
grid — causal or bidirectional mask (the mask switch), mean or last-token pooling, InfoNCE with mined hard
negatives, plus focal reweighting / hard-negative mixing / no hard negatives on the bidirectional mean-pooled one —
and fine-tuned contrastively on queries with evidence at mixed positions. Every retriever is evaluated by
recall@k / MRR / nDCG@10 over the whole test corpus, by nDCG@10 per (length bucket, position bin), and by gradient
saliency per position bin; BM25 and random ranking are the baselines.

- ``cpu`` (default): 2 layers x 4 heads, d = 64, documents of 64 / 128 / 256 tokens, 200 pre-training and 400
  fine-tuning steps (batch 16) per retriever, 5 retrievers (``CPU_GRID``); ~10 CPU-minutes.
- ``gpu``: 4 layers x 8 heads, d = 256, documents up to 512 tokens, longer training (not run here).
- ``smoke``: 1 layer, short documents, 2 retrievers, a few steps (tests).
"""

from __future__ import annotations

import dataclasses

from configs.common import AdamWConfig

__all__ = ["CorpusConfig", "ModelConfig", "Retriever", "PosirConfig", "PRESETS", "get_config", "CPU_GRID",
           "DEFAULT_GRID"]


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """The retrieval corpus (``experiments.substrates.text.retrieval_corpus``).

  Attributes:
    num_concepts, num_synonyms, num_noise: the template text's vocabulary.
    doc_lengths: document lengths (one length bucket each).
    position_bins: relative evidence-position bins (uniform).
    hard_negatives: near-miss documents per query (the mined hard negatives).
    distractors: random fact sentences per document.
    train_queries, test_queries: queries per split (train and test share no latent tuple).
    seed: data seed.
  """

  num_concepts: int = 12
  num_synonyms: int = 3
  num_noise: int = 200
  doc_lengths: tuple[int, ...] = (64, 128, 256)
  position_bins: int = 4
  hard_negatives: int = 1
  distractors: int = 2
  train_queries: int = 3000
  test_queries: int = 480
  seed: int = 0

  def __post_init__(self):
    if not self.doc_lengths or min(self.doc_lengths) < 48 or max(self.doc_lengths) > 512:
      raise ValueError(f"corpus.doc_lengths must lie in [48, 512], got {self.doc_lengths!r}")
    if self.train_queries < 8 or self.test_queries < 8:
      raise ValueError("corpus.train_queries and corpus.test_queries must be >= 8")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The decoder backbone (:class:`jaxattn.nn.pair.TextBackbone`)."""

  features: int = 64
  num_heads: int = 4
  num_layers: int = 2
  mlp_ratio: int = 4


@dataclasses.dataclass(frozen=True)
class Retriever:
  """One retriever of the grid.

  Attributes:
    name: its label.
    causal: keep the decoder's causal mask (True) or remove it (False: KaLM-V2's bidirectional conversion).
    pooling: ``mean`` or ``last`` (or ``cls`` / ``attention``).
    hard_negatives: use the mined near-miss documents as negatives (else in-batch only).
    focal_gamma: focal reweighting ``(1 - p)^gamma`` (0: off).
    hn_mix: synthetic mixed hard negatives per query (0: off).
  """

  name: str
  causal: bool
  pooling: str
  hard_negatives: bool = True
  focal_gamma: float = 0.0
  hn_mix: int = 0

  def __post_init__(self):
    if self.pooling not in ("mean", "last", "cls", "attention"):
      raise ValueError(f"retriever {self.name}: pooling must be mean, last, cls or attention, got {self.pooling!r}")
    if self.focal_gamma < 0 or self.hn_mix < 0:
      raise ValueError(f"retriever {self.name}: focal_gamma and hn_mix must be >= 0")


# The CPU grid (the 2-core budget): mask x pooling with mined hard negatives, plus KaLM-V2's fine-tuning recipe
# (focal reweighting + hard-negative mixing) on the bidirectional mean-pooled retriever.
CPU_GRID = (
    Retriever("causal + last", True, "last"),
    Retriever("causal + mean", True, "mean"),
    Retriever("bidir + last", False, "last"),
    Retriever("bidir + mean", False, "mean"),
    Retriever("bidir + mean, focal 1 + HN mixing", False, "mean", focal_gamma=1.0, hn_mix=2),
)
# The full ablation (gpu preset): each KaLM ingredient on and off separately.
DEFAULT_GRID = CPU_GRID[:4] + (
    Retriever("bidir + mean, no HN", False, "mean", hard_negatives=False),
    Retriever("bidir + mean, focal 1", False, "mean", focal_gamma=1.0),
    Retriever("bidir + mean, HN mixing", False, "mean", hn_mix=2),
    CPU_GRID[4],
)


@dataclasses.dataclass(frozen=True)
class PosirConfig:
  """One experiment.

  Attributes:
    name: preset id.
    corpus, model: data and backbone sizes.
    pretrain: causal LM pre-training of the backbone on training documents (``steps`` may be tiny, not 0).
    finetune: contrastive fine-tuning of every retriever (from the same pre-trained backbone).
    temperature: InfoNCE temperature.
    retrievers: the grid.
    saliency_queries: test queries per length bucket whose gradient saliency is computed.
  """

  name: str
  corpus: CorpusConfig = CorpusConfig()
  model: ModelConfig = ModelConfig()
  pretrain: AdamWConfig = AdamWConfig(steps=200, batch_size=16, lr=2e-3, warmup_steps=20)
  finetune: AdamWConfig = AdamWConfig(steps=400, batch_size=16, lr=1e-3, warmup_steps=40)
  temperature: float = 0.05
  retrievers: tuple[Retriever, ...] = CPU_GRID
  saliency_queries: int = 32

  def __post_init__(self):
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
    if not self.retrievers or len({r.name for r in self.retrievers}) != len(self.retrievers):
      raise ValueError("retrievers must be a non-empty tuple with distinct names")
    if self.saliency_queries < 1:
      raise ValueError("saliency_queries must be positive")


PRESETS: dict[str, PosirConfig] = {
    "cpu": PosirConfig("cpu"),
    "gpu": PosirConfig("gpu", corpus=CorpusConfig(num_concepts=24, doc_lengths=(64, 128, 256, 512), position_bins=8,
                                                  hard_negatives=7, train_queries=100000, test_queries=4000),
                       model=ModelConfig(features=256, num_heads=8, num_layers=4),
                       pretrain=AdamWConfig(steps=5000, batch_size=64, lr=1e-3, warmup_steps=500),
                       finetune=AdamWConfig(steps=5000, batch_size=128, lr=5e-4, warmup_steps=300),
                       retrievers=DEFAULT_GRID + (Retriever("bidir + mean, focal 2", False, "mean",
                                                            focal_gamma=2.0),),
                       saliency_queries=256),
    "smoke": PosirConfig("smoke", corpus=CorpusConfig(doc_lengths=(48, 64), position_bins=2, train_queries=128,
                                                      test_queries=48),
                         model=ModelConfig(features=32, num_heads=2, num_layers=1),
                         pretrain=AdamWConfig(steps=5, batch_size=8, warmup_steps=1),
                         finetune=AdamWConfig(steps=10, batch_size=8, warmup_steps=2),
                         retrievers=(Retriever("causal + last", True, "last"),
                                     Retriever("bidir + mean, HN mixing", False, "mean", focal_gamma=1.0, hn_mix=2)),
                         saliency_queries=4),
}


def get_config(preset: str) -> PosirConfig:
  if preset not in PRESETS:
    raise ValueError(f"unknown posir preset {preset!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[preset]
