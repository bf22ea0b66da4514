"""Static configuration of one linear-attention call: hashable, so it can be a ``jit``/``custom_vjp`` static arg."""

from __future__ import annotations

import dataclasses

# Log decays are clamped from below to this finite floor inside the implementations: exp(-1e30) is 0 in every float
# type, and keeping the value finite means (i - j) * g, sums and differences of log decays never produce NaN
# (0 * -inf, -inf - -inf) for a "reset" gate g = -inf.
LOG_DECAY_FLOOR = -1e30


@dataclasses.dataclass(frozen=True)
class LinearConfig:
  """Everything static about a call, validated by ``linear_attention``.

  Attributes:
    causal: the decayed causal recurrence (True) or ``o_t = scale * q_t^T (S_0 + sum_s k_s v_s^T)`` (False).
    scale: the output scale (default ``D ** -0.5``).
    chunk_size: the chunk length of the chunkwise implementations (None: backend default).
  """

  causal: bool
  scale: float
  chunk_size: int | None = None
