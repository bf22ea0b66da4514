"""The ``KVCache`` pytree: contiguous per-sequence KV storage for batched decoding, with optional Quest page bounds.

Layout (the library's ``[batch, length, heads, dim]`` convention, as in :func:`jaxattn.softmax_attention`)::

    k          [B, L_max, G, D]   keys, slot-major
    v          [B, L_max, G, E]   values
    lengths    [B] int32          slots written so far (slot s of sequence b is in use iff s < lengths[b])
    seen       [B] int32          tokens ever appended (the position the next token gets); == lengths unless the
                                  cache was compressed by an eviction policy
    positions  [B, L_max, G] int32 or None   original token position held by each (slot, kv head); None: slot s
                                  holds position s (a contiguous cache)
    valid      [B, L_max, G] bool or None    per-(slot, kv head) validity inside the written slots; None: all
                                  written slots are valid. Compressed caches keep different tokens per kv head
                                  (and, for Ada-SnapKV, different numbers of them): their slots are gathered per head.
    page_size  static int         0, or the Quest page size; then ``L_max % page_size == 0`` is required and
    page_min / page_max [B, L_max // page_size, G, D] f32   hold the element-wise min / max of the written keys of
                                  each page (+inf / -inf for pages with no written key).

Queries attend the way decoding does: append the new tokens first, then ``attend`` with the ``T`` newest queries,
the query ``t`` sitting at position ``seen - T + t`` and seeing every valid key whose position is not later
(causal). A query with no visible key gets output 0, never NaN.

Capacity: ``prefill`` / ``append`` raise a ``ValueError`` when, with concrete (non-traced) lengths, a write would go
past ``L_max``. Under ``jit`` the lengths are traced and the check cannot run: tokens past the capacity are dropped
and ``lengths`` saturates at ``L_max`` (check ``lengths + T <= capacity`` yourself before such a call).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn._validation import FLOATS

_HI = jax.lax.Precision.HIGHEST


def _concrete(x) -> Optional[np.ndarray]:
  """``x`` as a numpy array when it is a concrete value, None when it is traced."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except Exception:  # noqa: BLE001 - any non-concrete array
    return None


