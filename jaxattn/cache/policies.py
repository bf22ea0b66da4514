"""KV eviction / compression / selection policies as pure, jit-able functions over a :class:`KVCache`.

Every selection is a pair ``index [B, G|H, C]`` int32 (cache slots, ascending) and ``valid [B, G|H, C]`` bool; the
eviction policies return the compressed cache (:func:`jaxattn.cache.kv.gather`), whose ``positions`` / ``valid``
record what was kept. Budgets are static Python ints. Ties in a score are broken towards the lower slot (as
``jax.lax.top_k`` does). A sequence shorter than a budget keeps all its tokens (the spare entries are invalid).

- :func:`streaming_llm`: ``sinks`` first tokens + ``window`` most recent (StreamingLLM).
- :func:`h2o`: ``budget // 2`` heavy hitters by accumulated attention + the rest most recent (H2O as Recycled
  Attention configures it); :func:`h2o_scores` accumulates the scores of a block of queries.
- :func:`snapkv_compress` / :func:`ada_snapkv_compress`: SnapKV and Ada-SnapKV (Sparse Frontier's variant).
- :func:`quest_select` / :func:`quest_attend`: Quest page selection from the cache's page min/max bounds.
- :func:`select_topk_from_probs`: Recycled Attention / RefreshKV top-K from one probability row.

GQA: scores are computed per query head and reduced over each kv head's group of ``H // G`` query heads with
``gqa_reduce`` (``"max"`` or ``"mean"``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxattn.cache import kv
from jaxattn.cache.kv import KVCache, check_q, resolve_scale, decode_with_probs, gather, static_int, visible

_REDUCE = ("max", "mean")


def _reduce_group(x, G: int, how: str):
  """``x [B, H, S]`` -> ``[B, G, S]`` by max / mean over each group of ``H // G`` query heads."""
  if how not in _REDUCE:
    raise ValueError(f"gqa_reduce must be one of {_REDUCE}, got {how!r}")
  B, H, S = x.shape
  x = x.reshape(B, G, H // G, S)
  return jnp.max(x, axis=2) if how == "max" else jnp.mean(x, axis=2)


def max_pool(x, kernel: int):
  """Stride-1 max pooling along the last axis, window ``kernel`` (odd) centred, padded with ``-inf``."""
  if kernel == 1:
    return x
  r = kernel // 2
  xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(r, r)], constant_values=-jnp.inf)
  return jax.lax.reduce_window(xp, -jnp.inf, jax.lax.max, (1,) * (x.ndim - 1) + (kernel,), (1,) * x.ndim, "VALID")


def avg_pool(x, kernel: int):
  """Stride-1 average pooling along the last axis, window ``kernel`` (odd) centred, zero-padded, divided by
  ``kernel`` at the borders too (``torch.nn.functional.avg_pool1d``'s ``count_include_pad=True``)."""
  if kernel == 1:
    return x
  r = kernel // 2
  xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(r, r)])
  return jax.lax.reduce_window(xp, 0.0, jax.lax.add, (1,) * (x.ndim - 1) + (kernel,), (1,) * x.ndim,
                               "VALID") / kernel


def _pool_size(name: str, pool) -> int:
  pool = static_int(name, pool)
  if pool % 2 == 0:
    raise ValueError(f"{name} must be odd (a centred window), got {pool}")
  return pool


def _topk_sorted(score, k: int):
  """Top-``k`` over the last axis of ``score`` (``-inf`` = not selectable), returned sorted by index."""
  vals, idx = jax.lax.top_k(score, k)
  ok = vals > -jnp.inf
  key = jnp.where(ok, idx, score.shape[-1] + idx)  # valid first, by slot
  order = jnp.argsort(key, axis=-1)
  return jnp.take_along_axis(idx, order, -1).astype(jnp.int32), jnp.take_along_axis(ok, order, -1)


def _contiguous(cache: KVCache, name: str) -> None:
  if cache.positions is not None or cache.valid is not None:
    raise ValueError(f"{name} needs an uncompressed cache (slot s = position s); this one was already compressed")


