"""``implementation="cudnn"``: ``jax.nn.dot_product_attention`` on GPU, for the calls cuDNN supports."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn import _dispatch
from jaxattn.masks import Causal, Local
from jaxattn.ops.softmax.config import AttentionConfig


def softmax_attention_cudnn(q, k, v, bias, q_ids, kv_ids, cfg: AttentionConfig):
  """cuDNN flash attention. Raises NotImplementedError for what it cannot serve (the dispatcher moves on)."""
  if _dispatch.platform() != "gpu":
    raise NotImplementedError("cudnn needs a GPU backend")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise NotImplementedError(f"cudnn supports bf16/f16 only, got {q.dtype}")
  if q_ids is not None:
    raise NotImplementedError("cudnn path does not take segment ids")
  if cfg.return_lse:
    raise NotImplementedError("jax.nn.dot_product_attention does not return the log-sum-exp")
  if cfg.logits_soft_cap is not None:
    raise NotImplementedError("cudnn path does not support logits_soft_cap")
  is_causal, window = False, None
  mask = cfg.mask
  if isinstance(mask, Causal) and mask.offset == 0:
    is_causal = True
  elif isinstance(mask, Local) and mask.offset == 0:
    is_causal, window = mask.right == 0, (mask.left, mask.right)
  elif mask is not None:
    raise NotImplementedError(f"cudnn path supports full, Causal(0) and Local(offset=0) masks, not {mask!r}")
  if q.shape[-1] != v.shape[-1]:
    raise NotImplementedError("cudnn path needs equal qk and v head dims")
  out = jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype), scale=cfg.scale,
                                     is_causal=is_causal, local_window_size=window, implementation="cudnn")
  return out, None