def static_int(name: str, value, *, lo: int = 1) -> int:
  """``value`` as a Python int ``>= lo``; a ``ValueError`` naming ``name`` and the value otherwise."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be a static Python int, got {value!r} ({type(value).__name__})")
  if value < lo:
    raise ValueError(f"{name} must be >= {lo}, got {value}")
  return int(value)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """A batched KV cache (see the module docstring for the layout). Build with :func:`init`."""
  k: jax.Array  # [B, L_max, G, D]
  v: jax.Array  # [B, L_max, G, E]
  lengths: jax.Array  # [B] int32
  seen: jax.Array  # [B] int32
  positions: Optional[jax.Array] = None  # [B, L_max, G] int32
  valid: Optional[jax.Array] = None  # [B, L_max, G] bool
  page_min: Optional[jax.Array] = None  # [B, P, G, D] f32
  page_max: Optional[jax.Array] = None  # [B, P, G, D] f32
  page_size: int = dataclasses.field(default=0, metadata=dict(static=True))

  @property
  def capacity(self) -> int:
    return self.k.shape[1]

  @property
  def shape(self) -> tuple[int, int, int, int, int]:
    """``(B, L_max, G, D, E)``."""
    B, L, G, D = self.k.shape
    return B, L, G, D, self.v.shape[-1]

  def slot_positions(self) -> jax.Array:
    """``[B, L_max, G]`` int32: the original position of the token in each slot."""
    B, L, G, _ = self.k.shape
    if self.positions is not None:
      return self.positions
    return jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32)[None, :, None], (B, L, G))

  def slot_valid(self) -> jax.Array:
    """``[B, L_max, G]`` bool: the slots that hold a token (written and, for compressed caches, kept)."""
    B, L, G, _ = self.k.shape
    written = jnp.arange(L, dtype=jnp.int32)[None, :, None] < self.lengths[:, None, None]
    written = jnp.broadcast_to(written, (B, L, G))
    return written if self.valid is None else written & self.valid


def init(batch: int, capacity: int, num_kv_heads: int, head_dim: int, value_dim: int | None = None, *,
         dtype=jnp.float32, page_size: int = 0) -> KVCache:
  """An empty contiguous cache ``k [batch, capacity, num_kv_heads, head_dim]``.

  Args:
    page_size: 0 for no page metadata, else the Quest page size; it must divide ``capacity`` (pad the capacity up
      to a multiple: unwritten slots are never attended).

  Raises:
    ValueError: for non-positive sizes, a float dtype outside f32/bf16/f16, or a page size that does not divide
      the capacity, naming the value.
  """
  B = static_int("batch", batch)
  L = static_int("capacity", capacity)
  G = static_int("num_kv_heads", num_kv_heads)
  D = static_int("head_dim", head_dim)
  E = D if value_dim is None else static_int("value_dim", value_dim)
  P = static_int("page_size", page_size, lo=0)
  if jnp.dtype(dtype) not in FLOATS:
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {jnp.dtype(dtype)}")
  if P and L % P:
    raise ValueError(f"page_size {P} does not divide capacity {L}; round the capacity up to a multiple of {P} "
                     f"(the padding slots are never attended)")
  page_min = page_max = None
  if P:
    page_min = jnp.full((B, L // P, G, D), jnp.inf, jnp.float32)
    page_max = jnp.full((B, L // P, G, D), -jnp.inf, jnp.float32)
  zeros = jnp.zeros((B,), jnp.int32)
  return KVCache(k=jnp.zeros((B, L, G, D), dtype), v=jnp.zeros((B, L, G, E), dtype), lengths=zeros, seen=zeros,
                 page_min=page_min, page_max=page_max, page_size=P)


def _check_chunk(cache: KVCache, k, v, name: str) -> None:
  B, L, G, D, E = cache.shape
  for nm, x, last in (("k", k, D), ("v", v, E)):
    if x.ndim != 4 or x.shape[0] != B or x.shape[2] != G or x.shape[3] != last:
      raise ValueError(f"{name}: {nm} must have shape [B={B}, T, G={G}, {last}], got {x.shape}")
  if k.shape[1] != v.shape[1]:
    raise ValueError(f"{name}: k has {k.shape[1]} tokens but v has {v.shape[1]}")


def prefill(cache: KVCache, k, v, lengths=None) -> KVCache:
  """Appends a chunk ``k [B, T, G, D]``, ``v [B, T, G, E]`` (of which ``lengths[b]`` tokens are real, default all T).

  Chunks compose: prefilling chunk after chunk equals one prefill of their concatenation (per sequence, the real
  tokens of each chunk land right after the previous ones). Use it for decode steps too (``T = 1``, or
  :func:`append`).

  Raises:
    ValueError: for wrong shapes, ``lengths`` outside ``[0, T]``, or (concrete lengths only) a write past the
      capacity, naming the values.
  """
  _check_chunk(cache, k, v, "prefill")
  B, L, G, D, E = cache.shape
  T = k.shape[1]
  if lengths is None:
    n = jnp.full((B,), T, jnp.int32)
  else:
    n = jnp.asarray(lengths)
    if n.shape != (B,) or not jnp.issubdtype(n.dtype, jnp.integer):
      raise ValueError(f"prefill: lengths must be an int array of shape [{B}], got {n.shape} {n.dtype}")
    n = n.astype(jnp.int32)
    cn = _concrete(n)
    if cn is not None and (cn.min() < 0 or cn.max() > T):
      raise ValueError(f"prefill: lengths must lie in [0, T={T}], got {cn.tolist()}")
  cl, cn = _concrete(cache.lengths), _concrete(n)
  if cl is not None and cn is not None and np.any(cl + cn > L):
    raise ValueError(f"prefill: cache capacity {L} exceeded: lengths {cl.tolist()} + new tokens {cn.tolist()} "
                     f"(a cache used past its capacity; init a larger one)")
  return _prefill(cache, k, v, n)


@jax.jit
def _prefill(cache: KVCache, k, v, n) -> KVCache:
  B, L, G, D, E = cache.shape
  T = k.shape[1]
  t = jnp.arange(T, dtype=jnp.int32)[None, :]
  real = t < n[:, None]  # [B, T]
  slot = jnp.where(real, cache.lengths[:, None] + t, L)  # out of range => dropped
  b = jnp.arange(B)[:, None]
  new_k = cache.k.at[b, slot].set(k.astype(cache.k.dtype), mode="drop")
  new_v = cache.v.at[b, slot].set(v.astype(cache.v.dtype), mode="drop")
  upd = {}
  if cache.positions is not None:
    pos = jnp.broadcast_to((cache.seen[:, None] + t)[..., None], (B, T, G))
    upd["positions"] = cache.positions.at[b, slot].set(pos, mode="drop")
  if cache.valid is not None:
    upd["valid"] = cache.valid.at[b, slot].set(True, mode="drop")
  if cache.page_size:
    page = jnp.where(real, slot // cache.page_size, L)  # out of range => dropped
    kf = k.astype(jnp.float32)
    upd["page_min"] = cache.page_min.at[b, page].min(kf, mode="drop")
    upd["page_max"] = cache.page_max.at[b, page].max(kf, mode="drop")
  return dataclasses.replace(cache, k=new_k, v=new_v, lengths=jnp.minimum(cache.lengths + n, L),
                             seen=cache.seen + n, **upd)


def append(cache: KVCache, k, v) -> KVCache:
  """One decode step: ``k [B, G, D]`` / ``v [B, G, E]`` (or ``[B, 1, G, *]``) appended to every sequence."""
  if k.ndim == 3:
    k, v = k[:, None], v[:, None]
  return prefill(cache, k, v)


# ----------------------------------------------------------------------------------------------------- attention
def check_q(q, cache: KVCache, name: str) -> tuple[int, int, int]:
  B, L, G, D, _ = cache.shape
  if q.ndim != 4 or q.shape[0] != B or q.shape[3] != D:
    raise ValueError(f"{name}: q must have shape [B={B}, T, H, D={D}], got {q.shape}")
  H = q.shape[2]
  if H % G:
    raise ValueError(f"{name}: q has {H} heads, not a multiple of the cache's {G} kv heads")
  return q.shape[1], H, G


def visible(cache: KVCache, T: int, H: int, key_mask=None) -> jax.Array:
  """``[B, H, T, L_max]`` bool: which slots each of the ``T`` newest queries sees (valid and causal).

  Args:
    key_mask: optional extra selection, ``[B, G|H, L_max]`` bool (per kv head or per query head).
  """
  B, L, G, _, _ = cache.shape
  ok = cache.slot_valid()  # [B, L, G]
  pos = cache.slot_positions()
  qpos = cache.seen[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
  allowed = ok[:, None, :, :] & (pos[:, None, :, :] <= qpos[:, :, None, None])  # [B, T, L, G]
  allowed = jnp.repeat(jnp.transpose(allowed, (0, 3, 1, 2)), H // G, axis=1)  # [B, H, T, L]
  if key_mask is not None:
    if key_mask.shape[1] == G and G != H:
      key_mask = jnp.repeat(key_mask, H // G, axis=1)
    allowed = allowed & key_mask[:, :, None, :]
  return allowed


def resolve_scale(scale, D: int) -> float:
  from jaxattn._validation import validate_scale
  return validate_scale(scale, D)


def decode_with_probs(q, cache: KVCache, *, scale: float | None = None, key_mask=None):
  """Dense XLA attention of the ``T`` newest queries that also returns the probability rows.

  Args:
    q: ``[B, T, H, D]``, the queries of the last ``T`` appended tokens.
    key_mask: optional ``[B, G|H, L_max]`` bool selection (see :func:`visible`).

  Returns:
    ``out [B, T, H, E]`` in q's dtype and ``probs [B, T, H, L_max]`` f32 (0 on slots not seen; an all-zero row
    and output 0 for a query that sees no key).
  """
  T, H, G = check_q(q, cache, "decode_with_probs")
  return _decode_with_probs(q, cache, resolve_scale(scale, q.shape[-1]), key_mask)


@functools.partial(jax.jit, static_argnums=2)
def _decode_with_probs(q, cache: KVCache, sc: float, key_mask):
  T, H, G = q.shape[1], q.shape[2], cache.shape[2]
  allowed = visible(cache, T, H, key_mask)  # [B, H, T, L]
  kk = jnp.repeat(cache.k, H // G, axis=2).astype(jnp.float32)
  vv = jnp.repeat(cache.v, H // G, axis=2).astype(jnp.float32)
  s = jnp.einsum("bthd,blhd->bhtl", q.astype(jnp.float32), kk, precision=_HI) * sc
  s = jnp.where(allowed, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(allowed, jnp.exp(s - m), 0.0)
  den = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(den > 0, den, 1.0)
  out = jnp.einsum("bhtl,blhe->bthe", p, vv, precision=_HI)
  return out.astype(q.dtype), jnp.transpose(p, (0, 2, 1, 3))


def attend(q, cache: KVCache, *, scale: float | None = None, key_mask=None, implementation="xla"):
  """Attention of the ``T`` newest queries ``q [B, T, H, D]`` over the cache via :func:`jaxattn.softmax_attention`.

  Per-sequence lengths, per-head validity (compressed caches), causality within the chunk and an optional
  ``key_mask [B, G|H, L_max]`` selection become one boolean mask. A decode step (``T = 1``, a per-kv-head or no
  ``key_mask``, ``implementation`` a :func:`jaxattn.decode_attention` backend name or None) runs
  :func:`jaxattn.decode_attention` instead. Returns ``out [B, T, H, E]``.
  """
  check_q(q, cache, "attend")
  if q.dtype != cache.k.dtype:
    raise ValueError(f"attend: q dtype {q.dtype} differs from the cache's {cache.k.dtype}")
  return _attend(q, cache, key_mask, resolve_scale(scale, q.shape[-1]), implementation)


def decode_routable(implementation) -> bool:
  """Whether ``implementation`` names a :func:`jaxattn.decode_attention` backend (or None): then one-token steps
  run that op instead of ``softmax_attention``."""
  from jaxattn.ops.decode.api import BACKENDS
  return implementation is None or (isinstance(implementation, str) and implementation in BACKENDS)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _attend(q, cache: KVCache, key_mask, scale: float, implementation):
  from jaxattn.ops.softmax import softmax_attention
  T, H = q.shape[1], q.shape[2]
  G = cache.shape[2]
  if T == 1 and decode_routable(implementation) and (key_mask is None or key_mask.shape[1] == G):
    # One decode step: every written, valid slot holds an earlier position, so visible() is slot_valid() (& key_mask).
    from jaxattn.ops.decode import decode_attention
    valid = cache.valid
    if key_mask is not None:
      km = jnp.transpose(key_mask, (0, 2, 1))
      valid = km if valid is None else valid & km
    return decode_attention(q[:, 0], cache.k, cache.v, lengths=cache.lengths, valid=valid, scale=scale,
                            implementation=implementation)[:, None]
  return softmax_attention(q, cache.k, cache.v, mask=visible(cache, T, H, key_mask), scale=scale,
                           implementation=implementation)


def gather(cache: KVCache, index, valid, *, room: int = 0) -> KVCache:
  """A compressed cache keeping, per (sequence, kv head), the slots ``index [B, G, C]`` where ``valid [B, G, C]``.

  The result has capacity ``C + room`` (``room`` free slots for later decode steps), ``lengths = C`` (the kept
  slots; ``valid`` marks which of them hold a token), the original ``positions`` and the same ``seen``. Page
  metadata is dropped (Quest works on uncompressed caches).
  """
  room = static_int("room", room, lo=0)
  B, L, G, D, E = cache.shape
  if index.shape != valid.shape or index.ndim != 3 or index.shape[:2] != (B, G):
    raise ValueError(f"gather: index and valid must have shape [B={B}, G={G}, C], got {index.shape}, {valid.shape}")
  return _gather(cache, index, valid, room)


@functools.partial(jax.jit, static_argnums=3)
def _gather(cache: KVCache, index, valid, room: int) -> KVCache:
  B = cache.shape[0]
  idx = jnp.transpose(index, (0, 2, 1)).astype(jnp.int32)  # [B, C, G]
  ok = jnp.transpose(valid, (0, 2, 1)) & jnp.take_along_axis(cache.slot_valid(), idx, axis=1)
  k = jnp.take_along_axis(cache.k, idx[..., None], axis=1)
  v = jnp.take_along_axis(cache.v, idx[..., None], axis=1)
  pos = jnp.take_along_axis(cache.slot_positions(), idx, axis=1)
  k = jnp.where(ok[..., None], k, 0).astype(cache.k.dtype)
  v = jnp.where(ok[..., None], v, 0).astype(cache.v.dtype)
  pos = jnp.where(ok, pos, -1)

  def pad(x, fill):
    return jnp.pad(x, [(0, 0), (0, room)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)

  return KVCache(k=pad(k, 0), v=pad(v, 0), lengths=jnp.full((B,), index.shape[2], jnp.int32), seen=cache.seen,
                 positions=pad(pos, -1), valid=pad(ok, False))