def _budget(name: str, budget, cache: KVCache) -> int:
  budget = static_int(name, budget)
  if budget > cache.capacity:
    raise ValueError(f"{name} {budget} is larger than the context (cache capacity {cache.capacity})")
  return budget


def _slot_grid(cache: KVCache):
  B, L, G, _, _ = cache.shape
  s = jnp.arange(L, dtype=jnp.int32)[None, None, :]
  return s, cache.lengths[:, None, None]  # [1, 1, L], [B, 1, 1]


# ------------------------------------------------------------------------------------------------- StreamingLLM
def streaming_llm_select(cache: KVCache, *, sinks: int = 4, window: int):
  """The StreamingLLM selection: slots ``[0, sinks)`` and ``[len - window, len)``; ``(index, valid) [B, G, sinks +
  window]``. Raises ``ValueError`` for ``window < 1``, ``sinks < 0`` or ``sinks + window`` above the capacity."""
  _contiguous(cache, "streaming_llm")
  sinks = static_int("sinks", sinks, lo=0)
  window = static_int("window", window)
  _budget("sinks + window", sinks + window, cache)
  return _streaming(cache, sinks, window)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _streaming(cache: KVCache, sinks: int, window: int):
  K = sinks + window
  B, L, G, _, _ = cache.shape
  s, n = _slot_grid(cache)
  keep = (s < n) & ((s < sinks) | (s >= n - window))
  score = jnp.broadcast_to(jnp.where(keep, 0.0, -jnp.inf), (B, G, L))
  return _topk_sorted(score, K)


def streaming_llm(cache: KVCache, *, sinks: int = 4, window: int, room: int = 0) -> KVCache:
  """StreamingLLM eviction (attention sinks + recent window); Recycled Attention's baseline uses ``sinks=4,
  window=K-4``. Returns the compressed cache (capacity ``sinks + window + room``)."""
  index, valid = streaming_llm_select(cache, sinks=sinks, window=window)
  return gather(cache, index, valid, room=room)


# ---------------------------------------------------------------------------------------------------------- H2O
def attention_scores(q, cache: KVCache, *, gqa_reduce: str = "max", scale: float | None = None):
  """Accumulated attention ``[B, G, L_max]`` f32 of the ``T`` newest queries ``q [B, T, H, D]``: the causal
  probabilities summed over the queries, per query head, then reduced over each group with ``gqa_reduce``."""
  _, _, G = check_q(q, cache, "attention_scores")
  if gqa_reduce not in _REDUCE:
    raise ValueError(f"gqa_reduce must be one of {_REDUCE}, got {gqa_reduce!r}")
  _, p = decode_with_probs(q, cache, scale=scale)  # [B, T, H, L]
  return _sum_reduce(p, G, gqa_reduce)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _sum_reduce(p, G: int, how: str):
  return _reduce_group(jnp.sum(p, axis=1), G, how)


h2o_scores = attention_scores


def h2o_select(cache: KVCache, scores, *, budget: int):
  """H2O selection: the ``budget - budget // 2`` most recent slots plus the ``budget // 2`` older slots with the
  highest accumulated ``scores [B, G, L_max]`` (e.g. :func:`h2o_scores`, plus the probability rows of later decode
  steps). Returns ``(index, valid) [B, G, budget]``."""
  _contiguous(cache, "h2o")
  K = _budget("budget", budget, cache)
  if K < 2:
    raise ValueError(f"budget must be >= 2 (K/2 heavy hitters + K/2 recent), got {K}")
  B, L, G, _, _ = cache.shape
  if scores.shape != (B, G, L):
    raise ValueError(f"h2o: scores must have shape [B={B}, G={G}, L_max={L}], got {scores.shape}")
  return _h2o(cache, scores, K)


@functools.partial(jax.jit, static_argnums=2)
def _h2o(cache: KVCache, scores, K: int):
  B, L, G, _, _ = cache.shape
  heavy = K // 2
  recent = K - heavy
  s, n = _slot_grid(cache)
  is_recent = (s < n) & (s >= n - recent)
  older = s < n - recent
  h_idx, h_ok = _topk_sorted(jnp.where(older, scores.astype(jnp.float32), -jnp.inf), heavy)
  r_idx, r_ok = _topk_sorted(jnp.broadcast_to(jnp.where(is_recent, 0.0, -jnp.inf), (B, G, L)), recent)
  idx = jnp.concatenate([h_idx, r_idx], -1)
  ok = jnp.concatenate([h_ok, r_ok], -1)
  key = jnp.where(ok, idx, L + idx)
  order = jnp.argsort(key, axis=-1)
  return jnp.take_along_axis(idx, order, -1), jnp.take_along_axis(ok, order, -1)


