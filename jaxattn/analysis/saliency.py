"""Gradient saliency for token-embedding inputs: gradient x input and integrated gradients.

``fn`` maps embeddings ``x [..., T, E]`` (or any activation, e.g. encoder outputs) to a scalar or to per-sample
scores ``[B]`` (summed before differentiating: samples must not interact, as in a batched model without batch
norm). Saliency per token reduces the feature axis ``E`` (``reduce``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["grad_x_input", "integrated_gradients"]

_REDUCE = ("sum", "abs", "l2", None)


def _scalar(fn):
  def f(x):
    y = jnp.asarray(fn(x))
    return y.sum() if y.ndim else y
  return f


def _reduce(s, reduce):
  if reduce == "sum":
    return s.sum(-1)
  if reduce == "abs":
    return jnp.abs(s).sum(-1)
  if reduce == "l2":
    return jnp.sqrt((s * s).sum(-1))
  return s


def _check_reduce(reduce):
  if reduce not in _REDUCE:
    raise ValueError(f"reduce must be one of {_REDUCE}, got {reduce!r}")


def grad_x_input(fn, x, *, reduce: str | None = "sum"):
  """Gradient x input: ``(d fn / d x) * x`` reduced over the last (feature) axis.

  Args:
    fn: ``x -> scalar`` or ``x -> [B]`` (summed).
    x: the input embeddings ``[..., T, E]`` (float).
    reduce: ``"sum"`` (signed sum over ``E``), ``"abs"`` (sum of magnitudes), ``"l2"`` (norm over ``E``, the
      ``||grad * e||`` of the cross-attention / saliency comparison) or None (keep ``E``).

  Returns:
    ``[..., T]`` (or ``[..., T, E]`` with ``reduce=None``), f32.
  """
  _check_reduce(reduce)
  x = jnp.asarray(x, jnp.float32)
  g = jax.grad(_scalar(fn))(x)
  return _reduce(g * x, reduce)


def integrated_gradients(fn, x, *, baseline=None, steps: int = 32, method: str = "trapezoid",
                         reduce: str | None = "sum"):
  r"""Integrated gradients (Sundararajan et al., 2017).

  .. math:: IG(x) = (x - x_0) \odot \int_0^1 \nabla f(x_0 + \alpha (x - x_0))\, d\alpha

  approximated with ``steps`` intervals (``"trapezoid"``: ``steps + 1`` gradient evaluations, or ``"midpoint"``:
  ``steps``), evaluated one at a time (``lax.map``: memory of one gradient). With ``reduce="sum"`` the saliencies of
  a sample sum to ``f(x) - f(x_0)`` up to the quadrature error (completeness).

  Args:
    fn: ``x -> scalar`` or ``x -> [B]`` (summed).
    x: inputs ``[..., T, E]``.
    baseline: ``x_0`` broadcastable to ``x`` (default zeros).
    steps: number of quadrature intervals (positive int).
    method: ``"trapezoid"`` or ``"midpoint"``.
    reduce: as in :func:`grad_x_input`.

  Returns:
    ``[..., T]`` (or ``[..., T, E]``), f32.
  """
  _check_reduce(reduce)
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"steps must be a positive int, got {steps!r}")
  if method not in ("trapezoid", "midpoint"):
    raise ValueError(f"method must be 'trapezoid' or 'midpoint', got {method!r}")
  x = jnp.asarray(x, jnp.float32)
  x0 = jnp.zeros_like(x) if baseline is None else jnp.broadcast_to(jnp.asarray(baseline, jnp.float32), x.shape)
  if method == "trapezoid":
    alphas = np.linspace(0.0, 1.0, steps + 1)
    weights = np.full(steps + 1, 1.0 / steps)
    weights[[0, -1]] /= 2
  else:
    alphas = (np.arange(steps) + 0.5) / steps
    weights = np.full(steps, 1.0 / steps)
  grad = jax.grad(_scalar(fn))
  gs = lax.map(lambda a: grad(x0 + a * (x - x0)), jnp.asarray(alphas, jnp.float32))  # [n, ...]
  avg = jnp.tensordot(jnp.asarray(weights, jnp.float32), gs, axes=1)
  return _reduce((x - x0) * avg, reduce)
