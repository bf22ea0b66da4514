"""The dense f32 definition of landmark attention's grouped softmax: the oracle the other implementations match.

For query ``i`` in block ``c(i) = i // bs`` and logits ``s_ij = scale * q_i . k_j``:

- ``TOP(i)`` = the regular keys ``j <= i`` of block ``c(i)`` and the landmark ``L_b`` of every block ``b < c(i)``
  (the current block's landmark is masked, also for the landmark query itself);
- ``p_top = softmax_{TOP(i)}(s_i)``, ``lse_i = logsumexp_{TOP(i)}(s_i)``;
- ``a_ij = p_top(j)`` for a regular key of block ``c(i)``; ``a_ij = p_top(L_b) * softmax_{regular keys of b}(s_ij)``
  for a regular key of an earlier block ``b``; 0 for landmark keys. ``out_i = sum_j a_ij v_j``.

Gradients come from autodiff of this function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.ops.landmark.config import LandmarkCall
from jaxattn.ops.nonfinite import poison, sanitize


def structure(T: int, block_size: int):
  """Static numpy masks of the grouped softmax, ``[T, T]`` each.

  Returns:
    ``(cur, past_lm, past_reg)``: regular keys ``j <= i`` of the query's own block; landmarks of earlier blocks;
    regular keys of earlier blocks.
  """
  pos = np.arange(T)
  blk = pos // block_size
  lm = (pos + 1) % block_size == 0
  causal = pos[None, :] <= pos[:, None]
  same = blk[None, :] == blk[:, None]
  earlier = blk[None, :] < blk[:, None]
  return same & causal & ~lm[None, :], earlier & lm[None, :], earlier & ~lm[None, :]


def grouped_softmax_weights(s, block_size: int):
  """The attention weights ``a [..., T, T]`` and top-level log-sum-exp ``lse [..., T]`` from logits ``s [..., T, T]``.

  Numerically stable at any logit magnitude: both softmaxes (over ``TOP(i)`` and over each block's regular keys)
  subtract their own row maximum before ``exp`` and are normalised to probabilities in ``[0, 1]``, and an earlier
  block's weights are the product ``p_top(L_b) * p_local(j)`` of two probabilities (never a difference of large
  log-sum-exps). Differentiable (no NaN gradients: masked logits become ``-inf`` before any ``exp``).
  """
  T = s.shape[-1]
  bs = block_size
  cur, past_lm, past_reg = (jnp.asarray(m) for m in structure(T, bs))
  top = cur | past_lm
  s_top = jnp.where(top, s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s_top, axis=-1, keepdims=True))  # finite: TOP(i) is never empty
  e_top = jnp.exp(s_top - m)
  l_top = jnp.sum(e_top, axis=-1, keepdims=True)  # >= 1
  p_top = e_top / l_top  # [..., T, T]
  lse = m[..., 0] + jnp.log(l_top[..., 0])  # [..., T]

  # Per (query, key block): the local softmax over the block's regular keys, each with its own maximum.
  nb = -(-T // bs)
  pad = nb * bs - T
  s_blk = jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
  s_blk = s_blk.reshape(*s.shape[:-1], nb, bs)  # [..., T, nb, bs]
  regular = (np.arange(bs) < bs - 1)[None, :] & (np.arange(nb * bs).reshape(nb, bs) < T)  # [nb, bs]
  s_reg = jnp.where(jnp.asarray(regular), s_blk, -jnp.inf)
  m_loc = jax.lax.stop_gradient(jnp.max(s_reg, axis=-1, keepdims=True))  # finite: slot 0 of a block is regular
  e_loc = jnp.exp(s_reg - m_loc)
  p_loc = (e_loc / jnp.sum(e_loc, axis=-1, keepdims=True)).reshape(*s.shape[:-1], nb * bs)[..., :T]  # [..., T, T]
  # p_top of each block's landmark (0 for a last block without one), spread to the block's keys.
  lm_pos = np.arange(nb) * bs + bs - 1
  p_lm = jnp.where(jnp.asarray(lm_pos < T), p_top[..., np.minimum(lm_pos, T - 1)], 0.0)  # [..., T, nb]
  p_lm_j = p_lm[..., np.arange(T) // bs]  # [..., T, T]

  a = jnp.where(cur, p_top, 0.0) + jnp.where(past_reg, p_lm_j * p_loc, 0.0)
  return a, lse


def landmark_attention_reference(q, k, v, cfg: LandmarkCall):
  """Dense landmark attention in f32 (``Precision.HIGHEST``).

  Args:
    q: ``[B, T, H, D]``; k: ``[B, T, G, D]``; v: ``[B, T, G, E]``.
    cfg: the validated static configuration.

  Returns:
    ``out [B, T, H, E]`` in q's dtype and ``lse [B, H, T]`` f32 (the top-level log-sum-exp over ``TOP(i)``).
  """
  B, T, H, D = q.shape
  G = k.shape[2]
  R = H // G
  hi = jax.lax.Precision.HIGHEST
  # Non-finite inputs (jaxattn.ops.nonfinite): zeroed operands; a NaN is added only to the logits the grouped
  # softmax uses (a key whose k, or whose value at a regular position, is non-finite; a non-finite query row).
  (qf, bad_q), (kf, bad_k), (vf, bad_v) = (sanitize(x.astype(jnp.float32)) for x in (q, k, v))
  s = jnp.einsum("btgrd,bsgd->bgrts", qf.reshape(B, T, G, R, D), kf, precision=hi) * cfg.scale  # [B, G, R, T, T]
  bad_kv = bad_k | (bad_v & ((jnp.arange(T) + 1) % cfg.block_size != 0)[None, :, None])  # [B, T, G]
  used = functools.reduce(np.logical_or, structure(T, cfg.block_size))  # [T(i), T(j)]
  s = s + jnp.where(used, poison(bad_q).reshape(B, T, G, R).transpose(0, 2, 3, 1)[..., None]
                    + poison(bad_kv).transpose(0, 2, 1)[:, :, None, None, :], 0.0)
  a, lse = grouped_softmax_weights(s, cfg.block_size)
  o = jnp.einsum("bgrts,bsge->btgre", a, vf, precision=hi)
  return o.reshape(B, T, H, -1).astype(q.dtype), lse.reshape(B, H, T)
