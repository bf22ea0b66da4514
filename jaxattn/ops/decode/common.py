"""Pieces every decode backend shares: which keys a row attends, the statistics pass, and the no-gradient guard.

The statistics pass (:func:`stats_pass`) turns a backend's log-sum-exp ``lse [B, H]`` into the probability row or its
per-kv-head column sum with a second, chunked read of the keys (``p = exp(scale * q . k - lse)`` on the keys a row
attends, 0 elsewhere): memory per step ``O(B * H * chunk)``, so a column sum never builds ``[B, H, L]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn.ops.nonfinite import poison, sanitize

__all__ = ["entry_allowed", "first_occurrence", "dense_allowed", "stats_pass", "no_grad", "HIGHEST"]

HIGHEST = lax.Precision.HIGHEST
_F32 = jnp.float32


def _prec(dtype):
  return HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def entry_allowed(index, entry_valid, lengths, valid):
  """bool ``[B, G, K]``: the entries that name an attended key (valid entry, position ``< lengths[b]``, and, with a
  per-slot ``valid [B, L, G]``, a valid slot). Entries are in ``[0, L)`` where ``entry_valid``."""
  ok = entry_valid & (index < lengths[:, None, None])
  if valid is not None:
    B, G, _ = index.shape
    L = valid.shape[1]
    vt = jnp.transpose(valid, (0, 2, 1))  # [B, G, L]
    ok = ok & jnp.take_along_axis(vt, jnp.clip(index, 0, L - 1), axis=-1)
  return ok


def first_occurrence(index, ok):
  """bool ``[B, G, K]``: ``ok`` entries that are the first ``ok`` entry naming their position (a set: a position
  listed twice is attended once)."""
  key = jnp.where(ok, index, jnp.iinfo(jnp.int32).max)
  order = jnp.argsort(key, axis=-1, stable=True)
  srt = jnp.take_along_axis(key, order, axis=-1)
  dup = jnp.concatenate([jnp.zeros_like(srt[..., :1], bool), srt[..., 1:] == srt[..., :-1]], axis=-1)
  first_sorted = ~dup
  first = jnp.zeros(index.shape, bool)
  b, g = jnp.indices(index.shape[:2], sparse=True)
  first = first.at[b[..., None], g[..., None], order].set(first_sorted)
  return first & ok


def dense_allowed(lengths, valid, pos, G: int):
  """bool ``[B, G, C]``: the keys at positions ``pos [C]`` (int32) below ``lengths`` and valid."""
  ok = pos[None, None, :] < lengths[:, None, None]
  ok = jnp.broadcast_to(ok, (lengths.shape[0], G, pos.shape[0]))
  if valid is not None:
    ok = ok & jnp.transpose(jnp.take(valid, jnp.clip(pos, 0, valid.shape[1] - 1), axis=1), (0, 2, 1))
  return ok


def group_q(q, G: int):
  """``q [B, H, D]`` -> sanitized f32-ready ``[B, G, R, D]`` and its poison ``[B, G, R, 1]``."""
  B, H, D = q.shape
  qs, bad_q = sanitize(q)
  return qs.reshape(B, G, H // G, D), poison(bad_q).reshape(B, G, H // G, 1)


def logits_chunk(qg, pq, kc, vc, scale: float):
  """Logits ``[B, G, R, C]`` of the grouped queries against a key chunk ``kc [B, G, C, D]`` (``vc [B, G, C, E]``
  only poisons): a key with a non-finite k or v entry adds NaN."""
  kc, bad_k = sanitize(kc)
  _, bad_v = sanitize(vc)
  s = jnp.einsum("bgrd,bgcd->bgrc", qg, kc, preferred_element_type=_F32, precision=_prec(kc.dtype)) * scale
  return s + pq + poison(bad_k | bad_v)[:, :, None, :]


def stats_pass(q, k, v, lengths, valid, index, entry_valid, lse, *, scale: float, kind: str, chunk: int):
  """The probability row (``kind="probs"``: ``[B, H, L]`` dense, ``[B, H, K]`` gathered) or its column sum over
  each kv head's query heads (``"colsum"``: ``[B, G, L|K]``), f32, from ``lse [B, H]``; 0 on keys / entries not
  attended (an entry repeating a position reports that key's probability too)."""
  B, H, D = q.shape
  _, L, G, E = v.shape
  R = H // G
  qg, pq = group_q(q, G)
  lse_g = lse.reshape(B, G, R, 1)
  lse_g = jnp.where(lse_g == -jnp.inf, 0.0, lse_g)  # rows without keys: every p is masked (finite gradients)

  def probs(s, ok):  # s [B, G, R, C], ok [B, G, C]
    ok = ok[:, :, None, :]
    p = jnp.where(ok, jnp.exp(jnp.where(ok, s, -jnp.inf) - lse_g), 0.0)  # masked keys: exp(-inf), no overflow
    return p if kind == "probs" else jnp.sum(p, axis=2)

  if index is not None:
    K = index.shape[-1]
    C = max(1, min(chunk, K))
    n = -(-K // C)
    ok = entry_allowed(index, entry_valid, lengths, valid)
    idx = jnp.pad(jnp.clip(index, 0, L - 1), ((0, 0), (0, 0), (0, n * C - K)))
    ok = jnp.pad(ok, ((0, 0), (0, 0), (0, n * C - K)))
    b = jnp.arange(B)[:, None, None]
    g = jnp.arange(G)[None, :, None]

    def one(c):
      ic = lax.dynamic_slice_in_dim(idx, c * C, C, axis=2)
      oc = lax.dynamic_slice_in_dim(ok, c * C, C, axis=2)
      return probs(logits_chunk(qg, pq, k[b, ic, g], v[b, ic, g], scale), oc)

    out = lax.map(one, jnp.arange(n))  # [n, B, G, (R,) C]
    out = jnp.moveaxis(out, 0, -2).reshape(out.shape[1:-1] + (n * C,))[..., :K]
    return out.reshape(B, H, K) if kind == "probs" else out

  C = max(1, min(chunk, L))
  n = -(-L // C)
  shape = (B, G, R, L) if kind == "probs" else (B, G, L)

  def body(buf, c):
    start = jnp.minimum(c * C, L - C)  # the last chunk overlaps the previous one: it rewrites equal values
    pos = start + jnp.arange(C, dtype=jnp.int32)
    kc = jnp.transpose(lax.dynamic_slice_in_dim(k, start, C, axis=1), (0, 2, 1, 3))
    vc = jnp.transpose(lax.dynamic_slice_in_dim(v, start, C, axis=1), (0, 2, 1, 3))
    p = probs(logits_chunk(qg, pq, kc, vc, scale), dense_allowed(lengths, valid, pos, G))
    return lax.dynamic_update_slice_in_dim(buf, p, start, axis=buf.ndim - 1), None

  buf, _ = lax.scan(body, jnp.zeros(shape, _F32), jnp.arange(n))
  return buf.reshape(B, H, L) if kind == "probs" else buf


def no_grad(fn, *, op: str, implementation: str):
  """``fn`` (array arguments -> outputs) under a ``custom_vjp`` whose backward raises ``NotImplementedError``
  naming ``op`` and ``implementation`` (decode kernels are forward only)."""
  msg = (f"{op}: implementation {implementation!r} is forward only (decode is inference) and has no gradient; "
         f"use implementation='xla' or 'reference' to differentiate")

  @jax.custom_vjp
  def f(*args):
    return fn(*args)

  def f_fwd(*args):
    return fn(*args), None

  def f_bwd(_, ct):
    raise NotImplementedError(msg)

  f.defvjp(f_fwd, f_bwd)
  return f


def kernel_lists(args, L: int, G: int, block_k: int):
  """``(blocks, counts, key_mask or None)`` the decode kernels visit for the backend arguments ``args``
  (:mod:`pallas_kernels.decode.lists`): dense, every block below the length (the per-slot ``valid`` as the key
  mask); gathered, the distinct blocks of the attended entries and the key mask of their positions."""
  from pallas_kernels.decode import lists  # noqa: PLC0415 - kernels' helpers, needed by the kernel backends only
  _, _, _, lengths, valid, index, entry_valid = args
  if index is None:
    blocks, counts = lists.dense_lists(lengths, G, L, block_k)
    return blocks, counts, None if valid is None else jnp.transpose(valid, (0, 2, 1))
  ok = entry_allowed(index, entry_valid, lengths, valid)
  blocks, counts = lists.gathered_lists(index, ok, L, block_k)
  return blocks, counts, lists.scatter_key_mask(index, ok, L)
