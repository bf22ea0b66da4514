"""A small pre-norm decoder whose attention is :class:`jaxattn.nn.LandmarkAttention` (RoPE, retrieval cache)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.passkey import PasskeyConfig
from jaxattn.nn import LandmarkAttention


class Block(nnx.Module):
  """``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, cfg: PasskeyConfig, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.norm1 = nnx.RMSNorm(d, rngs=rngs)
    self.attn = LandmarkAttention(cfg.num_heads, d, block_size=cfg.block_size, num_kv_heads=cfg.num_kv_heads,
                                  retrieval_mode=cfg.retrieval_mode, positions="stingy", rngs=rngs)
    self.norm2 = nnx.RMSNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, cfg.mlp_ratio * d, rngs=rngs)
    self.down = nnx.Linear(cfg.mlp_ratio * d, d, rngs=rngs)

  def __call__(self, x, *, decode: bool = False, top_k: int | None = None):
    x = x + self.attn(self.norm1(x), decode=decode, top_k=top_k)
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class PasskeyLM(nnx.Module):
  """Token embedding, ``num_layers`` blocks, final norm, output projection: ``tokens [B, T] -> logits [B, T, V]``."""

  def __init__(self, cfg: PasskeyConfig, vocab_size: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab_size, cfg.d_model, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
    self.head = nnx.Linear(cfg.d_model, vocab_size, rngs=rngs)

  def init_cache(self, batch_size: int, mem_blocks: int) -> None:
    for block in self.blocks:
      block.attn.init_cache(batch_size, mem_blocks)

  def __call__(self, tokens, *, decode: bool = False, top_k: int | None = None):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, decode=decode, top_k=top_k)
    return self.head(self.norm(x)).astype(jnp.float32)
