"""``implementation="xla"``: decode attention as an online softmax over key chunks (the CPU default).

Dense: ``lax.scan`` over chunks of ``chunk`` keys sliced from the cache in place (the last chunk is shifted back to
end at ``L`` and masks the keys the previous chunk already covered, so the cache is never padded or copied).
Gathered: the same scan over chunks of index entries, each gathering its keys (``k[b, index[b, g, j], g]``); a
position listed twice counts once. Per step ``O(B * H * chunk)`` memory: ``[B, H, L]`` is never built unless the
probabilities are asked for. Statistics: a second chunked pass from the log-sum-exp
(:func:`jaxattn.ops.decode.common.stats_pass`). Plain JAX, differentiated by JAX (``autodiff``; reverse mode
through the scans keeps one chunk's intermediates per step).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxattn.backend import Backend
from jaxattn.ops.decode.common import (group_q, dense_allowed, entry_allowed, first_occurrence, logits_chunk,
                                       stats_pass)
from jaxattn.ops.decode.config import DecodeCall, XlaConfig, check_positive_int

_F32 = jnp.float32


def _online(carry, s, ok, vc):
  """One online-softmax step: ``s [B, G, R, C]`` logits, ``ok [B, G, C]``, ``vc [B, G, C, E]``."""
  acc, m, l = carry
  s = jnp.where(ok[:, :, None, :], s, -jnp.inf)
  vs = jnp.where(jnp.isfinite(vc), vc, jnp.zeros((), vc.dtype))
  m_new = lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1)))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp(m - m_safe)
  p = jnp.where(ok[:, :, None, :], jnp.exp(s - m_safe[..., None]), 0.0)
  l = alpha * l + jnp.sum(p, axis=-1)
  pv = jnp.einsum("bgrc,bgce->bgre", p.astype(vs.dtype) if vs.dtype != _F32 else p, vs,
                  preferred_element_type=_F32, precision=lax.Precision.HIGHEST if vs.dtype == _F32 else None)
  return alpha[..., None] * acc + pv, m_new, l


def decode_xla(q, k, v, lengths, valid, index, entry_valid, *, scale: float, chunk: int):
  """``(out [B, H, E] in q's dtype, lse [B, H] f32)`` by the chunked online softmax."""
  B, H, D = q.shape
  _, L, G, E = v.shape
  R = H // G
  qg, pq = group_q(q, G)
  init = (jnp.zeros((B, G, R, E), _F32), jnp.full((B, G, R), -jnp.inf, _F32), jnp.zeros((B, G, R), _F32))
  if index is not None:
    K = index.shape[-1]
    C = max(1, min(chunk, K))
    n = -(-K // C)
    ok = entry_allowed(index, entry_valid, lengths, valid)
    ok = first_occurrence(index, ok)
    idx = jnp.pad(jnp.clip(index, 0, L - 1), ((0, 0), (0, 0), (0, n * C - K)))
    ok = jnp.pad(ok, ((0, 0), (0, 0), (0, n * C - K)))
    b = jnp.arange(B)[:, None, None]
    g = jnp.arange(G)[None, :, None]

    def body(carry, c):
      ic = lax.dynamic_slice_in_dim(idx, c * C, C, axis=2)
      oc = lax.dynamic_slice_in_dim(ok, c * C, C, axis=2)
      kc, vc = k[b, ic, g], v[b, ic, g]  # [B, G, C, D|E]
      return _online(carry, logits_chunk(qg, pq, kc, vc, scale), oc, vc), None
  else:
    C = max(1, min(chunk, L))
    n = -(-L // C)

    def body(carry, c):
      start = jnp.minimum(c * C, L - C)
      pos = start + jnp.arange(C, dtype=jnp.int32)
      ok = dense_allowed(lengths, valid, pos, G) & (pos >= c * C)[None, None, :]  # overlap counted once
      kc = jnp.transpose(lax.dynamic_slice_in_dim(k, start, C, axis=1), (0, 2, 1, 3))
      vc = jnp.transpose(lax.dynamic_slice_in_dim(v, start, C, axis=1), (0, 2, 1, 3))
      return _online(carry, logits_chunk(qg, pq, kc, vc, scale), ok, vc), None

  (acc, m, l), _ = lax.scan(body, init, jnp.arange(n))
  ok = l != 0
  out = acc * jnp.where(ok, 1.0 / jnp.where(ok, l, 1.0), 0.0)[..., None]
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  lse = jnp.where(ok, m_safe + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf)
  return out.reshape(B, H, E).astype(q.dtype), lse.reshape(B, H)


def with_stats(call: DecodeCall, chunk: int, args, out, lse):
  """``(out, stats or None)``: the statistics pass when ``call.stats`` asks for it."""
  if call.stats is None:
    return out, None
  q, k, v, lengths, valid, index, entry_valid = args
  return out, stats_pass(q, k, v, lengths, valid, index, entry_valid, lse, scale=call.scale, kind=call.stats,
                         chunk=chunk)


class XlaBackend(Backend):
  """Chunked online softmax in plain JAX (dense or gathered); JAX differentiates it."""

  name = "xla"
  Config = XlaConfig
  autodiff = True

  def default_config(self, call: DecodeCall) -> XlaConfig:
    return XlaConfig(min(XlaConfig.chunk, max(call.K, call.S)))

  def validate_config(self, call: DecodeCall, config: XlaConfig) -> None:
    check_positive_int(f"xla: {type(config).__name__}", "chunk", config.chunk)

  def fwd(self, call: DecodeCall, config: XlaConfig, args):
    out, lse = decode_xla(*args, scale=call.scale, chunk=config.chunk)
    return with_stats(call, config.chunk, args, out, lse), args

  def bwd(self, call, config, residuals, cotangents, needs):
    raise NotImplementedError("the xla decode backend is differentiated by JAX directly (autodiff)")


BACKEND = XlaBackend()
