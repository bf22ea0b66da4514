"""Score transforms (Attention Debiasing, ``../shared/papers/cross.md`` §11 and pilot §21-B).

- :func:`fit_position_trend` fits the smooth positional trend ``tau(p)`` of mean scores over a calibration set, in
  log space on valid (non-pad) positions only, so ``tau > 0`` by construction (a plain cubic fit of the raw means
  with pad positions included went negative in the pilot and inverted the ranking);
- :func:`positional_detrend` applies ``w(p) = tau_min / tau(p)``;
- :func:`suppress` sets scores of padding / sink tokens to ``-inf`` so that top-k picks them last.

Shapes: scores ``[B, N]``; positions are the token indices ``0 .. N-1`` (the visual tokens' order).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

__all__ = ["PositionTrend", "fit_position_trend", "positional_detrend", "suppress"]


@dataclasses.dataclass(frozen=True)
class PositionTrend:
  """A fitted trend ``log tau(p) = sum_i c_i (p / (N - 1))^i`` over ``num_tokens`` positions.

  Attributes:
    coeffs: polynomial coefficients, highest degree first (``numpy.polyval`` order), of ``log tau``.
    num_tokens: ``N``, the token count of the calibration data (applying it to other counts is an error).
  """

  coeffs: tuple[float, ...]
  num_tokens: int

  def log_trend(self) -> np.ndarray:
    """``log tau(p)`` for ``p = 0 .. N-1`` (f64)."""
    x = np.arange(self.num_tokens) / max(self.num_tokens - 1, 1)
    return np.polyval(np.asarray(self.coeffs), x)

  def weights(self) -> np.ndarray:
    """``w(p) = tau_min / tau(p)`` in ``(0, 1]`` (f32 ``[N]``)."""
    lt = self.log_trend()
    return np.exp(lt.min() - lt).astype(np.float32)


def fit_position_trend(calib_scores, valid=None, *, degree: int = 3, eps: float = 1e-12) -> PositionTrend:
  """Fits ``log tau(p)`` (a polynomial of ``degree`` in ``p / (N - 1)``) to the log of the mean calibration score
  at each position, over valid entries only.

  Args:
    calib_scores: ``[M, N]`` non-negative scores of ``M`` calibration samples.
    valid: optional bool ``[M, N]`` or ``[N]`` (False: padding / sinks, left out of the means and the fit).
    degree: polynomial degree (the shipped debiasing weights are cubic).
    eps: floor of a mean before the log.

  Raises:
    ValueError: on a bad shape, negative scores, or fewer fitted positions than ``degree + 1``.
  """
  s = np.asarray(calib_scores, np.float64)
  if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 2:
    raise ValueError(f"calib_scores must have shape [M, N] with M >= 1, N >= 2, got {s.shape}")
  if (s < 0).any():
    raise ValueError(f"calib_scores must be non-negative (attention mass), min is {s.min()}")
  if not isinstance(degree, int) or degree < 0:
    raise ValueError(f"degree must be a non-negative int, got {degree!r}")
  v = np.ones_like(s, bool) if valid is None else np.broadcast_to(np.asarray(valid, bool), s.shape)
  cnt = v.sum(0)
  pos = np.flatnonzero(cnt > 0)
  if len(pos) < degree + 1:
    raise ValueError(f"only {len(pos)} positions have valid calibration scores; degree={degree} needs "
                     f"{degree + 1}")
  mean = (s * v).sum(0)[pos] / cnt[pos]
  x = pos / max(s.shape[1] - 1, 1)
  coeffs = np.polyfit(x, np.log(np.maximum(mean, eps)), degree)
  return PositionTrend(tuple(float(c) for c in coeffs), int(s.shape[1]))


def positional_detrend(scores, trend: PositionTrend):
  """``scores * w(p)`` (``[B, N]``), ``w`` from :meth:`PositionTrend.weights`.

  Raises:
    ValueError: when ``scores`` has another token count than the calibration data.
  """
  if jnp.ndim(scores) != 2:
    raise ValueError(f"scores must have shape [B, N], got {jnp.shape(scores)}")
  N = jnp.shape(scores)[1]
  if N != trend.num_tokens:
    raise ValueError(f"scores have {N} tokens but the trend was calibrated on {trend.num_tokens}")
  return jnp.asarray(scores, jnp.float32) * jnp.asarray(trend.weights())


def suppress(scores, drop, value: float = -jnp.inf):
  """Scores with ``drop`` tokens (bool ``[B, N]`` or ``[N]``: padding, sinks) set to ``value``."""
  if jnp.ndim(scores) != 2:
    raise ValueError(f"scores must have shape [B, N], got {jnp.shape(scores)}")
  drop = jnp.asarray(drop, bool)
  if drop.shape not in (jnp.shape(scores), jnp.shape(scores)[1:]):
    raise ValueError(f"drop must have shape [B, N] = {jnp.shape(scores)} or [N], got {drop.shape}")
  return jnp.where(drop, jnp.asarray(value, jnp.float32), jnp.asarray(scores, jnp.float32))
