"""Presets for ``python -m experiments prune``: attention-guided visual-token pruning on a toy VLM (FasterVLM,
Attention Debiasing, AdaptInfer; ``../shared/papers/cross.md`` §10, §11, §17, pilots §21-A/B).

The task is built so that the answer depends on a few visual tokens (pilot §21-A): one handwritten digit (scikit-
learn's digits, test images never seen in training) and ``num_distractors`` scrambled digits (the same pixels,
permuted: equal ink, so the feature norm cannot tell them apart) on a noisy canvas; half the canvases are
"non-square" (the bottom ``pad_rows`` patch rows are constant padding, LLaVA-style). Questions: ``what digit ?``
and ``is it a <d> ?``. The language model reads the vision encoder's *local* tokens (``feature_layer=0``: the
stem, each token an MLP of its 3 x 3 patch neighbourhood, before any attention mixes them), so pruning a token
really removes its evidence.

- ``cpu`` (default): ViT 2 x 64, LM 4 x 64, 1000 steps of 48; ~8 CPU-minutes in all (training ~0.25 CPU-s a step).
- ``gpu``: a wider/deeper model, 48 x 48 canvases (144 tokens), 20000 steps (not run here).
- ``smoke``: tiny model, 40 steps (tests).
"""

from __future__ import annotations

import dataclasses

from configs.common import AdamWConfig as TrainConfig

__all__ = ["TaskConfig", "ModelConfig", "TrainConfig", "PruneConfig", "PRESETS", "get_config"]


def _pos(where, name, v):
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    raise ValueError(f"{where}.{name} must be a positive int, got {v!r}")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Canvases and questions.

  Attributes:
    size, patch: canvas side and patch side in pixels (``(size / patch)^2`` visual tokens).
    num_distractors: scrambled digits beside the real one.
    noise: pixel noise standard deviation (digit pixels lie in [0, 1]; padding stays exactly 0).
    pad_prob, pad_rows: fraction of padded canvases and their padded patch rows (at the bottom).
    num_train, num_calib, num_test: records (train and calibration draw training digit images, test the held-out
      fifth: disjoint by construction).
    seed: data seed.
  """

  size: int = 32
  patch: int = 4
  num_distractors: int = 2
  noise: float = 0.1
  pad_prob: float = 0.5
  pad_rows: int = 2
  num_train: int = 16000
  num_calib: int = 512
  num_test: int = 1024
  seed: int = 0

  def __post_init__(self):
    for f in ("size", "patch", "num_train", "num_calib", "num_test"):
      _pos("task", f, getattr(self, f))
    if self.size % self.patch or self.size < 16:
      raise ValueError(f"task.size={self.size} must be >= 16 and a multiple of task.patch={self.patch}")
    g = self.size // self.patch
    if not 0 <= self.pad_rows < g or self.pad_rows * self.patch > self.size - 8:
      raise ValueError(f"task.pad_rows={self.pad_rows} must leave at least 8 pixel rows of a {self.size}-pixel "
                       f"canvas")
    free = (self.size - self.pad_rows * self.patch) // 8 * (self.size // 8)
    if self.num_distractors < 0 or self.num_distractors + 1 > free:
      raise ValueError(f"task.num_distractors={self.num_distractors} does not fit ({free} digit slots)")
    if not 0.0 <= self.noise < 1.0 or not 0.0 <= self.pad_prob <= 1.0:
      raise ValueError(f"task.noise must lie in [0, 1) and pad_prob in [0, 1], got {self.noise!r}, "
                       f"{self.pad_prob!r}")

  @property
  def num_tokens(self) -> int:
    return (self.size // self.patch) ** 2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The toy VLM (:class:`experiments.prune.model.PruneVLM`): a ViT with a [CLS] token (trained with an auxiliary
  digit-class head on [CLS], the analogue of CLIP's image-level objective), a linear projector of the ViT's layer
  ``feature_layer`` tokens (0: patch embeddings), and a causal LM over ``[visual; text]``.

  Attributes:
    vit_dim, vit_heads, vit_layers: vision encoder.
    lm_dim, lm_heads, lm_layers: language model.
    mlp_ratio: MLP expansion of both.
    feature_layer: which ViT hidden state the LM reads (0 = the local stem, before the first block).
    cls_weight: weight of the [CLS] classification loss.
  """

  vit_dim: int = 64
  vit_heads: int = 4
  vit_layers: int = 2
  lm_dim: int = 64
  lm_heads: int = 4
  lm_layers: int = 4
  mlp_ratio: int = 2
  feature_layer: int = 0
  cls_weight: float = 0.5

  def __post_init__(self):
    for f in ("vit_dim", "vit_heads", "vit_layers", "lm_dim", "lm_heads", "lm_layers", "mlp_ratio"):
      _pos("model", f, getattr(self, f))
    if self.vit_dim % self.vit_heads or self.lm_dim % self.lm_heads:
      raise ValueError("model widths must be multiples of their head counts")
    if self.vit_layers < 2:
      raise ValueError(f"model.vit_layers={self.vit_layers} must be >= 2 (last and penultimate [CLS] layers)")
    if not 0 <= self.feature_layer <= self.vit_layers:
      raise ValueError(f"model.feature_layer={self.feature_layer} must lie in [0, vit_layers={self.vit_layers}]")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """One experiment.

  Attributes:
    name: preset id.
    task, model, train: data, architecture, optimisation.
    keep: kept fractions of the visual tokens (the curve's x axis).
    lm_layer: the LM layer whose text->visual attention scores FastV / PDrop / AdaptInfer (single stage).
    stages: the multi-stage schedule's layers; their keep ratios are ``stage_factors`` x the single-stage ratio
      (capped at 1), which keeps the mean visual tokens per LM layer equal to the single stage's.
    stage_factors: per-stage multipliers (same length as ``stages``).
    timing_batch, timing_reps: LM prefill timing (CPU wall clock, median of ``timing_reps``).
    eval_batch: batch of the pruned evaluations.
  """

  name: str
  task: TaskConfig = TaskConfig()
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig(steps=1000, batch_size=48, eval_every=250)
  keep: tuple[float, ...] = (0.5, 0.25, 0.1, 0.05)
  lm_layer: int = 1
  stages: tuple[int, ...] = (1, 2, 3)
  stage_factors: tuple[float, ...] = (1.5, 1.0, 0.5)
  timing_batch: int = 256
  timing_reps: int = 5
  eval_batch: int = 256

  def __post_init__(self):
    if not self.keep or any(not 0.0 < r <= 1.0 for r in self.keep):
      raise ValueError(f"keep fractions must lie in (0, 1], got {self.keep!r}")
    L = self.model.lm_layers
    if not 1 <= self.lm_layer < L:
      raise ValueError(f"lm_layer={self.lm_layer} must name an LM layer in [1, {L - 1}]")
    if len(self.stages) != len(self.stage_factors) or any(not 1 <= l < L for l in self.stages):
      raise ValueError(f"stages={self.stages} must be LM layers in [1, {L - 1}], one factor each "
                       f"(stage_factors={self.stage_factors})")
    if self.stages[0] != self.lm_layer or abs(sum(self.stage_factors[i] * (
        (self.stages[i + 1] if i + 1 < len(self.stages) else L) - self.stages[i]) for i in range(len(self.stages)))
        - (L - self.lm_layer)) > 1e-6:
      raise ValueError(f"the multi-stage schedule must start at lm_layer={self.lm_layer} and keep the same mean "
                       f"tokens per layer: sum(factor x layers it covers) must equal {L - self.lm_layer}")
    _pos("config", "timing_batch", self.timing_batch)
    _pos("config", "timing_reps", self.timing_reps)
    _pos("config", "eval_batch", self.eval_batch)


