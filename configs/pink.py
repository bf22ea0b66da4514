"""Presets for ``python -m experiments pink``: Pink-style referring tasks (box-as-text) as a task family of the toy
VLM (:mod:`experiments.substrates.vlm`): "where is the 5?" answered with four coordinate tokens, "which digit is at
<x0> <y0> <x1> <y1>?" answered with a digit. The VLM trained on them (referring instruction tuning, ViT tuned) is
compared with the same VLM trained blind (no-image baseline) and with random boxes / random digits.

- ``cpu`` (default): 32x32 canvases, 2-4 digits, ViT 8x8 patches (16 visual tokens), d=64, 600 steps.
- ``gpu``: 48x48 canvases, 3-6 digits, d=256, 4 layers each, 20k steps (not run here).
- ``smoke``: tiny, for the tests.
"""

from __future__ import annotations

import dataclasses

from configs.substrates import CanvasConfig, LMConfig, TrainConfig, ViTConfig, VLMConfig

__all__ = ["PinkConfig", "PRESETS", "CELLS"]

CELLS = ("random", "no_image", "vlm")


@dataclasses.dataclass(frozen=True)
class PinkConfig:
  """One sweep.

  Attributes:
    name: preset id.
    vlm: the toy VLM and its training (its ``qtypes`` are the referring task family).
    cells: ``random`` (random valid box / random digit), ``no_image`` (the VLM trained on blank canvases),
      ``vlm`` (the VLM trained on the canvases).
    num_test: test questions (unseen digit images, other scenes).
    iou_threshold: a box counts as correct at IoU >= this (RefCOCO's Acc@0.5).
  """

  name: str
  vlm: VLMConfig = VLMConfig("pink", vit=ViTConfig(patch=8), qtypes=("where", "which_at"),
                             train=TrainConfig(steps=600, eval_every=300, warmup_steps=50, lr=3e-3, num_train=6000,
                                               num_eval=256))
  cells: tuple[str, ...] = CELLS
  num_test: int = 500
  iou_threshold: float = 0.5

  def __post_init__(self):
    if not self.cells or any(c not in CELLS for c in self.cells):
      raise ValueError(f"cells must be a non-empty subset of {CELLS}, got {self.cells!r}")
    if set(self.vlm.qtypes) - {"where", "which_at"}:
      raise ValueError(f"vlm.qtypes must be referring tasks ('where', 'which_at'), got {self.vlm.qtypes!r}")
    if not isinstance(self.num_test, int) or self.num_test < 1 or not 0 < self.iou_threshold <= 1:
      raise ValueError(f"num_test must be a positive int and iou_threshold in (0, 1], got {self.num_test!r}, "
                       f"{self.iou_threshold!r}")


PRESETS: dict[str, PinkConfig] = {
    "cpu": PinkConfig("cpu"),
    "gpu": PinkConfig("gpu", vlm=VLMConfig("pink-gpu", canvas=CanvasConfig(size=48, min_digits=3, max_digits=6),
                                           vit=ViTConfig(patch=4, d_model=256, num_heads=8, num_layers=4),
                                           lm=LMConfig(d_model=256, num_heads=8, num_layers=4),
                                           qtypes=("where", "which_at"),
                                           train=TrainConfig(steps=20000, eval_every=2000, num_train=200000,
                                                             num_eval=2000)),
                      num_test=5000),
    "smoke": PinkConfig("smoke", vlm=VLMConfig("pink-smoke", vit=ViTConfig(patch=8, d_model=16, num_heads=2,
                                                                           num_layers=1),
                                               lm=LMConfig(d_model=16, num_heads=2, num_layers=1),
                                               qtypes=("where", "which_at"),
                                               train=TrainConfig(steps=20, eval_every=10, log_every=10,
                                                                 batch_size=16, eval_batch_size=64, warmup_steps=4,
                                                                 num_train=128, num_eval=64)),
                        num_test=64),
}
