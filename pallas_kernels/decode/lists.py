"""Block lists and key masks of the decode kernels (plain jnp, jit-friendly).

Both decode kernels visit, per (sequence ``b``, kv head ``g``), the key blocks ``blocks[b, g, :counts[b, g]]`` of
``block_k`` keys each, and mask inside a visited block the keys at or past ``lengths[b]`` and, optionally, those
whose ``key_mask[b, g, key]`` is False:

- dense decode: every block below the length (:func:`dense_lists`);
- gathered (sparse) decode over token positions ``index [B, G, K]``: the distinct blocks holding a valid entry,
  ascending (:func:`gathered_lists`), and the key mask of the listed positions (:func:`scatter_key_mask`).

:func:`fetch_order` turns a list into what the kernels read: entries past the count repeat the last valid block (0
for an empty list) and everything is clipped to ``[0, nk)``, so no step ever addresses a block outside the cache and
the TPU pipeline re-fetches nothing for skipped steps.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["num_blocks", "dense_lists", "gathered_lists", "scatter_key_mask", "fetch_order"]


def num_blocks(L: int, block_k: int) -> int:
  return -(-L // block_k)


def dense_lists(lengths, G: int, L: int, block_k: int):
  """``(blocks [B, G, nk], counts [B, G])`` int32: blocks ``0 .. ceil(lengths[b] / block_k) - 1`` of each head."""
  nk = num_blocks(L, block_k)
  B = lengths.shape[0]
  counts = (jnp.clip(lengths, 0, L).astype(jnp.int32) + block_k - 1) // block_k
  blocks = jnp.broadcast_to(jnp.arange(nk, dtype=jnp.int32), (B, G, nk))
  return blocks, jnp.broadcast_to(counts[:, None], (B, G))


def gathered_lists(index, entry_valid, L: int, block_k: int):
  """``(blocks [B, G, min(K, nk)], counts [B, G])`` int32: the distinct blocks ``index // block_k`` of the valid
  entries of ``index [B, G, K]`` (``entry_valid [B, G, K]`` bool; valid entries must lie in ``[0, L)``),
  ascending, first ``counts`` valid."""
  nk = num_blocks(L, block_k)
  K = index.shape[-1]
  ids = jnp.sort(jnp.where(entry_valid, index // block_k, nk).astype(jnp.int32), axis=-1)  # nk: sorts last
  repeat = jnp.concatenate([jnp.zeros_like(ids[..., :1], bool), ids[..., 1:] == ids[..., :-1]], axis=-1)
  ids = jnp.sort(jnp.where(repeat, nk, ids), axis=-1)[..., :min(K, nk)]
  counts = jnp.sum(ids < nk, axis=-1, dtype=jnp.int32)
  return ids, counts


def scatter_key_mask(index, entry_valid, L: int):
  """``[B, G, L]`` bool: the positions listed by a valid entry of ``index [B, G, K]`` (invalid entries drop)."""
  B, G, _ = index.shape
  pos = jnp.where(entry_valid, index, L)  # out of range => dropped
  b = jnp.arange(B)[:, None, None]
  g = jnp.arange(G)[None, :, None]
  return jnp.zeros((B, G, L), bool).at[b, g, pos].set(True, mode="drop")


def fetch_order(blocks, counts, nk: int):
  """``blocks`` with the entries past ``counts`` replaced by the last valid one (0 when none), clipped to
  ``[0, nk)``, int32."""
  NB = blocks.shape[-1]
  j = jnp.arange(NB, dtype=jnp.int32)
  last = jnp.take_along_axis(blocks, jnp.clip(counts - 1, 0, NB - 1)[..., None], axis=-1)
  last = jnp.where(counts[..., None] > 0, last, 0)
  return jnp.clip(jnp.where(j < counts[..., None], blocks, last), 0, nk - 1).astype(jnp.int32)