def h2o(cache: KVCache, scores, *, budget: int, room: int = 0) -> KVCache:
  """H2O eviction (K/2 heavy hitters + K/2 recent); returns the compressed cache (capacity ``budget + room``)."""
  index, valid = h2o_select(cache, scores, budget=budget)
  return gather(cache, index, valid, room=room)


# ------------------------------------------------------------------------------------------------ SnapKV family
def _check_snap(cache: KVCache, q_window, capacity, window, pool, keep_first, keep_last, name):
  _contiguous(cache, name)
  T, H, G = check_q(q_window, cache, name)
  window = static_int("window", window)
  if T != window:
    raise ValueError(f"{name}: q_window holds {T} queries but window is {window}")
  if window > cache.capacity:
    raise ValueError(f"{name}: window {window} is larger than the context (cache capacity {cache.capacity})")
  pool = _pool_size("pool", pool)
  keep_first = static_int("keep_first", keep_first, lo=0)
  keep_last = static_int("keep_last", keep_last, lo=0)
  capacity = _budget("capacity", capacity, cache)
  if capacity < keep_first + keep_last:
    raise ValueError(f"{name}: capacity {capacity} is below keep_first + keep_last = {keep_first + keep_last}")
  return capacity, pool, keep_first, keep_last, H, G


def _window_probs(q_window, cache: KVCache, scale):
  _, p = decode_with_probs(q_window, cache, scale=scale)  # [B, W, H, L]
  return p


def _forced(cache: KVCache, score, keep_first: int, keep_last: int):
  s, n = _slot_grid(cache)
  written = s < n
  forced = written & ((s < keep_first) | (s >= n - keep_last))
  return jnp.where(written, jnp.where(forced, jnp.inf, score), -jnp.inf)


def snapkv_scores(q_window, cache: KVCache, *, pool: int = 21, scale: float | None = None, reduce: str = "sum_mean"):
  """SnapKV importance ``[B, G, L_max]`` (before forcing): window probabilities summed over the window queries and
  averaged over the group (``reduce="sum_mean"``, SnapKV) or maxed over both (``"max"``, Ada-SnapKV), then
  average-pooled with kernel ``pool``."""
  _, _, G = check_q(q_window, cache, "snapkv_scores")
  p = _window_probs(q_window, cache, scale)
  if reduce == "sum_mean":
    imp = _reduce_group(jnp.sum(p, axis=1), G, "mean")
  elif reduce == "max":
    imp = _reduce_group(jnp.max(p, axis=1), G, "max")
  else:
    raise ValueError(f"reduce must be 'sum_mean' or 'max', got {reduce!r}")
  return avg_pool(imp, _pool_size("pool", pool))


def snapkv_select(q_window, cache: KVCache, *, capacity: int, window: int, pool: int = 21, keep_first: int = 4,
                  keep_last: int = 128, scale: float | None = None):
  """SnapKV selection ``(index, valid) [B, G, capacity]`` (see :func:`snapkv_compress`)."""
  capacity, pool, kf, kl, _, _ = _check_snap(cache, q_window, capacity, window, pool, keep_first, keep_last,
                                             "snapkv_compress")
  return _snap_select(q_window, cache, capacity, pool, kf, kl, resolve_scale(scale, q_window.shape[-1]))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _snap_select(q_window, cache, capacity, pool, kf, kl, scale):
  score = _forced(cache, snapkv_scores(q_window, cache, pool=pool, scale=scale), kf, kl)
  return _topk_sorted(score, capacity)


