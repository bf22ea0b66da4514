"""Chunked linear attention with decay: ``gpu`` (Pallas Triton lowering), ``tpu`` (Pallas Mosaic TPU).

Both backends compute, per query head and chunk ``c`` of ``C`` tokens (local indices ``i, j``), with ``a_i`` the
chunk-local inclusive cumulative sum of the log decays (:func:`chunk_log_decay`) and ``A = a_{C-1}``::

    o_i     = scale * (sum_{j <= i} exp(a_i - a_j) (q_i . k_j) v_j + exp(a_i) q_i^T S_c)
    S_{c+1} = exp(A) S_c + sum_j exp(A - a_j) k_j v_j^T

Every exponent is a difference of two partial sums of the same chunk with a known sign (``a_i - a_j <= 0`` for
``i >= j``, ``A - a_j <= 0``, ``a_i <= 0``), clamped to ``<= 0`` and masked after the ``exp`` on the triangle
that is not used, so no factor exceeds 1 and nothing overflows; a decay is never split into
``exp(G_i) * exp(-G_j)``.

Accuracy: a plain f32 cumulative sum would make ``a_i - a_j`` carry the rounding error of ``|a_j|`` (one strong
gate early in a chunk, e.g. ``g = -60``, then costs ~1e-5 relative error on every later pair of the chunk). The
sums are therefore kept as unevaluated f32 pairs ``a = hi + lo`` (compensated "double-float" summation, an
associative scan of TwoSum steps), and kernels form ``(hi_i - hi_j) + (lo_i - lo_j)``: the ``hi`` difference is
exact when the two sums are within a factor of 2 (Sterbenz) and otherwise rounds relative to the (large) result,
so every exponent is accurate relative to itself, as with the segment sums of the xla path. This module holds
what both backends share.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

__all__ = ["KERNEL_LOG_DECAY_FLOOR", "chunk_log_decay", "pair_difference"]

# The kernels' floor: log decays are clamped from below to this value before the chunk sums. exp(-128) is 0 in f32
# (below the smallest subnormal, ~exp(-103.3)), so the clamp changes no f32 result; it keeps the chunk sums small
# enough (|a| <= 128 C) that differences of them are accurate, where the library's finite stand-in for a reset
# (jaxattn.ops.linear.config.FINITE_LOG_DECAY_FLOOR = -1e30, used by the xla path) would leave differences of
# 1e30-sized sums (rounding errors of ~1e23, i.e. exp(+garbage)). Gradients of clamped entries are 0, as they are
# for exp(g) itself in f32.
KERNEL_LOG_DECAY_FLOOR = -128.0


def _two_sum(a, b):
  """``(s, e)`` with ``s = fl(a + b)`` and ``a + b = s + e`` exactly (Knuth's TwoSum)."""
  s = a + b
  bp = s - a
  return s, (a - (s - bp)) + (b - bp)


def _add_pairs(x, y):
  """Double-float addition of ``(hi, lo)`` pairs, renormalised so that ``|lo| <= ulp(hi) / 2``."""
  s, e = _two_sum(x[0], y[0])
  e = e + (x[1] + y[1])
  hi = s + e
  return hi, e - (hi - s)


def chunk_log_decay(log_decay, B: int, T: int, H: int, chunk: int):
  """Chunk-local inclusive cumulative sums of the (clamped) log decays, zero-padded to whole chunks.

  Args:
    log_decay: None, ``[H]`` (per-head constant) or ``[B, T, H]`` (per-token gate), ``<= 0`` (``-inf`` allowed).
    B, T, H: batch, sequence length, query heads.
    chunk: the chunk length ``C``.

  Returns:
    None, or a pair of f32 ``(hi, lo)``, each ``[Ba, H, N, C]`` with ``N = ceil(T / C)``, ``Ba = 1`` for per-head
    decays (shared by the batch) and ``B`` for per-token gates, such that ``hi + lo`` (unevaluated) is
    ``a[b, h, c, i] = sum_{s <= i} g[b, c * C + s, h]`` to about 2^-48 relative. Padded positions have a zero log
    decay, so they leave the state unchanged.
  """
  if log_decay is None:
    return None
  g = jnp.maximum(jnp.asarray(log_decay, jnp.float32), KERNEL_LOG_DECAY_FLOOR)
  if g.ndim == 1:
    g = jnp.broadcast_to(g, (1, T, H))  # [1, T, H]
  N = -(-T // chunk)
  g = jnp.pad(g, ((0, 0), (0, N * chunk - T), (0, 0)))  # [Ba, N * C, H]
  g = g.reshape(g.shape[0], N, chunk, H).transpose(0, 3, 1, 2)  # [Ba, H, N, C]
  return lax.associative_scan(_add_pairs, (g, jnp.zeros_like(g)), axis=-1)


def pair_difference(hi_x, lo_x, hi_y, lo_y):
  """``x - y`` for double-float pairs, rounded once: ``(hi_x - hi_y) + (lo_x - lo_y)`` (used inside kernels)."""
  return (hi_x - hi_y) + (lo_x - lo_y)
