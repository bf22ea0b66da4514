"""Mosaic TPU decode attention: one query token per sequence over the listed key blocks of a KV cache.

Grid ``(B, G, NB)``: program ``(b, g)`` holds the ``R = H // G`` query heads of kv head ``g`` as one ``[R, D]``
tile (GQA: each key block is read once per kv head, not once per query head) and walks, sequentially, its block
list. The lists are scalar-prefetched (SMEM, flat int32), like paged attention: step ``j``'s BlockSpec index map
reads block ``fetch[b, g, j]`` of K / V (and of the optional key mask), so only listed blocks are DMA'd; steps past
the count re-name the last listed block (:func:`pallas_kernels.decode.lists.fetch_order`), so the pipeline fetches
nothing new, and their body is skipped with ``pl.when``. Online softmax state ``m, l [R, 128]`` (lane-replicated)
and ``acc [R, E]`` in f32 VMEM scratch; the last step writes ``out [R, E]`` and ``lse``.

Masking inside a visited block: keys at or past ``lengths[b]`` (scalar-prefetched) and, with a key mask, keys whose
mask is 0. Non-finite inputs reach allowed keys only: a key whose k or v row has a non-finite entry adds NaN to its
logit (the row counts come from two ``ones @ bad^T`` matmuls, which yield them lane-oriented like the logits), masked
logits are replaced by ``-inf`` with ``where``, and non-finite v entries are zeroed before ``p @ v``. A row with no
allowed key gets output 0 and lse ``-inf``.

Layouts: ``k [B, L, G, D]`` with ``D % 128 == 0`` is read in place as ``[B, L, G * D]`` (block ``(block_k, D)`` at
column block ``g``); other head dims are transposed to ``[B, G, L, D]`` (a copy). ``L`` is zero-padded to a multiple
of ``block_k`` (a copy) unless it is one already. ``block_k`` is the lane dim of the logits: a multiple of 128, or
all of ``L``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import NT
from pallas_kernels.decode.lists import fetch_order
from pallas_kernels.softmax.tpu import lanes

__all__ = ["NUM_LANES", "block_rule", "decode_attention"]

NUM_LANES = 128
_F32 = jnp.float32


def block_rule(block_k, L: int) -> str | None:
  """None if ``block_k`` can tile the key axis of length ``L`` (a multiple of 128, or ``>= L``: then it covers the
  axis), else the rule it breaks."""
  if not isinstance(block_k, int) or isinstance(block_k, bool) or block_k < 1:
    return "must be a positive int"
  if block_k < L and block_k % NUM_LANES:
    return f"breaks the TPU (8, 128) tiling rule: it is the lane dim of the logits, so it must be a multiple of " \
           f"{NUM_LANES} or cover the whole key axis (L={L})"
  return None


def _bad_rows(x, R: int):
  """``[R, bk]`` f32: per key row of ``x [bk, F]`` its number of non-finite entries, replicated over R rows."""
  bad = jnp.where(jnp.abs(x.astype(_F32)) < jnp.inf, 0.0, 1.0)
  return lax.dot_general(jnp.ones((R, x.shape[-1]), _F32), bad, NT, preferred_element_type=_F32)


def _kernel(fetch_ref, counts_ref, lengths_ref, q_ref, k_ref, v_ref, *rest, G: int, NB: int, bk: int,
            scale: float, prec, has_mask: bool):
  if has_mask:
    mask_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
  else:
    mask_ref = None
    o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
  b, g, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  row = b * G + g

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, _F32)
    l_scr[...] = jnp.zeros(l_scr.shape, _F32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, _F32)

  @pl.when(j < counts_ref[row])
  def _step():
    q, k, v = q_ref[...], k_ref[...], v_ref[...]  # [R, D], [bk, D], [bk, E]
    R, E = q.shape[0], v.shape[-1]
    s = lax.dot_general(q, k, NT, preferred_element_type=_F32, precision=prec) * scale  # [R, bk]
    cols = fetch_ref[row * NB + j] * bk + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    keep = cols < lengths_ref[b]
    if mask_ref is not None:
      keep = keep & (mask_ref[...] != 0)  # [1, bk] broadcast over the heads
    poisoned = (_bad_rows(k, R) + _bad_rows(v, R)) > 0
    s = jnp.where(keep, jnp.where(poisoned, jnp.nan, s), -jnp.inf)
    v = jnp.where(jnp.abs(v.astype(_F32)) < jnp.inf, v, jnp.zeros((), v.dtype))
    m_prev, l_prev = m_scr[...], l_scr[...]  # [R, 128]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # nothing allowed yet: shift by 0, p = 0
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - lanes(m_safe, s.shape[1]))
    l_scr[...] = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
    m_scr[...] = m_next
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=_F32, precision=prec)
    acc_scr[...] = acc_scr[...] * lanes(alpha, E) + pv

  @pl.when(j == NB - 1)
  def _end():
    l = l_scr[...]
    ok = l != 0  # a NaN l (the row attends a non-finite input) keeps its NaN
    inv = jnp.where(ok, 1.0 / jnp.where(ok, l, 1.0), 0.0)
    o_ref[...] = (acc_scr[...] * lanes(inv, o_ref.shape[-1])).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(ok, m_scr[...] + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf)


def _pad_keys(x, Lp: int):
  L = x.shape[1]
  return x if Lp == L else jnp.pad(x, ((0, 0), (0, Lp - L), (0, 0), (0, 0)))


def _kv_operand(x, Lp: int, bk: int, G: int, NB: int, slot):
  """``x [B, L, G, F]`` as the kernel reads it, and the BlockSpec of its ``(bk, F)`` block at the fetched block."""
  B, _, _, F = x.shape
  x = _pad_keys(x, Lp)
  if F % NUM_LANES == 0:
    spec = pl.BlockSpec((None, bk, F), lambda b, g, j, fetch, *_: (b, fetch[slot(b, g, j)], g))
    return x.reshape(B, Lp, G * F), spec
  spec = pl.BlockSpec((None, None, bk, F), lambda b, g, j, fetch, *_: (b, g, fetch[slot(b, g, j)], 0))
  return x.transpose(0, 2, 1, 3), spec


def decode_attention(q, k, v, blocks, counts, lengths, key_mask=None, *, block_k: int, scale: float,
                     interpret=False, vmem_limit_bytes: int | None = None):
  """Decode attention over listed key blocks.

  Args:
    q: ``[B, H, D]``; k: ``[B, L, G, D]``; v: ``[B, L, G, E]`` (``H % G == 0``).
    blocks: int32 ``[B, G, NB]`` key blocks (of ``block_k``) to visit, first ``counts[b, g]`` valid (any values
      past the count; everything is clipped to the cache).
    counts: int32 ``[B, G]`` in ``[0, NB]``.
    lengths: int32 ``[B]``: keys at or past ``lengths[b]`` are masked.
    key_mask: None or bool / int ``[B, G, L]`` (nonzero = the key may be attended).
    block_k: keys per block (see :func:`block_rule`).
    scale: logit scale.
    interpret: False (Mosaic), True / ``pltpu.InterpretParams(...)`` (TPU interpret mode on CPU).
    vmem_limit_bytes: Mosaic's scoped VMEM limit (None: the compiler default).

  Returns:
    ``out [B, H, E]`` in q's dtype and ``lse [B, H]`` f32 (natural log; ``-inf`` for a row with no allowed key).
  """
  B, H, D = q.shape
  _, L, G, E = v.shape
  R = H // G
  rule = block_rule(block_k, L)
  if rule:
    raise ValueError(f"block_k={block_k} {rule}")
  bk = min(block_k, L)
  nk = -(-L // bk)
  Lp = nk * bk
  NB = blocks.shape[-1]
  if blocks.shape != (B, G, NB) or counts.shape != (B, G) or lengths.shape != (B,):
    raise ValueError(f"blocks / counts / lengths must be [B={B}, G={G}, NB] / [B, G] / [B], got {blocks.shape}, "
                     f"{counts.shape}, {lengths.shape}")
  fetch = fetch_order(blocks, counts, nk).reshape(-1)
  counts = jnp.clip(counts, 0, NB).astype(jnp.int32).reshape(-1)
  lengths = jnp.clip(lengths, 0, L).astype(jnp.int32)
  slot = lambda b, g, j: (b * G + g) * NB + j
  kk, k_spec = _kv_operand(k, Lp, bk, G, NB, slot)
  vk, v_spec = _kv_operand(v, Lp, bk, G, NB, slot)
  head = lambda b, g, j, *_: (b, g, 0, 0)
  in_specs = [pl.BlockSpec((None, None, R, D), head), k_spec, v_spec]
  operands = [q.reshape(B, G, R, D), kk, vk]
  if key_mask is not None:
    km = jnp.pad(jnp.asarray(key_mask != 0, jnp.int32), ((0, 0), (0, 0), (0, Lp - L)))
    in_specs.append(pl.BlockSpec((None, None, 1, bk), lambda b, g, j, fetch, *_: (b, g, 0, fetch[slot(b, g, j)])))
    operands.append(km[:, :, None, :])
  prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
  kernel = functools.partial(_kernel, G=G, NB=NB, bk=bk, scale=float(scale), prec=prec,
                             has_mask=key_mask is not None)
  out, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(B, G, NB), in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, R, E), head), pl.BlockSpec((None, None, R, NUM_LANES), head)],
          scratch_shapes=[pltpu.VMEM((R, NUM_LANES), _F32), pltpu.VMEM((R, NUM_LANES), _F32),
                          pltpu.VMEM((R, E), _F32)]),
      out_shape=[jax.ShapeDtypeStruct((B, G, R, E), q.dtype), jax.ShapeDtypeStruct((B, G, R, NUM_LANES), _F32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                           vmem_limit_bytes=vmem_limit_bytes),
      interpret=pltpu.InterpretParams() if interpret is True else (interpret or False),
      name="jaxattn_decode_tpu",
  )(fetch, counts, lengths, *operands)
  return out.reshape(B, H, E), lse[..., 0].reshape(B, H)
