"""Linen bridge: :class:`jaxattn.nn.MultiHeadAttention` as a ``flax.linen.Module``.

A thin Linen module whose fields mirror the NNX constructor; it wraps the NNX module with
``flax.nnx.bridge.ToLinen`` under the submodule name ``"attention"``, so the parameters live at
``params/attention/{query,key,value,out}/kernel``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxattn import masks
  >>> from jaxattn.nn import LinenMultiHeadAttention
  >>> layer = LinenMultiHeadAttention(num_heads=4, in_features=32, mask=masks.Causal())
  >>> x = jnp.ones((2, 8, 32))
  >>> variables = layer.init(jax.random.key(0), x)
  >>> layer.apply(variables, x).shape
  (2, 8, 32)

Decoding with the KV cache (``decode=True``) is NNX only: use :class:`jaxattn.nn.MultiHeadAttention` for that.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen
from flax.core import FrozenDict
from flax.nnx import bridge

from jaxattn.masks import Mask
from jaxattn.nn.attention import MultiHeadAttention

__all__ = ["LinenMultiHeadAttention"]

_NNX_OPTIONS = ("num_kv_heads", "head_dim", "out_features", "in_kv_features", "use_rope", "rope_base", "mask",
                "scale", "logits_soft_cap", "implementation", "dtype", "param_dtype", "use_bias", "precision")


class LinenMultiHeadAttention(linen.Module):
  """Linen version of :class:`jaxattn.nn.MultiHeadAttention` (same options, same math; no decode cache).

  Attributes:
    num_heads, in_features, num_kv_heads, head_dim, out_features, in_kv_features, use_rope, rope_base, mask, scale,
    logits_soft_cap, implementation, dtype, param_dtype, use_bias, precision: as in
    :class:`jaxattn.nn.MultiHeadAttention`.

  Call: ``layer.apply(variables, x [B, T, in_features], context=None, mask=None, segment_ids=None,
  positions=None) -> [B, T, out_features]``.
  """

  num_heads: int
  in_features: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  out_features: int | None = None
  in_kv_features: int | None = None
  use_rope: bool = False
  rope_base: float = 10000.0
  mask: Mask | None = None
  scale: float | None = None
  logits_soft_cap: float | None = None
  implementation: str | tuple[str, ...] | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = False
  precision: Any = None

  @linen.compact
  def __call__(self, x, context=None, *, mask: Mask | None = None, segment_ids=None, positions=None):
    """See :meth:`jaxattn.nn.MultiHeadAttention.__call__` (``decode`` is not available in Linen)."""
    kwargs = FrozenDict({name: getattr(self, name) for name in _NNX_OPTIONS})
    inner = bridge.ToLinen(MultiHeadAttention, args=(self.num_heads, self.in_features), kwargs=kwargs,
                           name="attention")
    return inner(x, context, mask=mask, segment_ids=segment_ids, positions=positions)
