"""Non-finite inputs in masked positions: the helpers every family's pure-JAX paths share.

Guarantee (all families, all implementations): a NaN or infinity in ``q``, ``k`` or ``v`` reaches exactly the
(query, key) pairs the mask allows, as it would in an exact per-pair evaluation. A masked pair contributes an exact
zero to outputs, log-sum-exps and gradients (selected with ``where``, never computed as ``0 * x``), so a row whose
allowed inputs are finite gets a finite output, lse and gradient whatever the masked / padded positions hold, and
a row that does attend a non-finite input gets NaN (never a silently finite value).

Mechanism: operands are zeroed where non-finite (:func:`sanitize`) before every matmul, and a query row / key with a
non-finite entry adds NaN to its logits instead (:func:`poison`), so the NaN enters the computation only through
the pairs that are then kept.
"""

from __future__ import annotations

import jax.numpy as jnp


def sanitize(x):
  """``(x with non-finite entries replaced by 0, bool [...] "the last axis had a non-finite entry")``."""
  ok = jnp.isfinite(x)
  return jnp.where(ok, x, jnp.zeros((), x.dtype)), ~jnp.all(ok, axis=-1)


def poison(bad):
  """f32 NaN where ``bad`` else 0 (added to logits, or to an operand that feeds only allowed pairs)."""
  return jnp.where(bad, jnp.float32(jnp.nan), jnp.float32(0.0))


def poison_rows(x, bad):
  """``x`` with every row (last axis) flagged in ``bad`` set to NaN (finite rows unchanged)."""
  return jnp.where(bad[..., None], jnp.asarray(jnp.nan, x.dtype), x)
