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

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.ops.landmark.config import LandmarkConfig


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

  Differentiable (no NaN gradients: masked logits become ``-inf`` before any ``exp``).
  """
  T = s.shape[-1]
  bs = block_size
  cur, past_lm, past_reg = (jnp.asarray(m) for m in structure(T, bs))
  top = cur | past_lm
  s_top = jnp.where(top, s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s_top, axis=-1, keepdims=True))  # finite: TOP(i) is never empty
  lse = m[..., 0] + jnp.log(jnp.sum(jnp.exp(s_top - m), axis=-1))  # [..., T]

  # Per (query, key block): the landmark logit and the log-sum-exp of the block's regular keys.
  nb = -(-T // bs)
  pad = nb * bs - T
  s_blk = jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
  s_blk = s_blk.reshape(*s.shape[:-1], nb, bs)  # [..., T, nb, bs]
  regular = (np.arange(bs) < bs - 1)[None, :] & (np.arange(nb * bs).reshape(nb, bs) < T)  # [nb, bs]
  s_reg = jnp.where(jnp.asarray(regular), s_blk, -jnp.inf)
  m_loc = jax.lax.stop_gradient(jnp.max(s_reg, axis=-1, keepdims=True))  # finite: slot 0 of a block is regular
  lse_loc = m_loc[..., 0] + jnp.log(jnp.sum(jnp.exp(s_reg - m_loc), axis=-1))  # [..., T, nb]
  lam = s_blk[..., bs - 1]  # [..., T, nb] landmark logits (-inf for a last block without landmark)
  kb = np.arange(T) // bs
  lam_j, lse_loc_j = lam[..., kb], lse_loc[..., kb]  # [..., T, T]: per key, its block's values

  lse_e = lse[..., None]
  a_cur = jnp.exp(jnp.where(cur, s, -jnp.inf) - lse_e)
  a_past = jnp.exp(jnp.where(past_reg, lam_j + s - lse_loc_j, -jnp.inf) - lse_e)
  return a_cur + a_past, lse


def landmark_attention_reference(q, k, v, cfg: LandmarkConfig):
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
  qf = q.astype(jnp.float32).reshape(B, T, G, R, D)
  s = jnp.einsum("btgrd,bsgd->bgrts", qf, k.astype(jnp.float32), precision=hi) * cfg.scale  # [B, G, R, T, T]
  a, lse = grouped_softmax_weights(s, cfg.block_size)
  o = jnp.einsum("bgrts,bsge->btgre", a, v.astype(jnp.float32), precision=hi)
  return o.reshape(B, T, H, -1).astype(q.dtype), lse.reshape(B, H, T)
