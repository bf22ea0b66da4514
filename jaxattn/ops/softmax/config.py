"""Static configuration of one softmax-attention call: hashable, so it can be a ``jit``/``custom_vjp`` static arg."""

from __future__ import annotations

import dataclasses

from jaxattn.masks import Mask


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (query rows x key columns) for the blockwise implementations.

  ``block_q`` / ``block_k`` tile the forward pass; the backward passes use the ``_dq`` / ``_dkv`` sizes when given
  and the forward sizes otherwise. Each backend picks its own defaults (``BlockSizes.default(...)`` there).
  """

  block_q: int
  block_k: int
  block_q_dq: int | None = None
  block_k_dq: int | None = None
  block_q_dkv: int | None = None
  block_k_dkv: int | None = None

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if v is None and f.name not in ("block_q", "block_k"):
        continue
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"BlockSizes.{f.name} must be a positive int, got {v!r}")

  @property
  def dq(self) -> tuple[int, int]:
    return self.block_q_dq or self.block_q, self.block_k_dq or self.block_k

  @property
  def dkv(self) -> tuple[int, int]:
    return self.block_q_dkv or self.block_q, self.block_k_dkv or self.block_k


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Everything static about a call, validated by ``softmax_attention``.

  Attributes:
    T, S: query and key lengths.
    scale: logit scale (default ``D ** -0.5``).
    logits_soft_cap: ``cap * tanh(logits / cap)`` after scale and bias, or None.
    mask: static mask or None (all allowed).
    block_sizes: user tiles or None (backend default).
    return_lse: whether the caller needs the log-sum-exp (implementations that cannot give it refuse).
  """

  T: int
  S: int
  scale: float
  logits_soft_cap: float | None = None
  mask: Mask | None = None
  block_sizes: BlockSizes | None = None
  return_lse: bool = False
