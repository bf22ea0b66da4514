"""Zigzag permutation helpers: layout, round trips, and the in-shard_map ppermute version against the global one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxattn.parallel import (_compat, zigzag_indices, zigzag_permute, zigzag_permute_local, zigzag_unpermute,
                              zigzag_unpermute_local)
from jaxattn.parallel.zigzag import zigzag_chunks
from tests.parallel import common


def test_layout():
  assert zigzag_indices(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
  assert zigzag_chunks(4) == ((0, 7), (1, 6), (2, 5), (3, 4))
  idx = zigzag_indices(64, 8).reshape(8, 2, 4)  # shard r holds chunks r and 15 - r
  for r in range(8):
    assert idx[r, 0, 0] == 4 * r and idx[r, 1, 0] == 4 * (15 - r)


@pytest.mark.parametrize("T,P", [(2, 1), (8, 2), (24, 3), (64, 8), (1024, 64)])
def test_round_trip(T, P):
  perm = zigzag_indices(T, P)
  assert sorted(perm.tolist()) == list(range(T))
  x = jnp.arange(2 * T * 3).reshape(2, T, 3)
  np.testing.assert_array_equal(zigzag_unpermute(zigzag_permute(x, P), P), x)
  y = jnp.arange(2 * 3 * T).reshape(2, 3, T)
  np.testing.assert_array_equal(zigzag_permute(y, P, axis=2), y[:, :, perm])
  np.testing.assert_array_equal(zigzag_unpermute(zigzag_permute(y, P, axis=2), P, axis=2), y)


def test_errors():
  with pytest.raises(ValueError, match="multiple of 2 \\* num_shards = 16, got T=40"):
    zigzag_indices(40, 8)
  with pytest.raises(ValueError, match="num_shards must be a positive int"):
    zigzag_indices(8, 0)


def test_local_matches_global_and_round_trips():
  assert jax.device_count() == 8
  mesh = common.mesh_1d()
  x = jnp.arange(2 * 64 * 3, dtype=jnp.float32).reshape(2, 64, 3)
  spec = P(None, "seq")

  def local(x):
    z = zigzag_permute_local(x, "seq")
    return z, zigzag_unpermute_local(z, "seq")

  fn = jax.jit(_compat.shard_map(local, mesh=mesh, in_specs=spec, out_specs=(spec, spec)))
  z, back = fn(x)
  np.testing.assert_array_equal(z, zigzag_permute(x, 8))
  np.testing.assert_array_equal(back, x)
  # differentiable: the transpose of the permutation is the inverse permutation
  w = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), jnp.float32)
  g = jax.grad(lambda x: jnp.sum(fn(x)[0] * w))(x)
  np.testing.assert_array_equal(g, zigzag_unpermute(w, 8))
