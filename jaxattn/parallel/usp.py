"""USP (Unified Sequence Parallelism, Fang & Zhao 2024): Ulysses inside, ring across, on a 2-D set of mesh axes.

The sequence is sharded over ``(ring_axis, ulysses_axis)`` (ring major): the ``Pu`` devices of a Ulysses group
together hold one ring shard of ``T / Pr`` tokens. An ``all_to_all`` over the Ulysses axis gives each device that
whole ring shard for ``H / Pu`` heads; a ring over the ring axis (zigzag-balanced when asked) computes attention
against all ring shards; a last ``all_to_all`` restores sequence shards. Ulysses traffic stays inside the (fast,
usually intra-node) Ulysses group, and the ring only carries ``G / Pu`` kv heads, which is what lets CP grow beyond
the head count. The ring's blocks run the chosen softmax backend forward and backward
(:mod:`jaxattn.parallel.ring`); the all-to-alls are differentiated by autodiff.
"""

from __future__ import annotations

from typing import Callable

from jaxattn.parallel.ulysses import ulysses_attention_local

__all__ = ["usp_attention_local"]


def usp_attention_local(q, k, v, q_ids, kv_ids, *, ulysses_axis: str, ring_axis: str, ring_fn: Callable):
  """USP on this device's shards (inside ``shard_map``).

  Args:
    q, k, v, q_ids, kv_ids: this device's sequence shard (see :func:`ulysses_attention_local`).
    ulysses_axis, ring_axis: mesh axis names.
    ring_fn: ``(q, k, v, q_ids, kv_ids, axis_name) -> (out, lse)`` attention of a ring shard over ``axis_name``
      (the ring, with its own load balancing).

  Returns:
    ``(out [B, Tl, H, E], lse [B, H, Tl])``.
  """
  inner = lambda q, k, v, qi, ki: ring_fn(q, k, v, qi, ki, ring_axis)
  return ulysses_attention_local(q, k, v, q_ids, kv_ids, axis_name=ulysses_axis, inner=inner)
