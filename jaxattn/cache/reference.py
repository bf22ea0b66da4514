"""Straightforward numpy (f64) references of the cache policies: loops and sets, written independently of the JAX
code, for the tests. Inputs are numpy arrays in the :class:`jaxattn.cache.KVCache` layout (``k [B, L, G, D]``);
``lengths [B]`` are the written tokens per sequence. Selections are returned as ``list[list[set[int]]]`` indexed
``[b][head]``."""

from __future__ import annotations

import numpy as np


def _f64(x):
  return np.asarray(x, dtype=np.float64)


def probs(q, k, lengths, scale=None):
  """Causal probabilities ``[B, T, H, L]`` of the ``T`` last queries (query t at position ``len - T + t``)."""
  q, k = _f64(q), _f64(k)
  B, T, H, D = q.shape
  L, G = k.shape[1], k.shape[2]
  scale = D ** -0.5 if scale is None else scale
  out = np.zeros((B, T, H, L))
  for b in range(B):
    for t in range(T):
      qp = lengths[b] - T + t
      for h in range(H):
        g = h // (H // G)
        keys = [j for j in range(lengths[b]) if j <= qp]
        if not keys:
          continue
        s = np.array([q[b, t, h] @ k[b, j, g] for j in keys]) * scale
        e = np.exp(s - s.max())
        out[b, t, h, keys] = e / e.sum()
  return out


def masked_attention(q, k, v, allowed, scale=None):
  """``out [B, T, H, E]`` of dense attention with ``allowed [B, H, T, L]`` (0 for rows with no allowed key)."""
  q, k, v = _f64(q), _f64(k), _f64(v)
  B, T, H, D = q.shape
  G = k.shape[2]
  scale = D ** -0.5 if scale is None else scale
  out = np.zeros((B, T, H, v.shape[-1]))
  for b in range(B):
    for h in range(H):
      g = h // (H // G)
      for t in range(T):
        js = np.nonzero(allowed[b, h, t])[0]
        if len(js) == 0:
          continue
        s = k[b, js, g] @ q[b, t, h] * scale
        e = np.exp(s - s.max())
        out[b, t, h] = (e / e.sum()) @ v[b, js, g]
  return out


def top(score, k, allowed):
  """The ``k`` allowed indices of 1-D ``score`` with the highest values, ties towards the lower index."""
  cand = [i for i in range(len(score)) if allowed[i]]
  cand.sort(key=lambda i: (-score[i], i))
  return set(cand[:k])


