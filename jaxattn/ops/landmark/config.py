"""The landmark-attention family's protocol types: the call, the residuals, and each backend's tuning Config.

Semantics and static shapes (block size, scale, B, T, H, G, D, E, dtype) live in the hashable
:class:`LandmarkCall`; query / key tiles and launch parameters are tuning and live in the backends' Configs
(:class:`XlaConfig`, :class:`PallasGpuConfig`, :class:`PallasTpuConfig`), chosen per call by each backend's
``default_config`` and checked by its ``validate_config`` (see :mod:`jaxattn.backend`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from jaxattn.backend import config_error

__all__ = ["LandmarkCall", "LandmarkResiduals", "XlaConfig", "PallasGpuConfig", "PallasTpuConfig", "check_tile"]


@dataclasses.dataclass(frozen=True)
class LandmarkCall:
  """The semantics and static shapes of one ``landmark_attention`` call (a :mod:`jaxattn.backend` call).

  Arguments of every landmark backend, in order: ``(q [B, T, H, D], k [B, T, G, D], v [B, T, G, E])``; outputs
  ``(out [B, T, H, E] in q's dtype, lse [B, H, T] f32)`` (the top-level log-sum-exp over ``TOP(i)``); residuals a
  :class:`LandmarkResiduals`.

  Attributes:
    B, T, H, G, D, E: batch, sequence length (queries and keys: causal self-attention), query heads, kv heads,
      qk dim, v dim.
    dtype: q's dtype name.
    block_size: landmark block length ``bs``: token ``j`` is a landmark iff ``(j + 1) % bs == 0``.
    scale: logit scale.
  """

  B: int
  T: int
  H: int
  G: int
  D: int
  E: int
  dtype: str
  block_size: int
  scale: float


class LandmarkResiduals(NamedTuple):
  """What every landmark backend's ``fwd`` saves for its ``bwd``: the inputs and the outputs (``out``, ``lse``)."""

  q: Any
  k: Any
  v: Any
  out: Any
  lse: Any


def check_tile(owner: str, field: str, value, block_size: int) -> None:
  """``ValueError`` (``"<owner>.<field>=<value> must be ..."``) unless ``value`` is a positive multiple of
  ``block_size`` (tiles hold whole landmark blocks)."""
  if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value % block_size:
    raise config_error(owner, field, value, f"must be a positive multiple of block_size={block_size}")


@dataclasses.dataclass(frozen=True)
class XlaConfig:
  """The ``"xla"`` backend's Config: query and key tiles (multiples of the block size).

  The default config uses the multiples of the block size nearest 256 tokens, shrunk to the sequence.
  """

  block_q: int
  block_k: int


@dataclasses.dataclass(frozen=True)
class PallasGpuConfig:
  """The ``"pallas_gpu"`` backend's Config: the query tile and the Triton launch parameters (the key tile is one
  landmark block).

  Attributes:
    block_q: query tile, a power-of-two multiple of the block size (default: 128 tokens, at least one block,
      halved while it still covers ``T``).
    num_warps: None picks 4 for head dims <= 64, else 8.
    num_stages: Triton pipeline stages (the forward kernel; the default config takes the most, up to 2, that fit
      the GPU's shared memory).
    bwd_num_stages: Triton pipeline stages of the backward kernels (dq, dk/dv); None: ``num_stages``.
  """

  block_q: int
  num_warps: int | None = None
  num_stages: int = 2
  bwd_num_stages: int | None = None


@dataclasses.dataclass(frozen=True)
class PallasTpuConfig:
  """The ``"pallas_tpu"`` backend's Config: the query tile, a multiple of the block size (default 256 tokens rounded
  to whole blocks, at most the block-rounded sequence); the key tile is one landmark block."""

  block_q: int
