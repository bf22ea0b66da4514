"""``implementation="reference"``: the definition of ``decode_attention``, dense and in f32.

Builds the ``[B, G, L]`` boolean of attended keys (below the length, valid, and, in the gathered form, listed by a
valid entry), the ``[B, H, L]`` logits and probabilities, and reads the statistics off the probabilities (gathered:
at each entry's position). Differentiated by JAX directly (``autodiff``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxattn.backend import Backend
from jaxattn.ops.decode.common import HIGHEST, group_q, dense_allowed, entry_allowed
from jaxattn.ops.decode.config import DecodeCall
from jaxattn.ops.nonfinite import poison, sanitize
from pallas_kernels.decode.lists import scatter_key_mask

_F32 = jnp.float32


def decode_reference(q, k, v, lengths, valid, index, entry_valid, call: DecodeCall):
  """``(out [B, H, E], stats or None)`` by the definition (see :func:`jaxattn.ops.decode.api.decode_attention`)."""
  B, H, D = q.shape
  _, L, G, E = v.shape
  allowed = dense_allowed(lengths, valid, jnp.arange(L, dtype=jnp.int32), G)  # [B, G, L]
  if index is not None:
    ok = entry_allowed(index, entry_valid, lengths, valid)
    allowed = allowed & scatter_key_mask(index, ok, L)
  qg, pq = group_q(q, G)
  (ks, bad_k), (vs, bad_v) = sanitize(k), sanitize(v)
  s = jnp.einsum("bgrd,blgd->bgrl", qg.astype(_F32), ks.astype(_F32), precision=HIGHEST) * call.scale
  s = s + pq + jnp.transpose(poison(bad_k | bad_v), (0, 2, 1))[:, :, None, :]
  s = jnp.where(allowed[:, :, None, :], s, -jnp.inf)
  m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(m == -jnp.inf, 0.0, m)
  e = jnp.where(allowed[:, :, None, :], jnp.exp(s - m), 0.0)
  den = jnp.sum(e, axis=-1, keepdims=True)
  p = jnp.where(allowed[:, :, None, :], e / jnp.where(den == 0, 1.0, den), 0.0)  # [B, G, R, L]
  out = jnp.einsum("bgrl,blge->bgre", p, vs.astype(_F32), precision=HIGHEST).reshape(B, H, E).astype(q.dtype)
  if call.stats is None:
    return out, None
  if index is not None:
    ok = entry_allowed(index, entry_valid, lengths, valid)
    p = jnp.take_along_axis(p, jnp.clip(index, 0, L - 1)[:, :, None, :], axis=-1)  # [B, G, R, K]
    p = jnp.where(ok[:, :, None, :], p, 0.0)
  if call.stats == "probs":
    return out, p.reshape(B, H, p.shape[-1])
  return out, jnp.sum(p, axis=2)


class ReferenceBackend(Backend):
  """Dense f32 definition; JAX differentiates it."""

  name = "reference"
  autodiff = True

  def fwd(self, call: DecodeCall, config, args):
    return decode_reference(*args, call), args

  def bwd(self, call, config, residuals, cotangents, needs):
    raise NotImplementedError("the reference is differentiated by JAX directly (autodiff)")


BACKEND = ReferenceBackend()
