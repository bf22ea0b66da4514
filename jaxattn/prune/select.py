"""Selection: order-keeping top-k, keep counts, multi-stage schedules and the inflection-layer analysis
(FasterVLM, AdaptInfer; ``../shared/papers/cross.md`` §10, §17, §22-B)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["keep_count", "topk_keep_order", "PruningSchedule", "attention_shift", "inflection_layers"]


def _ratio(r, what="keep ratio"):
  if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0 or math.isnan(r):
    raise ValueError(f"{what} must lie in (0, 1], got {r!r}")
  return float(r)


def keep_count(num_tokens: int, ratio: float) -> int:
  """Tokens kept of ``num_tokens`` at keep ratio ``ratio`` in (0, 1]: ``max(1, round(N * ratio))``."""
  _ratio(ratio)
  if not isinstance(num_tokens, int) or num_tokens < 1:
    raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
  return max(1, min(num_tokens, int(round(num_tokens * ratio))))


def topk_keep_order(scores, k: int):
  """Indices ``[B, k]`` (int32, ascending: the tokens' original order) of the ``k`` highest scores ``[B, N]``.

  Ties go to the earlier token; ``-inf`` scores (suppressed tokens) are picked last.

  Raises:
    ValueError: if ``k`` is not in ``[1, N]`` (a budget larger than the sequence).
  """
  if jnp.ndim(scores) != 2:
    raise ValueError(f"scores must have shape [B, N], got {jnp.shape(scores)}")
  N = jnp.shape(scores)[1]
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= N:
    raise ValueError(f"budget k={k!r} must lie in [1, N={N}] (the sequence has {N} tokens)")
  _, idx = jax.lax.top_k(jnp.asarray(scores, jnp.float32), int(k))
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class PruningSchedule:
  """Prune at ``layers`` (ascending), keeping ``keep[s]`` of the *original* visual tokens from layer ``layers[s]``
  on (non-increasing: a pruned token never returns, AdaptInfer / RCP's cumulative masks).

  Layer ``l`` means: the tokens are pruned before block ``l`` runs (``0``: before the LM, FasterVLM's place).
  """

  layers: tuple[int, ...]
  keep: tuple[float, ...]

  def __post_init__(self):
    layers, keep = tuple(self.layers), tuple(self.keep)
    object.__setattr__(self, "layers", layers)
    object.__setattr__(self, "keep", keep)
    if not layers or len(layers) != len(keep):
      raise ValueError(f"a schedule needs one keep ratio per layer, got layers={layers} keep={keep}")
    for r in keep:
      _ratio(r)
    if any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in layers):
      raise ValueError(f"schedule layers must be non-negative ints, got {layers}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
      raise ValueError(f"schedule layers must be strictly increasing, got {layers}")
    if any(b > a for a, b in zip(keep, keep[1:])):
      raise ValueError(f"keep ratios must be non-increasing (pruned tokens never return), got {keep}")

  def validate(self, num_layers: int) -> "PruningSchedule":
    """Checks every layer exists in a model of ``num_layers`` blocks (``0 .. num_layers - 1``)."""
    bad = [l for l in self.layers if l >= num_layers]
    if bad:
      raise ValueError(f"schedule names layer(s) {bad} but the model has {num_layers} layers "
                       f"(0 .. {num_layers - 1})")
    return self

  def counts(self, num_tokens: int) -> tuple[int, ...]:
    """Kept tokens per stage (:func:`keep_count` of the original ``num_tokens``)."""
    return tuple(keep_count(num_tokens, r) for r in self.keep)

  def average_kept(self, num_tokens: int, num_layers: int) -> float:
    """Mean visual tokens per LM block over all ``num_layers`` blocks (the budget AdaptInfer equalises)."""
    self.validate(num_layers)
    c = self.counts(num_tokens)
    per = [num_tokens] * num_layers
    for s, l in enumerate(self.layers):
      for j in range(l, num_layers):
        per[j] = c[s]
    return float(np.mean(per))


def attention_shift(maps, eps: float = 1e-12) -> np.ndarray:
  """Jensen-Shannon divergence (nats) between successive layers' attention distributions over the same tokens.

  Args:
    maps: ``[L, B, N]`` non-negative attention mass per layer (e.g. text->visual column sums), normalised here.

  Returns:
    ``[L - 1]``: entry ``l`` is the batch-mean JS(layer l, layer l + 1).
  """
  m = np.asarray(maps, np.float64)
  if m.ndim != 3 or m.shape[0] < 2:
    raise ValueError(f"maps must have shape [L >= 2, B, N], got {m.shape}")
  p = m / np.maximum(m.sum(-1, keepdims=True), eps)
  a, b = p[:-1], p[1:]
  mid = 0.5 * (a + b)
  kl = lambda x, y: np.where(x > 0, x * np.log(np.maximum(x, eps) / np.maximum(y, eps)), 0.0).sum(-1)
  return (0.5 * kl(a, mid) + 0.5 * kl(b, mid)).mean(-1)


def inflection_layers(shift, num: int) -> tuple[int, ...]:
  """The ``num`` layers where attention changes most: ``l + 1`` for the largest ``shift[l]`` (ascending)."""
  s = np.asarray(shift, np.float64)
  if s.ndim != 1 or not 1 <= num <= len(s):
    raise ValueError(f"num={num!r} must lie in [1, {len(s)}] for a shift of shape {s.shape}")
  top = np.argsort(-s, kind="stable")[:num]
  return tuple(sorted(int(i) + 1 for i in top))
