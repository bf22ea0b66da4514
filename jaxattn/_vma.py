"""Varying-manual-axes (vma) typing under ``shard_map(check_vma=True)``.

Inside ``shard_map`` every value carries the set of mesh axes it varies over. A loop carry created from constants
(``jnp.zeros``) varies over none, while the loop body mixes it with per-device inputs, so ``fori_loop`` / ``scan``
reject the carry unless it is cast to the inputs' axes first. :func:`match_vma` does that cast. The other direction
is a ``custom_vjp`` backward: the cotangent of an input that does not vary over an axis (a bias or a decay shared
by every device) must not vary either, so :func:`sum_to_vma` sums it over the extra axes (what JAX's own transpose
of the implicit broadcast does). Outside ``shard_map`` (or on a jax without vma typing) both are the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax import lax

__all__ = ["match_vma", "pvary", "vma"]


def vma(x) -> frozenset:
  """The mesh axes ``x`` varies over (empty outside ``shard_map`` or for non-jax values)."""
  typeof = getattr(jax, "typeof", None)
  if typeof is None or x is None:
    return frozenset()
  try:
    aval = typeof(x)
  except Exception:  # noqa: BLE001 - not a jax value
    return frozenset()
  vma_ = getattr(aval, "vma", None)  # jax 0.6 - 0.9
  if vma_ is None:  # jax 0.10+: ManualAxisType(varying=..., unreduced=..., reduced=...)
    vma_ = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  return frozenset(vma_ or ())


def pvary(tree, axes: Sequence[str]):
  """Marks every leaf of ``tree`` as varying over ``axes`` (those it does not already vary over)."""
  axes = tuple(axes)

  def one(leaf):
    if leaf is None:
      return None
    missing = tuple(a for a in axes if a not in vma(leaf))
    if not missing:
      return leaf
    if hasattr(lax, "pcast"):
      return lax.pcast(leaf, missing, to="varying")
    if hasattr(lax, "pvary"):
      return lax.pvary(leaf, missing)
    return leaf

  return jax.tree_util.tree_map(one, tree)


def match_vma(tree, *like):
  """``tree`` (a loop's initial carry) cast to vary over every axis that any array in ``like`` varies over."""
  axes = frozenset().union(*(vma(x) for x in jax.tree_util.tree_leaves(like)))
  return pvary(tree, sorted(axes)) if axes else tree


def sum_to_vma(cotangents, primals):
  """Each cotangent ``psum``-ed over the axes it varies over but its primal does not (``None`` passes through).

  ``cotangents`` and ``primals`` are equal-length sequences (a ``custom_vjp`` backward's result and its inputs).
  """

  def one(ct, primal):
    if ct is None or primal is None:
      return ct
    extra = tuple(sorted(vma(ct) - vma(primal)))
    return lax.psum(ct, extra) if extra else ct

  return tuple(one(c, p) for c, p in zip(cotangents, primals))
