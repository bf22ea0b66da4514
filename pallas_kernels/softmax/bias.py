"""Additive logit bias for the softmax kernels (GPU and TPU): shape checks, padding, the dbias clean-up.

The kernels take a bias ``[Bb, Hb, T, S]`` with ``Bb in {1, B}`` and ``Hb in {1, H}`` (query heads). A size-1 dim
is never materialised: the BlockSpec index maps send every batch / head to block 0 of it. The bias enters the
logits after the scale and before the soft cap, as in ``jaxattn.ops.softmax.xla``::

    s = cap * tanh((scale * q.k + bias) / cap)        (s = scale * q.k + bias without a cap)

Its gradient is ``dS = P * (dP - delta)`` (times ``1 - tanh^2`` with a cap), the gradient of the pre-cap logits,
which one backward kernel (dq) writes per visited tile into a ``[B, H, Tp, Sp]`` buffer. Blocks the mask skips are
never written by a kernel: :func:`zero_unvisited` selects them to 0 in XLA (fused with the slice and the sum over
broadcast dims that :func:`reduce_to` does), so the buffer needs no zero fill.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["check_bias", "pad_bias", "visited_blocks", "zero_unvisited", "reduce_to", "dbias_dtype"]


def check_bias(name: str, bias, B: int, H: int, T: int, S: int) -> tuple[int, int]:
  """``(Bb, Hb)`` of a ``[Bb, Hb, T, S]`` float bias; ``ValueError`` naming the shape otherwise."""
  if bias.ndim != 4 or tuple(bias.shape[2:]) != (T, S) or bias.shape[0] not in (1, B) or bias.shape[1] not in (1, H):
    raise ValueError(f"{name}: bias shape {tuple(bias.shape)} must be [1|{B}, 1|{H}, {T}, {S}]")
  if not jnp.issubdtype(bias.dtype, jnp.floating):
    raise ValueError(f"{name}: bias must be a float array, got {bias.dtype}")
  return int(bias.shape[0]), int(bias.shape[1])


def pad_bias(bias, Tp: int, Sp: int):
  """``bias [Bb, Hb, T, S]`` zero-padded to ``[Bb, Hb, Tp, Sp]`` (padded keys / queries are masked or dropped)."""
  T, S = bias.shape[2:]
  if (T, S) == (Tp, Sp):
    return bias
  return jnp.pad(bias, ((0, 0), (0, 0), (0, Tp - T), (0, Sp - S)))


def visited_blocks(index, count, n_cols: int):
  """bool ``[Bl, Hl, n_rows, n_cols]``: which blocks a visiting list (``index [Bl, Hl, n_rows, K]``, first
  ``count`` entries valid) visits. A scatter: ``O(Bl * Hl * n_rows * K)``, no ``n_rows x K x n_cols`` array."""
  index = jnp.asarray(index, jnp.int32)
  Bl, Hl, n, K = index.shape
  valid = (jnp.arange(K, dtype=jnp.int32) < jnp.asarray(count, jnp.int32)[..., None]).astype(jnp.int8)
  b, h, r, _ = jnp.meshgrid(jnp.arange(Bl), jnp.arange(Hl), jnp.arange(n), jnp.arange(K), indexing="ij")
  vis = jnp.zeros((Bl, Hl, n, n_cols), jnp.int8).at[b, h, r, jnp.clip(index, 0, n_cols - 1)].max(valid)
  return vis > 0


def zero_unvisited(ds, index, count, block_q: int, block_k: int, T: int, S: int):
  """``ds [B, H, Tp, Sp]`` with the blocks the lists do not visit set to 0, cropped to ``[B, H, T, S]``."""
  B, H, Tp, Sp = ds.shape
  nq, nk = Tp // block_q, Sp // block_k
  vis = visited_blocks(index, count, nk)  # [Bl, Hl, nq, nk]
  vis = vis[:, :, :, None, :, None]
  ds = jnp.where(vis, ds.reshape(B, H, nq, block_q, nk, block_k), jnp.zeros((), ds.dtype))
  return ds.reshape(B, H, Tp, Sp)[:, :, :T, :S]


def reduce_to(ds, shape, dtype):
  """``ds [B, H, T, S]`` summed (in f32) over the dims where ``shape`` (the bias's) is 1, cast to ``dtype``."""
  axes = tuple(a for a in (0, 1) if shape[a] == 1 and ds.shape[a] != 1)
  if axes:
    ds = jnp.sum(ds.astype(jnp.float32), axis=axes, keepdims=True)
  return ds.astype(dtype)


def dbias_dtype(bias_shape, B: int, H: int, bias_dtype) -> jnp.dtype:
  """The dtype the kernel writes ``dS`` in: the bias's own when nothing is summed (each entry is one bias
  gradient), else f32 (the sum over broadcast dims runs in f32)."""
  if tuple(bias_shape[:2]) == (B, H):
    return jnp.dtype(bias_dtype)
  return jnp.dtype(jnp.float32)
