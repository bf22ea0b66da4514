"""Tiny pre-norm transformers built from :class:`jaxattn.nn.MultiHeadAttention`, for the analysis experiments.

- :class:`Seq2Seq`: encoder-decoder (``cross_saliency``). The encoder's self-attention is full, the decoder's is
  causal, and each decoder block reads the encoder output ``H`` through a cross-attention module (the same
  ``MultiHeadAttention`` called with ``context=H``). The model is split into :meth:`Seq2Seq.embed_source`,
  :meth:`Seq2Seq.encode` and :meth:`Seq2Seq.decode` so saliency can be taken with respect to the source embeddings
  ``e`` or the encoder output ``H``.
- :class:`DecoderLM`: a causal decoder (``act``).

Module paths (what :func:`jaxattn.analysis.capture` keys records by): ``encoder/<l>/attn``, ``decoder/<l>/attn``,
``decoder/<l>/cross`` and, for the LM, ``blocks/<l>/attn``. Positions are learned embeddings (no RoPE), so the
attention maps are the only place tokens meet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn import masks
from jaxattn.nn import MultiHeadAttention

__all__ = ["Block", "Seq2Seq", "DecoderLM"]


class Block(nnx.Module):
  """``x + self_attn(norm(x))``, optionally ``x + cross_attn(norm(x), H)``, then ``x + mlp(norm(x))``."""

  def __init__(self, d_model: int, num_heads: int, *, causal: bool, cross: bool, mlp_ratio: int = 4,
               rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.attn = MultiHeadAttention(num_heads, d_model, mask=masks.Causal() if causal else None, rngs=rngs)
    self.has_cross = cross
    if cross:
      self.norm_c = nnx.LayerNorm(d_model, rngs=rngs)
      self.cross = MultiHeadAttention(num_heads, d_model, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.up = nnx.Linear(d_model, mlp_ratio * d_model, rngs=rngs)
    self.down = nnx.Linear(mlp_ratio * d_model, d_model, rngs=rngs)

  def __call__(self, x, context=None):
    x = x + self.attn(self.norm1(x))
    if self.has_cross:
      x = x + self.cross(self.norm_c(x), context)
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class Seq2Seq(nnx.Module):
  """``(src [B, T], tgt_in [B, I]) -> logits [B, I, V]`` (f32); ``tgt_in`` is the teacher-forced decoder input."""

  def __init__(self, vocab_size: int, src_len: int, tgt_len: int, *, d_model: int, num_heads: int,
               enc_layers: int, dec_layers: int, mlp_ratio: int = 4, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.src_embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
    self.tgt_embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
    self.src_pos = nnx.Param(init(rngs.params(), (src_len, d_model)))
    self.tgt_pos = nnx.Param(init(rngs.params(), (tgt_len, d_model)))
    self.encoder = nnx.List([Block(d_model, num_heads, causal=False, cross=False, mlp_ratio=mlp_ratio, rngs=rngs)
                             for _ in range(enc_layers)])
    self.decoder = nnx.List([Block(d_model, num_heads, causal=True, cross=True, mlp_ratio=mlp_ratio, rngs=rngs)
                             for _ in range(dec_layers)])
    self.enc_norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.dec_norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

  def embed_source(self, src):
    """``src [B, T]`` -> the encoder input ``e [B, T, d]`` (token + position embeddings)."""
    return self.src_embed(src) + self.src_pos[...][: src.shape[1]]

  def encode(self, e):
    """``e [B, T, d]`` -> the encoder output ``H [B, T, d]`` (what the cross-attention reads)."""
    for block in self.encoder:
      e = block(e)
    return self.enc_norm(e)

  def decode(self, tgt_in, h):
    """``tgt_in [B, I]``, ``H [B, T, d]`` -> logits ``[B, I, V]`` (f32)."""
    y = self.tgt_embed(tgt_in) + self.tgt_pos[...][: tgt_in.shape[1]]
    for block in self.decoder:
      y = block(y, h)
    return self.head(self.dec_norm(y)).astype(jnp.float32)

  def __call__(self, src, tgt_in):
    return self.decode(tgt_in, self.encode(self.embed_source(src)))


class DecoderLM(nnx.Module):
  """``tokens [B, T] -> logits [B, T, V]`` (f32): causal pre-norm blocks, learned positions."""

  def __init__(self, vocab_size: int, max_len: int, *, d_model: int, num_heads: int, num_layers: int,
               mlp_ratio: int = 4, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
    self.pos = nnx.Param(init(rngs.params(), (max_len, d_model)))
    self.blocks = nnx.List([Block(d_model, num_heads, causal=True, cross=False, mlp_ratio=mlp_ratio, rngs=rngs)
                            for _ in range(num_layers)])
    self.norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x)).astype(jnp.float32)
