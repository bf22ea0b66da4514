"""Rotary position embeddings (RoPE, Su et al. 2021, https://arxiv.org/abs/2104.09864).

Feature pairs ``(x[..., i], x[..., i + D/2])`` are rotated by the angle ``p * base ** (-2 i / D)`` where ``p`` is the
token's position (the "rotate half" layout of GPT-NeoX, Llama and Gemma). Because a rotation by ``a`` followed by the
transpose of a rotation by ``b`` is a rotation by ``a - b``, the logit ``rope(q, p) . rope(k, p')`` depends on the
positions only through ``p - p'``: shifting every position by a constant leaves attention unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["apply_rope", "rope_frequencies"]


def rope_frequencies(head_dim: int, base: float = 10000.0) -> jax.Array:
  """Angular frequencies ``base ** (-2 i / D)`` for ``i < D / 2``, f32 ``[D / 2]``."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
  if not base > 0:
    raise ValueError(f"RoPE base must be positive, got {base!r}")
  return float(base) ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x, positions, base: float = 10000.0):
  r"""Rotates feature pairs of ``x`` by position-dependent angles.

  .. math::
     \theta_i = p \cdot \mathrm{base}^{-2i/D}, \qquad
     (x_i, x_{i+D/2}) \mapsto (x_i \cos\theta_i - x_{i+D/2} \sin\theta_i,\;
                                  x_{i+D/2} \cos\theta_i + x_i \sin\theta_i)

  Args:
    x: ``[B, T, H, D]`` with ``D`` even (queries or keys).
    positions: integer or float positions, ``[B, T]`` or ``[T]`` (shared by the batch).
    base: the wavelength base (10000 in the paper).

  Returns:
    ``[B, T, H, D]`` in x's dtype (the rotation is computed in f32).

  Raises:
    ValueError: if ``x`` is not rank 4, ``D`` is odd, or ``positions`` does not match ``[B, T]`` / ``[T]``.
  """
  x = jnp.asarray(x)
  positions = jnp.asarray(positions)
  if x.ndim != 4:
    raise ValueError(f"apply_rope expects x of shape [B, T, H, D], got {x.shape}")
  B, T, _, D = x.shape
  if positions.shape not in ((T,), (B, T), (1, T)):
    raise ValueError(f"positions must have shape [B, T] = {(B, T)} or [T] = {(T,)}, got {positions.shape}")
  freq = rope_frequencies(D, base)  # [D/2]
  pos = jnp.broadcast_to(positions, (positions.shape[0] if positions.ndim == 2 else 1, T))
  angle = pos.astype(jnp.float32)[:, :, None, None] * freq  # [B|1, T, 1, D/2]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, T, H, D/2] each
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
