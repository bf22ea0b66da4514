"""FLOP counts of softmax attention from the exact mask area.

Only the two matmuls count (softmax, masking and scaling are ignored, as in the FlashAttention papers):
``Q K^T`` costs ``2 * D`` flops per allowed (query, key) pair and ``P V`` costs ``2 * E``, so

  fwd = 2 * area * (D + E) * H * B        (= 4 * area * D * H * B when E = D)

where ``area = mask.area(T, S)`` is the exact number of allowed pairs (a causal ``T x T`` mask has
``T (T + 1) / 2``, not ``T^2 / 2``). Implementations that skip empty blocks but compute partial ones in full do
more work than this: the count measures useful work, so TFLOP/s across masks is comparable.

fwd+bwd = 3.5 * fwd, the FlashAttention convention: the backward pass has five matmuls to the forward's two
(``dV = P^T dO``, ``dP = dO V^T``, ``dQ = dS K``, ``dK = dS^T Q`` plus the recomputed ``Q K^T``), i.e. 2.5x the
forward.
"""

from __future__ import annotations

from jaxattn.masks import Full, Mask

BWD_FACTOR = 2.5
MODES = ("fwd", "fwd+bwd")


def attention_flops(mask: Mask | None, B: int, T: int, S: int, H: int, D: int, E: int | None = None,
                    mode: str = "fwd") -> float:
  """Matmul FLOPs of one attention call.

  Args:
    mask: the static mask (None means full).
    B, T, S, H, D: batch, query length, key length, query heads, qk head dim.
    E: value head dim (default ``D``).
    mode: ``"fwd"`` or ``"fwd+bwd"`` (``(1 + 2.5) x`` the forward).

  Returns:
    The FLOP count as a float.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  E = D if E is None else E
  area = (mask or Full()).area(T, S)
  fwd = 2.0 * area * (D + E) * H * B
  return fwd if mode == "fwd" else fwd * (1.0 + BWD_FACTOR)
