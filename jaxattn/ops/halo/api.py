"""``halo_attention``: validation and the three implementations of blocked local 2-D attention with halo."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxattn._validation import validate_scale
from jaxattn.ops.halo.mask import HaloMask, check_geometry, num_rel_positions
from jaxattn.ops.halo.reference import halo_attention_reference
from jaxattn.ops.halo.xla import halo_attention_xla

__all__ = ["halo_attention", "relative_position_bias", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("reference", "xla", "mask")
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def relative_position_bias(q, rel_h, rel_w, *, block: int, halo: int):
  """The factorised 2-D relative logits of every (query, key) pixel pair, ``[B, H, T, T]`` with ``T = Y * X``.

  ``bias[b, n, i, j] = q_i . rel_h[dy + b + h - 1] + q_i . rel_w[dx + b + h - 1]`` with ``(dy, dx)`` the offset
  of pixel ``j`` from pixel ``i``; pairs outside the halo window (masked anyway) use a clipped row. Quadratic in the
  number of pixels: this is the bias of the ``"mask"`` implementation, for small images.

  Shapes: ``q [B, Y, X, H, D]``, ``rel_h, rel_w [2(b+h)-1, D]``.
  """
  B, Y, X, H, D = q.shape
  T = Y * X
  n_rel = num_rel_positions(block, halo)
  yy, xx = np.divmod(np.arange(T), X)
  out = 0.0
  for table, c in ((rel_h, yy), (rel_w, xx)):
    idx = np.clip(c[None, :] - c[:, None] + block + halo - 1, 0, n_rel - 1).astype(np.int32)  # [T, T]
    qr = jnp.einsum("bthd,ld->bhtl", q.reshape(B, T, H, D), table.astype(q.dtype),
                    preferred_element_type=jnp.float32)
    out = out + jnp.take_along_axis(qr, jnp.broadcast_to(jnp.asarray(idx), (B, H, T, T)), axis=-1)
  return out


def halo_attention(q, k, v, *, block: int, halo: int, rel_h=None, rel_w=None, scale: float | None = None,
                   mask_padding: bool = True, pad: bool = False, implementation: str | None = None,
                   softmax_implementation=None):
  r"""Blocked local self-attention with halo over an image (HaloNet, Vaswani et al. 2021).

  The image is cut into ``block x block`` query blocks; all queries of a block attend the same ``w x w`` window,
  ``w = block + 2 * halo``, centred on the block (rows ``[i b - h, i b + b + h)``, same for columns):

  .. math::
     s_{ij} = \mathrm{scale}\; q_i \cdot k_j + q_i \cdot r^h_{y_j - y_i} + q_i \cdot r^w_{x_j - x_i},\qquad
     o_i = \sum_{j \in W(i)} \mathrm{softmax}_j(s_{ij})\, v_j

  with the factorised relative-position tables ``r^h = rel_h``, ``r^w = rel_w`` (row ``dy + b + h - 1``; the
  relative logits are not scaled, as in timm's ``HaloAttn``). ``block`` equal to the image side is global attention
  with 2-D relative positions; ``halo = 0`` is non-overlapping block attention.

  Image border: the window of an edge block reaches ``halo`` pixels outside the image. With
  ``mask_padding=True`` (default) those keys are masked (the softmax runs over the pixels that exist); with False
  they are zero vectors that still receive probability (logit = relative logit, value 0), which is what timm's
  ``HaloAttn`` does. The paper does not say which it uses (``../shared/papers/efficient.md`` §7a); the mask
  formulation (``implementation="mask"``) can only express the first.

  Args:
    q: queries ``[B, Y, X, H, D]`` (image height ``Y``, width ``X``; f32, bf16 or f16).
    k: keys ``[B, Y, X, G, D]`` with ``H % G == 0`` (query head ``n`` uses kv head ``n // (H // G)``).
    v: values ``[B, Y, X, G, E]``.
    block: query block side ``b`` (an int >= 1).
    halo: halo ``h``, an int with ``0 <= h <= b``.
    rel_h, rel_w: relative-position tables ``[2(b+h)-1, D]`` (shared by the heads), both or neither.
    scale: logit scale (default ``D ** -0.5``).
    mask_padding: mask window keys outside the image (see above).
    pad: allow ``Y`` / ``X`` not divisible by ``block``: the image is zero-padded to a multiple of the block for
      the blocking (padded queries are dropped from the output; padded keys are outside the image and follow
      ``mask_padding``).
    implementation: ``"xla"`` (default: the blocked computation, never builds a ``T x T`` array),
      ``"reference"`` (dense f32 definition over the zero-padded key grid), or ``"mask"``
      (:func:`jaxattn.softmax_attention` over the flattened image with :class:`HaloMask` and the relative logits as
      a ``[B, H, T, T]`` bias; needs ``mask_padding=True``).
    softmax_implementation: passed to :func:`jaxattn.softmax_attention` by ``"mask"`` (note: the Pallas backends
      take no bias, so use them with ``rel_h=None``).

  Returns:
    ``[B, Y, X, H, E]`` in q's dtype.

  Raises:
    ValueError: bad ranks, shapes, dtypes, ``halo > block``, an image side not divisible by ``block`` without
      ``pad``, mismatched or wrongly sized tables, an unknown implementation, or ``"mask"`` with
      ``mask_padding=False`` — each naming the offending value.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 5:
      raise ValueError(f"{name} must have rank 5 ([B, Y, X, heads, dim]), got shape {x.shape}")
    if x.dtype not in _FLOATS:
      raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
  if k.shape[:4] != v.shape[:4]:
    raise ValueError(f"k {k.shape} and v {v.shape} must agree in [B, Y, X, G]")
  if q.shape[:3] != k.shape[:3]:
    raise ValueError(f"q {q.shape} and k {k.shape} must agree in [B, Y, X] (halo attention is self-attention "
                     f"over one image)")
  if q.shape[4] != k.shape[4]:
    raise ValueError(f"q's head dim {q.shape[4]} differs from k's {k.shape[4]}")
  if q.shape[3] % k.shape[3]:
    raise ValueError(f"q has {q.shape[3]} heads, not a multiple of k's {k.shape[3]} kv heads")
  B, Y, X, H, D = q.shape
  Y, X, block, halo = check_geometry(Y, X, block, halo, bool(pad))
  scale = validate_scale(scale, D)
  if (rel_h is None) != (rel_w is None):
    raise ValueError("rel_h and rel_w must be given together (or neither)")
  if rel_h is not None:
    rel_h, rel_w = jnp.asarray(rel_h), jnp.asarray(rel_w)
    want = (num_rel_positions(block, halo), D)
    for name, t in (("rel_h", rel_h), ("rel_w", rel_w)):
      if t.shape != want:
        raise ValueError(f"{name} must have shape {want} (2 * (block + halo) - 1 rows, head dim D), got {t.shape}")
  impl = "xla" if implementation is None else implementation
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
  if impl == "reference":
    return halo_attention_reference(q, k, v, rel_h, rel_w, block=block, halo=halo, scale=scale,
                                    mask_padding=bool(mask_padding))
  if impl == "xla":
    return halo_attention_xla(q, k, v, rel_h, rel_w, block=block, halo=halo, scale=scale,
                              mask_padding=bool(mask_padding))
  if not mask_padding:
    raise ValueError("implementation='mask' needs mask_padding=True: a mask over the image cannot attend the "
                     "zero padding outside it (use 'xla' or 'reference')")
  from jaxattn.ops.softmax.api import softmax_attention
  G, E = k.shape[3], v.shape[4]
  T = Y * X
  bias = None if rel_h is None else relative_position_bias(q, rel_h, rel_w, block=block, halo=halo)
  out = softmax_attention(q.reshape(B, T, H, D), k.reshape(B, T, G, D), v.reshape(B, T, G, E),
                          mask=HaloMask(Y, X, block, halo, pad=bool(pad)), bias=bias, scale=scale,
                          implementation=softmax_implementation)
  return out.reshape(B, Y, X, H, E)
