"""Straightforward numpy (float64) references of each selection, for tests and small-shape checks.

Loops and dense ``[T, S]`` arrays, written for clarity, not speed; the conventions are those of
:mod:`jaxattn.sparse.index` (positions ``p_i = i + S - T``, causal ``j <= p_i``, GQA head ``h // (H // G)``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["dense_probs", "vertical_slash_scores", "vertical_slash_reference", "flexprefill_reference",
           "vs_mask_reference", "block_topk_reference", "blocks_covering", "recall_reference",
           "masked_attention_reference"]


def _f64(x):
  return np.asarray(x, np.float64)


def _heads(k, H):
  G = k.shape[2]
  return np.repeat(_f64(k), H // G, axis=2)


def dense_probs(q, k, scale=None, allowed=None):
  """Dense masked softmax ``P [B, H, T, S]`` (f64); ``allowed [T, S]`` default causal; empty rows are 0."""
  q, B, T, H, D = _f64(q), *q.shape
  S = k.shape[1]
  scale = D ** -0.5 if scale is None else scale
  s = np.einsum("bthd,bshd->bhts", q, _heads(k, H)) * scale
  if allowed is None:
    allowed = np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T)
  s = np.where(allowed, s, -np.inf)
  m = s.max(-1, keepdims=True)
  p = np.where(allowed, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
  l = p.sum(-1, keepdims=True)
  return p / np.where(l == 0, 1.0, l)


def vertical_slash_scores(q, k, last_q, scale=None):
  """``(vertical [B, H, S], slash [B, H, S])``: column sums and diagonal sums of the last ``last_q`` rows of
  the causal softmax (diagonal ``d`` of row ``i`` is key ``p_i - d``)."""
  T, S = q.shape[1], k.shape[1]
  P = dense_probs(q, k, scale)[:, :, T - last_q:]
  vertical = P.sum(2)
  slash = np.zeros_like(vertical)
  for r in range(last_q):
    p = T - last_q + r + (S - T)
    for d in range(p + 1):
      slash[:, :, d] += P[:, :, r, p - d]
  return vertical, slash


def _top(score, n, n_forced):
  key = np.where(np.arange(score.shape[-1]) < n_forced, np.inf, score)
  return np.argsort(-key, kind="stable")[:n]


def vertical_slash_reference(q, k, *, n_vertical, n_slash, last_q, force_first, force_local, scale=None):
  """Per (b, h): the set of kept columns and the set of kept diagonal offsets, plus the scores.

  Returns ``(cols, offs, vertical, slash)`` with ``cols[b][h]`` / ``offs[b][h]`` Python sets.
  """
  vertical, slash = vertical_slash_scores(q, k, last_q, scale)
  B, H = vertical.shape[:2]
  cols = [[set(_top(vertical[b, h], n_vertical, force_first).tolist()) for h in range(H)] for b in range(B)]
  offs = [[set(_top(slash[b, h], n_slash, force_local).tolist()) for h in range(H)] for b in range(B)]
  return cols, offs, vertical, slash


def _adaptive(score, n_forced, alpha, floor, cap):
  order = _top(score, len(score), n_forced)
  frac = np.cumsum(score[order]) / score.sum()
  n = 1
  while n < len(order) and frac[n - 1] < alpha:
    n += 1
  n = min(max(n, floor), cap)
  return set(order[:n].tolist())


def flexprefill_reference(q, k, *, alpha, min_budget, max_vertical, max_slash, last_q, force_first, force_local,
                          scale=None):
  """As :func:`vertical_slash_reference` with FlexPrefill's adaptive budgets (cumulative mass >= alpha)."""
  vertical, slash = vertical_slash_scores(q, k, last_q, scale)
  B, H = vertical.shape[:2]
  cols = [[_adaptive(vertical[b, h], force_first, alpha, max(min_budget, force_first), max_vertical)
           for h in range(H)] for b in range(B)]
  offs = [[_adaptive(slash[b, h], force_local, alpha, max(min_budget, force_local), max_slash)
           for h in range(H)] for b in range(B)]
  return cols, offs, vertical, slash


def vs_mask_reference(cols, offs, T, S):
  """bool ``[B, H, T, S]`` from per-(b, h) column / offset sets, causal."""
  B, H = len(cols), len(cols[0])
  out = np.zeros((B, H, T, S), bool)
  for b in range(B):
    for h in range(H):
      for i in range(T):
        p = i + S - T
        for j in range(p + 1):
          out[b, h, i, j] = j in cols[b][h] or (p - j) in offs[b][h]
  return out


def blocks_covering(token_mask, block_q, block_k):
  """bool ``[B, H, nQ, nK]``: blocks holding at least one selected pair of ``token_mask [B, H, T, S]``."""
  B, H, T, S = token_mask.shape
  nq, nk = -(-T // block_q), -(-S // block_k)
  out = np.zeros((B, H, nq, nk), bool)
  for qb in range(nq):
    for kb in range(nk):
      out[:, :, qb, kb] = token_mask[:, :, qb * block_q:(qb + 1) * block_q, kb * block_k:(kb + 1) * block_k] \
          .any((-1, -2))
  return out


def block_topk_reference(q, k, *, top_k, block_q, block_k, force_first=True, force_local=2, scale=None):
  """bool layout ``[B, H, nQ, nK]`` of MInference block top-k (mean pooling, forced first / local blocks)."""
  q, B, T, H, D = _f64(q), *q.shape
  S = k.shape[1]
  kh = _heads(k, H)
  scale = D ** -0.5 if scale is None else scale
  nq, nk = -(-T // block_q), -(-S // block_k)
  out = np.zeros((B, H, nq, nk), bool)
  for qb in range(nq):
    rows = np.arange(qb * block_q, min(qb * block_q + block_q, T))
    p_lo, p_hi = rows[0] + S - T, rows[-1] + S - T
    qm = q[:, rows].mean(1)  # [B, H, D]
    for b in range(B):
      for h in range(H):
        cand = []
        for kb in range(nk):
          j0 = kb * block_k
          if j0 > p_hi:
            continue  # causally empty
          km = kh[b, j0:min(j0 + block_k, S), h].mean(0)
          forced = (force_first and kb == 0) or (
              force_local and p_lo // block_k - (force_local - 1) <= kb <= p_hi // block_k)
          cand.append((0 if forced else 1, -(qm[b, h] @ km) * scale if not forced else 0.0, kb))
        cand.sort()
        for _, _, kb in cand[:top_k]:
          out[b, h, qb, kb] = True
  return out


def recall_reference(q, k, allowed_sel, scale=None):
  """``[B, H]``: mean over query rows of the dense causal softmax mass on ``allowed_sel [B|1, H|1, T, S]``."""
  P = dense_probs(q, k, scale)
  return (P * allowed_sel).sum(-1).mean(-1)


def masked_attention_reference(q, k, v, allowed, scale=None):
  """Dense attention ``[B, T, H, E]`` (f64) where ``allowed [B, H, T, S]`` says which pairs are computed."""
  q, B, T, H, D = _f64(q), *q.shape
  scale = D ** -0.5 if scale is None else scale
  s = np.where(allowed, np.einsum("bthd,bshd->bhts", q, _heads(k, H)) * scale, -np.inf)
  m = s.max(-1, keepdims=True)
  p = np.where(allowed, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
  l = p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshe->bthe", p / np.where(l == 0, 1.0, l), _heads(v, H))
