"""The softmax family's call description (SoftmaxCall), residuals (SoftmaxResiduals) and backend configs (tiles)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from jaxattn.backend import Shapes, config_error
from jaxattn.masks import Mask, PerHead


TILE_FIELDS = ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (query rows x key columns) of the blockwise softmax backends; the ``"xla"`` backend's Config.

  ``block_q`` / ``block_k`` tile the forward pass; the backward passes use the ``_dq`` / ``_dkv`` sizes when given
  and the forward sizes otherwise. The Pallas backends' configs (:class:`PallasGpuConfig`,
  :class:`PallasTpuConfig`) are these tiles plus their launch / compiler knobs, so
  ``softmax_attention(..., block_sizes=BlockSizes(...))`` sets the tiles of whichever blockwise backend runs.
  Each backend checks its own rules in ``validate_config`` (powers of two on GPU, the (8, 128) rule on TPU).
  """

  block_q: int
  block_k: int
  block_q_dq: int | None = None
  block_k_dq: int | None = None
  block_q_dkv: int | None = None
  block_k_dkv: int | None = None

  def __post_init__(self):
    for name in TILE_FIELDS:
      v = getattr(self, name)
      if v is None and name not in ("block_q", "block_k"):
        continue
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise config_error(type(self).__name__, name, v, "must be a positive int")

  @property
  def fwd(self) -> tuple[int, int]:
    return self.block_q, self.block_k

  @property
  def dq(self) -> tuple[int, int]:
    return self.block_q_dq or self.block_q, self.block_k_dq or self.block_k

  @property
  def dkv(self) -> tuple[int, int]:
    return self.block_q_dkv or self.block_q, self.block_k_dkv or self.block_k

  def tiles(self) -> dict:
    """The six tile fields (for ``dataclasses.replace`` of a config that extends these tiles)."""
    return {name: getattr(self, name) for name in TILE_FIELDS}


@dataclasses.dataclass(frozen=True)
class PallasGpuConfig(BlockSizes):
  """The ``"pallas_gpu"`` backend's Config: tiles (powers of two >= 16) and Triton launch parameters.

  Attributes:
    num_warps, num_stages: forward launch (``num_warps=None``: 4 for head dims <= 64, else 8).
    num_warps_bwd, num_stages_bwd: the dq and dk/dv kernels' launch.
  """

  num_warps: int | None = None
  num_stages: int = 3
  num_warps_bwd: int | None = None
  num_stages_bwd: int = 2

  def warps(self, head_dim: int, backward: bool = False) -> int:
    w = self.num_warps_bwd if backward else self.num_warps
    return w if w is not None else (4 if head_dim <= 64 else 8)


@dataclasses.dataclass(frozen=True)
class PallasTpuConfig(BlockSizes):
  """The ``"pallas_tpu"`` backend's Config: tiles (the (8, 128) rule, clamped to T / S) and the Mosaic VMEM limit.

  Attributes:
    vmem_limit_bytes: scoped VMEM limit passed to the Mosaic compiler (None: the compiler's default).
  """

  vmem_limit_bytes: int | None = None


# ------------------------------------------------------------------------------------ the op protocol's types
@dataclasses.dataclass(frozen=True)
class SoftmaxCall(Shapes):
  """The semantics and static shapes of one ``softmax_attention`` call (a :mod:`jaxattn.backend` call).

  Arguments of every softmax backend, in order: ``(q [B, T, H, D], k [B, S, G, D], v [B, S, G, E],
  bias [b, h, T, S] or None, q_ids [B, T] int32 or None, kv_ids [B, S] int32 or None)``; outputs
  ``(out [B, T, H, E], lse [B, H, T] f32)``; residuals a :class:`SoftmaxResiduals`.

  Attributes:
    B, T, S, H, G, D, E: batch, query length, key length, query heads, kv heads, qk dim, v dim.
    dtype: q's dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``).
    scale: logit scale.
    logits_soft_cap: ``cap * tanh(logits / cap)`` after scale and bias, or None.
    mask: static mask or None (all allowed).
    bias: the bias's ``(b, h)`` broadcast dims (``b`` in ``{1, B}``, ``h`` in ``{1, H}``), or None without bias.
    segment_ids: whether ``q_ids`` / ``kv_ids`` are given.
    return_lse: whether the caller uses the log-sum-exp.
    mask_array: the ``bias`` argument carries a boolean mask array (``softmax_attention(mask=<bool array>)``):
      its ``-inf`` entries are masked pairs (masked after scale, bias and soft cap, so masked pairs stay out of
      valid rows whatever they hold). Served by ``reference`` and ``xla`` only.
    dropout_rate: attention dropout probability in ``[0, 1)``; when positive the backends get a 7th argument, the
      uint32 ``[2]`` dropout seed (:mod:`jaxattn.ops.softmax.dropout`). Served by ``reference`` and ``xla`` only.

  ``mask`` may be a :class:`jaxattn.masks.PerHead` (one mask per query head; ``reference`` and ``xla`` only).
  """

  scale: float
  logits_soft_cap: float | None = None
  mask: Mask | None = None
  bias: tuple[int, int] | None = None
  segment_ids: bool = False
  return_lse: bool = False
  mask_array: bool = False
  dropout_rate: float = 0.0


def dense_only_reason(backend: str, call: SoftmaxCall) -> str | None:
  """Why a kernel backend cannot serve ``call``'s mask array, per-head mask or dropout (None when it has none).

  The kernel backends' ``supports`` call this first, so dispatch falls back to ``xla`` with a clear warning.
  """
  if call.mask_array:
    return f"{backend} does not take boolean mask arrays (use a static jaxattn.masks mask or segment ids)"
  if isinstance(call.mask, PerHead):
    return f"{backend} does not support per-head masks (PerHead)"
  if call.dropout_rate:
    return f"{backend} does not support attention dropout"
  return None


class SoftmaxResiduals(NamedTuple):
  """What every softmax backend's ``fwd`` saves for its ``bwd``.

  The per-block gradients of softmax attention are exact given the *row's* final ``out`` and ``lse``
  (``p_ij = exp(s_ij - lse_i)``, ``delta_i = dO_i . O_i - dlse_i``), so context parallelism replaces ``out`` and
  ``lse`` by the global ones (``res._replace(out=..., lse=...)``) and runs the backend's ``bwd`` per ring step.
  ``extra`` holds backend-specific arrays (visiting lists, tiles) or None.
  """

  q: Any
  k: Any
  v: Any
  bias: Any
  q_ids: Any
  kv_ids: Any
  out: Any
  lse: Any
  extra: Any = None
