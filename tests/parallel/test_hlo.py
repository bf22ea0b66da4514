"""Compiled-HLO checks: the ring moves K/V only by collective-permute (never an all-gather or all-to-all), forward
and backward; the all-gather strategy does gather."""

import re

import jax
import jax.numpy as jnp
import pytest

from jaxattn import masks
from jaxattn.parallel import context_parallel_attention
from tests.parallel import common

OPS = ("collective-permute", "all-gather", "all-to-all", "reduce-scatter")


def _collectives(strategy):
  q, k, v, _, _ = common.inputs(0)
  ids = common.doc_ids()
  loss = lambda q, k, v: jnp.sum(context_parallel_attention(
      q, k, v, mesh=common.mesh_1d(), seq_axis="seq", strategy=strategy, mask=masks.Causal(), segment_ids=ids))
  text = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, v).compile().as_text()
  return {op: len(re.findall(rf"\b{op}(?:-start)?\(", text)) for op in OPS}


def test_ring_uses_collective_permute_only():
  counts = _collectives("ring")
  assert counts["collective-permute"] > 0, counts
  assert counts["all-gather"] == counts["all-to-all"] == counts["reduce-scatter"] == 0, counts


@pytest.mark.slow
def test_all_gather_gathers_and_reduce_scatters():
  counts = _collectives("all_gather")
  assert counts["all-gather"] > 0 and counts["reduce-scatter"] > 0, counts
