"""Dense reference of halo attention: every query against the whole zero-padded key grid, masked (f32).

It never cuts windows: the keys are the image zero-padded by ``halo`` on every side (and up to a multiple of the
block when padding is requested), flattened, and each query ``(qy, qx)`` of block ``(i, j)`` may attend padded-grid
key ``(py, px)`` iff ``i * b <= py < i * b + w`` and ``j * b <= px < j * b + w`` (``w = b + 2h``; the padded grid is
shifted by ``h``, so this is the window ``[i * b - h, i * b + b + h)`` in image coordinates). With
``mask_padding=True`` keys outside the image are also excluded; with False they take part as zero vectors (logit
``0 + relative-position logit``, value 0), as in timm's ``HaloAttn``. Relative logits are
``q . rel_h[dy + b + h - 1] + q . rel_w[dx + b + h - 1]`` with ``dy = ky - qy``, ``dx = kx - qx`` in image
coordinates, added after the ``scale`` (not scaled).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["halo_attention_reference", "dense_layout"]

_HI = jax.lax.Precision.HIGHEST


def dense_layout(height: int, width: int, block: int, halo: int, mask_padding: bool):
  """Static numpy pieces of the dense problem over the padded key grid.

  Returns:
    ``(allowed [T, S] bool, idx_y [T, S] int32, idx_x [T, S] int32, (Yk, Xk))`` with ``T = height * width``,
    ``S = Yk * Xk`` the padded key grid (``Yk = ceil(height / block) * block + 2 * halo``); ``idx_*`` are the
    (clipped) relative-position table rows of each pair.
  """
  b, h = block, halo
  yk = -(-height // b) * b + 2 * h
  xk = -(-width // b) * b + 2 * h
  qy, qx = np.divmod(np.arange(height * width), width)
  py, px = np.divmod(np.arange(yk * xk), xk)
  qy, qx, py, px = qy[:, None], qx[:, None], py[None, :], px[None, :]
  y0, x0 = (qy // b) * b, (qx // b) * b
  allowed = (py >= y0) & (py < y0 + b + 2 * h) & (px >= x0) & (px < x0 + b + 2 * h)
  ky, kx = py - h, px - h  # image coordinates of the padded-grid key
  if mask_padding:
    allowed &= (ky >= 0) & (ky < height) & (kx >= 0) & (kx < width)
  n_rel = 2 * (b + h) - 1
  idx_y = np.clip(ky - qy + b + h - 1, 0, n_rel - 1).astype(np.int32)
  idx_x = np.clip(kx - qx + b + h - 1, 0, n_rel - 1).astype(np.int32)
  return allowed, idx_y, idx_x, (yk, xk)


def halo_attention_reference(q, k, v, rel_h, rel_w, *, block: int, halo: int, scale: float, mask_padding: bool):
  """The definition (arguments validated by :func:`jaxattn.ops.halo.halo_attention`).

  Shapes: ``q [B, Y, X, H, D]``, ``k [B, Y, X, G, D]``, ``v [B, Y, X, G, E]``, ``rel_h, rel_w [2(b+h)-1, D]`` or
  None -> ``[B, Y, X, H, E]`` in q's dtype (computed in f32, ``Precision.HIGHEST``).
  """
  B, Y, X, H, D = q.shape
  G, E = k.shape[3], v.shape[4]
  allowed, idx_y, idx_x, (yk, xk) = dense_layout(Y, X, block, halo, mask_padding)
  f32 = jnp.float32
  pad = ((0, 0), (halo, yk - Y - halo), (halo, xk - X - halo), (0, 0), (0, 0))
  kf = jnp.pad(k.astype(f32), pad).reshape(B, yk * xk, G, D)
  vf = jnp.pad(v.astype(f32), pad).reshape(B, yk * xk, G, E)
  kf, vf = jnp.repeat(kf, H // G, axis=2), jnp.repeat(vf, H // G, axis=2)
  qf = q.astype(f32).reshape(B, Y * X, H, D)
  s = scale * jnp.einsum("bthd,bshd->bhts", qf, kf, precision=_HI)
  if rel_h is not None:
    T, S = allowed.shape
    for table, idx in ((rel_h, idx_y), (rel_w, idx_x)):
      qr = jnp.einsum("bthd,ld->bhtl", qf, table.astype(f32), precision=_HI)
      s = s + jnp.take_along_axis(qr, jnp.broadcast_to(jnp.asarray(idx), (B, H, T, S)), axis=-1)
  ok = jnp.asarray(allowed)[None, None]
  m = jnp.max(jnp.where(ok, s, -jnp.inf), axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(ok, jnp.exp(s - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)  # a row with no allowed key (none here) gives 0, never NaN
  out = jnp.einsum("bhts,bshe->bthe", p, vf, precision=_HI)
  return out.reshape(B, Y, X, H, E).astype(q.dtype)
