"""Ranking and pair metrics plus the lexical baselines of the pair experiments (numpy only).

- :func:`bm25` — Okapi BM25 scores ``[Q, N]`` of token-id queries against token-id documents (``k1``, ``b``).
- :func:`jaccard` — token-set overlap of two sentences (the lexical paraphrase baseline).
- :func:`ranks` / :func:`recall_at` / :func:`mrr` — from a score matrix and each query's positive column.
- :func:`spearman` — rank correlation (average ranks for ties).
- :func:`best_threshold` — the accuracy-maximising threshold of a scalar score on labelled data.
- :func:`position_profile` — a per-query metric averaged per (length bucket, position bin) cell (PosIR).
"""

from __future__ import annotations

import numpy as np

__all__ = ["bm25", "jaccard", "ranks", "recall_at", "mrr", "spearman", "best_threshold", "position_profile"]


def bm25(queries, q_lens, docs, d_lens, vocab_size: int, *, k1: float = 1.2, b: float = 0.75,
         ignore=()) -> np.ndarray:
  """BM25 ``[Q, N]``: ``sum_{w in q} idf(w) tf(w, d) (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl))``.

  ``idf(w) = log(1 + (N - df + 0.5) / (df + 0.5))`` over the ``N`` documents; ids in ``ignore`` (padding, function
  words) are skipped. Every query token counts once per occurrence.
  """
  docs, queries = np.asarray(docs), np.asarray(queries)
  N = len(docs)
  tf = np.zeros((N, vocab_size), np.float32)
  for i in range(N):
    np.add.at(tf[i], docs[i, : d_lens[i]], 1.0)
  skip = np.zeros(vocab_size, bool)
  skip[list(ignore)] = True
  df = (tf > 0).sum(0)
  idf = np.log1p((N - df + 0.5) / (df + 0.5)) * ~skip
  dl = np.asarray(d_lens, np.float32)
  norm = k1 * (1 - b + b * dl / dl.mean())
  w = tf * (k1 + 1) / (tf + norm[:, None])  # [N, V]
  qc = np.zeros((len(queries), vocab_size), np.float32)
  for i in range(len(queries)):
    np.add.at(qc[i], queries[i, : q_lens[i]], 1.0)
  return (qc * idf) @ w.T


def jaccard(a, a_len, b, b_len, ignore=()) -> np.ndarray:
  """Token-set Jaccard overlap per pair ``[n]`` (ids in ``ignore`` dropped)."""
  out = np.zeros(len(a))
  ig = set(ignore)
  for i in range(len(a)):
    sa = set(a[i, : a_len[i]].tolist()) - ig
    sb = set(b[i, : b_len[i]].tolist()) - ig
    out[i] = len(sa & sb) / max(len(sa | sb), 1)
  return out


def ranks(scores, positive) -> np.ndarray:
  """1-based rank of column ``positive[q]`` in row ``q`` of ``scores [Q, N]`` (ties count against it)."""
  scores = np.asarray(scores, np.float64)
  pos = scores[np.arange(len(scores)), positive]
  return (scores >= pos[:, None]).sum(1)


def recall_at(r, k: int) -> float:
  """Share of queries whose positive ranks within the top ``k``."""
  return float((np.asarray(r) <= k).mean())


def mrr(r) -> float:
  return float((1.0 / np.asarray(r, np.float64)).mean())


def _rankdata(x):
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="mergesort")
  r = np.empty(len(x))
  r[order] = np.arange(1, len(x) + 1)
  for v in np.unique(x):  # average ranks of ties
    m = x == v
    if m.sum() > 1:
      r[m] = r[m].mean()
  return r


def spearman(x, y) -> float:
  """Spearman's rank correlation (0 when either side is constant)."""
  rx, ry = _rankdata(x), _rankdata(y)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  den = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
  return float((rx * ry).sum() / den) if den > 0 else 0.0


def best_threshold(scores, labels) -> float:
  """Threshold ``t`` maximising the accuracy of ``scores > t`` against binary ``labels``."""
  s = np.asarray(scores, np.float64)
  y = np.asarray(labels).astype(bool)
  cand = np.unique(s)
  cand = np.concatenate([[cand[0] - 1], (cand[1:] + cand[:-1]) / 2 if len(cand) > 1 else [], [cand[-1] + 1]])
  acc = [((s > t) == y).mean() for t in cand]
  return float(cand[int(np.argmax(acc))])


def position_profile(values, bucket, pos_bin, n_buckets: int, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
  """Mean of a per-query metric per cell: ``(means [n_buckets, n_bins]`` (NaN for an empty cell), ``counts)``."""
  v = np.asarray(values, np.float64)
  sums = np.zeros((n_buckets, n_bins))
  cnt = np.zeros((n_buckets, n_bins), np.int64)
  np.add.at(sums, (np.asarray(bucket), np.asarray(pos_bin)), v)
  np.add.at(cnt, (np.asarray(bucket), np.asarray(pos_bin)), 1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan), cnt
