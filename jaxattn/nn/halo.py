"""Flax NNX HaloNet attention (Vaswani et al. 2021): blocked local 2-D self-attention with halo.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxattn.nn import HaloAttention
  >>> layer = HaloAttention(32, 4, block=4, halo=2, rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((2, 16, 16, 32))).shape      # [B, Y, X, C] image in, same layout out
  (2, 16, 16, 32)
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxattn.nn._checks import head_layout
from jaxattn.ops.halo.api import IMPLEMENTATIONS, halo_attention
from jaxattn.ops.halo.mask import check_geometry, num_rel_positions

__all__ = ["HaloAttention"]


class HaloAttention(nnx.Module):
  r"""Multi-head halo attention over a ``[B, Y, X, C]`` feature map, with 2-D relative position logits.

  .. math::
     q = x W_q,\ k = x W_k,\ v = x W_v\ (1 \times 1\ \text{projections}),\qquad
     y = \mathrm{halo\_attention}(q, k, v; b, h, r^h, r^w)\, W_o

  Each ``block x block`` query block attends its ``(block + 2 halo)^2`` window
  (:func:`jaxattn.ops.halo.halo_attention`). ``block`` equal to the feature map's side gives global attention
  with the same relative positions.

  Args:
    in_features: channels ``C`` of ``x``.
    num_heads: query heads ``H``.
    block: query block side ``b``.
    halo: halo ``h`` (``0 <= h <= b``).
    num_kv_heads: key/value heads ``G`` (default ``H``).
    head_dim: ``D`` (default ``in_features // num_heads``).
    out_features: output channels (default ``in_features``).
    rel_pos: learn the two relative-position tables ``[2(b+h)-1, D]`` (shared by the heads; initialised
      ``N(0, D^-1)`` as timm's ``PosEmbedRel``).
    mask_padding: mask window keys outside the image (False: attend them as zeros, timm's behaviour).
    pad: accept feature maps whose sides are not multiples of ``block``.
    implementation: ``"xla"`` (default), ``"reference"`` or ``"mask"`` (see :func:`halo_attention`).
    dtype, param_dtype, use_bias, precision: as :class:`flax.nnx.LinearGeneral`.
    rngs: parameter initialisation.

  Raises:
    ValueError: bad sizes (``halo > block`` ...), naming the value; a feature map whose side is not a multiple
      of ``block`` (without ``pad``) when called.
  """

  def __init__(self, in_features: int, num_heads: int, *, block: int, halo: int, num_kv_heads: int | None = None,
               head_dim: int | None = None, out_features: int | None = None, rel_pos: bool = True,
               mask_padding: bool = True, pad: bool = False, implementation: str | None = None, dtype=None,
               param_dtype=jnp.float32, use_bias: bool = False, precision=None, rngs: nnx.Rngs):
    self.num_heads, self.in_features, self.num_kv_heads, self.head_dim, self.out_features = head_layout(
        num_heads, in_features, num_kv_heads, head_dim, out_features)
    check_geometry(block, block, block, halo, pad=True)  # block >= 1, 0 <= halo <= block
    if implementation is not None and implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
    self.block, self.halo = int(block), int(halo)
    self.mask_padding, self.pad = bool(mask_padding), bool(pad)
    self.implementation = implementation
    self.dtype = dtype
    H, G, D = self.num_heads, self.num_kv_heads, self.head_dim
    common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.query = nnx.LinearGeneral(self.in_features, (H, D), **common)
    self.key = nnx.LinearGeneral(self.in_features, (G, D), **common)
    self.value = nnx.LinearGeneral(self.in_features, (G, D), **common)
    self.out = nnx.LinearGeneral((H, D), self.out_features, axis=(-2, -1), **common)
    if rel_pos:
      init = nnx.initializers.normal(stddev=D ** -0.5)
      n_rel = num_rel_positions(self.block, self.halo)
      self.rel_h = nnx.Param(init(rngs.params(), (n_rel, D), param_dtype))
      self.rel_w = nnx.Param(init(rngs.params(), (n_rel, D), param_dtype))
    else:
      self.rel_h = self.rel_w = None

  def __call__(self, x):
    """``x [B, Y, X, in_features]`` -> ``[B, Y, X, out_features]``."""
    if x.ndim != 4 or x.shape[-1] != self.in_features:
      raise ValueError(f"x must be [B, Y, X, {self.in_features}], got shape {x.shape}")
    q, k, v = self.query(x), self.key(x), self.value(x)
    rel = {}
    if self.rel_h is not None:
      dt = q.dtype
      rel = dict(rel_h=self.rel_h[...].astype(dt), rel_w=self.rel_w[...].astype(dt))
    o = halo_attention(q, k, v, block=self.block, halo=self.halo, mask_padding=self.mask_padding, pad=self.pad,
                       implementation=self.implementation, **rel)
    return self.out(o)
