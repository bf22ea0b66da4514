"""One comparison every softmax implementation runs: outputs, lse and all gradients against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import testing


def make_inputs(seed, *, B, T, S, H, G, D, E=None, dtype=jnp.float32, num_segments=None, bias_shape=None):
  """Random q, k, v, (q_ids, kv_ids) with ``num_segments`` ids (sorted, so documents), and a bias."""
  rng = np.random.default_rng(seed)
  q, k, v = testing.random_qkv(jax.random.key(seed), B=B, T=T, S=S, H=H, G=G, D=D, E=E, dtype=dtype)
  seg = None
  if num_segments:
    seg = (jnp.asarray(np.sort(rng.integers(0, num_segments, (B, T)), axis=1), jnp.int32),
           jnp.asarray(np.sort(rng.integers(0, num_segments, (B, S)), axis=1), jnp.int32))
  bias = None if bias_shape is None else jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
  return q, k, v, seg, bias


def check_against_reference(impl, q, k, v, *, mask=None, segment_ids=None, bias=None, logits_soft_cap=None,
                            block_sizes=None, grads=True, seed=0):
  """Asserts ``impl`` equals the reference in out, lse, dq, dk, dv (and dbias) within the tolerance table."""
  kw = dict(mask=mask, segment_ids=segment_ids, logits_soft_cap=logits_soft_cap, return_lse=True)

  def run(name, q, k, v, bias):
    extra = {"block_sizes": block_sizes} if name != "reference" else {}
    return jaxattn.softmax_attention(q, k, v, bias=bias, implementation=name, **kw, **extra)

  out, lse = run(impl, q, k, v, bias)
  ref_out, ref_lse = run("reference", q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), bias)
  assert out.dtype == q.dtype and out.shape == ref_out.shape
  assert lse.dtype == jnp.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
  testing.assert_close(out, ref_out, dtype=q.dtype, name=f"{impl} out")
  testing.assert_close(lse, ref_lse, dtype=q.dtype, name=f"{impl} lse")
  if not grads:
    return
  rng = np.random.default_rng(seed + 1)
  w_out = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  w_lse = jnp.asarray(rng.normal(size=lse.shape), jnp.float32)

  def loss(name, q, k, v, bias):
    o, l = run(name, q, k, v, bias)
    return jnp.sum(o.astype(jnp.float32) * w_out) + jnp.sum(jnp.where(jnp.isfinite(l), l * w_lse, 0.0))

  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  got = jax.grad(lambda *a: loss(impl, *a), argnums)(q, k, v, bias)
  want = jax.grad(lambda *a: loss("reference", *a), argnums)(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), bias)
  for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
    testing.assert_close(g, w, dtype=q.dtype, kind="grad", name=f"{impl} {name}")
