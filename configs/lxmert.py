"""Presets for ``python -m experiments lxmert``: toy relational VQA on digit canvases, LXMERT-lite co-attention
(language + object encoders, then cross-modality layers) vs a single-stream transformer over the concatenated
``[question; objects]`` at equal parameters (+-10%), with a question-only model and a majority-answer baseline.

Object features, as in the paper, come from a frozen pre-trained region encoder: LXMERT reads Faster R-CNN RoI
features pre-trained on Visual Genome; here a one-hidden-layer digit classifier trained on the training pool's crops
(``object_features="frozen_mlp"``). ``object_features="pixels"`` feeds the raw 8x8 crops instead: with only the
answer as supervision no model then learns to recognise the digits in the budget and every model collapses to the
per-type majority answer (the committed result before this was fixed).

- ``cpu`` (default): 32x32 canvases with 2-4 digits, d=64, 10k training questions, 2000 steps at peak lr 1e-3, one
  seed (cut from 2 seeds to fit the CPU budget of a shared machine).
- ``gpu``: 48x48 canvases with 3-6 digits, d=256, 200k questions, 20k steps, 3 seeds (not run here).
- ``smoke``: tiny, for the tests.
"""

from __future__ import annotations

import dataclasses

from configs.substrates import CanvasConfig, TrainConfig

__all__ = ["LXMERTConfig", "PRESETS", "MODELS", "VQA_QTYPES", "OBJECT_FEATURES"]

MODELS = ("coattention", "single_stream", "question_only")
OBJECT_FEATURES = ("frozen_mlp", "pixels")
VQA_QTYPES = ("exists", "rel_yn", "rel_what")


@dataclasses.dataclass(frozen=True)
class LXMERTConfig:
  """One sweep: every model in ``models`` trained with every seed.

  Attributes:
    name: preset id.
    canvas, train: scenes and optimizer settings (:mod:`configs.substrates`).
    d_model, num_heads: width and heads of every encoder.
    language_layers, object_layers, cross_layers: LXMERT-lite's N_L, N_R, N_X.
    models: which models to train (``coattention``, ``single_stream``, ``question_only``).
    qtypes: question types (uniform mix).
    seeds: one run per seed and model.
    object_features: ``frozen_mlp`` (the hidden layer of a digit classifier pre-trained on the training pool's
      noisy crops, then frozen: LXMERT's pre-trained region features) or ``pixels`` (the raw crops).
    feature_dim: hidden width of the frozen region encoder (the object feature size).
  """

  name: str
  canvas: CanvasConfig = CanvasConfig()
  train: TrainConfig = TrainConfig(steps=2000, lr=1e-3, eval_every=250, warmup_steps=100, num_train=10000,
                                   num_eval=1000)
  d_model: int = 64
  num_heads: int = 4
  language_layers: int = 1
  object_layers: int = 1
  cross_layers: int = 2
  models: tuple[str, ...] = MODELS
  qtypes: tuple[str, ...] = VQA_QTYPES
  seeds: tuple[int, ...] = (0,)
  object_features: str = "frozen_mlp"
  feature_dim: int = 64

  def __post_init__(self):
    if not self.models or any(m not in MODELS for m in self.models):
      raise ValueError(f"models must be a non-empty subset of {MODELS}, got {self.models!r}")
    if not self.qtypes or any(q not in VQA_QTYPES for q in self.qtypes):
      raise ValueError(f"qtypes must be a non-empty subset of {VQA_QTYPES}, got {self.qtypes!r}")
    if self.object_features not in OBJECT_FEATURES:
      raise ValueError(f"object_features must be one of {OBJECT_FEATURES}, got {self.object_features!r}")
    if isinstance(self.feature_dim, bool) or not isinstance(self.feature_dim, int) or self.feature_dim < 1:
      raise ValueError(f"feature_dim must be a positive int, got {self.feature_dim!r}")
    if not self.seeds:
      raise ValueError("seeds must not be empty")
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} must be a multiple of num_heads={self.num_heads}")
    if min(self.language_layers, self.object_layers) < 0 or self.cross_layers < 1:
      raise ValueError(f"layer counts must be >= 0 (cross >= 1), got {self.language_layers}, "
                       f"{self.object_layers}, {self.cross_layers}")


PRESETS: dict[str, LXMERTConfig] = {
    "cpu": LXMERTConfig("cpu"),
    "gpu": LXMERTConfig("gpu", canvas=CanvasConfig(size=48, min_digits=3, max_digits=6),
                        train=TrainConfig(steps=20000, eval_every=2000, num_train=200000, num_eval=10000),
                        d_model=256, num_heads=8, language_layers=2, object_layers=2, cross_layers=2,
                        seeds=(0, 1, 2)),
    "smoke": LXMERTConfig("smoke", train=TrainConfig(steps=30, eval_every=15, log_every=10, batch_size=16,
                                                     eval_batch_size=64, warmup_steps=5, num_train=256,
                                                     num_eval=64),
                          d_model=16, num_heads=2, cross_layers=1, seeds=(0,)),
}
