"""The linear-attention family's protocol types: the call, the residuals, and each backend's tuning Config.

Semantics and static shapes (causal, scale, decay kind, initial state, B, T, S, H, G, D, E, dtype) live in the
hashable :class:`LinearCall`; the chunk length and kernel tiles are tuning and live in the backends' Configs
(:class:`XlaConfig`, :class:`PallasGpuConfig`, :class:`PallasTpuConfig`), chosen per call by each backend's
``default_config`` and checked by its ``validate_config`` (see :mod:`jaxattn.backend`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from jaxattn.backend import Shapes, config_error

__all__ = ["FINITE_LOG_DECAY_FLOOR", "DECAY_KINDS", "LinearCall", "LinearResiduals", "XlaConfig", "PallasGpuConfig",
           "PallasTpuConfig", "check_positive_int"]

# The finite stand-in for a reset gate: the xla path, the references and context parallelism clamp log decays from
# below to this value. exp(-1e30) is 0 in every float type (f64 included), and a finite value keeps (i - j) * g,
# sums and differences of log decays free of NaN (0 * -inf, -inf - -inf) for g = -inf. (The Pallas kernels clamp
# to their own, larger floor before their chunk sums: pallas_kernels.linear.KERNEL_LOG_DECAY_FLOOR.)
FINITE_LOG_DECAY_FLOOR = -1e30

DECAY_KINDS = (None, "head", "token")


@dataclasses.dataclass(frozen=True)
class LinearCall(Shapes):
  """The semantics and static shapes of one ``linear_attention`` call (a :mod:`jaxattn.backend` call).

  Arguments of every linear backend, in order: ``(q [B, T, H, D], k [B, S, G, D], v [B, S, G, E],
  log_decay (None, f32 [H] or f32 [B, T, H]), initial_state (None or f32 [B, H, D, E]))``; outputs
  ``(out [B, T, H, E] in q's dtype, final_state [B, H, D, E] f32)``; residuals a :class:`LinearResiduals`.

  Attributes:
    B, T, S, H, G, D, E: batch, query length, key length (``S == T`` when causal), query heads, kv heads, qk dim,
      v dim.
    dtype: q's dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``).
    scale: output scale.
    causal: the decayed causal recurrence (True) or ``o_t = scale * q_t^T (S_0 + sum_s k_s v_s^T)`` (False).
    decay: the log decay's kind: None (no decay), ``"head"`` (a constant per query head, ``[H]``) or ``"token"``
      (a per-token gate, ``[B, T, H]``).
    initial_state: whether an initial state is passed.
  """

  scale: float
  causal: bool = True
  decay: str | None = None
  initial_state: bool = False

  def __post_init__(self):
    if self.decay not in DECAY_KINDS:
      raise ValueError(f"LinearCall.decay must be one of {DECAY_KINDS}, got {self.decay!r}")


class LinearResiduals(NamedTuple):
  """What every linear backend's ``fwd`` saves for its ``bwd``: the arguments (``initial_state`` None when absent),
  the final state, and backend-specific arrays in ``extra`` (the xla path's chunk-entry states) or None."""

  q: Any
  k: Any
  v: Any
  log_decay: Any
  initial_state: Any
  final_state: Any
  extra: Any = None


def check_positive_int(owner: str, field: str, value, *, allow_none: bool = False) -> None:
  """``ValueError`` (``"<owner>.<field>=<value> must be a positive int"``) unless ``value`` is one."""
  if value is None and allow_none:
    return
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise config_error(owner, field, value, "must be a positive int" + (" or None" if allow_none else ""))


DEFAULT_XLA_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class XlaConfig:
  """The ``"xla"`` backend's Config.

  Attributes:
    chunk_size: tokens per chunk (any positive int; a chunk longer than ``T`` covers the sequence). The default
      config uses ``min(64, T)``.
  """

  chunk_size: int = DEFAULT_XLA_CHUNK


@dataclasses.dataclass(frozen=True)
class PallasGpuConfig:
  """The ``"pallas_gpu"`` backend's Config: chunk, tiles of the chunk-parallel passes and Triton launch parameters.

  Sizes are powers of two >= 16 (Triton tile shapes); ``None`` tiles take the defaults below, clamped to the padded
  head dims (powers of two >= 16). The chunk is clamped to ``max(16, next_pow2(T))`` (a longer chunk would only
  pad). See :mod:`pallas_kernels.linear.gpu` for the passes.

  Attributes:
    chunk_size: tokens per chunk ``C`` (the intra-chunk matrices are ``C x C``; default 64).
    block_e: output-pass value tile (default 64; 32 for f32 with head dims above 128).
    block_d_dq: dq/dk-pass key tile (default: the whole key dim up to 128 for 16-bit inputs, 64 for f32, with the dv
      pass fused in, unless a 16-bit log-decay gradient is needed; else 64).
    block_e_dkv: dv-pass value tile (default 128 where the dq/dk pass may fuse, else 64).
    num_warps: Triton warps of every pass, or None (default) for per-pass values (4, or 8 for the passes with the
      largest register footprint).
    num_stages: Triton pipelining stages of every pass.
    block_d_state, block_e_state: the sequential state passes' ``[bd, be]`` tile of the state (default 64 x 64,
      halved down to 32 x 32 while ``B * H * (D / bd) * (E / be) < 256``: every program walks all chunks).
    state_interval: chunks per stored forward state ``K`` (a power of two, default 4; clamped to the number of
      chunks): the forward's state pass stores every K-th chunk-entry state and each output program walks K chunks
      from it (``1 / K`` of the state traffic).
  """

  chunk_size: int = 64
  block_e: int | None = None
  block_d_dq: int | None = None
  block_e_dkv: int | None = None
  num_warps: int | None = None
  num_stages: int = 2
  block_d_state: int | None = None
  block_e_state: int | None = None
  state_interval: int = 4


@dataclasses.dataclass(frozen=True)
class PallasTpuConfig:
  """The ``"pallas_tpu"`` backend's Config.

  Attributes:
    chunk_size: tokens per chunk: a multiple of 8 (f32) / 16 (bf16) unless it covers ``T`` (the TPU tiling rule).
      The default config uses 128, or ``T`` rounded up to the sublane multiple when shorter.
  """

  chunk_size: int