def snapkv_compress(q_window, cache: KVCache, *, capacity: int, window: int, pool: int = 21, keep_first: int = 4,
                    keep_last: int = 128, scale: float | None = None, room: int = 0) -> KVCache:
  """SnapKV compression after prefill (The Sparse Frontier's variant).

  ``q_window [B, window, H, D]`` are the queries of the last ``window`` prompt tokens (already in the cache).
  Importance of a key = its causal softmax probability summed over the window queries, averaged over the query
  heads of its group, average-pooled (kernel ``pool``, zero padding); the first ``keep_first`` and last
  ``keep_last`` tokens are always kept; the top ``capacity`` per kv head are kept.

  Raises:
    ValueError: capacity above the cache capacity or below ``keep_first + keep_last``, zero / negative budgets,
      an even pool, a window that does not match ``q_window``.
  """
  index, valid = snapkv_select(q_window, cache, capacity=capacity, window=window, pool=pool, keep_first=keep_first,
                               keep_last=keep_last, scale=scale)
  return gather(cache, index, valid, room=room)


def ada_snapkv_select(q_window, cache: KVCache, *, capacity: int, window: int, pool: int = 21,
                      keep_first: int = 4, keep_last: int = 128, min_ratio: float = 0.2,
                      scale: float | None = None):
  """Ada-SnapKV selection ``(index, valid) [B, G, C_max]`` with ``C_max = min(L_max, G * capacity - (G - 1) *
  m)`` and ``m = max(int(min_ratio * capacity), keep_first + keep_last)``: every kv head keeps its own top ``m``
  (forced tokens first), the remaining ``G * (capacity - m)`` slots go to the globally best scores across the kv
  heads of a sequence, so heads get different lengths (``valid.sum(-1)``)."""
  capacity, pool, kf, kl, _, G = _check_snap(cache, q_window, capacity, window, pool, keep_first, keep_last,
                                             "ada_snapkv_compress")
  if not isinstance(min_ratio, (int, float)) or isinstance(min_ratio, bool) or not 0 <= min_ratio <= 1:
    raise ValueError(f"min_ratio must be a number in [0, 1], got {min_ratio!r}")
  B, L, _, _, _ = cache.shape
  m = max(int(min_ratio * capacity), kf + kl)
  m = min(m, capacity)
  total = G * capacity
  c_max = min(L, total - (G - 1) * m)
  return _ada_select(q_window, cache, capacity, pool, kf, kl, m, c_max, resolve_scale(scale, q_window.shape[-1]))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7, 8))
def _ada_select(q_window, cache, capacity, pool, kf, kl, m, c_max, scale):
  B, L, G, _, _ = cache.shape
  total = G * capacity
  score = _forced(cache, snapkv_scores(q_window, cache, pool=pool, scale=scale, reduce="max"), kf, kl)
  # mandatory: each head's own top m
  if m:
    _, midx = jax.lax.top_k(score, m)
    mvals = jnp.take_along_axis(score, midx, -1)
    mand = jnp.zeros((B, G, L), bool).at[jnp.arange(B)[:, None, None], jnp.arange(G)[None, :, None], midx].set(
        mvals > -jnp.inf)
  else:
    mand = jnp.zeros((B, G, L), bool)
  rest = total - G * m
  chosen = mand
  if rest:
    flat = jnp.where(mand, -jnp.inf, score).reshape(B, G * L)
    gv, gi = jax.lax.top_k(flat, rest)
    extra = jnp.zeros((B, G * L), bool).at[jnp.arange(B)[:, None], gi].set(gv > -jnp.inf).reshape(B, G, L)
    chosen = chosen | extra
  return _topk_sorted(jnp.where(chosen, 0.0, -jnp.inf), c_max)


def ada_snapkv_compress(q_window, cache: KVCache, *, capacity: int, window: int, pool: int = 21,
                        keep_first: int = 4, keep_last: int = 128, min_ratio: float = 0.2,
                        scale: float | None = None, room: int = 0) -> KVCache:
  """Ada-SnapKV compression: SnapKV with importance maxed over the window and the group, and per-head budgets
  from a global top-k across kv heads (see :func:`ada_snapkv_select`). Total kept tokens per sequence is at most
  ``G * capacity``; the compressed cache has capacity ``C_max + room``."""
  index, valid = ada_snapkv_select(q_window, cache, capacity=capacity, window=window, pool=pool,
                                   keep_first=keep_first, keep_last=keep_last, min_ratio=min_ratio, scale=scale)
  return gather(cache, index, valid, room=room)


