"""Helpers shared by the softmax kernel test files: inputs and a jitted (out, lse, grads) runner."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import testing


def inputs(seed, B, T, S, H, G, D, E, dtype=jnp.float32):
  q, k, v = testing.random_qkv(jax.random.key(seed), B=B, T=T, S=S, H=H, G=G, D=D, E=E, dtype=dtype)
  rng = np.random.default_rng(seed)
  w_out = jnp.asarray(rng.normal(size=(B, T, H, E)), jnp.float32)
  w_lse = jnp.asarray(rng.normal(size=(B, H, T)), jnp.float32)
  return q, k, v, w_out, w_lse


@functools.partial(jax.jit, static_argnames=("impl", "mask", "cap", "blocks"))
def run(q, k, v, seg, w_out, w_lse, *, impl, mask, cap, blocks):
  """(out, lse) and the gradients of a loss that uses both (so dlse is exercised)."""
  kw = dict(mask=mask, segment_ids=seg, logits_soft_cap=cap, return_lse=True, implementation=impl)
  if impl != "reference":
    kw["block_sizes"] = blocks

  def loss(q, k, v):
    o, l = jaxattn.softmax_attention(q, k, v, **kw)
    return jnp.sum(o.astype(jnp.float32) * w_out) + jnp.sum(jnp.where(jnp.isfinite(l), l * w_lse, 0.0)), (o, l)

  (_, (o, l)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
  return o, l, grads
