"""Static configuration of one landmark-attention call: hashable, so it can be a ``jit``/``custom_vjp`` static arg."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LandmarkConfig:
  """Everything static about a call, validated by ``landmark_attention``.

  Attributes:
    T: sequence length (queries and keys: causal self-attention).
    block_size: landmark block length ``bs``: token ``j`` is a landmark iff ``(j + 1) % bs == 0``.
    scale: logit scale (default ``D ** -0.5``).
    block_q: query tile of the blockwise implementations (a multiple of ``block_size``; None: backend default).
    block_k: key tile of the ``xla`` implementation (a multiple of ``block_size``; None: default). The Pallas
      kernels always use one landmark block per key tile.
  """

  T: int
  block_size: int
  scale: float
  block_q: int | None = None
  block_k: int | None = None
