"""Benchmark presets and the cases they expand to.

The preset dataclasses live in :mod:`configs.bench` (typed configs); this module looks them up and turns a
preset into :class:`Case` objects (one shape with one built mask).
"""

from __future__ import annotations

import dataclasses

from configs.bench import PRESETS, BenchPreset, BenchShape, MaskSpec
from jaxattn import backend as backend_lib
from jaxattn.masks import Mask

__all__ = ["PRESETS", "BenchPreset", "BenchShape", "MaskSpec", "Case", "get_preset", "default_preset_name",
           "cases"]


@dataclasses.dataclass(frozen=True)
class Case:
  """One timed problem: a shape and a static mask built for its lengths."""

  shape: BenchShape
  mask_spec: MaskSpec
  mask: Mask

  @property
  def name(self) -> str:
    """``<shape>_<mask>``, e.g. ``b8_t2048_causal``."""
    return f"{self.shape.name}_{self.mask_spec.name}"


def get_preset(name: str) -> BenchPreset:
  """The preset called ``name``.

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
  return PRESETS[name]


def default_preset_name() -> str:
  """``"cpu"`` on a CPU backend, ``"gpu"`` otherwise."""
  return "cpu" if backend_lib.platform() == "cpu" else "gpu"


def cases(preset: BenchPreset) -> list[Case]:
  """Every (shape, mask) pair of ``preset`` in order, masks built for the shape's ``T`` and ``S``."""
  return [Case(s, m, m.build(s.T, s.S)) for s in preset.shapes for m in s.masks]
