"""The tiny decoder: pre-norm blocks around :class:`jaxattn.nn.MultiHeadAttention` (causal, RoPE, GQA).

Training calls the module as is (``model(tokens) -> logits``). Inference with other attention (a sparse prefill
index, a compressed or selected KV cache, :mod:`experiments.longctx.infer`) uses the same parameters through the
block's parts: :meth:`Block.qkv` (the module's own projections and :func:`jaxattn.nn.apply_rope`) and
:meth:`Block.finish` (output projection, residual, MLP), so the attention in between is the only thing that
changes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.longctx import ModelConfig
from jaxattn import masks
from jaxattn.nn import MultiHeadAttention, apply_rope

__all__ = ["Block", "TinyLM"]


class Block(nnx.Module):
  """``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, m: ModelConfig, *, rngs: nnx.Rngs):
    d = m.d_model
    self.norm1 = nnx.RMSNorm(d, rngs=rngs)
    self.attn = MultiHeadAttention(m.num_heads, d, num_kv_heads=m.num_kv_heads, use_rope=True,
                                   mask=masks.Causal(), rngs=rngs)
    self.norm2 = nnx.RMSNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, m.mlp_ratio * d, rngs=rngs)
    self.down = nnx.Linear(m.mlp_ratio * d, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))

  def qkv(self, x, positions):
    """``x [B, T, d]`` at ``positions [T]`` or ``[B, T]`` -> rotated ``q [B, T, H, Dh]``, ``k [B, T, G, Dh]`` and
    ``v [B, T, G, Dh]`` (exactly what the module attends with)."""
    h = self.norm1(x)
    a = self.attn
    q, k, v = a.query(h), a.key(h), a.value(h)
    return apply_rope(q, positions, a.rope_base), apply_rope(k, positions, a.rope_base), v

  def finish(self, x, o):
    """The rest of the block given the attention output ``o [B, T, H, Dh]``."""
    x = x + self.attn.out(o)
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TinyLM(nnx.Module):
  """``tokens [B, T] -> logits [B, T, V]`` (f32)."""

  def __init__(self, m: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab_size, m.d_model, rngs=rngs)
    self.blocks = nnx.List([Block(m, rngs=rngs) for _ in range(m.num_layers)])
    self.norm = nnx.RMSNorm(m.d_model, rngs=rngs)
    self.head = nnx.Linear(m.d_model, vocab_size, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.logits(x)

  def logits(self, x):
    return self.head(self.norm(x)).astype(jnp.float32)
