"""Attention dropout bits as a counter-based function of ``(key, b, h, i, j)``, computable for any tile.

``softmax_attention(..., dropout_rate=r, dropout_rng=key)`` drops each normalised probability ``P[b, h, i, j]``
independently with probability ``r`` and scales the kept ones by ``1 / (1 - r)`` (as flax does). Whether an entry is
kept is a pure function of the key and the entry's coordinates, so the dense reference and the blockwise xla path
(any tile sizes, forward and backward) drop exactly the same entries, and the backward regenerates the bits per tile
instead of storing a ``T x S`` mask:

  ``seed = jax.random.bits(key, (2,), uint32)``; ``(k0, k1) = threefry2x32(seed, (b, h))``;
  ``bits = threefry2x32((k0, k1), (i, j))[0]``; keep iff ``bits >= round(r * 2**32)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p


def dropout_seed(rng) -> jax.Array:
  """The two uint32 seed words of a PRNG key (a typed ``jax.random.key`` or a raw ``PRNGKey``)."""
  return jax.random.bits(rng, (2,), jnp.uint32)


def keep_threshold(rate: float) -> int:
  """Entries with ``bits >= threshold`` are kept: ``P(keep) = 1 - rate`` up to ``2**-32``."""
  return min(int(round(float(rate) * 2.0 ** 32)), 2 ** 32 - 1)


def _threefry(k0, k1, x0, x1):
  shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in (k0, k1, x0, x1)))
  args = [jnp.broadcast_to(jnp.asarray(a, jnp.uint32), shape) for a in (k0, k1, x0, x1)]
  return threefry2x32_p.bind(*args)


def head_keys(seed, b, h):
  """Per ``(batch, head)`` keys ``(k0, k1)`` for broadcasting uint32 index arrays ``b`` and ``h``."""
  return _threefry(seed[0], seed[1], b, h)


def keep_mask(keys, rate: float, i, j):
  """Boolean keep mask for ``keys`` from :func:`head_keys` and query / key index arrays (all broadcasting)."""
  bits = _threefry(keys[0], keys[1], i, j)[0]
  return bits >= jnp.uint32(keep_threshold(rate))


def apply(p, keep, rate: float):
  """``p`` with dropped entries 0 and kept ones scaled by ``1 / (1 - rate)`` (a select: a dropped NaN gives 0)."""
  return jnp.where(keep, p * (1.0 / (1.0 - rate)), 0.0)
