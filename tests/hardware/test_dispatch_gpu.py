"""The op protocol on a real GPU: fallback when a kernel does not fit, explicit names that raise (issue 12 item 2).

On an H100/H200 the landmark dk/dv kernel at D=128, bf16, block 128 needed more shared memory than the card has (the
measurement in issue 13). Under ``implementation=None`` dispatch must either run it (once the tiles fit) or skip it
with one :class:`jaxattn.backend.FallbackWarning` naming the backend and the resource, and still return gradients
equal to the reference.
"""

import warnings

import jax
import jax.numpy as jnp
import pytest

import jaxattn
from jaxattn import backend, testing


def _loss(impl, block_size):
  def loss(q, k, v):
    return jnp.sum(jaxattn.landmark_attention(q, k, v, block_size=block_size, implementation=impl)
                   .astype(jnp.float32) ** 2)
  return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [64, 128])
def test_landmark_bf16_d128_falls_back_or_fits(block_size):
  q, k, v = testing.random_qkv(jax.random.key(0), B=1, T=2048, H=8, G=8, D=128, dtype=jnp.bfloat16)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    val, grads = _loss(None, block_size)(q, k, v)
  fallbacks = [w for w in caught if issubclass(w.category, backend.FallbackWarning)]
  for w in fallbacks:
    print("fallback:", w.message)
    assert "pallas_gpu" in str(w.message)
  f32 = lambda x: x.astype(jnp.float32)
  r_val, r_grads = _loss("xla", block_size)(f32(q), f32(k), f32(v))
  assert abs(float(val) - float(r_val)) <= 2e-2 * abs(float(r_val))
  for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
    testing.assert_no_nan(g, name)
    assert testing.relative_rms(g, r) <= 3e-2, name


@pytest.mark.gpu
def test_softmax_default_chain_on_gpu_matches_reference():
  q, k, v = testing.random_qkv(jax.random.key(1), B=2, T=1024, H=8, G=2, D=128, dtype=jnp.bfloat16)
  seg = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 256)[None].repeat(2, 0)
  f = lambda impl: jax.jit(jax.grad(lambda q, k, v: jnp.sum(jaxattn.softmax_attention(
      q, k, v, mask=jaxattn.masks.Causal(), segment_ids=seg, implementation=impl).astype(jnp.float32) ** 2),
      (0, 1, 2)))
  grads = f(None)(q, k, v)
  ref = f("reference")(*(x.astype(jnp.float32) for x in (q, k, v)))
  for g, r in zip(grads, ref):
    assert testing.relative_rms(g, r) <= 2e-2
