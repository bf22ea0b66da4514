"""Cache policies as settings objects, for decoding modules that own their cache (:class:`jaxattn.nn.MultiHeadAttention`).

A policy turns the pure functions of :mod:`jaxattn.cache.policies` into a per-step rule over a full-capacity,
contiguous cache: it keeps a small state (``keep [B, G, L]`` bool: the slots the policy retains per kv head, and
``scores [B, G, L]`` f32 where it accumulates attention), and

- after every prefill call (``T > 1`` new tokens, attended densely) :meth:`CachePolicy.after_prefill` updates the
  state from the prompt's queries (SnapKV, Ada-SnapKV and H2O select here);
- every decode step (``T == 1``) :meth:`CachePolicy.decode` attends the new query over the retained slots and
  updates the state (StreamingLLM's window moves, H2O evicts, Quest picks pages, Recycled Attention re-selects).

The retained set is applied as a key mask, so outputs are exactly those of a cache that evicted the other slots
(an evicted slot never comes back), while the buffer keeps its full capacity: this is for measuring what a policy
does to a model's outputs. To actually shrink the storage, use :func:`jaxattn.cache.snapkv_compress` and friends
on a :class:`jaxattn.cache.KVCache`.

=====================  =================================================================================
policy                 rule
=====================  =================================================================================
``Dense()``            every written slot (the module's behaviour without a policy)
``StreamingLLM``       ``sinks`` first tokens + the ``window`` most recent (the new token included)
``H2O``                ``budget // 2`` heavy hitters by attention accumulated since the prompt + the rest
                       most recent; an evicted slot stays evicted
``SnapKV``             after the prompt: the top ``capacity`` keys per kv head by the last ``window``
                       queries' pooled attention (first / last tokens forced); every generated token kept
``AdaSnapKV``          SnapKV with per-head budgets from a global top-k (same total ``G * capacity``)
``Quest``              per step, the ``budget // page_size`` pages with the highest key-bound score
``Recycled``           a dense step every ``stride`` steps re-selects the top ``k`` keys from its attention;
                       steps in between attend those plus every token generated since
=====================  =================================================================================
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxattn.cache import policies
from jaxattn.cache.kv import KVCache, attend, decode_with_probs, static_int

__all__ = ["CachePolicy", "Dense", "StreamingLLM", "H2O", "SnapKV", "AdaSnapKV", "Quest", "Recycled",
           "contiguous_view", "PolicyState"]

PolicyState = dict  # {"keep": [B, G, L] bool, "scores": [B, G, L] f32, "step": [] int32}


def contiguous_view(k, v, n, page_size: int = 0) -> KVCache:
  """A :class:`KVCache` over a contiguous buffer ``k [B, L, G, D]``, ``v [B, L, G, E]`` whose first ``n`` (int32
  scalar or ``[B]``) slots are written; with ``page_size`` the Quest page bounds are computed from the keys."""
  B, L, G, D = k.shape
  lengths = jnp.broadcast_to(jnp.asarray(n, jnp.int32), (B,))
  page_min = page_max = None
  if page_size:
    written = (jnp.arange(L)[None, :] < lengths[:, None]).reshape(B, L // page_size, page_size, 1, 1)
    kp = k.astype(jnp.float32).reshape(B, L // page_size, page_size, G, D)
    page_min = jnp.min(jnp.where(written, kp, jnp.inf), axis=2)
    page_max = jnp.max(jnp.where(written, kp, -jnp.inf), axis=2)
  return KVCache(k=k, v=v, lengths=lengths, seen=lengths, page_min=page_min, page_max=page_max,
                 page_size=page_size)


def _as_mask(index, valid, L: int):
  """``(index, valid) [B, G, C]`` -> ``[B, G, L]`` bool."""
  B, G, _ = index.shape
  b = jnp.arange(B)[:, None, None]
  g = jnp.arange(G)[None, :, None]
  return jnp.zeros((B, G, L), bool).at[b, g, index].max(valid)


def _slots(cache: KVCache):
  """``(slot [1, 1, L], n [B, 1, 1])``: slot ids and the written count."""
  L = cache.capacity
  return jnp.arange(L, dtype=jnp.int32)[None, None, :], cache.lengths[:, None, None]


class CachePolicy:
  """Base class: keeps every written slot. Subclasses are frozen dataclasses of static settings."""

  needs_pages: int = 0  # the page size a policy needs the view to carry (Quest)

  def validate(self, capacity: int, num_kv_heads: int) -> None:
    """Raises ``ValueError`` when the settings cannot work with a cache of ``capacity`` slots."""

  def init_state(self, batch: int, capacity: int, num_kv_heads: int) -> PolicyState:
    return {"keep": jnp.ones((batch, num_kv_heads, capacity), bool),
            "scores": jnp.zeros((batch, num_kv_heads, capacity), jnp.float32),
            "step": jnp.zeros((), jnp.int32)}

  def after_prefill(self, q, cache: KVCache, state: PolicyState, *, scale: float) -> PolicyState:
    """State after ``q [B, T, H, D]`` (the newest ``T`` tokens, already in ``cache``) were attended densely."""
    return state

  def decode(self, q, cache: KVCache, state: PolicyState, *, scale: float, implementation):
    """``q [B, 1, H, D]`` over the retained slots (the new token is in ``cache``) -> ``(out [B, 1, H, E], state)``."""
    return attend(q, cache, scale=scale, key_mask=state["keep"] | _new(cache), implementation=implementation), state


def _new(cache: KVCache):
  """``[B, 1, L]`` bool: the newest written slot (a decode step always sees its own token)."""
  s, n = _slots(cache)
  return s == n - 1


@dataclasses.dataclass(frozen=True)
class Dense(CachePolicy):
  """Every written slot: the same as no policy."""


@dataclasses.dataclass(frozen=True)
class StreamingLLM(CachePolicy):
  """Attention sinks + a recent window: ``sinks`` first tokens and the ``window`` most recent, per step."""

  window: int
  sinks: int = 4

  def validate(self, capacity, num_kv_heads):
    static_int("StreamingLLM.window", self.window)
    static_int("StreamingLLM.sinks", self.sinks, lo=0)

  def decode(self, q, cache, state, *, scale, implementation):
    s, n = _slots(cache)
    keep = (s < self.sinks) | (s >= n - self.window)
    return attend(q, cache, scale=scale, key_mask=keep, implementation=implementation), state


@dataclasses.dataclass(frozen=True)
class H2O(CachePolicy):
  """Heavy-hitter oracle: ``budget // 2`` slots with the highest attention accumulated from the prompt on, plus the
  ``budget - budget // 2`` most recent; an evicted slot never returns. Scores come from the dense probabilities of
  the prompt and of every decode step over the retained slots (the decode step runs XLA attention to get them)."""

  budget: int
  gqa_reduce: str = "max"

  def validate(self, capacity, num_kv_heads):
    b = static_int("H2O.budget", self.budget, lo=2)
    if b > capacity:
      raise ValueError(f"H2O.budget {b} is larger than the cache capacity {capacity}")
    if self.gqa_reduce not in ("max", "mean"):
      raise ValueError(f"H2O.gqa_reduce must be 'max' or 'mean', got {self.gqa_reduce!r}")

  def _evict(self, cache, state, scores):
    index, valid = policies.h2o_select(cache, jnp.where(state["keep"], scores, -jnp.inf), budget=self.budget)
    keep = _as_mask(index, valid, cache.capacity)
    return dict(state, keep=keep, scores=scores)

  def after_prefill(self, q, cache, state, *, scale):
    scores = state["scores"] + policies.attention_scores(q, cache, gqa_reduce=self.gqa_reduce, scale=scale)
    # the prompt's own tokens are all alive until the first eviction
    s, n = _slots(cache)
    return self._evict(cache, dict(state, keep=state["keep"] | (s < n)), scores)

  def decode(self, q, cache, state, *, scale, implementation):
    keep = state["keep"] | _new(cache)
    out, p = decode_with_probs(q, cache, scale=scale, key_mask=keep)  # p [B, 1, H, L]
    B, _, H, L = p.shape
    per_group = jnp.sum(p, axis=1).reshape(B, cache.shape[2], -1, L)  # [B, G, H // G, L]
    scores = state["scores"] + (jnp.max(per_group, 2) if self.gqa_reduce == "max" else jnp.mean(per_group, 2))
    return out, self._evict(cache, dict(state, keep=keep), scores)


@dataclasses.dataclass(frozen=True)
class SnapKV(CachePolicy):
  """SnapKV after the prompt (:func:`jaxattn.cache.snapkv_select`); tokens generated afterwards are all kept."""

  capacity: int
  window: int = 32
  pool: int = 7
  keep_first: int = 4
  keep_last: int = 32

  def validate(self, capacity, num_kv_heads):
    c = static_int(f"{type(self).__name__}.capacity", self.capacity)
    if c > capacity:
      raise ValueError(f"{type(self).__name__}.capacity {c} is larger than the cache capacity {capacity}")
    static_int(f"{type(self).__name__}.window", self.window)

  def _select(self, q_window, cache, scale):
    return policies.snapkv_select(q_window, cache, capacity=self.capacity, window=self.window, pool=self.pool,
                                  keep_first=self.keep_first, keep_last=self.keep_last, scale=scale)

  def after_prefill(self, q, cache, state, *, scale):
    if q.shape[1] < self.window:
      raise ValueError(f"{type(self).__name__}: the prompt chunk has {q.shape[1]} tokens, fewer than the "
                       f"observation window {self.window}")
    index, valid = self._select(q[:, -self.window:], cache, scale)
    s, n = _slots(cache)
    return dict(state, keep=_as_mask(index, valid, cache.capacity) | (s >= n))  # later tokens: kept


@dataclasses.dataclass(frozen=True)
class AdaSnapKV(SnapKV):
  """Ada-SnapKV after the prompt (:func:`jaxattn.cache.ada_snapkv_select`): per-head budgets, same total."""

  min_ratio: float = 0.2

  def _select(self, q_window, cache, scale):
    return policies.ada_snapkv_select(q_window, cache, capacity=self.capacity, window=self.window, pool=self.pool,
                                      keep_first=self.keep_first, keep_last=self.keep_last,
                                      min_ratio=self.min_ratio, scale=scale)


@dataclasses.dataclass(frozen=True)
class Quest(CachePolicy):
  """Quest: each decode step attends the ``budget // page_size`` pages (the current one first) with the highest
  upper bound of ``q . k`` from the pages' element-wise key min / max. ``page_size`` must divide the capacity."""

  budget: int
  page_size: int = 16
  share_pages: bool = True

  @property
  def needs_pages(self) -> int:  # type: ignore[override]
    return self.page_size

  def validate(self, capacity, num_kv_heads):
    P = static_int("Quest.page_size", self.page_size)
    b = static_int("Quest.budget", self.budget)
    if capacity % P:
      raise ValueError(f"Quest.page_size {P} does not divide the cache capacity {capacity}")
    if b % P or b > capacity:
      raise ValueError(f"Quest.budget {b} must be a multiple of page_size {P} and at most the capacity {capacity}")

  def decode(self, q, cache, state, *, scale, implementation):
    out, _, _ = policies.quest_attend(q, cache, self.budget, share_pages=self.share_pages, scale=scale,
                                      implementation=implementation)
    return out, state


