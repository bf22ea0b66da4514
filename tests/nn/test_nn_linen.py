"""The Linen bridge: init + apply, and equality with the NNX module holding the same parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import masks, testing
from jaxattn.nn import LinenMultiHeadAttention, MultiHeadAttention

B, T, F = 2, 8, 16


def _x(seed=1, shape=(B, T, F)):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_init_apply_matches_nnx_module():
  opts = dict(num_kv_heads=2, use_rope=True, mask=masks.Causal())
  layer = LinenMultiHeadAttention(num_heads=4, in_features=F, **opts)
  x = _x()
  variables = jax.jit(layer.init)(jax.random.key(0), x)
  params = variables["params"]["attention"]
  assert set(variables) == {"params"}
  assert params["query"]["kernel"].shape == (F, 4, 4) and params["key"]["kernel"].shape == (F, 2, 4)
  out = jax.jit(layer.apply)(variables, x)
  assert out.shape == (B, T, F)

  # the same parameters in the NNX module give the same output
  m = MultiHeadAttention(4, F, **opts, rngs=nnx.Rngs(1))
  state = nnx.state(m, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(m, state)
  ref = nnx.jit(lambda m, x: m(x))(m, x)
  testing.assert_close(out, ref, name="linen vs nnx")


def test_call_time_options_and_grad():
  layer = LinenMultiHeadAttention(num_heads=2, in_features=F, out_features=6)
  x = _x()
  variables = jax.jit(layer.init)(jax.random.key(0), x)
  ids = jnp.array([[0] * 3 + [1] * 5, [0] * 8], jnp.int32)

  @jax.jit
  def loss(params):
    y = layer.apply({"params": params}, x, mask=masks.Causal(), segment_ids=ids)
    return jnp.sum(y ** 2), y

  (val, y), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
  assert y.shape == (B, T, 6) and np.isfinite(float(val))
  testing.assert_no_nan(grads, "grads")
  # the first document's tokens never see the second's: changing the second leaves them unchanged
  x2 = x.at[0, 3:].set(0.0)
  y2 = jax.jit(lambda v, x: layer.apply(v, x, mask=masks.Causal(), segment_ids=ids))(variables, x2)
  testing.assert_close(y2[0, :3], y[0, :3], name="segment isolation")


def test_bad_options_raise_at_init():
  layer = LinenMultiHeadAttention(num_heads=4, in_features=F, num_kv_heads=3)
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    layer.init(jax.random.key(0), _x())
