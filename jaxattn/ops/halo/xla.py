"""Blocked halo attention in plain XLA: query blocks against their gathered halo windows; no ``T x T`` mask.

Steps (``b`` block, ``h`` halo, ``w = b + 2h``; ``nby x nbx`` blocks after padding the image to multiples of b):

1. queries ``[B, Y, X, H, D] -> [B, nby, nbx, b*b, G, H/G, D]`` (a reshape);
2. keys / values zero-padded by ``h`` on every side, then the ``w x w`` window of every block is gathered with two
   static ``take``s (rows, then columns): ``[B, nby, nbx, w*w, G, D]`` — ``(w / b)^2`` times the key memory;
3. logits per block ``[b*b, w*w]`` plus the factorised relative logits (one ``[b, w]`` table lookup per axis,
   broadcast over the other axis), window keys outside the image masked when ``mask_padding``;
4. a safe softmax, the value product, and the blocks folded back (padding rows cropped).

Cost per query: ``w^2 (D + E)`` multiply-adds (global attention: ``Y * X * (D + E)``).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

__all__ = ["halo_attention_xla", "window_layout"]


@functools.lru_cache(maxsize=64)
def window_layout(height: int, width: int, block: int, halo: int):
  """Static numpy pieces: ``(rows [nby, w], cols [nbx, w], valid [nby, nbx, w*w] bool, rel_idx [b, w])``.

  ``rows[i]`` are the padded-grid rows of block row ``i``'s window; ``valid`` marks window keys inside the image;
  ``rel_idx[q, k] = k - q + b - 1`` is the relative-position table row of window offset ``k`` seen from in-block
  offset ``q`` (the same on both axes).
  """
  b, h = block, halo
  w = b + 2 * h
  nby, nbx = -(-height // b), -(-width // b)
  rows = np.arange(nby)[:, None] * b + np.arange(w)[None, :]
  cols = np.arange(nbx)[:, None] * b + np.arange(w)[None, :]
  ry = (rows - h >= 0) & (rows - h < height)  # [nby, w]
  rx = (cols - h >= 0) & (cols - h < width)  # [nbx, w]
  valid = (ry[:, None, :, None] & rx[None, :, None, :]).reshape(nby, nbx, w * w)
  rel_idx = np.arange(w)[None, :] - np.arange(b)[:, None] + b - 1
  for a in (rows, cols, valid, rel_idx):
    a.setflags(write=False)
  return rows, cols, valid, rel_idx


def halo_attention_xla(q, k, v, rel_h, rel_w, *, block: int, halo: int, scale: float, mask_padding: bool):
  """Blocked halo attention (arguments validated by :func:`jaxattn.ops.halo.halo_attention`).

  Shapes: ``q [B, Y, X, H, D]``, ``k [B, Y, X, G, D]``, ``v [B, Y, X, G, E]``, ``rel_h, rel_w [2(b+h)-1, D]`` or
  None -> ``[B, Y, X, H, E]`` in q's dtype (logits and softmax in f32).
  """
  B, Y, X, H, D = q.shape
  G, E = k.shape[3], v.shape[4]
  R = H // G
  b, h = block, halo
  w = b + 2 * h
  rows, cols, valid, rel_idx = window_layout(Y, X, b, h)
  nby, nbx = rows.shape[0], cols.shape[0]
  yp, xp = nby * b, nbx * b
  f32 = jnp.float32

  qp = jnp.pad(q, ((0, 0), (0, yp - Y), (0, xp - X), (0, 0), (0, 0)))
  qb = qp.reshape(B, nby, b, nbx, b, G, R, D).transpose(0, 1, 3, 2, 4, 5, 6, 7)  # [B, i, j, qy, qx, G, R, D]

  kv_pad = ((0, 0), (h, yp - Y + h), (h, xp - X + h), (0, 0), (0, 0))

  def windows(x):  # [B, Y, X, G, F] -> [B, nby, nbx, w*w, G, F]
    x = jnp.pad(x, kv_pad)
    x = jnp.take(x, jnp.asarray(rows.reshape(-1)), axis=1).reshape(B, nby, w, xp + 2 * h, G, x.shape[-1])
    x = jnp.take(x, jnp.asarray(cols.reshape(-1)), axis=3).reshape(B, nby, w, nbx, w, G, x.shape[-1])
    return x.transpose(0, 1, 3, 2, 4, 5, 6).reshape(B, nby, nbx, w * w, G, x.shape[-1])

  kw, vw = windows(k), windows(v)
  s = jnp.einsum("bijyxgrd,bijkgd->bijgryxk", qb, kw, preferred_element_type=f32) * scale
  s = s.reshape(B, nby, nbx, G, R, b, b, w, w)
  if rel_h is not None:
    idx = jnp.asarray(rel_idx)
    ty, tx = rel_h[idx], rel_w[idx]  # [b, w, D]: table row of (in-block offset, window offset)
    ly = jnp.einsum("bijyxgrd,ykd->bijgryxk", qb, ty.astype(q.dtype), preferred_element_type=f32)
    lx = jnp.einsum("bijyxgrd,xkd->bijgryxk", qb, tx.astype(q.dtype), preferred_element_type=f32)
    s = s + ly[..., :, None] + lx[..., None, :]
  s = s.reshape(B, nby, nbx, G, R, b * b, w * w)
  if mask_padding:
    ok = jnp.asarray(valid)[None, :, :, None, None, None, :]
    s = jnp.where(ok, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(ok, jnp.exp(s - m), 0.0)
  else:
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  o = jnp.einsum("bijgrqk,bijkge->bijqgre", p.astype(v.dtype), vw, preferred_element_type=f32)
  o = o.reshape(B, nby, nbx, b, b, H, E).transpose(0, 1, 3, 2, 4, 5, 6).reshape(B, yp, xp, H, E)
  return o[:, :Y, :X].astype(q.dtype)
