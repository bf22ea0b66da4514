"""The dense f32 definition of masked softmax attention: the oracle every other implementation is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.ops.softmax.config import AttentionConfig


def allowed_dense(cfg: AttentionConfig, q_ids, kv_ids):
  """Boolean ``[B|1, 1, 1, T, S]`` mask combining the static mask and segment ids (or None when unmasked)."""
  allowed = None
  if cfg.mask is not None:
    allowed = jnp.asarray(cfg.mask.to_dense(cfg.T, cfg.S))[None, None, None]
  if q_ids is not None:
    seg = (q_ids[:, :, None] == kv_ids[:, None, :])[:, None, None]  # [B, 1, 1, T, S]
    allowed = seg if allowed is None else allowed & seg
  return allowed


def softmax_attention_reference(q, k, v, bias, q_ids, kv_ids, cfg: AttentionConfig):
  """Dense attention in f32 (``Precision.HIGHEST``).

  Args:
    q: ``[B, T, H, D]``; k: ``[B, S, G, D]``; v: ``[B, S, G, E]``.
    bias: None or ``[B|1, H|1, T, S]``.
    q_ids, kv_ids: None or int ``[B, T]`` / ``[B, S]``.
    cfg: the validated static configuration.

  Returns:
    ``out [B, T, H, E]`` in q's dtype and ``lse [B, H, T]`` f32 (``-inf`` for rows with no allowed key,
    whose output is 0).
  """
  return dense_attention(q, k, v, bias, allowed_dense(cfg, q_ids, kv_ids), cfg.scale, cfg.logits_soft_cap)


def dense_attention(q, k, v, bias, allowed, scale: float, logits_soft_cap: float | None = None):
  """The definition with an explicit boolean ``allowed`` array broadcastable to ``[B, G, R, T, S]`` (or None)."""
  B, T, H, D = q.shape
  S, G = k.shape[1], k.shape[2]
  R = H // G
  hi = jax.lax.Precision.HIGHEST
  qf = q.astype(jnp.float32).reshape(B, T, G, R, D)
  s = jnp.einsum("btgrd,bsgd->bgrts", qf, k.astype(jnp.float32), precision=hi) * scale  # [B, G, R, T, S]
  if bias is not None:
    s = s + bias.astype(jnp.float32).reshape(bias.shape[0], -1, 1 if bias.shape[1] == 1 else R, T, S)
  if logits_soft_cap is not None:
    s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
  if allowed is None:
    allowed = jnp.ones((1, 1, 1, T, S), bool)
  # Rows with no allowed key: the max is -inf, so shift by 0 instead; p is 0 there and the output is 0.
  m = jax.lax.stop_gradient(jnp.max(jnp.where(allowed, s, -jnp.inf), axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(allowed, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bgrts,bsge->btgre", p / jnp.where(l == 0, 1.0, l), v.astype(jnp.float32), precision=hi)
  lse = jnp.where(l[..., 0] > 0, m[..., 0] + jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)), -jnp.inf)
  return o.reshape(B, T, H, -1).astype(q.dtype), lse.reshape(B, H, T)
