"""The dense f32 definition of masked softmax attention: the oracle every other implementation is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.backend import Backend
from jaxattn.ops.nonfinite import poison, sanitize
from jaxattn.masks import PerHead
from jaxattn.ops.softmax import dropout
from jaxattn.ops.softmax.config import SoftmaxCall, SoftmaxResiduals


def allowed_dense(cfg: SoftmaxCall, q_ids, kv_ids, bias=None):
  """Boolean ``[B|1, G|1, R|1, T, S]`` mask combining the static (or per-head) mask, segment ids and, for a
  ``cfg.mask_array`` call, the ``-inf`` entries of ``bias`` (or None when unmasked)."""
  allowed = None
  R = cfg.H // cfg.G
  if isinstance(cfg.mask, PerHead):
    allowed = jnp.asarray(cfg.mask.to_dense_heads(cfg.T, cfg.S)).reshape(1, cfg.G, R, cfg.T, cfg.S)
  elif cfg.mask is not None:
    allowed = jnp.asarray(cfg.mask.to_dense(cfg.T, cfg.S))[None, None, None]
  if q_ids is not None:
    seg = (q_ids[:, :, None] == kv_ids[:, None, :])[:, None, None]  # [B, 1, 1, T, S]
    allowed = seg if allowed is None else allowed & seg
  if cfg.mask_array and bias is not None:
    arr = (bias != -jnp.inf).reshape(bias.shape[0], -1, 1 if bias.shape[1] == 1 else R, cfg.T, cfg.S)
    allowed = arr if allowed is None else allowed & arr
  return allowed


def dropout_keep_dense(cfg: SoftmaxCall, seed):
  """The dropout keep mask ``[B, G, R, T, S]`` (:mod:`jaxattn.ops.softmax.dropout`), or None without dropout."""
  if seed is None or not cfg.dropout_rate:
    return None
  R = cfg.H // cfg.G
  u = lambda n, shape: jnp.arange(n, dtype=jnp.uint32).reshape(shape)
  keys = dropout.head_keys(seed, u(cfg.B, (cfg.B, 1, 1, 1, 1)), u(cfg.H, (1, cfg.G, R, 1, 1)))
  return dropout.keep_mask(keys, cfg.dropout_rate, u(cfg.T, (1, 1, 1, cfg.T, 1)), u(cfg.S, (1, 1, 1, 1, cfg.S)))


def softmax_attention_reference(q, k, v, bias, q_ids, kv_ids, cfg: SoftmaxCall, dropout_seed=None):
  """Dense attention in f32 (``Precision.HIGHEST``).

  Args:
    q: ``[B, T, H, D]``; k: ``[B, S, G, D]``; v: ``[B, S, G, E]``.
    bias: None or ``[B|1, H|1, T, S]``.
    q_ids, kv_ids: None or int ``[B, T]`` / ``[B, S]``.
    cfg: the call (mask, scale, soft cap, T, S, dropout rate).
    dropout_seed: uint32 ``[2]`` (:func:`jaxattn.ops.softmax.dropout.dropout_seed`) when ``cfg.dropout_rate > 0``.

  Returns:
    ``out [B, T, H, E]`` in q's dtype and ``lse [B, H, T]`` f32 (``-inf`` for rows with no allowed key,
    whose output is 0).
  """
  return dense_attention(q, k, v, bias, allowed_dense(cfg, q_ids, kv_ids, bias), cfg.scale, cfg.logits_soft_cap,
                         keep=dropout_keep_dense(cfg, dropout_seed), dropout_rate=cfg.dropout_rate)


def dense_attention(q, k, v, bias, allowed, scale: float, logits_soft_cap: float | None = None, keep=None,
                    dropout_rate: float = 0.0):
  """The definition with an explicit boolean ``allowed`` array broadcastable to ``[B, G, R, T, S]`` (or None).

  ``keep`` (bool, broadcastable like ``allowed``) applies attention dropout at ``dropout_rate`` to the normalised
  probabilities (dropped entries 0, kept ones scaled by ``1 / (1 - dropout_rate)``); the log-sum-exp is unchanged.
  """
  B, T, H, D = q.shape
  S, G = k.shape[1], k.shape[2]
  R = H // G
  hi = jax.lax.Precision.HIGHEST
  out_dtype = q.dtype
  # Non-finite inputs: q, k, v are zeroed where non-finite and a query row / key with a non-finite entry adds NaN
  # to its logits instead, so the NaN reaches exactly the allowed pairs of that row / key; masked pairs are exact
  # zeros (selected with where, never 0 * NaN), in the forward and in the gradients.
  q, bad_q = sanitize(q.astype(jnp.float32))
  k, bad_k = sanitize(k.astype(jnp.float32))
  v, bad_v = sanitize(v.astype(jnp.float32))
  qf = q.reshape(B, T, G, R, D)
  s = jnp.einsum("btgrd,bsgd->bgrts", qf, k, precision=hi) * scale  # [B, G, R, T, S]
  s = s + poison(bad_q).reshape(B, T, G, R).transpose(0, 2, 3, 1)[..., None]
  s = s + poison(bad_k | bad_v).transpose(0, 2, 1)[:, :, None, None, :]
  if bias is not None:
    s = s + bias.astype(jnp.float32).reshape(bias.shape[0], -1, 1 if bias.shape[1] == 1 else R, T, S)
  if allowed is None:
    allowed = jnp.ones((1, 1, 1, T, S), bool)
  if logits_soft_cap is not None:
    # masked logits are zeroed first: tanh' of a NaN / inf masked logit would turn its zero cotangent into NaN
    s = logits_soft_cap * jnp.tanh(jnp.where(allowed, s, 0.0) / logits_soft_cap)
  # Rows with no allowed key: the max is -inf, so shift by 0 instead; p is 0 there and the output is 0.
  s = jnp.where(allowed, s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(allowed, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  # where() again: p / l is NaN at masked pairs of a NaN row, which would reach dv through p^T dO.
  probs = jnp.where(allowed, p / jnp.where(l == 0, 1.0, l), 0.0)
  if keep is not None:
    probs = dropout.apply(probs, keep, dropout_rate)
  o = jnp.einsum("bgrts,bsge->btgre", probs, v, precision=hi)
  # l == 0: no allowed key (lse -inf); a NaN l (a row poisoned by a non-finite input) keeps lse NaN.
  lse = jnp.where(l[..., 0] == 0, -jnp.inf, m[..., 0] + jnp.log(jnp.where(l[..., 0] == 0, 1.0, l[..., 0])))
  return o.reshape(B, T, H, -1).astype(out_dtype), lse.reshape(B, H, T)


class ReferenceBackend(Backend):
  """The dense f32 definition; its gradient is ``jax.vjp`` of the definition (the oracle for every backend)."""

  name = "reference"
  autodiff = True

  def fwd(self, call: SoftmaxCall, config, args):
    seed = args[6] if len(args) > 6 else None  # the dropout seed (call.dropout_rate > 0)
    out, lse = softmax_attention_reference(*args[:6], call, dropout_seed=seed)
    return (out, lse), SoftmaxResiduals(*args[:6], out, lse, seed)

  def bwd(self, call: SoftmaxCall, config, residuals: SoftmaxResiduals, cotangents, needs):
    q, k, v, bias, q_ids, kv_ids = residuals[:6]
    seed = residuals.extra if call.dropout_rate else None
    f = lambda q, k, v, bias: softmax_attention_reference(q, k, v, bias, q_ids, kv_ids, call, dropout_seed=seed)
    _, vjp = jax.vjp(f, q, k, v, bias)
    return (*vjp(tuple(cotangents)), None, None) + ((None,) if call.dropout_rate else ())


BACKEND = ReferenceBackend()
