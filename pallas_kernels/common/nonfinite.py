"""Non-finite inputs for the raw kernels: the operand preparation every kernel family runs before ``pallas_call``.

Guarantee (as in ``jaxattn``): a NaN / inf in q, k or v reaches exactly the (query, key) pairs the mask allows.
The kernels never see a non-finite value they could multiply by a masked zero: before the kernel (plain jnp, fused
with the padding, ``O((T + S) * D)``)

- forward: v is zeroed where non-finite; a query row, or a key whose k or v has a non-finite entry, becomes
  all-NaN in q / k, so its NaN enters through the logits of allowed pairs only (masked logits are replaced by
  ``-inf`` with ``where``); a row that attends it gets NaN output and lse (never a finite value);
- backward: q, k, v are zeroed; the NaN of a poisoned row is carried by its lse / delta, and the kernels select
  masked entries of ``p`` and ``ds`` to exact zeros with ``where``.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["finite_rows", "zero_nonfinite", "forward_operands", "backward_operands"]


def finite_rows(x):
  """bool ``x.shape[:-1]``: the row (last axis) has only finite entries."""
  return jnp.all(jnp.isfinite(x), axis=-1)


def zero_nonfinite(x):
  return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def _nan_rows(x, ok):
  return jnp.where(ok[..., None], x, jnp.asarray(jnp.nan, x.dtype))


def forward_operands(q, k, v, value_used=None):
  """``(q, k, v)`` for a forward kernel: NaN rows of q, NaN keys (k or used v non-finite), zeroed v.

  Args:
    q: ``[B, T, H, D]``; k: ``[B, S, G, D]``; v: ``[B, S, G, E]``.
    value_used: None (every value can be mixed in) or bool ``[S]``: the positions whose value some query uses
      (landmark attention never mixes landmark values in, so a NaN there must not poison the key).
  """
  ok_v = finite_rows(v)
  if value_used is not None:
    ok_v = ok_v | ~value_used[None, :, None]
  return (_nan_rows(q, finite_rows(q)), _nan_rows(k, finite_rows(k) & ok_v), zero_nonfinite(v))


def backward_operands(*xs):
  """Every operand with non-finite entries zeroed (the backward kernels' q, k, v)."""
  return tuple(zero_nonfinite(x) for x in xs)
