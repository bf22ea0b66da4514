"""Inference of the tiny LM with a chosen sparse prefill or decode cache policy: task accuracy and per-layer
attention recall.

Two phases over the same teacher-forced sequences (``tokens [B, L]``; the answers sit in the last ``query_len``
tokens, :mod:`experiments.longctx.tasks`):

- :func:`prefill_eval` — *sparse prefill*: the whole sequence (context, questions, answers) is one prefill whose
  attention, in every layer, runs on the selection a :mod:`jaxattn.sparse` builder makes from that layer's own
  ``q``, ``k`` (``VerticalSlash`` / ``FlexPrefill``: the exact token selection; ``BlockTopK``: its block lists).
  The questions are part of the prompt, as in RULER, so the answers are read off the prefill's logits.
- :func:`decode_eval` — *sparse decode*: the context (``L - query_len`` tokens) is prefilled densely into one
  :class:`jaxattn.cache.KVCache` per layer (Quest page bounds kept), then the query segment is decoded one token
  at a time (teacher forced); each decode query attends the keys a :class:`DecodePolicy` picks: ``dense`` (all),
  ``quest`` (:func:`jaxattn.cache.quest_select`, query-aware pages, shared by each kv group) or ``topk``
  (:func:`jaxattn.cache.select_topk_from_probs` on the exact probabilities, the oracle top-k per kv head).

Both return the answer-token accuracy (and per-example exact match), the *attention recall* per layer (the
fraction of the dense softmax mass of that layer's queries, on the sparse run's own activations, that the
selection keeps: :func:`jaxattn.sparse.attention_recall` for prefill, the probability row summed over the kept
keys for decode) and the realised sparsity per layer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn import cache as kv
from jaxattn import masks, sparse
from jaxattn.ops.softmax import softmax_attention

__all__ = ["PrefillPattern", "DecodePolicy", "prefill_eval", "decode_eval", "answer_metrics"]


@dataclasses.dataclass(frozen=True)
class PrefillPattern:
  """A prefill selection: ``builder`` None (dense), a ``VerticalSlash`` / ``FlexPrefill`` (token selection) or a
  ``BlockTopK`` (block lists of ``block`` x ``block`` tiles)."""

  builder: Any = None
  block: int = 16


@dataclasses.dataclass(frozen=True)
class DecodePolicy:
  """Decode-time key selection: ``kind`` in ``dense``, ``quest``, ``topk``, ``sink_window`` (the first ``sinks``
  keys and the most recent ``budget - sinks``, StreamingLLM's set without eviction); ``budget`` keys per kv head (a
  multiple of ``page_size`` for Quest, the current page included); 0 for dense."""

  kind: str = "dense"
  budget: int = 0
  page_size: int = 16
  sinks: int = 4

  def __post_init__(self):
    if self.kind not in ("dense", "quest", "topk", "sink_window"):
      raise ValueError(f"DecodePolicy.kind must be 'dense', 'quest', 'topk' or 'sink_window', got {self.kind!r}")
    if self.kind != "dense" and (not isinstance(self.budget, int) or self.budget < 1):
      raise ValueError(f"DecodePolicy.budget must be a positive int for {self.kind}, got {self.budget!r}")
    if self.kind == "quest" and self.budget % self.page_size:
      raise ValueError(f"DecodePolicy.budget={self.budget} must be a multiple of page_size={self.page_size} (Quest)")


# --------------------------------------------------------------------------------------------------- prefill
@functools.partial(nnx.jit, static_argnames=("pattern",))
def _prefill(model, tokens, pattern: PrefillPattern):
  B, T = tokens.shape
  x = model.embed(tokens)
  pos = jnp.arange(T)
  recalls, sparsities = [], []
  for block in model.blocks:
    q, k, v = block.qkv(x, pos)
    b = pattern.builder
    if b is None:
      o = softmax_attention(q, k, v, mask=masks.Causal())
      rec, sp = jnp.ones(()), jnp.zeros(())
    else:
      if isinstance(b, sparse.BlockTopK):
        sel = b.build(q, k, block_q=pattern.block, block_k=pattern.block)
      else:
        sel = b.select(q, k)
      o = sparse.sparse_attention(q, k, v, sel)
      rec, sp = sparse.attention_recall(q, k, sel).mean, sparse.sparsity(sel).mean
    recalls.append(rec)
    sparsities.append(sp)
    x = block.finish(x, o)
  return model.logits(x), jnp.stack(recalls), jnp.stack(sparsities)


def answer_metrics(logits, tokens, answer):
  """``(correct [B] answer tokens right, count [B] answer tokens, exact [B] all right)`` from logits at every
  position (``logits[:, i]`` predicts ``tokens[:, i + 1]``)."""
  pred = np.asarray(jnp.argmax(logits[:, :-1], -1))
  ans = np.asarray(answer)[:, 1:]
  right = (pred == np.asarray(tokens)[:, 1:]) & ans
  n = ans.sum(1)
  return right.sum(1), n, right.sum(1) == n


def prefill_eval(model, tokens, answer, pattern: PrefillPattern = PrefillPattern()) -> dict:
  """Sparse-prefill evaluation of one batch: ``{correct, count, exact}`` per example (numpy) and ``recall``,
  ``sparsity`` per layer (numpy ``[layers]``)."""
  logits, rec, sp = _prefill(model, jnp.asarray(tokens), pattern)
  c, n, e = answer_metrics(logits, tokens, answer)
  return dict(correct=c, count=n, exact=e, recall=np.asarray(rec), sparsity=np.asarray(sp))


# ---------------------------------------------------------------------------------------------------- decode
def _select(policy: DecodePolicy, q, c: kv.KVCache, probs):
  """``key_mask [B, G, L_max]`` of the policy (None: dense) for decode query ``q [B, 1, H, D]``."""
  if policy.kind == "dense":
    return None
  B, L, G = c.shape[:3]
  if policy.kind == "sink_window":
    slot = jnp.arange(L)[None, None, :]
    n = c.lengths[:, None, None]
    sinks = min(policy.sinks, policy.budget // 2)
    sel = (slot < sinks) | (slot >= n - (policy.budget - sinks))
    return jnp.broadcast_to(sel & (slot < n), (B, G, L))
  if policy.kind == "quest":
    pages, valid = kv.quest_select(q, c.page_min, c.page_max, min(policy.budget, L), page_size=c.page_size,
                                   lengths=c.lengths)
    return kv.quest_key_mask(c, pages, valid)
  idx, valid, _ = kv.select_topk_from_probs(probs[:, 0], min(policy.budget, L), num_kv_heads=G, pool=1,
                                            lengths=c.lengths)
  sel = jnp.zeros((B, G, L), bool)
  b, g = jnp.arange(B)[:, None, None], jnp.arange(G)[None, :, None]
  return sel.at[b, g, idx].max(valid)


@functools.partial(nnx.jit, static_argnames=("prompt_len", "policy"))
def _decode(model, tokens, prompt_len: int, policy: DecodePolicy):
  B, T = tokens.shape
  P = prompt_len
  page = policy.page_size
  cap = -(-T // page) * page
  # dense prefill of the context, one cache per layer
  x = model.embed(tokens[:, :P])
  caches = []
  for block in model.blocks:
    q, k, v = block.qkv(x, jnp.arange(P))
    G, D = k.shape[2], k.shape[3]
    c = kv.prefill(kv.init(B, cap, G, D, dtype=k.dtype, page_size=page), k, v)
    caches.append(c)
    x = block.finish(x, softmax_attention(q, k, v, mask=masks.Causal()))
  last_logits = model.logits(x[:, -1])  # predicts tokens[:, P]

  def step(caches, t):
    tok = jax.lax.dynamic_index_in_dim(tokens, P + t, axis=1, keepdims=True)  # [B, 1]
    x = model.embed(tok)
    new, recs, sps = [], [], []
    for block, c in zip(model.blocks, caches):
      q, k, v = block.qkv(x, (P + t)[None])
      c = kv.append(c, k, v)
      _, probs = kv.decode_with_probs(q, c)  # dense probabilities [B, 1, H, L]
      mask = _select(policy, q, c, probs)
      if mask is None:
        o = kv.decode_with_probs(q, c)[0]
        rec = jnp.ones(())
        sp = jnp.zeros(())
      else:
        o = kv.decode_with_probs(q, c, key_mask=mask)[0]
        H = q.shape[2]
        mh = jnp.repeat(mask, H // mask.shape[1], axis=1)  # [B, H, L]
        rec = jnp.mean(jnp.sum(jnp.where(mh, probs[:, 0], 0.0), -1))
        seen = c.slot_valid()[:, :, 0]  # [B, L] written slots
        kept = jnp.sum(mask & seen[:, None, :], -1)  # [B, G]
        sp = jnp.mean(1.0 - kept / jnp.sum(seen, -1, keepdims=True))
      new.append(c)
      recs.append(rec)
      sps.append(sp)
      x = block.finish(x, o)
    return new, (model.logits(x[:, 0]), jnp.stack(recs), jnp.stack(sps))

  A = T - P
  _, (logits, rec, sp) = jax.lax.scan(step, caches, jnp.arange(A))  # logits [A, B, V]
  logits = jnp.concatenate([last_logits[None], logits], 0)  # [A + 1, B, V]: predicts tokens[P..T]
  return jnp.transpose(logits, (1, 0, 2)), rec.mean(0), sp.mean(0)


def decode_eval(model, tokens, answer, *, query_len: int, policy: DecodePolicy = DecodePolicy()) -> dict:
  """Sparse-decode evaluation of one batch (the last ``query_len`` tokens decoded): as :func:`prefill_eval`."""
  tokens = np.asarray(tokens)
  P = tokens.shape[1] - query_len
  if np.asarray(answer)[:, :P + 1].any():
    raise ValueError(f"answers must lie after the first decoded token (position > {P})")
  logits, rec, sp = _decode(model, jnp.asarray(tokens), P, policy)  # logits predict tokens[P..]
  # logits[:, j] predicts tokens[:, P + j]; answer_metrics expects logits[:, i] to predict tokens[:, i + 1]
  c, n, e = answer_metrics(logits, tokens[:, P - 1:], np.asarray(answer)[:, P - 1:])
  return dict(correct=c, count=n, exact=e, recall=np.asarray(rec), sparsity=np.asarray(sp))
