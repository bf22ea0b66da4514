"""Recycled Attention / RefreshKV decoding: alternate full-attention steps (which refresh a top-K set of keys from
the step's probability row) with cheap partial steps over that set.

State (:class:`RecycledKVCache`, one per layer)::

    full       KVCache, capacity L_max          every token (C_f; appended at every step, which is equivalent to
                                                the paper's lazy "append what was decoded since the last full step")
    partial    compressed KVCache, capacity K + room   the recycled set C_p, gathered per kv head (positions/valid)
    score      [B, G, K + room] f32             pooled score of each partial slot from the last full step (+inf
                                                for tokens decoded since; -inf for empty slots)
    q_mean     [B, D] f32                       mean over heads of the last full step's query
    since_full int32 scalar                     decode steps since the last full step (prefill counts as one)

A decode step (:func:`recycled_decode_step`) appends the new token to ``full``, decides whether this step is full
and runs exactly one branch under ``jax.lax.cond``:

- full: dense attention over ``full`` with the probability row (:func:`jaxattn.cache.decode_with_probs`), then
  ``C_p = top-K(maxpool(reduce_group(probs)))`` (:func:`jaxattn.cache.select_topk_from_probs`);
- partial: the new token joins ``C_p`` (``evict=False``, Recycled Attention: appended in the ``room`` slots;
  ``evict=True``, RefreshKV: it replaces the slot with the lowest score, keeping ``|C_p| = K``), then attention over
  ``C_p`` only.

Schedules: ``"fixed"``: a full step every ``stride`` steps; ``"query_similarity"`` (RefreshKV): every ``qc_stride``
steps, a full step iff the cosine similarity between the head-mean of the current query and ``q_mean`` is below
``threshold``. ``lax.cond`` needs one predicate, so the decision is batch-wide: a full step when any sequence asks
for one. With ``evict=False`` a step is also full when the partial cache has no room left.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxattn.cache.kv import KVCache, resolve_scale, append, attend, decode_with_probs, gather, static_int
from jaxattn.cache.policies import select_topk_from_probs

SCHEDULES = ("fixed", "query_similarity")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RecycledKVCache:
  """The dual cache of Recycled Attention / RefreshKV (see the module docstring)."""
  full: KVCache
  partial: KVCache
  score: jax.Array  # [B, G, K + room] f32
  q_mean: jax.Array  # [B, D] f32
  since_full: jax.Array  # [] int32


def _refresh(full: KVCache, q, k: int, room: int, pool: int, gqa_reduce: str, scale):
  out, probs = decode_with_probs(q, full, scale=scale)
  G = full.shape[2]
  index, valid, pooled = select_topk_from_probs(probs[:, -1], k, num_kv_heads=G, pool=pool, gqa_reduce=gqa_reduce,
                                                lengths=full.lengths)
  partial = gather(full, index, valid, room=room)
  score = jnp.where(valid, jnp.take_along_axis(pooled, index, -1), -jnp.inf)
  score = jnp.pad(score, [(0, 0), (0, 0), (0, room)], constant_values=-jnp.inf)
  q_mean = jnp.mean(q[:, -1].astype(jnp.float32), axis=1)
  return out, partial, score, q_mean


def recycled_init(cache: KVCache, q_last, *, k: int, room: int = 0, pool: int = 7, gqa_reduce: str = "max",
                  scale: float | None = None) -> tuple[jax.Array, RecycledKVCache]:
  """Starts decoding after a prefill: the last prompt token's query ``q_last [B, 1, H, D]`` attends the full
  ``cache`` and its probability row selects the first ``C_p``. Returns ``(out [B, 1, H, E], state)``.

  Raises:
    ValueError: ``k`` not positive or above the capacity, bad ``pool`` / ``gqa_reduce``, or a compressed cache.
  """
  if cache.positions is not None or cache.valid is not None:
    raise ValueError("recycled_init needs an uncompressed cache")
  k = static_int("k", k)
  room = static_int("room", room, lo=0)
  if k > cache.capacity:
    raise ValueError(f"k {k} is larger than the context (cache capacity {cache.capacity})")
  if q_last.ndim != 4 or q_last.shape[1] != 1:
    raise ValueError(f"q_last must be [B, 1, H, D], got {q_last.shape}")
  if gqa_reduce not in ("max", "mean"):
    raise ValueError(f"gqa_reduce must be one of ('max', 'mean'), got {gqa_reduce!r}")
  pool = static_int("pool", pool)
  if pool % 2 == 0:
    raise ValueError(f"pool must be odd (a centred window), got {pool}")
  return _init(cache, q_last, k, room, pool, gqa_reduce, resolve_scale(scale, q_last.shape[-1]))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _init(cache, q_last, k, room, pool, gqa_reduce, scale):
  out, partial, score, q_mean = _refresh(cache, q_last, k, room, pool, gqa_reduce, scale)
  return out, RecycledKVCache(full=cache, partial=partial, score=score, q_mean=q_mean,
                              since_full=jnp.zeros((), jnp.int32))


def _insert(partial: KVCache, score, k_new, v_new, evict: bool):
  """The new token ``k_new [B, G, D]`` joins the partial cache (appended, or replacing the lowest-score slot)."""
  if not evict:
    slot = partial.lengths  # [B]
    C = partial.capacity
    new = append(partial, k_new, v_new)
    hit = jnp.arange(C)[None, None, :] == slot[:, None, None]
    return new, jnp.where(hit, jnp.inf, score)
  B, C, G, _ = partial.k.shape
  slot = jnp.argmin(score, axis=-1)  # [B, G]
  b = jnp.arange(B)[:, None]
  g = jnp.arange(G)[None, :]
  new = dataclasses.replace(
      partial,
      k=partial.k.at[b, slot, g].set(k_new.astype(partial.k.dtype)),
      v=partial.v.at[b, slot, g].set(v_new.astype(partial.v.dtype)),
      positions=partial.positions.at[b, slot, g].set(jnp.broadcast_to(partial.seen[:, None], (B, G))),
      valid=partial.valid.at[b, slot, g].set(True),
      seen=partial.seen + 1)
  return new, score.at[b, g, slot].set(jnp.inf)


def recycled_decode_step(state: RecycledKVCache, q, k_new, v_new, *, k: int, schedule: str = "fixed",
                         stride: int = 10, qc_stride: int = 5, threshold: float = 0.85, evict: bool = False,
                         pool: int = 7, gqa_reduce: str = "max", scale: float | None = None,
                         implementation="xla"):
  """One decode step. ``q [B, 1, H, D]``, ``k_new [B, G, D]``, ``v_new [B, G, E]`` belong to the new token.

  Args:
    k: the recycled set's size K (the same as at :func:`recycled_init`); the partial cache's capacity beyond it is
      the ``room`` given there.
    schedule: ``"fixed"`` (a full step every ``stride`` steps) or ``"query_similarity"`` (checked every
      ``qc_stride`` steps against ``threshold``).
    evict: RefreshKV's eviction (keep ``|C_p| = K + room`` by replacing the lowest-score slot) instead of growing.

  Returns:
    ``(out [B, 1, H, E], new_state, was_full)`` (``was_full`` a bool scalar).
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  stride = static_int("stride", stride)
  qc_stride = static_int("qc_stride", qc_stride)
  if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not -1 <= threshold <= 1:
    raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold!r}")
  k = static_int("k", k)
  room = state.partial.capacity - k
  if room < 0:
    raise ValueError(f"k {k} does not match the state's partial cache (capacity {state.partial.capacity})")
  if q.ndim != 4 or q.shape[1] != 1:
    raise ValueError(f"q must be [B, 1, H, D], got {q.shape}")
  B, _, G, D, E = state.full.shape
  if q.shape[0] != B or q.shape[3] != D or q.shape[2] % G:
    raise ValueError(f"q must be [B={B}, 1, H (multiple of {G}), D={D}], got {q.shape}")
  if k_new.shape != (B, G, D) or v_new.shape != (B, G, E):
    raise ValueError(f"k_new / v_new must be [B={B}, G={G}, {D}] / [.., {E}], got {k_new.shape} / {v_new.shape}")
  if gqa_reduce not in ("max", "mean"):
    raise ValueError(f"gqa_reduce must be one of ('max', 'mean'), got {gqa_reduce!r}")
  pool = static_int("pool", pool)
  if pool % 2 == 0:
    raise ValueError(f"pool must be odd (a centred window), got {pool}")
  return _step(state, q, k_new, v_new, k, schedule, stride, qc_stride, float(threshold), bool(evict), pool,
               gqa_reduce, resolve_scale(scale, D), implementation)


