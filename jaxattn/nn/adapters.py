"""Adapters that plug :func:`jaxattn.softmax_attention` into flax's own attention layers.

``flax.nnx.MultiHeadAttention`` and ``flax.linen.MultiHeadDotProductAttention`` take an ``attention_fn`` called as
``attention_fn(query, key, value, mask=..., dropout_rng=..., dropout_rate=..., broadcast_dropout=...,
deterministic=..., dtype=..., precision=..., module=..., is_causal=...)`` (Linen also passes
``force_fp32_for_softmax`` and the einsum overrides, filtered by the function's signature), with query ``[batch...,
T, H, D]``, key ``[batch..., S, G, D]`` and value ``[batch..., S, G, E]``. :func:`as_attention_fn` returns such a
callable.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxattn import masks
  >>> from jaxattn.nn import as_attention_fn
  >>> layer = nnx.MultiHeadAttention(4, 32, attention_fn=as_attention_fn(mask=masks.Causal()), decode=False,
  ...                                rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((2, 8, 32))).shape
  (2, 8, 32)
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from jaxattn.masks import Causal, Mask
from jaxattn.ops.softmax.api import softmax_attention
from jaxattn.ops.softmax.config import BlockSizes

__all__ = ["AttentionFn", "as_attention_fn"]

@dataclasses.dataclass(frozen=True)
class AttentionFn:
  """A flax ``attention_fn`` backed by :func:`jaxattn.softmax_attention` (build it with :func:`as_attention_fn`).

  Frozen and hashable, so flax modules can keep it as a static attribute.

  Attributes:
    mask: static mask applied to every call (combined with ``is_causal`` and any dense mask the layer passes).
    implementation: passed to :func:`jaxattn.softmax_attention`.
    logits_soft_cap: logit soft cap.
    scale: logit scale (default ``D ** -0.5``, as in flax).
    block_sizes: tiles for whichever blockwise backend runs (``softmax_attention``'s ``block_sizes=``).
  """

  mask: Mask | None = None
  implementation: str | tuple | None = None
  logits_soft_cap: float | None = None
  scale: float | None = None
  block_sizes: BlockSizes | None = None

  def __call__(self, query, key, value, bias=None, mask=None, broadcast_dropout: bool = True, dropout_rng=None,
               dropout_rate: float = 0.0, deterministic: bool = False, dtype=None, precision=None, module=None,
               promote_dtype=None, is_causal: bool = False, force_fp32_for_softmax: bool = False,
               qk_attn_weights_einsum=None, attn_weights_value_einsum=None):
    """Attention with flax's ``dot_product_attention`` calling convention.

    Args:
      query: ``[batch..., T, H, D]``.
      key: ``[batch..., S, G, D]`` with ``H % G == 0``.
      value: ``[batch..., S, G, E]``.
      bias: additive logit bias broadcastable to ``[batch..., H, T, S]``.
      mask: dense boolean mask broadcastable to ``[batch..., H, T, S]`` (True = attend), or None.
      dropout_rate, deterministic, dropout_rng: attention-weight dropout (``dropout_rate > 0`` and
        ``deterministic=False``; needs ``dropout_rng``), applied to the normalised probabilities with kept ones
        scaled by ``1 / (1 - dropout_rate)``, drawn independently per (batch, head, query, key) (see
        :func:`jaxattn.softmax_attention`; served by the ``xla`` / ``reference`` paths).
      dtype: computation dtype (default: promote the inputs).
      precision: ignored (f32 inputs are computed at highest precision by the jaxattn implementations).
      module: must be None (jaxattn never materialises the attention weights, so it cannot sow them).
      promote_dtype: optional flax dtype promotion function ``((q, k, v), dtype=) -> (q, k, v)``.
      is_causal: add a ``Causal()`` (top-left aligned, ``j <= i``) mask, as ``jax.nn.dot_product_attention``.
      broadcast_dropout, force_fp32_for_softmax: accepted for compatibility; unused (dropout bits are never
        broadcast over batch / heads; softmax statistics are always f32).
      qk_attn_weights_einsum, attn_weights_value_einsum: must be None.

    Returns:
      ``[batch..., T, H, E]`` in the (promoted) query dtype.

    Raises:
      NotImplementedError: for ``module`` (sowing weights) or einsum overrides.
      ValueError: on shapes that do not line up, or training-mode dropout without ``dropout_rng``.
    """
    train_dropout = dropout_rate > 0.0 and not deterministic
    if train_dropout and dropout_rng is None:
      raise ValueError(f"dropout_rate={dropout_rate} with deterministic=False needs a dropout_rng")
    if module is not None:
      raise NotImplementedError("jaxattn never materialises attention weights, so it cannot sow them "
                                "(sow_weights=True); use flax's dot_product_attention for that")
    if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
      raise NotImplementedError("custom attention einsums (qk_attn_weights_einsum / attn_weights_value_einsum) "
                                "are not supported by jaxattn")
    del broadcast_dropout, precision, force_fp32_for_softmax
    if promote_dtype is not None:
      query, key, value = promote_dtype((query, key, value), dtype=dtype)
    else:
      dtype = dtype or jnp.result_type(query, key, value)
      query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))
    if not query.ndim == key.ndim == value.ndim or query.ndim < 3:
      raise ValueError(f"query, key, value must have the same rank >= 3 ([batch..., length, heads, features]), "
                       f"got shapes {query.shape}, {key.shape}, {value.shape}")
    batch = query.shape[:-3]
    if key.shape[:-3] != batch or value.shape[:-3] != batch:
      raise ValueError(f"query, key, value batch dims differ: {query.shape}, {key.shape}, {value.shape}")
    T, H = query.shape[-3:-1]
    S = key.shape[-3]
    nb = math.prod(batch)
    q, k, v = (x.reshape(nb, *x.shape[-3:]) for x in (query, key, value))  # [B, T, H, D], [B, S, G, D|E]

    static = self.mask
    if is_causal:
      static = Causal() if static is None else static & Causal()

    full_bias = None
    if bias is not None:
      full_bias = flatten_heads_last(jnp.asarray(bias, jnp.float32), batch, H, T, S, "bias")  # [B|1, H|1, T, S]
    att_mask = static
    if mask is not None:
      # The dense mask goes to softmax_attention as a boolean mask array (exact: masked pairs excluded after the
      # soft cap; rows with no allowed key return 0, jaxattn's convention, where flax's default returns the mean of
      # the values); a static mask given here is folded into it.
      allowed = flatten_heads_last(jnp.asarray(mask).astype(bool), batch, H, T, S, "mask")  # [B|1, H|1, T, S]
      if static is not None:
        allowed = allowed & jnp.asarray(static.to_dense(T, S))
      att_mask = allowed
    out = softmax_attention(q, k, v, mask=att_mask, bias=full_bias, scale=self.scale,
                            logits_soft_cap=self.logits_soft_cap, implementation=self.implementation,
                            block_sizes=self.block_sizes, dropout_rate=dropout_rate if train_dropout else 0.0,
                            dropout_rng=dropout_rng if train_dropout else None)  # [B, T, H, E]
    return out.reshape(*batch, T, H, out.shape[-1])


def flatten_heads_last(x, batch: tuple[int, ...], H: int, T: int, S: int, name: str):
  """Broadcasts ``x`` (to ``[batch..., H, T, S]``) and flattens it to ``[B|1, H|1, T, S]``.

  A head or batch axis of size 1 stays 1 so the bias is not replicated needlessly.
  """
  target = (*batch, H, T, S)
  try:
    shape = np.broadcast_shapes(x.shape, target)
  except ValueError:
    shape = None
  if shape != target:
    raise ValueError(f"{name} shape {x.shape} does not broadcast to [batch..., H, T, S] = {target}")
  x = x.reshape((1,) * (len(target) - x.ndim) + x.shape)
  h = 1 if x.shape[-3] == 1 else H
  b = 1 if all(d == 1 for d in x.shape[:-3]) else math.prod(batch)
  return jnp.broadcast_to(x, (*(batch if b > 1 else (1,) * len(batch)), h, T, S)).reshape(b, h, T, S)


def as_attention_fn(*, mask: Mask | None = None, implementation=None,
                    logits_soft_cap: float | None = None, scale: float | None = None,
                    block_sizes: BlockSizes | None = None) -> AttentionFn:
  """A flax ``attention_fn`` that runs :func:`jaxattn.softmax_attention`.

  Pass it to ``flax.nnx.MultiHeadAttention(attention_fn=...)`` or
  ``flax.linen.MultiHeadDotProductAttention(attention_fn=...)``.

  How flax's arguments map:

  - ``mask`` (dense boolean ``[batch..., H|1, T, S]``, e.g. padding masks or the mask flax builds when decoding with
    its own cache): routed exactly as ``softmax_attention(mask=<bool array>)`` (the static mask folded in; served
    by the ``xla`` / ``reference`` paths, which hold a ``T x S`` array, as flax does). Rows with no allowed key
    return 0 (jaxattn's convention), not the mean of the values that flax's default returns. For speed prefer the
    static ``mask`` given here.
  - ``is_causal=True``: adds ``masks.Causal()`` to the static mask.
  - ``dropout_rate > 0`` in training mode (``deterministic=False``, with ``dropout_rng``): attention dropout in the
    ``xla`` / ``reference`` paths (independent per batch and head; ``broadcast_dropout`` is ignored).
  - ``sow_weights`` (``module=``) and Linen's einsum overrides raise ``NotImplementedError``; ``precision`` is
    ignored.

  Args:
    mask: a static :mod:`jaxattn.masks` mask applied to every call (e.g. ``masks.Causal()``).
    implementation: passed to :func:`jaxattn.softmax_attention`: a backend name, ``(name, Config)`` or a
      sequence of those (None picks per platform).
    logits_soft_cap: if set, logits become ``cap * tanh(logits / cap)``.
    scale: logit scale (default ``D ** -0.5``, flax's default).
    block_sizes: tiles for whichever blockwise backend runs (``softmax_attention``'s ``block_sizes=``).

  Returns:
    An :class:`AttentionFn` (a frozen, hashable callable).

  Raises:
    ValueError: on a bad ``mask``, ``logits_soft_cap``, ``scale`` or ``block_sizes``.
  """
  if mask is not None and not isinstance(mask, Mask):
    raise ValueError(f"mask must be a jaxattn.masks.Mask or None, got {type(mask).__name__}; dense mask arrays are "
                     f"passed by the flax layer at call time")
  if logits_soft_cap is not None and not (isinstance(logits_soft_cap, (int, float)) and logits_soft_cap > 0):
    raise ValueError(f"logits_soft_cap must be a positive float or None, got {logits_soft_cap!r}")
  if scale is not None and not (isinstance(scale, (int, float)) and np.isfinite(scale)):
    raise ValueError(f"scale must be a finite float or None, got {scale!r}")
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
  if implementation is not None and not isinstance(implementation, str):
    implementation = tuple(tuple(i) if isinstance(i, list) else i for i in implementation)
  return AttentionFn(mask=mask, implementation=implementation,
                     logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
                     scale=None if scale is None else float(scale), block_sizes=block_sizes)
