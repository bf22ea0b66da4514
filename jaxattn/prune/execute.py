"""Executors: apply a selection to the next layers, either by gathering the kept tokens (shorter sequence, the
inference path: static ``k`` keeps ``jit`` shapes) or as segment ids / a mask over the full sequence (static
shapes; equal outputs at the kept and text positions).

The mask form gives pruned visual tokens their own segment (id 1): kept tokens and text (id 0) never attend them,
and their own rows only see each other, so no row is empty (never NaN) and nothing they compute reaches id 0.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["gather_keep", "keep_mask", "prune_segment_ids", "compose"]


def _check_idx(idx, n):
  if jnp.ndim(idx) != 2:
    raise ValueError(f"indices must have shape [B, k], got {jnp.shape(idx)}")
  if jnp.shape(idx)[1] > n:
    raise ValueError(f"{jnp.shape(idx)[1]} kept indices exceed the {n} tokens")


def gather_keep(x, idx, *, start: int = 0, num: int | None = None):
  """``x [B, L, ...]`` laid out as ``[prefix; block; suffix]`` -> ``[prefix; block[idx]; suffix]``.

  The block (the prunable visual tokens) holds ``num`` tokens from ``start`` (default: to the end); ``idx [B, k]``
  indexes into it and its order is kept. Prefix and suffix (e.g. the text) are kept whole.

  Returns:
    ``[B, L - num + k, ...]``.
  """
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f"x must have shape [B, L, ...], got {x.shape}")
  L = x.shape[1]
  num = L - start if num is None else num
  if not 0 <= start <= L or not 0 < num <= L - start:
    raise ValueError(f"block start={start}, num={num} does not fit a sequence of {L} tokens")
  _check_idx(idx, num)
  idx = jnp.asarray(idx, jnp.int32) + start
  kept = jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
  return jnp.concatenate([x[:, :start], kept, x[:, start + num:]], axis=1)


def keep_mask(idx, num_tokens: int):
  """Boolean ``[B, N]``: True at the kept indices ``idx [B, k]``."""
  _check_idx(idx, num_tokens)
  B = jnp.shape(idx)[0]
  return jnp.zeros((B, num_tokens), bool).at[jnp.arange(B)[:, None], jnp.asarray(idx)].set(True)


def prune_segment_ids(keep, num_text: int = 0, *, num_prefix: int = 0):
  """Segment ids ``[B, P + N + T]`` (int32) for ``[prefix; visual; text]``: 0 for the prefix, kept visual tokens
  and text, 1 for pruned visual tokens. Pass as ``segment_ids=(ids, ids)`` to the next layers' attention.

  Args:
    keep: bool ``[B, N]`` (from :func:`keep_mask`).
    num_text, num_prefix: tokens after / before the visual block (always kept).
  """
  keep = jnp.asarray(keep, bool)
  if keep.ndim != 2:
    raise ValueError(f"keep must have shape [B, N], got {keep.shape}")
  if num_text < 0 or num_prefix < 0:
    raise ValueError(f"num_text={num_text} and num_prefix={num_prefix} must be non-negative")
  B = keep.shape[0]
  vis = jnp.where(keep, 0, 1).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros((B, num_prefix), jnp.int32), vis, jnp.zeros((B, num_text), jnp.int32)], axis=1)


def compose(prev_idx, stage_idx):
  """Original-token indices after a later stage: ``prev_idx[b, stage_idx[b]]`` (``[B, k_s]``, ascending when both
  are), for a stage that selected ``stage_idx`` among the survivors ``prev_idx`` of the earlier stages."""
  prev_idx, stage_idx = jnp.asarray(prev_idx), jnp.asarray(stage_idx)
  _check_idx(stage_idx, prev_idx.shape[1])
  return jnp.take_along_axis(prev_idx, stage_idx, axis=1)
