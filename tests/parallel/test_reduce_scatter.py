"""The all-gather strategy's and linear context parallelism's backward send dK/dV (and the linear states' cotangents)
back with a reduce-scatter, never an all-reduce of the gathered arrays: checked in the lowered program (StableHLO,
no compile, fast) on 8 CPU devices. On TPU, ``python -m experiments tpu_compile`` shows the compiled form: XLA:TPU's
reduce-scatter fusion (``all-reduce-scatter``, emitter ``SingleInputAllReduceScatterFusion``) at production sizes
(tests/experiments/test_tpu_compile.py)."""

import re

import jax
import jax.numpy as jnp

from jaxattn import masks
from jaxattn.parallel import context_parallel_attention, context_parallel_linear_attention
from tests.parallel import common


def _ops(loss, *args):
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).as_text()
  return {op: len(re.findall(rf"stablehlo\.{op}\b", text)) for op in ("all_gather", "reduce_scatter", "all_reduce")}


def test_all_gather_strategy_reduce_scatters_dkv():
  q, k, v, w, _ = common.inputs(0)
  loss = lambda q, k, v: jnp.sum(w * context_parallel_attention(q, k, v, mesh=common.mesh_1d(), seq_axis="seq",
                                                                strategy="all_gather", mask=masks.Causal()))
  ops = _ops(loss, q, k, v)
  assert ops["all_gather"] >= 2 and ops["reduce_scatter"] >= 2 and ops["all_reduce"] == 0, ops


def test_linear_context_parallel_reduce_scatters():
  q, k, v, w, _ = common.inputs(0)
  decay = -jnp.linspace(0.05, 0.5, q.shape[2], dtype=jnp.float32)
  loss = lambda q, k, v: jnp.sum(w * context_parallel_linear_attention(q, k, v, mesh=common.mesh_1d(), seq_axis="seq",
                                                                       log_decay=decay))
  ops = _ops(loss, q, k, v)
  assert ops["all_gather"] >= 1 and ops["reduce_scatter"] >= 1 and ops["all_reduce"] == 0, ops