@dataclasses.dataclass(frozen=True)
class Recycled(CachePolicy):
  """Recycled Attention (fixed schedule): every ``stride``-th decode step (the first included) attends densely and
  keeps the top ``k`` keys of its attention (max-pooled, kernel ``pool``; see
  :func:`jaxattn.cache.select_topk_from_probs`); the steps in between attend those ``k`` plus every token
  generated since the last dense step."""

  k: int
  stride: int = 10
  pool: int = 7
  gqa_reduce: str = "max"

  def validate(self, capacity, num_kv_heads):
    k = static_int("Recycled.k", self.k)
    static_int("Recycled.stride", self.stride)
    if k > capacity:
      raise ValueError(f"Recycled.k {k} is larger than the cache capacity {capacity}")

  def decode(self, q, cache, state, *, scale, implementation):
    G = cache.shape[2]
    s, n = _slots(cache)

    def full(state):
      out, p = decode_with_probs(q, cache, scale=scale)  # [B, 1, H, L]
      index, valid, _ = policies.select_topk_from_probs(p[:, 0], self.k, num_kv_heads=G, pool=self.pool,
                                                        gqa_reduce=self.gqa_reduce, lengths=cache.lengths)
      return out, _as_mask(index, valid, cache.capacity) | (s >= n)

    def partial(state):
      keep = state["keep"] | _new(cache)
      return attend(q, cache, scale=scale, key_mask=keep, implementation=implementation), keep

    out, keep = jax.lax.cond(state["step"] % self.stride == 0, full, partial, state)
    return out, dict(state, keep=keep, step=state["step"] + 1)