def reduce_group(x, G, how):
  """``x [H, S]`` -> ``[G, S]``."""
  H = x.shape[0]
  x = x.reshape(G, H // G, -1)
  return x.max(1) if how == "max" else x.mean(1)


def max_pool(x, kernel):
  r = kernel // 2
  return np.array([max(x[max(0, i - r):i + r + 1]) for i in range(len(x))])


def avg_pool(x, kernel):
  r = kernel // 2
  return np.array([x[max(0, i - r):i + r + 1].sum() / kernel for i in range(len(x))])


def streaming_llm(lengths, G, sinks, window):
  return [[{j for j in range(n) if j < sinks or j >= n - window} for _ in range(G)] for n in lengths]


def h2o(lengths, scores, budget):
  heavy = budget // 2
  recent = budget - heavy
  out = []
  for b, n in enumerate(lengths):
    row = []
    for g in range(scores.shape[1]):
      rec = {j for j in range(max(0, n - recent), n)}
      old = [j < n - recent for j in range(scores.shape[2])]
      row.append(rec | top(scores[b, g], heavy, old))
    out.append(row)
  return out


def h2o_scores(q, k, lengths, G, how="max"):
  p = probs(q, k, lengths).sum(1)  # [B, H, L]
  return np.stack([reduce_group(p[b], G, how) for b in range(len(lengths))])


def _snap_score(q_window, k, lengths, pool, mode):
  p = probs(q_window, k, lengths)  # [B, W, H, L]
  G = k.shape[2]
  out = []
  for b in range(len(lengths)):
    imp = reduce_group(p[b].sum(0), G, "mean") if mode == "snap" else reduce_group(p[b].max(0), G, "max")
    out.append(np.stack([avg_pool(imp[g], pool) for g in range(G)]))
  return np.stack(out)  # [B, G, L]


def _forced(score, n, keep_first, keep_last):
  s = score.copy()
  for j in range(len(s)):
    if j >= n:
      s[j] = -np.inf
    elif j < keep_first or j >= n - keep_last:
      s[j] = np.inf
  return s


def snapkv(q_window, k, lengths, capacity, pool, keep_first, keep_last):
  sc = _snap_score(q_window, k, lengths, pool, "snap")
  out = []
  for b, n in enumerate(lengths):
    row = []
    for g in range(k.shape[2]):
      s = _forced(sc[b, g], n, keep_first, keep_last)
      row.append(top(s, capacity, [j < n for j in range(len(s))]))
    out.append(row)
  return out


def ada_snapkv(q_window, k, lengths, capacity, pool, keep_first, keep_last, min_ratio):
  sc = _snap_score(q_window, k, lengths, pool, "ada")
  G, L = k.shape[2], k.shape[1]
  m = min(max(int(min_ratio * capacity), keep_first + keep_last), capacity)
  out = []
  for b, n in enumerate(lengths):
    s = np.stack([_forced(sc[b, g], n, keep_first, keep_last) for g in range(G)])
    chosen = [top(s[g], m, [j < n for j in range(L)]) for g in range(G)]
    cand = [(g, j) for g in range(G) for j in range(n) if j not in chosen[g]]
    cand.sort(key=lambda gj: (-s[gj[0], gj[1]], gj[0] * L + gj[1]))
    for g, j in cand[:G * capacity - G * m]:
      chosen[g].add(j)
    out.append(chosen)
  return out


def quest(q, k, lengths, budget, page_size, share_pages):
  """Pages selected per kv head (share_pages) or per query head, from the written keys' page min/max."""
  q, k = _f64(q), _f64(k)
  B, H, D = q.shape
  G = k.shape[2]
  n_sel = budget // page_size
  out = []
  for b, n in enumerate(lengths):
    n_pages = -(-n // page_size)
    ub = np.zeros((H, n_pages))
    for p in range(n_pages):
      keys = k[b, p * page_size:min(n, (p + 1) * page_size)]  # [t, G, D]
      mn, mx = keys.min(0), keys.max(0)
      for h in range(H):
        g = h // (H // G)
        ub[h, p] = np.maximum(q[b, h] * mn[g], q[b, h] * mx[g]).sum()
    sc = ub.reshape(G, H // G, n_pages).sum(1) if share_pages else ub
    row = []
    for i in range(sc.shape[0]):
      s = sc[i].copy()
      s[(n - 1) // page_size] = np.inf
      row.append(top(s, n_sel, [True] * n_pages))
    out.append(row)
  return out


def as_sets(index, valid):
  """A JAX selection ``(index, valid) [B, X, C]`` as ``[b][x] -> set``."""
  index, valid = np.asarray(index), np.asarray(valid)
  return [[set(index[b, x][valid[b, x]].tolist()) for x in range(index.shape[1])] for b in range(index.shape[0])]


def recycled(q_last, qs, k_all, v_all, lengths, *, k, room=0, schedule="fixed", stride=10, qc_stride=5,
             threshold=0.85, evict=False, pool=7, gqa_reduce="max"):
  """Recycled Attention / RefreshKV decoding simulated with Python sets.

  ``k_all [B, N, G, D]`` / ``v_all`` hold the prompt (``lengths[b]`` tokens) followed, at positions
  ``lengths[b] + i``, by the token of decode step ``i``; ``qs [steps, B, H, D]`` are the decode queries. Returns
  ``(outs [steps, B, H, E], was_full [steps], selections)`` where ``selections[i]`` is ``[b][g] -> set`` of the
  recycled set attended at step ``i`` (after the step's insertion or refresh)."""
  q_last, qs, k_all, v_all = _f64(q_last), _f64(qs), _f64(k_all), _f64(v_all)
  B, H, D = q_last.shape
  G = k_all.shape[2]
  scale = D ** -0.5

  def attn(b, h, q, keys):
    keys = sorted(keys)
    g = h // (H // G)
    s = k_all[b, keys, g] @ q * scale
    e = np.exp(s - s.max())
    return e / e.sum(), v_all[b, keys, g]

  def refresh(q, n_now):
    sel, sc = [], []
    for b in range(B):
      p = np.zeros((H, k_all.shape[1]))
      for h in range(H):
        w, _ = attn(b, h, q[b, h], range(n_now[b]))
        p[h, :n_now[b]] = w
      red = reduce_group(p[:, :n_now[b]], G, gqa_reduce)
      pooled = np.stack([max_pool(red[g], pool) for g in range(G)])
      row, srow = [], []
      for g in range(G):
        chosen = top(pooled[g], k, [True] * n_now[b])
        row.append(chosen)
        srow.append({j: pooled[g, j] for j in chosen})
      sel.append(row)
      sc.append(srow)
    return sel, sc

  n = list(lengths)
  sel, scores = refresh(q_last, n)
  q_mean = q_last.mean(1)
  since, grown = 0, 0
  outs, flags, sels = [], [], []
  for i, q in enumerate(qs):
    n = [x + 1 for x in n]
    since += 1
    if schedule == "fixed":
      full = since >= stride
    else:
      qm = q.mean(1)
      cos = (qm * q_mean).sum(-1) / (np.linalg.norm(qm, axis=-1) * np.linalg.norm(q_mean, axis=-1))
      full = since % qc_stride == 0 and bool(np.any(cos < threshold))
    if not evict and grown >= room:
      full = True
    out = np.zeros((B, H, v_all.shape[-1]))
    if full:
      sel, scores = refresh(q[:, :, :], n)
      q_mean, since, grown = q.mean(1), 0, 0
      for b in range(B):
        for h in range(H):
          w, vals = attn(b, h, q[b, h], range(n[b]))
          out[b, h] = w @ vals
    else:
      for b in range(B):
        for g in range(G):
          new = n[b] - 1
          if evict and len(sel[b][g]) >= k + room:
            victim = min(scores[b][g], key=lambda j: (scores[b][g][j], j))
            sel[b][g].discard(victim)
            del scores[b][g][victim]
          sel[b][g].add(new)
          scores[b][g][new] = np.inf
        for h in range(H):
          w, vals = attn(b, h, q[b, h], sel[b][h // (H // G)])
          out[b, h] = w @ vals
      grown += 1
    outs.append(out)
    flags.append(full)
    sels.append([[set(s) for s in row] for row in sel])
  return np.stack(outs), flags, sels
