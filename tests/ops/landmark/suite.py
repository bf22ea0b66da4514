"""Shared helpers for the landmark-attention tests: inputs, a jitted value-and-grad runner and the comparison."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import testing


def inputs(seed, B, T, H, G, D, E, dtype=jnp.float32):
  """q, k, v and fixed random cotangent weights for out and lse."""
  q, k, v = testing.random_qkv(seed, B=B, T=T, H=H, G=G, D=D, E=E, dtype=dtype)
  rng = np.random.default_rng(seed + 1)
  w_out = jnp.asarray(rng.normal(size=(B, T, H, E)), jnp.float32)
  w_lse = jnp.asarray(rng.normal(size=(B, H, T)), jnp.float32)
  return q, k, v, w_out, w_lse


@functools.partial(jax.jit, static_argnames=("impl", "block_size", "block_q", "block_k"))
def run(q, k, v, w_out, w_lse, *, impl, block_size, block_q=None, block_k=None):
  """(out, lse) and the gradients of a loss that uses both (so the lse cotangent is exercised)."""
  def loss(q, k, v):
    o, l = jaxattn.landmark_attention(q, k, v, block_size=block_size, return_lse=True, implementation=impl,
                                      block_q=block_q, block_k=block_k)
    return jnp.sum(o.astype(jnp.float32) * w_out) + jnp.sum(l * w_lse), (o, l)

  (_, (o, l)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
  return o, l, grads


def compare(impl, q, k, v, w_out, w_lse, *, block_size, block_q=None, block_k=None):
  """Asserts ``impl`` matches the f32 reference in out, lse, dq, dk, dv (at q's dtype's tolerance)."""
  out, lse, grads = run(q, k, v, w_out, w_lse, impl=impl, block_size=block_size, block_q=block_q, block_k=block_k)
  f32 = lambda x: x.astype(jnp.float32)
  r_out, r_lse, r_grads = run(f32(q), f32(k), f32(v), w_out, w_lse, impl="reference", block_size=block_size)
  assert out.dtype == q.dtype and out.shape == r_out.shape
  assert lse.dtype == jnp.float32 and lse.shape == r_lse.shape
  testing.assert_close(out, r_out, dtype=q.dtype, name=f"{impl} out")
  testing.assert_close(lse, r_lse, dtype=q.dtype, name=f"{impl} lse")
  for name, g, r, x in zip(("dq", "dk", "dv"), grads, r_grads, (q, k, v)):
    assert g.dtype == x.dtype and g.shape == x.shape
    testing.assert_close(g, r, dtype=q.dtype, kind="grad", name=f"{impl} {name}")
  return out, lse, grads
