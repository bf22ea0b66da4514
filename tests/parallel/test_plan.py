"""Trace-time planning: local chunk masks equal the global mask's restriction; skipped blocks are exactly the empty
ones; every device's planned area equals its rows' area; zigzag balances causal work."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from jaxattn import masks
from jaxattn.parallel import plan as plan_lib
from jaxattn.parallel.zigzag import zigzag_indices
from tests import strategies as mst

MASKS = {
    "full": None,
    "causal": masks.Causal(),
    "sliding_window": masks.sliding_window(6),
    "bidirectional_window": masks.Local(5, 3),
    "causal_offset": masks.Causal(-3),
    "documents": masks.causal_document([10, 20, 3, 31]),
    "doc_and_window": masks.causal_document([10, 20, 3, 31]) & masks.sliding_window(8),
    "prefix_lm": masks.prefix_lm_causal(12, 64),
}


def _dense(mask, T):
  return np.ones((T, T), bool) if mask is None else mask.to_dense(T, T)


def _positions(r, P, T, layout):
  if layout == "zigzag":
    return zigzag_indices(T, P).reshape(P, -1)[r]
  return np.arange(r * (T // P), (r + 1) * (T // P))


def _local_dense(local, n_q, n_k):
  if local is None:
    return np.ones((n_q, n_k), bool)
  if isinstance(local, str):
    assert local == plan_lib.SKIP
    return np.zeros((n_q, n_k), bool)
  return local.to_dense(n_q, n_k)


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ring_plan_local_masks_are_exact(name, layout):
  mask, T, P = MASKS[name], 64, 8
  dense = _dense(mask, T)
  plan = plan_lib.ring_plan(mask, T, P, layout)
  n = T // P
  for s in range(P):
    for r in range(P):
      rows, cols = _positions(r, P, T, layout), _positions((r - s) % P, P, T, layout)
      want = dense[np.ix_(rows, cols)]
      if s >= plan.num_steps:
        assert not want.any(), (name, layout, s, r)  # dropped steps have nothing to compute
        continue
      branch = plan.table[s][r]
      local = plan_lib.SKIP if branch == 0 else plan.masks[branch - 1]
      np.testing.assert_array_equal(_local_dense(local, n, n), want, err_msg=f"{name} {layout} s={s} r={r}")
      assert (branch == 0) == (not want.any())  # skipped exactly when the block is empty


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("q_layout,kv_layout", [("contiguous", "contiguous"), ("zigzag", "contiguous"),
                                                 ("zigzag", "zigzag")])
def test_gather_plan_local_masks_are_exact(name, q_layout, kv_layout):
  mask, T, P = MASKS[name], 64, 8
  dense = _dense(mask, T)
  plan = plan_lib.gather_plan(mask, T, P, q_layout, kv_layout)
  cols = np.concatenate([_positions(p, P, T, kv_layout) for p in range(P)])
  for r in range(P):
    branch = plan.table[r]
    local = plan_lib.SKIP if branch == 0 else plan.masks[branch - 1]
    np.testing.assert_array_equal(_local_dense(local, T // P, T), dense[np.ix_(_positions(r, P, T, q_layout), cols)])


def test_chunk_grid_block_layout_matches_dense():
  mask = masks.causal_document([10, 20, 3, 31]) | masks.Local(2, 2)
  grid = plan_lib.local_mask(mask, (8, 40), (0, 48), 8)
  assert isinstance(grid, plan_lib.ChunkGrid)
  dense = grid.to_dense(16, 16)
  for bq, bk in [(2, 3), (4, 4), (5, 7), (16, 16)]:
    layout = grid.block_layout(16, 16, bq, bk)
    for a in range(layout.shape[0]):
      for b in range(layout.shape[1]):
        tile = dense[a * bq:(a + 1) * bq, b * bk:(b + 1) * bk]
        want = masks.FULL if tile.all() else (masks.EMPTY if not tile.any() else masks.PARTIAL)
        assert layout[a, b] == want
  assert grid.area(16, 16) == dense.sum()


def test_causal_branches_are_shared_and_steps_skipped():
  # zigzag causal: only three distinct local masks for any P (diagonal step, "lower" and "upper" half blocks)
  plan = plan_lib.ring_plan(masks.Causal(), 1024, 16, "zigzag")
  assert len(plan.masks) == 3 and plan.num_steps == 16 and plan.computed_steps.all()
  # contiguous causal: device r computes at step s iff s <= r
  plan = plan_lib.ring_plan(masks.Causal(), 1024, 16, "contiguous")
  np.testing.assert_array_equal(plan.computed_steps, np.triu(np.ones((16, 16), bool)))  # [step, device]
  # a window shorter than a shard needs two steps only, and a full mask one branch with no switch
  assert plan_lib.ring_plan(masks.sliding_window(64), 1024, 16, "contiguous").num_steps == 2
  full = plan_lib.ring_plan(None, 1024, 16, "contiguous")
  assert full.masks == (None,) and set(np.asarray(full.table).flat) == {1}


def test_zigzag_balances_causal_area():
  T, P = 256, 8
  dense = masks.Causal().to_dense(T, T)
  for layout, bound in (("zigzag", 1.05), ("contiguous", 1.8)):
    area = [dense[_positions(r, P, T, layout)].sum() for r in range(P)]
    ratio = max(area) / np.mean(area)
    assert (ratio <= bound) if layout == "zigzag" else (ratio >= bound)


@given(data=st.data(), P=st.sampled_from([1, 2, 4]), layout=st.sampled_from(["contiguous", "zigzag"]))
def test_fuzzed_masks_ring_and_gather_plans(data, P, layout):
  T = 48
  mask = data.draw(mst.any_mask(T, T))
  dense = mask.to_dense(T, T)
  plan = plan_lib.ring_plan(mask, T, P, layout)
  for s in range(P):
    for r in range(P):
      want = dense[np.ix_(_positions(r, P, T, layout), _positions((r - s) % P, P, T, layout))]
      if s >= plan.num_steps:
        assert not want.any()
        continue
      b = plan.table[s][r]
      np.testing.assert_array_equal(_local_dense(plan_lib.SKIP if b == 0 else plan.masks[b - 1], T // P, T // P),
                                    want)
  gplan = plan_lib.gather_plan(mask, T, P, layout, "contiguous")
  for r in range(P):
    b = gplan.table[r]
    np.testing.assert_array_equal(_local_dense(plan_lib.SKIP if b == 0 else gplan.masks[b - 1], T // P, T),
                                  dense[_positions(r, P, T, layout)])
