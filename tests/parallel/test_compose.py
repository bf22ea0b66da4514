"""Composition: data- and tensor-parallel axes of a 2-D mesh, calls inside a user's own shard_map (axis_name=), and
the default (Explicit-axis) mesh of jax.make_mesh."""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import jaxattn
from jaxattn import masks, testing
from jaxattn.parallel import _compat, context_parallel_attention, context_parallel_linear_attention
from tests.parallel import common


def test_data_parallel_axis():
  mesh = common.auto_mesh((2, 4), ("data", "seq"))
  q, k, v, w_out, w_lse = common.inputs(1, b=2)
  ids = common.doc_ids(b=2)
  attn = lambda q, k, v: context_parallel_attention(q, k, v, mesh=mesh, seq_axis="seq", batch_axis="data",
                                                    strategy="ring", mask=masks.Causal(), segment_ids=ids,
                                                    return_lse=True)
  (out, lse), grads = common.value_and_grads(attn, q, k, v, w_out, w_lse)
  (r_out, r_lse), r_grads = common.reference(masks.Causal(), ids, q, k, v, w_out, w_lse)
  assert out.sharding.spec[:2] == ("data", "seq")
  testing.assert_close((out, lse), (r_out, r_lse))
  testing.assert_close(grads, r_grads, kind="grad")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ulysses", "all_gather"])
def test_tensor_parallel_head_axis(strategy):
  mesh = common.auto_mesh((2, 4), ("model", "seq"))
  q, k, v, w_out, w_lse = common.inputs(2)
  attn = lambda q, k, v: context_parallel_attention(q, k, v, mesh=mesh, seq_axis="seq", head_axis="model",
                                                    strategy=strategy, mask=masks.Causal(), return_lse=True)
  (out, lse), grads = common.value_and_grads(attn, q, k, v, w_out, w_lse)
  (r_out, r_lse), r_grads = common.reference(masks.Causal(), None, q, k, v, w_out, w_lse)
  testing.assert_close((out, lse), (r_out, r_lse))
  testing.assert_close(grads, r_grads, kind="grad")


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("strategy", ["ring", pytest.param("ulysses", marks=pytest.mark.slow)])
def test_inside_user_shard_map(strategy, check_vma):
  mesh = common.mesh_1d()
  q, k, v, w_out, w_lse = common.inputs(4)
  spec = P(None, "seq")

  def model(q, k, v):  # the user's per-device code: natural-order shards in, natural-order shards out
    out = context_parallel_attention(q, k, v, axis_name="seq", strategy=strategy, mask=masks.Causal())
    return out * 2.0

  sharded = _compat.shard_map(model, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check=check_vma)
  loss = lambda q, k, v: jnp.sum(sharded(q, k, v) * w_out)
  ref_loss = lambda q, k, v: jnp.sum(jaxattn.softmax_attention(q, k, v, mask=masks.Causal()) * 2.0 * w_out)
  val, grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)
  r_val, r_grads = jax.jit(jax.value_and_grad(ref_loss, (0, 1, 2)))(q, k, v)
  testing.assert_close(val, r_val, rms=1e-5)
  testing.assert_close(grads, r_grads, kind="grad")


def test_explicit_mesh_forward():
  mesh = jax.make_mesh((8,), ("seq",))  # Explicit axes by default on recent jax
  q, k, v, _, _ = common.inputs(5)
  out = context_parallel_attention(q, k, v, mesh=mesh, seq_axis="seq", strategy="all_gather", mask=masks.Causal())
  testing.assert_close(out, jaxattn.softmax_attention(q, k, v, mask=masks.Causal()))


@pytest.mark.slow
@pytest.mark.parametrize("check_vma", [True, False])
def test_linear_inside_user_shard_map(check_vma):
  q, k, v, _, _ = common.inputs(5)
  spec = P(None, "seq")
  lin = _compat.shard_map(functools.partial(context_parallel_linear_attention, axis_name="seq"),
                          mesh=common.mesh_1d(), in_specs=(spec,) * 3, out_specs=spec, check=check_vma)
  testing.assert_close(jax.jit(lin)(q, k, v), jaxattn.linear_attention(q, k, v), rms=1e-5)
