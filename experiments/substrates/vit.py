"""ViT-tiny over digit canvases, and the pre-LN transformer block it shares with the toy VLM's language model.

Built from :class:`jaxattn.nn.MultiHeadAttention` only, so every experiment on the substrate also exercises the
library's attention path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.substrates import ViTConfig
from jaxattn import masks
from jaxattn.nn import MultiHeadAttention

__all__ = ["Block", "ViTTiny", "patchify"]


class Block(nnx.Module):
  """Pre-LN transformer block: ``x += MHA(LN(x)); x += MLP(LN(x))``; ``x [B, N, d] -> [B, N, d]``.

  Args:
    d_model, num_heads, mlp_ratio: width, heads, MLP expansion.
    mask: a static :mod:`jaxattn.masks` mask (``masks.Causal()`` for a decoder; None: full attention).
    rngs: parameter initialisation.
  """

  def __init__(self, d_model: int, num_heads: int, mlp_ratio: int = 2, *, mask: masks.Mask | None = None,
               rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.attn = MultiHeadAttention(num_heads, d_model, mask=mask, use_bias=True, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.up = nnx.Linear(d_model, mlp_ratio * d_model, rngs=rngs)
    self.down = nnx.Linear(mlp_ratio * d_model, d_model, rngs=rngs)

  def __call__(self, x, *, segment_ids=None):
    x = x + self.attn(self.ln1(x), segment_ids=segment_ids)
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


def patchify(images, patch: int):
  """``images [B, S, S] -> patches [B, (S / patch)^2, patch^2]`` in row-major patch order."""
  B, S, S2 = images.shape
  if S != S2 or S % patch:
    raise ValueError(f"images must be square [B, S, S] with S a multiple of patch={patch}, got {images.shape}")
  n = S // patch
  x = images.reshape(B, n, patch, n, patch).transpose(0, 1, 3, 2, 4)
  return x.reshape(B, n * n, patch * patch)


class ViTTiny(nnx.Module):
  """``images [B, S, S] -> tokens [B, (S / patch)^2, d_model]``: linear patch embedding + learned positions,
  ``num_layers`` :class:`Block` s with full attention, final LayerNorm (no CLS token; callers pool or project).
  """

  def __init__(self, cfg: ViTConfig, image_size: int, *, rngs: nnx.Rngs):
    if image_size % cfg.patch:
      raise ValueError(f"image_size={image_size} is not a multiple of vit.patch={cfg.patch}")
    self.patch = cfg.patch
    self.num_patches = (image_size // cfg.patch) ** 2
    self.embed = nnx.Linear(cfg.patch * cfg.patch, cfg.d_model, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (self.num_patches, cfg.d_model)))
    self.blocks = nnx.List([Block(cfg.d_model, cfg.num_heads, cfg.mlp_ratio, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.ln = nnx.LayerNorm(cfg.d_model, rngs=rngs)

  def __call__(self, images):
    x = self.embed(patchify(jnp.asarray(images, jnp.float32), self.patch)) + self.pos[...]
    for blk in self.blocks:
      x = blk(x)
    return self.ln(x)
