"""context_parallel_attention == single-device softmax_attention on 8 CPU devices: every strategy x mask, GQA,
forward (out, lse) and gradients; options (zigzag inputs, no load balancing, empty rows); validation errors."""

import jax
import jax.numpy as jnp
import pytest

import jaxattn
from jaxattn import masks, testing
from jaxattn.parallel import context_parallel_attention, zigzag_permute, zigzag_unpermute
from tests.parallel import common

STRATEGY_NAMES = ("ring", "all_gather", "ulysses", "usp")
MASK_NAMES = tuple(common.MASKS)
# A representative subset runs by default (each case compiles one sharded fwd+bwd, a few seconds on 2 cores);
# the whole cross product is marked slow.
# (ring with segment ids runs by default in test_compose.py::test_data_parallel_axis)
DEFAULT = {("ring", "causal"), ("all_gather", "sliding_window"), ("ulysses", "documents"), ("usp", "causal")}
MATRIX = [pytest.param(s, m, marks=() if (s, m) in DEFAULT else pytest.mark.slow, id=f"{s}-{m}")
          for s in STRATEGY_NAMES for m in MASK_NAMES]


def test_eight_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("strategy,mask_name", MATRIX)
def test_matches_single_device(strategy, mask_name):
  common.check_strategy(strategy, mask_name)


def test_ring_contiguous_sliding_window_and_empty_rows():
  # load_balance=None: contiguous shards, the ring stops after the 2 steps the window reaches; Local(...) with a
  # negative offset leaves the first rows with no key (output 0, lse -inf, no NaN anywhere).
  mask = masks.Local(4, 0, -3)
  common.check_strategy("ring", (mask, False), load_balance=None)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_bf16(strategy):
  common.check_strategy(strategy, "causal", dtype=jnp.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ring", "all_gather", "usp"])
def test_static_document_mask(strategy):
  # documents as a static Slices mask (non shift-invariant: cells are Offset masks)
  common.check_strategy(strategy, (masks.causal_document(common.DOC_LENS), False))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_zigzag_inputs_skip_the_reshuffle(strategy):
  q, k, v, _, _ = common.inputs(3)
  ids = common.doc_ids()
  mesh, axis, P = ((common.mesh_usp(), ("uly", "ring"), 4) if strategy == "usp" else (common.mesh_1d(), "seq", 8))
  zq, zk, zv = (zigzag_permute(x, P) for x in (q, k, v))
  out = context_parallel_attention(zq, zk, zv, mesh=mesh, seq_axis=axis, strategy=strategy, mask=masks.Causal(),
                                   segment_ids=zigzag_permute(ids, P), zigzag_inputs=True)
  ref = jaxattn.softmax_attention(q, k, v, mask=masks.Causal(), segment_ids=ids)
  testing.assert_close(zigzag_unpermute(out, P), ref)


def test_errors():
  q, k, v, _, _ = common.inputs(0)
  mesh = common.mesh_1d()
  with pytest.raises(ValueError, match=r"H=6 heads .* multiple of its size 8"):
    context_parallel_attention(q[:, :, :6], k, v[:, :, :2], mesh=mesh, seq_axis="seq", strategy="ulysses")
  with pytest.raises(ValueError, match="strategy must be one of"):
    context_parallel_attention(q, k, v, mesh=mesh, seq_axis="seq", strategy="tree")
  with pytest.raises(ValueError, match=r"multiple of 2 \* P = 16, got T=56"):
    context_parallel_attention(q[:, :56], k[:, :56], v[:, :56], mesh=mesh, seq_axis="seq", strategy="ring",
                               mask=masks.Causal())
  with pytest.raises(ValueError, match="T=60 is not a multiple of the 8 sequence shards"):
    context_parallel_attention(q[:, :60], k[:, :60], v[:, :60], mesh=mesh, seq_axis="seq", strategy="ring")
  with pytest.raises(ValueError, match=r"usp needs seq_axis=\(ulysses_axis, ring_axis\)"):
    context_parallel_attention(q, k, v, mesh=mesh, seq_axis="seq", strategy="usp")
  with pytest.raises(ValueError, match="'model'.*not an axis of the mesh"):
    context_parallel_attention(q, k, v, mesh=mesh, seq_axis="model", strategy="ring")
  with pytest.raises(ValueError, match="either mesh= and seq_axis="):
    context_parallel_attention(q, k, v, mesh=mesh, seq_axis="seq", axis_name="seq", strategy="ring")
  with pytest.raises(ValueError, match="equal q and k/v lengths"):
    context_parallel_attention(q, k[:, :32], v[:, :32], mesh=mesh, seq_axis="seq", strategy="ring")
  with pytest.raises(ValueError, match="not a multiple of k's 3 kv heads"):
    context_parallel_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), mesh=mesh, seq_axis="seq",
                               strategy="ring")
