"""The decode family's protocol types: the call and each backend's tuning Config.

Semantics and static shapes (scale, which statistics, dense or gathered, whether a per-slot validity is passed, B,
L, H, G, D, E, K, dtype) live in the hashable :class:`DecodeCall`; key-block sizes, chunk lengths and launch
parameters are tuning and live in the backends' Configs, chosen per call by each backend's ``default_config`` and
checked by its ``validate_config`` (see :mod:`jaxattn.backend`).
"""

from __future__ import annotations

import dataclasses

from jaxattn.backend import Shapes, config_error

__all__ = ["STATS", "DecodeCall", "XlaConfig", "PallasGpuConfig", "PallasTpuConfig", "check_positive_int"]

STATS = (None, "probs", "colsum")


@dataclasses.dataclass(frozen=True)
class DecodeCall(Shapes):
  """The semantics and static shapes of one ``decode_attention`` call (a :mod:`jaxattn.backend` call).

  Arguments of every decode backend, in order: ``(q [B, H, D], k [B, L, G, D], v [B, L, G, E], lengths int32 [B]
  (in ``[0, L]``), valid (None or bool [B, L, G]), index (None or int32 [B, G, K], entries in ``[0, L)``),
  entry_valid (None or bool [B, G, K]))``; outputs ``(out [B, H, E] in q's dtype, stats (None, f32 [B, H, L|K]
  probabilities or [B, G, L|K] column sums))``.

  Attributes:
    B, H, G, D, E: batch, query heads, kv heads, qk dim, v dim; ``T = 1``; ``S = L`` the cache length.
    dtype: q's dtype name.
    K: entries per (sequence, kv head) of the gathered form (0: dense).
    scale: logit scale.
    stats: None, ``"probs"`` or ``"colsum"``.
    has_valid: a per-(slot, kv head) validity is passed.
  """

  K: int
  scale: float
  stats: str | None = None
  has_valid: bool = False

  @property
  def gathered(self) -> bool:
    return self.K > 0

  def __post_init__(self):
    if self.stats not in STATS:
      raise ValueError(f"DecodeCall.stats must be one of {STATS}, got {self.stats!r}")


def check_positive_int(owner: str, field: str, value, *, allow_none: bool = False) -> None:
  """``ValueError`` (``"<owner>.<field>=<value> must be a positive int"``) unless ``value`` is one."""
  if value is None and allow_none:
    return
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise config_error(owner, field, value, "must be a positive int" + (" or None" if allow_none else ""))


@dataclasses.dataclass(frozen=True)
class XlaConfig:
  """The ``"xla"`` backend's Config.

  Attributes:
    chunk: keys (dense) or index entries (gathered) per step of the online-softmax scan, and of the statistics
      pass; any positive int (a chunk longer than the axis covers it). Memory per step ``O(B * H * chunk)``.
  """

  chunk: int = 1024


@dataclasses.dataclass(frozen=True)
class PallasGpuConfig:
  """The ``"pallas_gpu"`` backend's Config (see :mod:`pallas_kernels.decode.gpu`).

  Attributes:
    block_k: keys per block, a power of two >= 16; None: the largest of 128, 64, 32, 16 that divides ``L`` (no
      padding copy), else 64. The gathered form visits whole blocks that hold a listed key.
    num_splits: programs per (sequence, kv head) along the key blocks (flash-decoding split-K); None: enough to give
      about 256 programs in all (at most the number of blocks).
    num_warps: Triton warps (1, 2, 4, 8 or 16).
    num_stages: Triton pipelining stages (1 to 8).
  """

  block_k: int | None = None
  num_splits: int | None = None
  num_warps: int = 4
  num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class PallasTpuConfig:
  """The ``"pallas_tpu"`` backend's Config (see :mod:`pallas_kernels.decode.tpu`).

  Attributes:
    block_k: keys per block (the DMA unit and the logits' lane dim): a multiple of 128 or at least ``L``; None: all
      of ``L`` up to 512, else the largest of 512, 256, 128 that divides ``L`` (no padding copy), else 512.
    vmem_limit_bytes: Mosaic's scoped VMEM limit, or None (the compiler default).
  """

  block_k: int | None = None
  vmem_limit_bytes: int | None = None
