"""Split-K decode attention for GPUs (flash-decoding): Pallas kernels with the Triton lowering, and the combine.

One query token per sequence. Grid ``(B, G, num_splits)``: program ``(b, g, s)`` holds the ``R = H // G`` query
heads of kv head ``g`` as one ``[Rp, Dp]`` tile (rows padded to a power of two >= 16 for ``tl.dot``; K / V are read
once per kv head, never repeated per query head) and walks the ``s``-th contiguous chunk of ``per =
ceil(NB / num_splits)`` entries of its block list ``blocks[b, g, :counts[b, g]]`` with ``lax.fori_loop``, slicing
K / V with ``pl.ds`` (the Triton backend cannot scalar-prefetch). Each program writes its partial online-softmax
state ``(acc [Rp, Ep], m [Rp], l [Rp])`` (f32); :func:`combine` merges the splits in XLA (the flash-decoding
reduction) into ``out`` and ``lse``. Splitting the key axis keeps the GPU busy when ``B * G`` is small (a single
sequence of a long cache) where one program per (b, g) would leave most SMs idle.

Masking inside a visited block: keys at or past ``lengths[b]`` and, with a key mask, keys whose mask is 0. A key
whose k or v row has a non-finite entry adds NaN to its logit (so it reaches only the rows that attend it), masked
logits become ``-inf`` with ``where``, non-finite v entries are zeroed before ``p @ v``. A row with no allowed key
gets output 0 and lse ``-inf``.

Copies: ``L`` is zero-padded to a multiple of ``block_k`` and the head dims to powers of two >= 16 only when they
are not already (cache capacities and head dims usually are).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import MAX_HEAD_DIM, NN, NT, is_pow2, next_pow2, padded_head_dim
from pallas_kernels.decode.lists import fetch_order

__all__ = ["block_rule", "decode_partials", "combine", "decode_attention", "MAX_HEAD_DIM"]

_F32 = jnp.float32


def block_rule(b) -> str | None:
  """None if ``b`` can be the key block (a power of two >= 16), else the rule it breaks."""
  if not isinstance(b, int) or isinstance(b, bool) or b < 16 or not is_pow2(b):
    return "must be a power of two >= 16"
  return None


def _dot(a, b, dims):
  prec = lax.Precision.HIGHEST if a.dtype == _F32 else None
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=_F32)


def _finite(x):
  return jnp.abs(x.astype(_F32)) < jnp.inf


def _kernel(q_ref, k_ref, v_ref, fetch_ref, meta_ref, km_ref, acc_ref, m_ref, l_ref, *, per: int, bk: int,
            scale: float):
  split = pl.program_id(2)
  count, length = meta_ref[0], meta_ref[1]
  start = split * per
  end = jnp.maximum(jnp.minimum(start + per, count), start)
  q = q_ref[...]  # [Rp, Dp]
  rp = q.shape[0]

  def body(n, carry):
    acc, m, l = carry
    col0 = pl.multiple_of(fetch_ref[n] * bk, bk)
    ks = pl.ds(col0, bk)
    k, v = k_ref[ks, :], v_ref[ks, :]  # [bk, Dp], [bk, Ep]
    s = _dot(q, k, NT) * scale  # [Rp, bk]
    keep = col0 + lax.broadcasted_iota(jnp.int32, (bk,), 0) < length
    if km_ref is not None:
      keep = keep & (km_ref[ks] != 0)
    bad = jnp.maximum(jnp.max(jnp.where(_finite(k), 0.0, 1.0), axis=1),
                      jnp.max(jnp.where(_finite(v), 0.0, 1.0), axis=1)) > 0  # [bk]
    s = jnp.where(keep[None, :], jnp.where(bad[None, :], jnp.nan, s), -jnp.inf)
    v = jnp.where(_finite(v), v, jnp.zeros((), v.dtype))
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing allowed yet: shift by 0, p = 0
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    l = alpha * l + p.sum(axis=-1)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, NN)
    return acc, m_new, l

  init = (jnp.zeros(acc_ref.shape, _F32), jnp.full((rp,), -jnp.inf, _F32), jnp.zeros((rp,), _F32))
  acc, m, l = lax.fori_loop(start, end, body, init)
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _pad(x, axis: int, size: int):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def decode_partials(q, k, v, blocks, counts, lengths, key_mask=None, *, block_k: int, scale: float,
                    num_splits: int, num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
  """The split kernel: per (b, g, split) the partial state over its chunk of the block list.

  Args: as :func:`decode_attention`.

  Returns:
    ``(acc [B, G, NS, Rp, Ep], m [B, G, NS, Rp], l [B, G, NS, Rp])`` f32 with ``NS = min(num_splits, NB)``
    (``m = -inf``, ``l = 0``, ``acc = 0`` for a split that saw no allowed key).
  """
  B, H, D = q.shape
  _, L, G, E = v.shape
  R = H // G
  rule = block_rule(block_k)
  if rule:
    raise ValueError(f"block_k={block_k} {rule}")
  if max(D, E) > MAX_HEAD_DIM:
    raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got D={D}, E={E}")
  bk = block_k
  nk = -(-L // bk)
  Lp = nk * bk
  NB = blocks.shape[-1]
  NS = max(1, min(int(num_splits), NB))
  per = -(-NB // NS)
  Rp, Dp, Ep = max(16, next_pow2(R)), padded_head_dim(D), padded_head_dim(E)
  fetch = fetch_order(blocks, counts, nk)
  meta = jnp.stack([jnp.clip(counts, 0, NB).astype(jnp.int32),
                    jnp.broadcast_to(jnp.clip(lengths, 0, L).astype(jnp.int32)[:, None], (B, G))], axis=-1)
  qp = _pad(_pad(q.reshape(B, G, R, D), 2, Rp), 3, Dp)
  kp = _pad(_pad(k, 1, Lp), 3, Dp)
  vp = _pad(_pad(v, 1, Lp), 3, Ep)
  km = None if key_mask is None else _pad(jnp.asarray(key_mask != 0, jnp.int8), 2, Lp)
  in_specs = [
      pl.BlockSpec((None, None, Rp, Dp), lambda b, g, s: (b, g, 0, 0)),
      pl.BlockSpec((None, Lp, None, Dp), lambda b, g, s: (b, 0, g, 0)),
      pl.BlockSpec((None, Lp, None, Ep), lambda b, g, s: (b, 0, g, 0)),
      pl.BlockSpec((None, None, NB), lambda b, g, s: (b, g, 0)),
      pl.BlockSpec((None, None, 2), lambda b, g, s: (b, g, 0)),
      None if km is None else pl.BlockSpec((None, None, Lp), lambda b, g, s: (b, g, 0)),
  ]
  out_specs = [
      pl.BlockSpec((None, None, None, Rp, Ep), lambda b, g, s: (b, g, s, 0, 0)),
      pl.BlockSpec((None, None, None, Rp), lambda b, g, s: (b, g, s, 0)),
      pl.BlockSpec((None, None, None, Rp), lambda b, g, s: (b, g, s, 0)),
  ]
  return pl.pallas_call(
      functools.partial(_kernel, per=per, bk=bk, scale=float(scale)),
      grid=(B, G, NS),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct((B, G, NS, Rp, Ep), _F32), jax.ShapeDtypeStruct((B, G, NS, Rp), _F32),
                 jax.ShapeDtypeStruct((B, G, NS, Rp), _F32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="jaxattn_decode_gpu",
  )(qp, kp, vp, fetch, meta, km)


def combine(acc, m, l, *, H: int, E: int, dtype):
  """Merges the splits' states (axis 2) -> ``(out [B, H, E] in dtype, lse [B, H] f32)``; NaN states stay NaN."""
  B, G = acc.shape[:2]
  R = H // G
  mx = jnp.max(m, axis=2)  # [B, G, Rp]
  m_safe = jnp.where(mx == -jnp.inf, 0.0, mx)
  w = jnp.exp(m - m_safe[:, :, None])  # [B, G, NS, Rp]; an empty split weighs exp(-inf) = 0
  lt = jnp.sum(w * l, axis=2)
  at = jnp.sum(w[..., None] * acc, axis=2)  # [B, G, Rp, Ep]
  ok = lt != 0
  inv = jnp.where(ok, 1.0 / jnp.where(ok, lt, 1.0), 0.0)
  out = (at * inv[..., None])[:, :, :R, :E].reshape(B, H, E).astype(dtype)
  lse = jnp.where(ok, m_safe + jnp.log(jnp.where(ok, lt, 1.0)), -jnp.inf)[:, :, :R].reshape(B, H)
  return out, lse


