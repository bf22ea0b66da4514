"""Ulysses (DeepSpeed) context parallelism: all-to-all from sequence shards to head shards, attend, and back.

Inside ``shard_map`` over an axis of ``P`` devices holding ``Tl = T / P`` tokens and all ``H`` heads each, one
``all_to_all`` per tensor gives every device the whole sequence for ``H / P`` query heads (and the matching kv
heads), local attention runs on the full sequence with the global mask (perfectly balanced: every device does the same
work), and a last ``all_to_all`` brings the output back to sequence shards.

Heads: ``H`` must be a multiple of ``P``. With GQA, kv head ``g`` serves query heads ``[g R, (g + 1) R)``; when
``G`` is not a multiple of ``P`` the kv heads are first repeated to ``lcm(G, P)`` heads (so each device still gets
whole groups), at ``lcm(G, P) / G`` times the K/V all-to-all volume. Backward is autodiff (``all_to_all`` transposes
to the reverse ``all_to_all``; the repeat sums dK/dV back).
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn.parallel import _compat
from jaxattn.parallel.zigzag import zigzag_indices

__all__ = ["check_heads", "seq_to_heads", "heads_to_seq", "ulysses_attention_local"]


def check_heads(H: int, G: int, P: int, axis_name) -> None:
  """Raises a ValueError naming the values when ``H`` query heads cannot be split over ``P`` devices."""
  if H % P:
    raise ValueError(f"ulysses needs the query heads to split evenly over the {axis_name!r} axis: H={H} heads is "
                     f"not a multiple of its size {P} (use strategy='ring', 'all_gather' or 'usp' with a smaller "
                     f"ulysses axis)")
  if H % G:
    raise ValueError(f"q has {H} heads, not a multiple of k's {G} kv heads")


def kv_repeat(G: int, P: int) -> int:
  """How many times each kv head is repeated so that the kv heads split evenly over ``P`` devices."""
  return 1 if G % P == 0 else math.lcm(G, P) // G


def seq_to_heads(x, axis_name):
  """``[B, Tl, h, d] -> [B, Tl * P, h / P, d]`` (sequence shards -> head shards)."""
  return lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)


def heads_to_seq(x, axis_name):
  """``[B, T, h / P, d] -> [B, T / P, h, d]`` (head shards -> sequence shards)."""
  return lax.all_to_all(x, axis_name, split_axis=1, concat_axis=2, tiled=True)


def ulysses_attention_local(q, k, v, q_ids, kv_ids, *, axis_name: str, inner: Callable, zigzag_inputs: bool = False):
  """Ulysses around ``inner`` on this device's shards (inside ``shard_map``).

  Args:
    q: ``[B, Tl, H, D]``; k: ``[B, Tl, G, D]``; v: ``[B, Tl, G, E]``; q_ids, kv_ids: ``[B, Tl]`` or None.
    axis_name: the mesh axis to turn from sequence into heads.
    inner: ``(q [B, T, H/P, D], k, v, q_ids [B, T] | None, kv_ids) -> (out [B, T, H/P, E], lse [B, H/P, T])``,
      e.g. a single-device :func:`jaxattn.softmax_attention` or a ring over another axis (USP).
    zigzag_inputs: the shards are in zigzag order over this axis (:func:`~jaxattn.parallel.zigzag_permute` with
      ``P`` shards): the gathered sequence is put back in natural order for ``inner`` and the output re-permuted.

  Returns:
    ``(out [B, Tl, H, E], lse [B, H, Tl])``.
  """
  P = _compat.axis_size(axis_name)
  B, Tl, H, _ = q.shape
  G = k.shape[2]
  check_heads(H, G, P, axis_name)
  rep = kv_repeat(G, P)
  if rep > 1:
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)  # head g*rep + i reads kv head g
  qh, kh, vh = seq_to_heads(q, axis_name), seq_to_heads(k, axis_name), seq_to_heads(v, axis_name)
  gather = lambda x: None if x is None else lax.all_gather(x, axis_name, axis=1, tiled=True)
  qi, ki = gather(q_ids), gather(kv_ids)
  if zigzag_inputs and P > 1:
    inv = jnp.asarray(np.argsort(zigzag_indices(Tl * P, P)).astype(np.int32))
    nat = lambda x: None if x is None else jnp.take(x, inv, axis=1)
    qh, kh, vh, qi, ki = nat(qh), nat(kh), nat(vh), nat(qi), nat(ki)
  out, lse = inner(qh, kh, vh, qi, ki)
  if zigzag_inputs and P > 1:
    perm = jnp.asarray(zigzag_indices(Tl * P, P))
    out, lse = jnp.take(out, perm, axis=1), jnp.take(lse, perm, axis=2)
  out = heads_to_seq(out, axis_name)
  lse = lax.all_to_all(lse, axis_name, split_axis=2, concat_axis=1, tiled=True)  # [B, H, Tl]
  return out, lse
