"""Presets for ``python -m experiments retrieval_heads``: retrieval heads of a tiny decoder trained on a needle-copy
task (Retrieval Head, Wu et al., arXiv 2404.15574; ``../shared/papers/efficient.md`` §9).

A prompt is ``bos, haystack..., mark, needle..., mark, haystack..., query`` and the answer is the needle; needle
tokens never occur elsewhere in the prompt (with decoys the model did not learn to copy at this scale). The decoder
is built from :class:`jaxattn.nn.MultiHeadAttention` (RoPE, causal, q/k/v/o biases).

- ``cpu`` (default): 4 layers x 8 heads, d_model 128, prompts of 64 tokens with 4-token needles over a
  128-token vocabulary, 4500 AdamW steps of batch 32 (a cosine schedule that reaches zero only when the run
  ends); retrieval scores over 64 detection prompts, head masking over 64 test prompts for k in {1, 2, 4, 8} with
  3 random draws per k.
- ``gpu``: the same protocol on a wider, deeper model at 512-token prompts (not run here).
- ``smoke``: seconds (the tests): 2 layers x 2 heads, 24-token prompts, 2-token needles, 40 steps, k = 2 only.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["TaskConfig", "ModelConfig", "TrainConfig", "RetrievalHeadsConfig", "PRESETS", "RESERVED"]

RESERVED = 4  # ids 0..3: bos, mark, query, and one unused; haystack and needle tokens are drawn from [4, vocab)


def _pos_int(owner: str, name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


def _float_in(owner: str, name: str, value, lo: float, hi: float) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if not ok or not lo <= value <= hi:
    raise ValueError(f"{owner}.{name} must be a float in [{lo:g}, {hi:g}], got {value!r}")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """The needle-copy data.

  Attributes:
    length: prompt length ``P`` (``bos`` first, ``query`` last).
    needle_len: needle tokens ``K`` (the answer).
    vocab: vocabulary size (ids below :data:`RESERVED` are special).
    train_size: training prompts (a fixed set, reshuffled every epoch).
    detect_size: prompts on which retrieval scores are computed.
    test_size: prompts on which head masking is evaluated.
    seed: data seed (train, detection and test sets use distinct streams; detection and test needles never
      equal a training needle).
  """

  length: int = 64
  needle_len: int = 4
  vocab: int = 128
  train_size: int = 32768
  detect_size: int = 64
  test_size: int = 64
  seed: int = 0

  def __post_init__(self):
    for f in ("length", "needle_len", "vocab", "train_size", "detect_size", "test_size"):
      _pos_int("TaskConfig", f, getattr(self, f))
    if self.length < self.needle_len + 4:
      raise ValueError(f"TaskConfig.length must be >= needle_len + 4 = {self.needle_len + 4}, got {self.length}")
    if self.vocab - RESERVED < 2 * self.needle_len:
      raise ValueError(f"TaskConfig.vocab must leave at least 2 x needle_len = {2 * self.needle_len} ordinary tokens "
                       f"above the {RESERVED} reserved ids, got vocab={self.vocab}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Pre-norm decoder: embedding, ``num_layers`` x (LayerNorm, causal RoPE MultiHeadAttention with biases,
  LayerNorm, GELU MLP), final LayerNorm, linear head."""

  num_layers: int = 4
  num_heads: int = 8
  d_model: int = 128
  mlp_ratio: int = 4
  use_bias: bool = True

  def __post_init__(self):
    for f in ("num_layers", "num_heads", "d_model", "mlp_ratio"):
      _pos_int("ModelConfig", f, getattr(self, f))
    if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
      raise ValueError(f"ModelConfig.d_model={self.d_model} must split into num_heads={self.num_heads} heads of an "
                       f"even size (RoPE)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """AdamW on a warmup-cosine schedule (:func:`experiments.common.train.adamw_cosine`)."""

  steps: int = 4500
  batch_size: int = 32
  lr: float = 1e-3
  warmup_steps: int = 200
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-8
  grad_clip: float | None = 1.0
  eval_every: int = 500
  seed: int = 0

  def __post_init__(self):
    for f in ("steps", "batch_size", "eval_every"):
      _pos_int("TrainConfig", f, getattr(self, f))
    if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps < self.steps:
      raise ValueError(f"TrainConfig.warmup_steps must be an int in [0, steps={self.steps}), got "
                       f"{self.warmup_steps!r}")
    _float_in("TrainConfig", "lr", self.lr, 1e-7, 1.0)
    _float_in("TrainConfig", "weight_decay", self.weight_decay, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class RetrievalHeadsConfig:
  """One experiment.

  Attributes:
    name: preset id.
    task, model, train: data, architecture, optimisation.
    ks: numbers of heads masked (top-k by retrieval score vs k random heads).
    random_draws: random head sets per k (seeds ``0..random_draws-1``).
    exclude_top: random heads are drawn outside the ``exclude_top`` best-scoring heads (the paper's control draws
      outside its top 100 of 1024; here at least ``max(ks)``, so a random set never contains a top-k head).
    threshold: a head with retrieval score above it is a retrieval head (the paper: 0.1).
    mask_mode: :class:`jaxattn.analysis.HeadMask` mode (``"uniform"`` zeroes the query: the paper's masking).
  """

  name: str
  task: TaskConfig = TaskConfig()
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  ks: tuple[int, ...] = (1, 2, 4, 8)
  random_draws: int = 3
  exclude_top: int = 8
  threshold: float = 0.1
  mask_mode: str = "uniform"

  def __post_init__(self):
    heads = self.model.num_layers * self.model.num_heads
    if not self.ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in self.ks):
      raise ValueError(f"ks must be positive ints, got {self.ks!r}")
    if tuple(sorted(set(self.ks))) != tuple(self.ks):
      raise ValueError(f"ks must be increasing and distinct, got {self.ks!r}")
    _pos_int("RetrievalHeadsConfig", "random_draws", self.random_draws)
    if not isinstance(self.exclude_top, int) or self.exclude_top < max(self.ks):
      raise ValueError(f"exclude_top must be an int >= max(ks) = {max(self.ks)}, got {self.exclude_top!r}")
    if heads - self.exclude_top < max(self.ks):
      raise ValueError(f"{heads} heads leave only {heads - self.exclude_top} outside the top exclude_top="
                       f"{self.exclude_top}: too few to draw max(ks) = {max(self.ks)} random heads")
    _float_in("RetrievalHeadsConfig", "threshold", self.threshold, 0.0, 1.0)
    if self.mask_mode not in ("uniform", "zero"):
      raise ValueError(f"mask_mode must be 'uniform' or 'zero', got {self.mask_mode!r}")


PRESETS: dict[str, RetrievalHeadsConfig] = {
    "cpu": RetrievalHeadsConfig("cpu"),
    "gpu": RetrievalHeadsConfig(
        "gpu", task=TaskConfig(length=512, needle_len=8, vocab=1024, train_size=262144, detect_size=256,
                               test_size=256),
        model=ModelConfig(num_layers=8, num_heads=16, d_model=512),
        train=TrainConfig(steps=20000, batch_size=64, lr=5e-4, warmup_steps=1000, eval_every=1000),
        ks=(1, 2, 4, 8, 16), random_draws=5, exclude_top=16),
    "smoke": RetrievalHeadsConfig(
        "smoke", task=TaskConfig(length=24, needle_len=2, vocab=32, train_size=256, detect_size=8, test_size=8),
        model=ModelConfig(num_layers=2, num_heads=2, d_model=16, mlp_ratio=2),
        train=TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=20),
        ks=(2,), random_draws=1, exclude_top=2),
}