PRESETS: dict[str, PruneConfig] = {
    "cpu": PruneConfig("cpu"),
    "gpu": PruneConfig("gpu", task=TaskConfig(size=48, num_distractors=4, pad_rows=3, num_train=200000,
                                              num_calib=2048, num_test=8192),
                       model=ModelConfig(vit_dim=192, vit_heads=6, vit_layers=6, lm_dim=256, lm_heads=8,
                                         lm_layers=8),
                       train=TrainConfig(steps=20000, batch_size=128, lr=1e-3, eval_every=2000, eval_batch_size=512),
                       keep=(0.5, 0.25, 0.111, 0.05, 0.025), lm_layer=2, stages=(2, 4, 6),
                       stage_factors=(1.5, 1.0, 0.5), timing_batch=512, timing_reps=10, eval_batch=512),
    "smoke": PruneConfig("smoke", task=TaskConfig(size=16, num_distractors=1, pad_rows=1, num_train=512,
                                                  num_calib=32, num_test=64),
                         model=ModelConfig(vit_dim=16, vit_heads=2, lm_dim=16, lm_heads=2, lm_layers=3),
                         train=TrainConfig(steps=40, batch_size=32, eval_every=20, eval_batch_size=64),
                         keep=(0.5, 0.25), lm_layer=1, stages=(1, 2), stage_factors=(1.5, 0.5), timing_batch=64,
                         timing_reps=2, eval_batch=64),
}


def get_config(preset: str) -> PruneConfig:
  if preset not in PRESETS:
    raise ValueError(f"unknown prune preset {preset!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[preset]
