"""Every op works inside a user's ``shard_map(check_vma=True)``: loop carries are cast to the inputs' varying axes
(``jaxattn._vma.match_vma``), so data parallelism over a batch-sharded mesh needs no ``check_vma=False``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxattn
from jaxattn import masks
from jaxattn._vma import match_vma, vma
from jaxattn.parallel._compat import shard_map
from jaxattn.testing import assert_close, random_qkv

_OPS = {
    "softmax_xla": lambda q, k, v: jaxattn.softmax_attention(q, k, v, mask=masks.Causal(), implementation="xla"),
    "softmax_reference": lambda q, k, v: jaxattn.softmax_attention(q, k, v, mask=masks.Local(16, 0),
                                                                   implementation="reference"),
    "linear_xla": lambda q, k, v: jaxattn.linear_attention(q, k, v, log_decay=jnp.full((4,), -0.1),
                                                           implementation="xla", chunk_size=16),
    "linear_reference": lambda q, k, v: jaxattn.linear_attention(q, k, v, log_decay=jnp.full((4,), -0.1),
                                                                 implementation="reference"),
    "landmark_xla": lambda q, k, v: jaxattn.landmark_attention(q, k, v, block_size=16, implementation="xla"),
}


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))


def test_match_vma_marks_constants_varying():
  def f(x):
    z = match_vma(jnp.zeros(3), x, None)
    assert vma(z) == vma(x) == frozenset({"data"})
    return x + z.sum()

  out = shard_map(f, mesh=_mesh(), in_specs=P("data"), out_specs=P("data"), check=True)(jnp.ones((4, 3)))
  np.testing.assert_array_equal(np.asarray(out), np.ones((4, 3)))
  assert match_vma(jnp.zeros(3), jnp.ones(2)).shape == (3,)  # identity outside shard_map


@pytest.mark.parametrize("name", sorted(_OPS))
def test_op_under_checked_shard_map(name):
  op = _OPS[name]
  q, k, v = random_qkv(jax.random.PRNGKey(3), B=4, T=64, S=64, H=4, G=2, D=16, dtype=jnp.float32)
  sharded = shard_map(lambda q, k, v: op(q, k, v), mesh=_mesh(), in_specs=(P("data"),) * 3, out_specs=P("data"),
                      check=True)
  out = jax.jit(sharded)(q, k, v)
  assert_close(out, op(q, k, v), dtype=jnp.float32, kind="out", name=f"{name} forward")

  def loss(f):
    return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))

  got = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(op), argnums=(0, 1, 2))(q, k, v)
  for g, w, n in zip(got, want, "qkv"):
    assert_close(g, w, dtype=jnp.float32, kind="grad", name=f"{name} d{n}")


def test_replicated_bias_gradient_is_summed_over_devices():
  """A bias shared by every device (in_specs ``P()``) gets the sum of the per-device cotangents."""
  q, k, v = random_qkv(jax.random.PRNGKey(5), B=4, T=32, S=32, H=2, D=16, dtype=jnp.float32)
  bias = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 32, 32)), jnp.float32)

  def op(q, k, v, bias):
    return jaxattn.softmax_attention(q, k, v, bias=bias, mask=masks.Causal(), implementation="xla")

  sharded = shard_map(op, mesh=_mesh(), in_specs=(P("data"),) * 3 + (P(),), out_specs=P("data"), check=True)
  got = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(sharded(*a))), argnums=3))(q, k, v, bias)
  want = jax.grad(lambda *a: jnp.sum(jnp.sin(op(*a))), argnums=3)(q, k, v, bias)
  assert_close(got, want, dtype=jnp.float32, kind="grad", name="dbias")