def decode_attention(q, k, v, blocks, counts, lengths, key_mask=None, *, block_k: int, scale: float,
                     num_splits: int = 1, num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
  """Decode attention over listed key blocks: the split kernel and the combine.

  Args:
    q: ``[B, H, D]``; k: ``[B, L, G, D]``; v: ``[B, L, G, E]`` (``H % G == 0``, head dims up to 256).
    blocks: int32 ``[B, G, NB]`` key blocks (of ``block_k``) to visit, first ``counts[b, g]`` valid (entries past
      the count are never read; everything is clipped to the cache).
    counts: int32 ``[B, G]``; lengths: int32 ``[B]`` (keys at or past it are masked).
    key_mask: None or bool / int ``[B, G, L]`` (nonzero = the key may be attended).
    block_k: keys per block, a power of two >= 16.
    scale: logit scale.
    num_splits: programs per (b, g) along the list (clamped to ``[1, NB]``).
    num_warps, num_stages: Triton launch parameters.
    interpret: Pallas interpret mode (CPU).

  Returns:
    ``out [B, H, E]`` in q's dtype and ``lse [B, H]`` f32 (natural log; ``-inf`` for a row with no allowed key).
  """
  acc, m, l = decode_partials(q, k, v, blocks, counts, lengths, key_mask, block_k=block_k, scale=scale,
                              num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                              interpret=interpret)
  return combine(acc, m, l, H=q.shape[1], E=v.shape[-1], dtype=q.dtype)
