"""Flax NNX landmark attention (Mohtashami & Jaggi 2023): grouped-softmax training, retrieval at inference.

Training mode runs :func:`jaxattn.landmark_attention` over a sequence whose every ``block_size``-th token is a
landmark (insert them with :func:`jaxattn.ops.landmark.data.insert_landmarks`). Generation mode
(``decode=True``) feeds the sequence in chunks of any length through a per-layer
:class:`~jaxattn.ops.landmark.retrieval.LandmarkCache`: each chunk attends to its local frame (the incomplete block
plus the chunk) and to the ``top_k`` cached blocks its queries retrieve by landmark score
(:func:`~jaxattn.ops.landmark.retrieval.landmark_retrieval_attention`).

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxattn.nn import LandmarkAttention
  >>> layer = LandmarkAttention(4, 64, block_size=16, top_k=2, rngs=nnx.Rngs(0))
  >>> x = jnp.ones((2, 64, 64))
  >>> layer(x).shape                       # training: grouped softmax over the whole sequence
  (2, 64, 64)
  >>> layer.init_cache(batch_size=2, mem_blocks=32)
  >>> y = layer(x[:, :40], decode=True)    # prompt chunk: 2 blocks go to the cache
  >>> y = layer(x[:, 40:41], decode=True)  # then one token at a time
  >>> int(layer.cache_num_blocks[...]), int(layer.cache_local_len[...])
  (2, 9)
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.nn._checks import head_layout, positive_int
from jaxattn.nn.rope import apply_rope
from jaxattn.ops.landmark.api import landmark_attention
from jaxattn.ops.landmark.retrieval import (POSITION_MODES, RETRIEVAL_MODES, LandmarkCache,
                                            landmark_retrieval_attention)

__all__ = ["LandmarkAttention"]

_CACHE_FIELDS = LandmarkCache._fields


class LandmarkAttention(nnx.Module):
  r"""Multi-head (grouped-query) landmark attention with RoPE and a retrieval cache.

  .. math::
     q = x W_q,\quad k = x W_k,\quad v = x W_v,\quad o = \mathrm{landmark\_attention}(\mathrm{rope}(q),
     \mathrm{rope}(k), v),\quad y = o W_o

  Shapes: ``x [B, T, in_features]`` -> ``[B, T, out_features]``; ``H = num_heads``, ``G = num_kv_heads``,
  ``D = head_dim``. Causal self-attention only.

  Args:
    num_heads: query heads ``H``.
    in_features: feature size of ``x``.
    block_size: landmark block length (the landmark is each block's last token).
    num_kv_heads: key/value heads ``G`` (default ``H``); ``H % G == 0``.
    head_dim: ``D`` (default ``in_features // num_heads``).
    out_features: output size (default ``in_features``).
    use_rope: rotate queries and keys with RoPE (training: positions ``0..T-1``; decoding: see ``positions``).
    rope_base: RoPE wavelength base.
    scale: logit scale (default ``D ** -0.5``).
    implementation: passed to :func:`jaxattn.landmark_attention` (None picks per platform).
    top_k: default number of cached blocks each query retrieves when decoding (0: local frame only).
    retrieval_mode: ``"per_token_and_head"``, ``"max_over_heads"`` or ``"max_over_tokens"``.
    positions: ``"stingy"`` (the paper's: retrieved blocks right before the local frame, positions stay short) or
      ``"exact"`` (true sequence positions).
    dtype, param_dtype, use_bias, precision: as :class:`flax.nnx.LinearGeneral`.
    rngs: parameter initialisation.
  """

  def __init__(self, num_heads: int, in_features: int, *, block_size: int, num_kv_heads: int | None = None,
               head_dim: int | None = None, out_features: int | None = None, use_rope: bool = True,
               rope_base: float = 10000.0, scale: float | None = None,
               implementation: str | Sequence[str] | None = None, top_k: int = 4,
               retrieval_mode: str = "per_token_and_head", positions: str = "stingy", dtype=None,
               param_dtype=jnp.float32, use_bias: bool = False, precision=None, rngs: nnx.Rngs):
    self.num_heads, self.in_features, self.num_kv_heads, self.head_dim, self.out_features = head_layout(
        num_heads, in_features, num_kv_heads, head_dim, out_features)
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size < 2:
      raise ValueError(f"block_size must be an int >= 2, got {block_size!r}")
    if use_rope and self.head_dim % 2:
      raise ValueError(f"use_rope needs an even head_dim, got {self.head_dim}")
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0:
      raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if retrieval_mode not in RETRIEVAL_MODES:
      raise ValueError(f"retrieval_mode must be one of {RETRIEVAL_MODES}, got {retrieval_mode!r}")
    if positions not in POSITION_MODES:
      raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
    if implementation is not None and not isinstance(implementation, str):
      implementation = tuple(implementation)
    self.block_size = int(block_size)
    self.use_rope = bool(use_rope)
    self.rope_base = float(rope_base)
    self.scale = None if scale is None else float(scale)
    self.implementation = implementation
    self.top_k = int(top_k)
    self.retrieval_mode = retrieval_mode
    self.positions = positions
    self.dtype = dtype
    self.param_dtype = param_dtype

    H, G, D = self.num_heads, self.num_kv_heads, self.head_dim
    common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.query = nnx.LinearGeneral(self.in_features, (H, D), **common)
    self.key = nnx.LinearGeneral(self.in_features, (G, D), **common)
    self.value = nnx.LinearGeneral(self.in_features, (G, D), **common)
    self.out = nnx.LinearGeneral((H, D), self.out_features, axis=(-2, -1), **common)
    for name in _CACHE_FIELDS:
      setattr(self, f"cache_{name}", nnx.data(None))

  # ------------------------------------------------------------------------------------------------------ cache
  def init_cache(self, batch_size: int, mem_blocks: int, dtype=None) -> None:
    """Creates an empty retrieval cache (``nnx.Cache`` variables ``cache_mem_k`` ... ``cache_local_len``).

    Args:
      batch_size: ``B`` of the decoding calls.
      mem_blocks: ring-buffer capacity ``M`` in blocks (older blocks are overwritten).
      dtype: cache dtype (default: the module's ``dtype``, else ``param_dtype``).
    """
    cache = LandmarkCache.create(positive_int("batch_size", batch_size), positive_int("mem_blocks", mem_blocks),
                                 self.block_size, self.num_kv_heads, self.head_dim,
                                 dtype=dtype or self.dtype or self.param_dtype)
    for name, value in zip(_CACHE_FIELDS, cache):
      setattr(self, f"cache_{name}", nnx.Cache(value))

  @property
  def cache(self) -> LandmarkCache | None:
    """The current :class:`LandmarkCache` (None before :meth:`init_cache`)."""
    if getattr(self, "cache_mem_k") is None:
      return None
    return LandmarkCache(*(getattr(self, f"cache_{n}")[...] for n in _CACHE_FIELDS))

  def _set_cache(self, cache: LandmarkCache) -> None:
    for name, value in zip(_CACHE_FIELDS, cache):
      getattr(self, f"cache_{name}")[...] = value

  # ------------------------------------------------------------------------------------------------------- call
  def __call__(self, x, *, decode: bool = False, top_k: int | None = None, positions=None):
    """Applies landmark attention.

    Args:
      x: ``[B, T, in_features]`` with landmark tokens at every ``block_size``-th position (in decode mode: of the
        whole sequence fed so far, i.e. chunks continue the layout).
      decode: process ``x`` as the next chunk through the cache (needs :meth:`init_cache`).
      top_k: override the module's ``top_k`` for this call (decode mode).
      positions: RoPE positions ``[B, T]`` or ``[T]`` in training mode (default ``arange(T)``); decoding assigns
        positions itself.

    Returns:
      ``[B, T, out_features]``.
    """
    x = jnp.asarray(x)
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"x must have shape [B, T, {self.in_features}], got {x.shape}")
    T = x.shape[1]
    q, k, v = self.query(x), self.key(x), self.value(x)  # [B, T, H|G, D]
    if decode:
      cache = self.cache
      if cache is None:
        raise ValueError("decode=True needs a cache: call init_cache(batch_size, mem_blocks) first")
      if positions is not None:
        raise ValueError("positions are assigned by the cache in decode mode; pass positions=None")
      out, cache = landmark_retrieval_attention(
          q, k, v, cache, top_k=self.top_k if top_k is None else top_k, mode=self.retrieval_mode,
          positions=self.positions, rope_base=self.rope_base if self.use_rope else None, scale=self.scale,
          implementation=self.implementation)
      self._set_cache(cache)
    else:
      if self.use_rope:
        positions = jnp.arange(T) if positions is None else positions
        q, k = apply_rope(q, positions, self.rope_base), apply_rope(k, positions, self.rope_base)
      out = landmark_attention(q, k, v, block_size=self.block_size, scale=self.scale,
                               implementation=self.implementation)
    return self.out(out)