@functools.partial(jax.jit, static_argnums=tuple(range(4, 14)))
def _step(state, q, k_new, v_new, k, schedule, stride, qc_stride, threshold, evict, pool, gqa_reduce, scale,
          implementation):
  room = state.partial.capacity - k
  full = append(state.full, k_new, v_new)
  since = state.since_full + 1
  if schedule == "fixed":
    want = since >= stride
  else:
    qm = jnp.mean(q[:, 0].astype(jnp.float32), axis=1)
    cos = jnp.sum(qm * state.q_mean, -1) / jnp.maximum(
        jnp.linalg.norm(qm, axis=-1) * jnp.linalg.norm(state.q_mean, axis=-1), 1e-30)
    want = (since % qc_stride == 0) & jnp.any(cos < threshold)
  if not evict:
    want = want | jnp.any(state.partial.lengths >= state.partial.capacity)

  def full_step(_):
    out, partial, score, q_mean = _refresh(full, q, k, room, pool, gqa_reduce, scale)
    return out, partial, score, q_mean, jnp.zeros((), jnp.int32)

  def partial_step(_):
    partial, score = _insert(state.partial, state.score, k_new, v_new, evict)
    out = attend(q, partial, scale=scale, implementation=implementation)
    return out, partial, score, state.q_mean, since

  out, partial, score, q_mean, since = jax.lax.cond(want, full_step, partial_step, None)
  return out, RecycledKVCache(full=full, partial=partial, score=score, q_mean=q_mean, since_full=since), want
