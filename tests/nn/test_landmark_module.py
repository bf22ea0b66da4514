"""NNX LandmarkAttention: training mode is the functional op on the projections; chunked decoding under nnx.jit with
top-k covering every block (exact positions) equals training mode; cache creation; bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn
from jaxattn import testing
from jaxattn.nn import LandmarkAttention, apply_rope


def _layer(**kw):
  return LandmarkAttention(4, 32, block_size=8, num_kv_heads=2, rngs=nnx.Rngs(0), **kw)


def test_training_mode_is_the_functional_op():
  layer = _layer()
  x = jax.random.normal(jax.random.key(1), (2, 30, 32))
  pos = jnp.arange(30)
  q, k, v = apply_rope(layer.query(x), pos), apply_rope(layer.key(x), pos), layer.value(x)
  expected = layer.out(jaxattn.landmark_attention(q, k, v, block_size=8, implementation="reference"))
  testing.assert_close(layer(x), expected, kind="grad")


def test_chunked_decoding_with_all_blocks_equals_training_mode():
  layer = _layer(top_k=16, positions="exact")
  x = jax.random.normal(jax.random.key(2), (2, 71, 32))
  full = layer(x)
  layer.init_cache(batch_size=2, mem_blocks=16)
  step = nnx.jit(lambda m, x: m(x, decode=True))
  outs = [step(layer, x[:, a:b]) for a, b in ((0, 35), (35, 70), (70, 71))]  # the last chunk: one token
  testing.assert_close(jnp.concatenate(outs, axis=1), full, kind="grad", name="decode vs training")
  cache = layer.cache
  assert int(cache.num_blocks) == 8 and int(cache.local_len) == 7
  assert cache.mem_k.shape == (2, 16, 8, 2, 8)
  # re-initialising resets the cache
  layer.init_cache(batch_size=2, mem_blocks=16)
  assert int(layer.cache.num_blocks) == 0 and not np.asarray(layer.cache.mem_k).any()


def test_bad_inputs():
  layer = _layer()
  with pytest.raises(ValueError, match="needs a cache"):
    layer(jnp.ones((1, 4, 32)), decode=True)
  with pytest.raises(ValueError, match="x must have shape"):
    layer(jnp.ones((1, 4, 31)))
  with pytest.raises(ValueError, match="retrieval_mode must be one of"):
    _layer(retrieval_mode="max")
  with pytest.raises(ValueError, match="block_size must be an int >= 2"):
    LandmarkAttention(4, 32, block_size=1, rngs=nnx.Rngs(0))
