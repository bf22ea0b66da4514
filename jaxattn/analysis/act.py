"""ACT attention calibration (Yu et al., ICML 2024), in matrix form and fused into an online softmax.

Definition, as the official code computes it, for one head's attention matrix ``A [T, S]`` (post-softmax) and its
allowed pairs:

- column score ``c_j = sum_i A_ij / n_j`` with ``n_j`` the number of queries allowed to attend key ``j``
  (``T - j`` for a square causal mask, as the official code);
- sink set ``S = {j : c_j > tau}``, minus its first (smallest) element when ``keep_first`` (the official code keeps
  the first sink, normally the BOS token);
- per row ``i`` with sink mass ``T_i = sum_{j in S} A_ij`` and non-sink mass ``N_i = sum_{j not in S} A_ij``:
  sinks keep ``beta * A_ij``, non-sinks get ``A_ij * (1 + (1 - beta) T_i / N_i)`` (the freed mass redistributed in
  proportion to the non-sink attention). Rows with ``N_i = 0`` (e.g. causal row 0 when key 0 is a sink) are left
  unchanged, which is the official code's ``A[0, 0] = 1``.

Every row still sums to 1. The same distribution is ``softmax_j(s_ij + b_i [j in S])`` with the row-dependent bias
``b_i = log(beta N_i / (N_i + (1 - beta) T_i))`` (a single key bias ``log beta`` is not equivalent), which
:func:`act_attention` evaluates blockwise: pass 1 the column sums / counts (:func:`jaxattn.ops.softmax.stats
.attention_stats`), then one online-softmax sweep with two accumulators (sink / non-sink keys) under one running
max and denominator, finishing with ``out_i = (beta acc_sink + (1 + (1 - beta) l_sink / l_non) acc_non) / l``.

The official code calibrates only batch element 0; these functions are batch-safe (sinks per batch element and head).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn.ops.softmax import api
from jaxattn.ops.softmax.config import BlockSizes, SoftmaxCall
from jaxattn.ops.softmax.stats import prepare, attention_stats
from jaxattn.ops.softmax.xla import (BlockPlan, Tile, kv_lists, q_blocks, safe_max, side_blocks, unq_blocks,
                                    visit_info)

__all__ = ["act_sinks", "act_calibrate", "act_row_bias", "act_attention"]

_HI = lax.Precision.HIGHEST


def _check(beta, tau):
  if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
    raise ValueError(f"beta must be a float in [0, 1], got {beta!r}")
  if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not np.isfinite(tau):
    raise ValueError(f"tau must be a finite float, got {tau!r}")


def act_sinks(colsum, colcount, *, tau: float = 0.1, keep_first: bool = True):
  """The ACT sink set ``[..., S]`` bool from column sums and counts (``attention_stats`` ``colsum`` / ``colcount``).

  ``sink_j = colsum_j / colcount_j > tau`` (keys no query may attend are never sinks); with ``keep_first`` the
  smallest sink index is removed from the set (it keeps its attention).
  """
  _check(0.5, tau)
  colsum = jnp.asarray(colsum, jnp.float32)
  colcount = jnp.asarray(colcount)
  score = colsum / jnp.maximum(colcount, 1).astype(jnp.float32)
  sink = (score > tau) & (colcount > 0)
  if keep_first:
    first = jnp.argmax(sink, axis=-1)  # the first True (0 when there is none, and then sink[0] is False)
    sink = sink & (jnp.arange(sink.shape[-1]) != first[..., None])
  return sink


def _causal_allowed(T: int, S: int):
  return jnp.asarray(np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T))


def _select_heads(heads, H: int):
  """Bool ``[H]`` from None (all) or a sequence of head indices (checked)."""
  if heads is None:
    return np.ones(H, bool)
  sel = np.zeros(H, bool)
  for h in heads:
    if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or not 0 <= h < H:
      raise ValueError(f"head {h!r} does not exist: the attention has {H} heads")
    sel[int(h)] = True
  return sel


def act_calibrate(probs, *, beta: float = 0.4, tau: float = 0.1, keep_first: bool = True, allowed=None,
                  heads=None):
  """ACT in matrix form: calibrates attention probabilities ``probs [..., H, T, S]`` (batch-safe).

  Args:
    probs: post-softmax attention ``[..., H, T, S]`` (any leading batch dims; every (batch, head) gets its own
      sink set).
    beta: the fraction of its attention each sink keeps (official default 0.4).
    tau: the column-score threshold (official default 0.1).
    keep_first: leave the first sink (smallest index) uncalibrated, as the official code.
    allowed: bool broadcastable to ``probs``: the pairs the mask allows (for the column counts ``n_j``); None
      means bottom-right-aligned causal (``j <= i + S - T``, the official setting).
    heads: head indices (axis -3) to calibrate, or None for all.

  Returns:
    Calibrated probabilities, same shape; rows sum to what they summed to before.
  """
  _check(beta, tau)
  probs = jnp.asarray(probs, jnp.float32)
  if probs.ndim < 3:
    raise ValueError(f"probs must have shape [..., H, T, S], got {probs.shape}")
  H, T, S = probs.shape[-3:]
  allowed = _causal_allowed(T, S) if allowed is None else jnp.asarray(allowed, bool)
  colcount = jnp.broadcast_to(allowed, probs.shape).sum(-2)
  sink = act_sinks(probs.sum(-2), colcount, tau=tau, keep_first=keep_first)[..., None, :]  # [..., H, 1, S]
  Ts = jnp.where(sink, probs, 0.0).sum(-1, keepdims=True)
  N = jnp.where(sink, 0.0, probs).sum(-1, keepdims=True)
  cal = jnp.where(sink, beta * probs, probs * (1.0 + (1.0 - beta) * Ts / jnp.where(N > 0, N, 1.0)))
  cal = jnp.where(N > 0, cal, probs)
  sel = jnp.asarray(_select_heads(heads, H))[:, None, None]
  return jnp.where(sel, cal, probs)


def act_row_bias(probs, *, beta: float = 0.4, tau: float = 0.1, keep_first: bool = True, allowed=None):
  """The row-dependent logit bias form of ACT: ``(b [..., H, T], sink [..., H, S])``.

  ``softmax_j(s_ij + b_i * sink_j)`` equals :func:`act_calibrate` of ``softmax(s)``, with
  ``b_i = log(beta N_i / (N_i + (1 - beta) T_i))`` (0 on rows with ``N_i = 0``). Mostly for tests and teaching: it
  needs the probabilities; :func:`act_attention` computes the same thing blockwise.
  """
  _check(beta, tau)
  probs = jnp.asarray(probs, jnp.float32)
  T, S = probs.shape[-2:]
  allowed = _causal_allowed(T, S) if allowed is None else jnp.asarray(allowed, bool)
  colcount = jnp.broadcast_to(allowed, probs.shape).sum(-2)
  sink = act_sinks(probs.sum(-2), colcount, tau=tau, keep_first=keep_first)
  Ts = jnp.where(sink[..., None, :], probs, 0.0).sum(-1)
  N = jnp.where(sink[..., None, :], 0.0, probs).sum(-1)
  ok = (N > 0) & (beta > 0)
  b = jnp.where(ok, jnp.log(jnp.where(ok, beta * N, 1.0)) - jnp.log(jnp.where(ok, N + (1.0 - beta) * Ts, 1.0)), 0.0)
  return b, sink


def act_attention(q, k, v, *, mask=None, segment_ids=None, bias=None, scale: float | None = None,
                  logits_soft_cap: float | None = None, beta: float = 0.4, tau: float = 0.1, keep_first: bool = True,
                  heads=None, sinks=None, block_sizes: BlockSizes | None = None, return_sinks: bool = False):
  """Softmax attention with ACT calibration, fused into a blockwise online softmax (never ``T x S``).

  Pass 1 computes the column sums and counts blockwise (:func:`jaxattn.ops.softmax.stats.attention_stats`) and the
  sink set (:func:`act_sinks`); pass 2 is one online-softmax sweep keeping two accumulators, sink and non-sink keys,
  under one running max and denominator (module docstring). Equal to ``act_calibrate(P) @ V`` up to f32 rounding.
  Forward only (inference; no gradient).

  Args:
    q, k, v, mask, segment_ids, bias, scale, logits_soft_cap: as in :func:`jaxattn.softmax_attention` (f32 / bf16
      / f16; no dropout). ``mask`` None means full attention: pass ``masks.Causal()`` for a decoder (the paper's
      setting).
    beta, tau, keep_first: ACT's settings (:func:`act_calibrate`).
    heads: query head indices to calibrate (None: all); the others get plain softmax attention.
    sinks: optional precomputed sink set ``[B, H, S]`` bool (skips pass 1).
    block_sizes: tiles of both passes.
    return_sinks: also return the sink set.

  Returns:
    ``out [B, T, H, E]`` in q's dtype (and ``sinks [B, H, S]`` bool when ``return_sinks``).
  """
  _check(beta, tau)
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  if v.ndim != 4 or v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must have shape [B, S, G, E] matching k {k.shape}, got {v.shape}")
  qv, kv, biasv, q_ids, kv_ids, call = prepare(q, k, mask, segment_ids, bias, scale, logits_soft_cap)
  B, T, H, _ = q.shape
  S = k.shape[1]
  if sinks is None:
    st = attention_stats(q, k, mask=mask, segment_ids=segment_ids, bias=bias, scale=scale,
                         logits_soft_cap=logits_soft_cap, stats=("colsum", "colcount"), block_sizes=block_sizes)
    sinks = act_sinks(st["colsum"], st["colcount"], tau=tau, keep_first=keep_first)
  else:
    sinks = jnp.asarray(sinks, bool)
    if sinks.shape != (B, H, S):
      raise ValueError(f"sinks must have shape [B, H, S] = {(B, H, S)}, got {sinks.shape}")
  sinks = sinks & jnp.asarray(_select_heads(heads, H))[None, :, None]
  call = api.make_call(qv, kv, v, mask=call.mask, bias=biasv, segment_ids=q_ids is not None, scale=call.scale,
                       logits_soft_cap=call.logits_soft_cap, mask_array=call.mask_array)
  blocks = block_sizes or api.BACKENDS["xla"].default_config(call)
  out = _act_xla(qv, kv, v.astype(q.dtype), biasv, q_ids, kv_ids, sinks, call=call, blocks=blocks,
                 beta=float(beta))
  return (out, sinks) if return_sinks else out


@functools.partial(jax.jit, static_argnames=("call", "blocks", "beta"))
def _act_xla(q, k, v, bias, q_ids, kv_ids, sinks, *, call: SoftmaxCall, blocks: BlockSizes, beta: float):
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  bq, bk = blocks.block_q, blocks.block_k
  info = visit_info(call.mask, T, S, bq, bk)
  tile = Tile(BlockPlan(call, blocks), info, q.dtype)
  qB = q_blocks(q.reshape(B, T, G, R, D), bq)  # [nQ, B, G, R, bq, D]
  kB, vB = q_blocks(k, bk), q_blocks(v, bk)  # [nK, B, G, bk, D|E]
  nk = info.num_k_blocks
  sinkB = jnp.pad(sinks, [(0, 0), (0, 0), (0, nk * bk - S)]).reshape(B, G, R, nk, bk).transpose(3, 0, 1, 2, 4)
  biasB, qidB, kidB = side_blocks(bias, q_ids, kv_ids, R, bq, bk)
  kv_index, kv_count, kv_tile = kv_lists(info)
  prec = tile.prec

  def one_q_block(qi):
    def body(n, carry):
      m, l_s, l_n, acc_s, acc_n = carry
      kj = kv_index[qi, n]
      s, _ = tile.logits(qB[qi], kB[kj], None if biasB is None else biasB[qi, kj],
                         None if qidB is None else qidB[qi], None if kidB is None else kidB[kj], kv_tile[qi, n], qi, kj)
      m_new = jnp.maximum(m, s.max(-1))
      m_safe = safe_max(m_new)
      alpha = jnp.exp(m - m_safe)
      p = jnp.exp(s - m_safe[..., None])  # [B, G, R, bq, bk]
      is_sink = sinkB[kj][:, :, :, None, :]
      p_s = jnp.where(is_sink, p, 0.0)
      p_n = jnp.where(is_sink, 0.0, p)
      pv = lambda x: jnp.einsum("bgrqk,bgke->bgrqe", x.astype(v.dtype), vB[kj], preferred_element_type=jnp.float32,
                                precision=prec)
      return (m_new, alpha * l_s + p_s.sum(-1), alpha * l_n + p_n.sum(-1),
              alpha[..., None] * acc_s + pv(p_s), alpha[..., None] * acc_n + pv(p_n))

    shape = (B, G, R, bq)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (E,), jnp.float32), jnp.zeros(shape + (E,), jnp.float32))
    _, l_s, l_n, acc_s, acc_n = lax.fori_loop(0, kv_count[qi], body, init)
    l = l_s + l_n
    gain = jnp.where(l_n > 0, 1.0 + (1.0 - beta) * l_s / jnp.where(l_n > 0, l_n, 1.0), 1.0)
    keep = jnp.where(l_n > 0, beta, 1.0)  # rows without non-sink mass stay uncalibrated
    out = (keep[..., None] * acc_s + gain[..., None] * acc_n) / jnp.where(l == 0, 1.0, l)[..., None]
    return out.astype(q.dtype)

  outB = lax.map(one_q_block, jnp.arange(info.num_q_blocks))  # [nQ, B, G, R, bq, E]
  return unq_blocks(outB, T).reshape(B, T, H, E)