# -------------------------------------------------------------------------------------------------------- Quest
def quest_scores(q, page_min, page_max, *, share_pages: bool = True):
  """Quest page scores: ``sum_d max(q_d * min_d, q_d * max_d)`` (an upper bound of ``q . k`` inside the page).

  Args:
    q: ``[B, H, D]`` decode queries; page_min, page_max: ``[B, P, G, D]``.

  Returns:
    ``[B, G, P]`` (scores summed over each group's query heads) when ``share_pages``, else ``[B, H, P]``.
  """
  B, H, D = q.shape
  G = page_min.shape[2]
  qf = q.astype(jnp.float32)
  mn = jnp.repeat(page_min, H // G, axis=2)  # [B, P, H, D]
  mx = jnp.repeat(page_max, H // G, axis=2)
  a = qf[:, None] * mn
  b = qf[:, None] * mx
  # unwritten pages hold +/-inf: avoid inf * 0 = NaN (they are masked out by the caller anyway)
  s = jnp.sum(jnp.where(jnp.isnan(a) | jnp.isnan(b), -jnp.inf, jnp.maximum(a, b)), axis=-1)  # [B, P, H]
  s = jnp.transpose(s, (0, 2, 1))
  if share_pages:
    s = jnp.sum(s.reshape(B, G, H // G, -1), axis=2)
  return s


def quest_select(q, page_min, page_max, budget: int, *, page_size: int, lengths, share_pages: bool = True):
  """Quest decode-time page selection.

  Selects ``budget // page_size`` pages per kv head (``share_pages``: scores summed over the group's query heads)
  or per query head: always the current page (the one holding token ``lengths - 1``), then the pages of written
  tokens with the highest :func:`quest_scores`.

  Args:
    q: ``[B, 1, H, D]`` (or ``[B, H, D]``) the decode query; page_min / page_max: ``[B, P, G, D]`` (a cache's
      ``page_min`` / ``page_max``); budget: tokens, a positive multiple of ``page_size`` at most ``P * page_size``;
      lengths: ``[B]`` tokens in the cache.

  Returns:
    ``(pages, valid)`` ``[B, G|H, budget // page_size]`` int32 / bool, pages ascending.
  """
  if q.ndim == 4:
    if q.shape[1] != 1:
      raise ValueError(f"quest_select takes one decode query per sequence, got q of shape {q.shape}")
    q = q[:, 0]
  page_size = static_int("page_size", page_size)
  budget = static_int("budget", budget)
  B, P, G, D = page_min.shape
  if q.ndim != 3 or q.shape[0] != B or q.shape[2] != D or q.shape[1] % G:
    raise ValueError(f"quest_select: q must be [B={B}, H (multiple of {G}), D={D}], got {q.shape}")
  if budget % page_size:
    raise ValueError(f"quest_select: budget {budget} is not a multiple of page_size {page_size}")
  if budget > P * page_size:
    raise ValueError(f"quest_select: budget {budget} is larger than the context ({P} pages of {page_size})")
  return _quest(q, page_min, page_max, jnp.asarray(lengths, jnp.int32), budget // page_size, page_size,
                bool(share_pages))


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _quest(q, page_min, page_max, lengths, n: int, page_size: int, share_pages: bool):
  P = page_min.shape[1]
  s = quest_scores(q, page_min, page_max, share_pages=share_pages)
  pages = jnp.arange(P, dtype=jnp.int32)[None, None, :]
  lengths = lengths[:, None, None]
  written = pages * page_size < lengths
  current = pages == (lengths - 1) // page_size
  s = jnp.where(written, jnp.where(current, jnp.inf, s), -jnp.inf)
  return _topk_sorted(s, n)


def quest_key_mask(cache: KVCache, pages, valid):
  """``[B, G|H, L_max]`` bool: the slots of the selected pages."""
  return _quest_key_mask(pages, valid, cache.capacity // cache.page_size, cache.page_size)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _quest_key_mask(pages, valid, P: int, page_size: int):
  sel = jnp.zeros(pages.shape[:2] + (P,), bool)
  sel = sel.at[jnp.arange(pages.shape[0])[:, None, None], jnp.arange(pages.shape[1])[None, :, None], pages].max(
      valid)
  return jnp.repeat(sel, page_size, axis=-1)


def quest_attend(q, cache: KVCache, budget: int, *, share_pages: bool = True, scale: float | None = None,
                 implementation="xla"):
  """Quest decode attention: selects pages with :func:`quest_select` from the cache's page bounds and attends
  ``q [B, 1, H, D]`` over their tokens (with ``share_pages`` and a :func:`jaxattn.decode_attention` backend name:
  that op's gathered form, reading only the selected pages). Returns ``(out [B, 1, H, E], pages, valid)``."""
  from jaxattn.cache.kv import attend
  if not cache.page_size:
    raise ValueError("quest_attend: the cache has no page metadata; init it with page_size > 0")
  _contiguous(cache, "quest_attend")
  pages, valid = quest_select(q, cache.page_min, cache.page_max, budget, page_size=cache.page_size,
                              lengths=cache.lengths, share_pages=share_pages)
  if share_pages and q.ndim == 4 and kv.decode_routable(implementation):  # sparse decode over the pages' tokens
    from jaxattn.ops.decode import decode_attention
    ps = cache.page_size
    index = (pages[..., None] * ps + jnp.arange(ps, dtype=jnp.int32)).reshape(*pages.shape[:2], -1)
    out = decode_attention(q[:, 0], cache.k, cache.v, lengths=cache.lengths, index=index,
                           index_valid=jnp.repeat(valid, ps, axis=-1), scale=scale, implementation=implementation)
    return out[:, None], pages, valid
  out = attend(q, cache, scale=scale, key_mask=quest_key_mask(cache, pages, valid), implementation=implementation)
  return out, pages, valid


# ------------------------------------------------------------------------------------- Recycled / RefreshKV top-K
def select_topk_from_probs(probs, k: int, *, num_kv_heads: int, pool: int = 7, gqa_reduce: str = "max",
                           lengths=None):
  """Recycled Attention's selection: ``probs [B, H, S]`` (one query's probability row per head) reduced over each
  kv head's group (``gqa_reduce``), max-pooled (kernel ``pool``, centred, ``-inf`` padding), then the top ``k``
  written slots (``< lengths``, default all) per kv head. Returns ``(index, valid) [B, G, k]`` and the pooled score
  ``[B, G, S]``."""
  k = static_int("k", k)
  pool = _pool_size("pool", pool)
  G = static_int("num_kv_heads", num_kv_heads)
  B, H, S = probs.shape
  if H % G:
    raise ValueError(f"probs has {H} heads, not a multiple of num_kv_heads {G}")
  if k > S:
    raise ValueError(f"k {k} is larger than the context ({S} keys)")
  if gqa_reduce not in _REDUCE:
    raise ValueError(f"gqa_reduce must be one of {_REDUCE}, got {gqa_reduce!r}")
  if lengths is None:
    lengths = jnp.full((B,), S, jnp.int32)
  return _select_topk(probs, jnp.asarray(lengths, jnp.int32), k, G, pool, gqa_reduce)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _select_topk(probs, lengths, k: int, G: int, pool: int, gqa_reduce: str):
  S = probs.shape[-1]
  score = max_pool(_reduce_group(probs.astype(jnp.float32), G, gqa_reduce), pool)
  score = jnp.where(jnp.arange(S)[None, None, :] < lengths[:, None, None], score, -jnp.inf)
  index, valid = _topk_sorted(score, k)
  return index, valid, score


__all__ = [
    "streaming_llm", "streaming_llm_select", "h2o", "h2o_select", "h2o_scores", "attention_scores",
    "snapkv_scores", "snapkv_select", "snapkv_compress", "ada_snapkv_select", "ada_snapkv_compress", "quest_scores",
    "quest_select", "quest_key_mask", "quest_attend", "select_topk_from_probs", "max_pool", "avg_pool", "visible",
]
