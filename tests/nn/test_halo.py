"""NNX HaloAttention: equals the functional op on its 1x1 projections (fwd + grads), GQA, no rel-pos, nnx.jit,
and bad sizes raise naming the value."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxattn
from jaxattn import testing
from jaxattn.nn import HaloAttention


def _expected(layer, x, implementation="reference"):
  q, k, v = layer.query(x), layer.key(x), layer.value(x)
  rel = {} if layer.rel_h is None else dict(rel_h=layer.rel_h[...], rel_w=layer.rel_w[...])
  return layer.out(jaxattn.halo_attention(q, k, v, block=layer.block, halo=layer.halo, pad=layer.pad,
                                          mask_padding=layer.mask_padding, implementation=implementation, **rel))


@pytest.mark.slow
def test_module_is_the_functional_op_fwd_and_grads():
  layer = HaloAttention(16, 4, block=4, halo=2, num_kv_heads=2, rngs=nnx.Rngs(0))
  assert layer.rel_h.shape == (2 * (4 + 2) - 1, 4)
  x = jax.random.normal(jax.random.key(1), (2, 8, 12, 16))
  testing.assert_close(layer(x), _expected(layer, x), name="module")

  def loss(model, x, ref):
    return jnp.sum(jnp.sin(model(x) if not ref else _expected(model, x)))

  g = nnx.grad(loss, argnums=(0, 1))(layer, x, False)
  g_ref = nnx.grad(loss, argnums=(0, 1))(layer, x, True)
  testing.assert_close(nnx.to_pure_dict(g[0]), nnx.to_pure_dict(g_ref[0]), kind="grad", name="param grads")
  testing.assert_close(g[1], g_ref[1], kind="grad", name="input grads")
  assert float(jnp.abs(g[0].rel_h[...]).max()) > 0  # the relative tables are trained


def test_module_options_under_jit():
  layer = HaloAttention(8, 2, block=4, halo=1, rel_pos=False, pad=True, mask_padding=False, out_features=6,
                        rngs=nnx.Rngs(2))
  assert layer.rel_h is None
  x = jax.random.normal(jax.random.key(3), (1, 6, 9, 8))
  y = nnx.jit(lambda m, x: m(x))(layer, x)
  assert y.shape == (1, 6, 9, 6)
  testing.assert_close(y, _expected(layer, x), name="jit, padded, zeros at the border")


def test_bad_sizes_raise():
  with pytest.raises(ValueError, match=r"halo \(3\) must not exceed block \(2\)"):
    HaloAttention(8, 2, block=2, halo=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    HaloAttention(10, 4, block=2, halo=1, rngs=nnx.Rngs(0))
  layer = HaloAttention(8, 2, block=4, halo=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="image width 6 is not divisible by block 4"):
    layer(jnp.ones((1, 8, 6, 8)))
  with pytest.raises(ValueError, match=r"x must be \[B, Y, X, 8\]"):
    layer(jnp.ones((1, 8, 8, 4)))
  with pytest.raises(ValueError, match="implementation must be one of"):
    HaloAttention(8, 2, block=4, halo=1, implementation="cudnn", rngs=nnx.Rngs(0))
