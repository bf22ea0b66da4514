r"""Zigzag (dual-chunk-swap) load balancing for causal context parallelism.

The sequence of ``T`` tokens is cut into ``2P`` chunks of ``C = T / (2P)`` tokens and shard ``r`` of ``P`` holds
chunks ``r`` and ``2P - 1 - r`` (an early and a late one), so with a causal mask every shard attends the same area
up to one chunk-diagonal: ``(2P + 1) C^2 / 2`` pairs each (imbalance 1 instead of about 2 for contiguous shards).

Zigzag order of a sequence is the concatenation of the shards' chunks, ``[0, 2P-1, 1, 2P-2, ..., P-1, P]``:

  >>> zigzag_indices(8, 2).tolist()   # C = 2
  [0, 1, 6, 7, 2, 3, 4, 5]

Two kinds of helpers:

- global (any array, no mesh): :func:`zigzag_permute` / :func:`zigzag_unpermute` gather along ``axis`` with the
  static permutation (use them once on the data, e.g. token ids, positions and labels, to keep a whole model in
  zigzag order and pass ``zigzag_inputs=True``);
- local (inside ``shard_map``): :func:`zigzag_permute_local` / :func:`zigzag_unpermute_local` turn a contiguous
  shard into a zigzag shard and back with two ``ppermute``\ s of half a shard each (no all-gather).

Remember that positions (RoPE) must follow the permutation when the data is kept in zigzag order.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn.parallel import _compat

__all__ = ["zigzag_chunks", "zigzag_indices", "zigzag_permute", "zigzag_unpermute", "zigzag_permute_local",
           "zigzag_unpermute_local"]


def zigzag_chunks(num_shards: int) -> tuple[tuple[int, int], ...]:
  """The chunk indices ``(r, 2P - 1 - r)`` held by each of ``P = num_shards`` shards."""
  P = _check_positive("num_shards", num_shards)
  return tuple((r, 2 * P - 1 - r) for r in range(P))


@functools.lru_cache(maxsize=64)
def _indices(T: int, P: int) -> np.ndarray:
  C = T // (2 * P)
  order = [c for pair in zigzag_chunks(P) for c in pair]
  idx = (np.asarray(order)[:, None] * C + np.arange(C)[None, :]).reshape(-1).astype(np.int32)
  idx.setflags(write=False)
  return idx


def zigzag_indices(T: int, num_shards: int) -> np.ndarray:
  """``perm [T]`` with ``x_zigzag = x[perm]`` (int32, numpy).

  Raises:
    ValueError: when ``T`` is not a multiple of ``2 * num_shards``.
  """
  T, P = _check_positive("T", T), _check_positive("num_shards", num_shards)
  if T % (2 * P):
    raise ValueError(f"zigzag needs the sequence length to be a multiple of 2 * num_shards = {2 * P}, got T={T}")
  return _indices(T, P)


def zigzag_permute(x, num_shards: int, axis: int = 1):
  """Natural order -> zigzag order along ``axis`` (a static gather; any array, sharded or not)."""
  x = jnp.asarray(x)
  return jnp.take(x, jnp.asarray(zigzag_indices(x.shape[axis], num_shards)), axis=axis)


def zigzag_unpermute(x, num_shards: int, axis: int = 1):
  """Zigzag order -> natural order along ``axis`` (inverse of :func:`zigzag_permute`)."""
  x = jnp.asarray(x)
  inv = np.argsort(zigzag_indices(x.shape[axis], num_shards)).astype(np.int32)
  return jnp.take(x, jnp.asarray(inv), axis=axis)


# ------------------------------------------------------------------------------------------ inside shard_map
def _dest_even(P: int) -> list[tuple[int, int]]:
  """ppermute pairs sending natural shard ``d``'s first half (chunk ``2d``) to the shard that holds it in zigzag."""
  return [(d, 2 * d if 2 * d < P else 2 * P - 1 - 2 * d) for d in range(P)]


def _dest_odd(P: int) -> list[tuple[int, int]]:
  """Same for the second half (chunk ``2d + 1``)."""
  return [(d, 2 * d + 1 if 2 * d + 1 < P else 2 * P - 2 - 2 * d) for d in range(P)]


def _halves(x, axis: int):
  n = x.shape[axis]
  if n % 2:
    raise ValueError(f"a zigzag shard needs an even local length, got {n} along axis {axis}")
  return lax.slice_in_dim(x, 0, n // 2, axis=axis), lax.slice_in_dim(x, n // 2, n, axis=axis)


def zigzag_permute_local(x, axis_name: str, axis: int = 1):
  """Inside ``shard_map``: this device's contiguous shard -> its zigzag shard (two half-shard ``ppermute``\\ s).

  Shard ``d`` of a contiguous layout holds chunks ``2d`` and ``2d + 1``; afterwards shard ``r`` holds chunks ``r`` and
  ``2P - 1 - r`` in that order. Differentiable (the transpose is the inverse permutation).
  """
  P = _compat.axis_size(axis_name)
  if P == 1:
    return x
  first, second = _halves(x, axis)
  even = lax.ppermute(first, axis_name, _dest_even(P))  # chunk r (r even) or 2P-1-r (r odd)
  odd = lax.ppermute(second, axis_name, _dest_odd(P))  # chunk r (r odd) or 2P-1-r (r even)
  r_even = lax.axis_index(axis_name) % 2 == 0
  return jnp.where(r_even, jnp.concatenate([even, odd], axis), jnp.concatenate([odd, even], axis))


def zigzag_unpermute_local(x, axis_name: str, axis: int = 1):
  """Inside ``shard_map``: inverse of :func:`zigzag_permute_local` (zigzag shard -> contiguous shard)."""
  P = _compat.axis_size(axis_name)
  if P == 1:
    return x
  lo, hi = _halves(x, axis)  # chunks r and 2P-1-r
  r_even = lax.axis_index(axis_name) % 2 == 0
  even, odd = jnp.where(r_even, lo, hi), jnp.where(r_even, hi, lo)
  even = lax.ppermute(even, axis_name, [(b, a) for a, b in _dest_even(P)])
  odd = lax.ppermute(odd, axis_name, [(b, a) for a, b in _dest_odd(P)])
  return jnp.concatenate([even, odd], axis)


def _check_positive(name, value) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)
