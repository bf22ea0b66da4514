"""Settings of the shared toy substrates (:mod:`experiments.substrates`): digit canvases, the ViT-tiny encoder, the
toy vision-language model (ViT + causal LM over ``[visual tokens; text tokens]``) and its training.

These are building blocks the experiment presets (``configs/lxmert.py``, ``configs/pink.py``, ...) compose; a
trained substrate is cached under ``runs/substrates/<fingerprint of its settings>/``.
"""

from __future__ import annotations

import dataclasses

__all__ = ["CanvasConfig", "ViTConfig", "LMConfig", "TrainConfig", "VLMConfig", "QTYPES"]


def _pos_int(where: str, name: str, v) -> None:
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    raise ValueError(f"{where}.{name} must be a positive int, got {v!r}")


@dataclasses.dataclass(frozen=True)
class CanvasConfig:
  """Digit canvases: ``min_digits..max_digits`` sklearn digits (8x8, distinct classes) pasted without overlap at
  random positions (multiples of ``coord_step`` pixels) on a ``size x size`` canvas, plus Gaussian noise.

  Attributes:
    size: canvas side in pixels (a multiple of ``coord_step``; at least 16).
    min_digits, max_digits: digits per canvas (the others in a scene are the distractors of a question).
    noise: standard deviation of the added pixel noise (digit pixels lie in [0, 1]).
    coord_step: placement grid and box-token resolution in pixels (boxes are exact at this resolution).
    gap: minimum free pixels between two digit boxes.
  """

  size: int = 32
  min_digits: int = 2
  max_digits: int = 4
  noise: float = 0.1
  coord_step: int = 2
  gap: int = 0

  def __post_init__(self):
    for f in ("size", "min_digits", "max_digits", "coord_step"):
      _pos_int("canvas", f, getattr(self, f))
    if self.size < 16 or self.size % self.coord_step:
      raise ValueError(f"canvas.size={self.size} must be >= 16 and a multiple of coord_step={self.coord_step}")
    if not self.min_digits <= self.max_digits <= 10:
      raise ValueError(f"canvas digits must satisfy 1 <= min_digits={self.min_digits} <= max_digits="
                       f"{self.max_digits} <= 10 (distinct classes)")
    if (self.size // (8 + self.gap)) ** 2 < self.max_digits:
      raise ValueError(f"canvas.size={self.size} cannot hold max_digits={self.max_digits} 8x8 digits with "
                       f"gap={self.gap}")
    if not 0.0 <= self.noise < 1.0 or self.gap < 0:
      raise ValueError(f"canvas.noise must lie in [0, 1) and gap >= 0, got noise={self.noise!r}, gap={self.gap!r}")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """ViT-tiny: ``patch x patch`` patches -> linear embedding + learned positions -> ``num_layers`` pre-LN blocks
  (:class:`jaxattn.nn.MultiHeadAttention`, full attention) -> LayerNorm.

  Attributes:
    patch: patch side in pixels (divides the canvas size).
    d_model, num_heads, num_layers, mlp_ratio: width, heads, depth, MLP expansion.
  """

  patch: int = 4
  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 2
  mlp_ratio: int = 2

  def __post_init__(self):
    for f in ("patch", "d_model", "num_heads", "num_layers", "mlp_ratio"):
      _pos_int("vit", f, getattr(self, f))
    if self.d_model % self.num_heads:
      raise ValueError(f"vit.d_model={self.d_model} must be a multiple of num_heads={self.num_heads}")


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """The causal LM of the toy VLM: token + position embeddings, ``num_layers`` pre-LN causal blocks over
  ``[projected visual tokens; text tokens]``, untied output head.

  Attributes:
    d_model, num_heads, num_layers, mlp_ratio: width, heads, depth, MLP expansion.
    max_text: longest text (question + answer) in tokens.
  """

  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 2
  mlp_ratio: int = 2
  max_text: int = 16

  def __post_init__(self):
    for f in ("d_model", "num_heads", "num_layers", "mlp_ratio", "max_text"):
      _pos_int("lm", f, getattr(self, f))
    if self.d_model % self.num_heads:
      raise ValueError(f"lm.d_model={self.d_model} must be a multiple of num_heads={self.num_heads}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """AdamW with warmup + cosine (:func:`experiments.common.train.adamw_cosine`).

  Attributes:
    steps, batch_size, lr: optimizer steps, batch, peak learning rate.
    eval_every, log_every, eval_batch_size: evaluation / logging intervals (checkpoints at each evaluation).
    weight_decay, b1, b2, eps, warmup_steps, grad_clip: optimizer settings.
    num_train, num_eval: training / held-out records (disjoint digit images, other scene seeds).
  """

  steps: int = 1500
  batch_size: int = 64
  lr: float = 2e-3
  eval_every: int = 500
  log_every: int = 50
  eval_batch_size: int = 256
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-8
  warmup_steps: int = 100
  grad_clip: float | None = 1.0
  num_train: int = 20000
  num_eval: int = 2000

  def __post_init__(self):
    for f in ("steps", "batch_size", "eval_every", "log_every", "eval_batch_size", "num_train", "num_eval"):
      _pos_int("train", f, getattr(self, f))
    if not 0.0 < self.lr < 1.0:
      raise ValueError(f"train.lr must lie in (0, 1), got {self.lr!r}")
    if self.batch_size > self.num_train:
      raise ValueError(f"train.batch_size={self.batch_size} exceeds train.num_train={self.num_train}")
    if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
      raise ValueError(f"train.warmup_steps={self.warmup_steps} must lie in [0, steps={self.steps})")


QTYPES = ("exists", "rel_yn", "rel_what", "where", "which_at")  # experiments.substrates.grammar.QTYPES


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """One trained toy VLM (:mod:`experiments.substrates.vlm`): data, architecture, training; its fingerprint names
  the cache folder ``runs/substrates/<fingerprint>/`` (the ``name`` is not part of it).

  Attributes:
    name: a label.
    canvas, vit, lm, train: the parts.
    qtypes: the question types of the training mix (uniform).
    freeze_vision: no gradient into the ViT (its parameters keep their initial or pretrained values).
    blind: the model sees a blank canvas (the no-image baseline).
    seed: parameter, data-order and scene seed.
  """

  name: str
  canvas: CanvasConfig = CanvasConfig()
  vit: ViTConfig = ViTConfig()
  lm: LMConfig = LMConfig()
  train: TrainConfig = TrainConfig()
  qtypes: tuple[str, ...] = ("exists",)
  freeze_vision: bool = False
  blind: bool = False
  seed: int = 0

  def __post_init__(self):
    bad = [q for q in self.qtypes if q not in QTYPES]
    if not self.qtypes or bad:
      raise ValueError(f"qtypes must be a non-empty subset of {QTYPES}, got {self.qtypes!r}")
    if self.canvas.size % self.vit.patch:
      raise ValueError(f"canvas.size={self.canvas.size} must be a multiple of vit.patch={self.vit.patch}")
