"""``python -m experiments cp_model``: exact areas, imbalance, byte counts, and an end-to-end run of the tiny preset."""

import json

import numpy as np
import pytest

from configs import cp_model as cp_configs
from experiments.cp_model import hardware, model, run
from jaxattn import masks

T = 96
MASKS = [None, masks.Causal(), masks.Causal(-5), masks.sliding_window(7), masks.Local(3, 4, 2),
         masks.causal_document([10, 30, 7, 49]), masks.full_document([50, 46]),
         masks.causal_document([40, 56]) & masks.sliding_window(9), masks.prefix_lm_causal(20, T)]


@pytest.mark.parametrize("mask", MASKS, ids=repr)
def test_pair_areas_are_exact(mask):
  dense = np.ones((T, T), bool) if mask is None else mask.to_dense(T, T)
  lo, hi = model.row_intervals(mask, T)
  for n in (1, 4, 12):
    A = model.pair_areas(lo, hi, n)
    C = T // n
    want = dense.reshape(n, C, n, C).sum(axis=(1, 3))
    np.testing.assert_array_equal(A, want)
  assert model.pair_areas(lo, hi, 12).sum() == (T * T if mask is None else mask.area(T, T))
  np.testing.assert_array_equal(model.coarsen(model.pair_areas(lo, hi, 12), 4), model.pair_areas(lo, hi, 4))


def test_row_intervals_refuse_non_interval_rows():
  with pytest.raises(ValueError, match="does not support"):
    model.row_intervals(masks.Causal() | masks.Local(0, 3), T)
  with pytest.raises(ValueError, match="one key interval per row"):
    model.row_intervals(masks.share_question(16, [40, 40]), T)


def test_imbalance_and_ring_accounting():
  P = 8
  lo, hi = model.row_intervals(masks.Causal(), 1024)
  A = model.pair_areas(lo, hi, 2 * P)
  zig = model.device_pair_areas(A, P, "zigzag").sum(1)
  cont = model.device_pair_areas(A, P, "contiguous").sum(1)
  assert model.imbalance(zig) <= 1.05 and model.imbalance(cont) > 1.8
  prob = model.Problem(B=1, T=1024, H=8, G=2, D=16)
  hw = hardware.get("h100")
  ring = model.estimate("ring", prob, hw, A, P, "zigzag")
  kv_local = 2 * 1 * (1024 // P) * 2 * 16 * 2
  assert ring.steps == P and ring.bytes_fwd == (P - 1) * kv_local
  assert ring.flops_fwd_max == 4 * 8 * 16 * zig.max()
  assert ring.flops_fwd_total == 4 * 8 * 16 * A.sum()
  contiguous = model.estimate("ring", prob, hw, A, P, "contiguous")
  assert contiguous.t_fwd > ring.t_fwd  # the imbalance costs time
  window = model.pair_areas(*model.row_intervals(masks.sliding_window(64), 1024), 2 * P)
  assert model.estimate("ring", prob, hw, window, P, "contiguous").steps == 2  # unneeded steps dropped
  assert not model.estimate("ulysses", model.Problem(1, 1024, 4, 2, 16), hw, A, P).feasible  # H < P


def test_tiny_preset_end_to_end(tmp_path):
  assert run.main(["--preset", "tiny", "--out", str(tmp_path)]) == 0
  rows = [json.loads(line) for line in (tmp_path / "cp_model.jsonl").read_text().splitlines()]
  p = cp_configs.TINY
  assert len(rows) == len(p.seq_lens) * len(p.masks) * len(p.devices) * len(p.hardware) * len(run.VARIANTS)
  for r in rows:
    if r["mask"] == "causal":
      assert r["imbalance_zigzag"] <= 1.05
    if r["feasible"]:
      assert 0 < r["efficiency"] <= 1.0 + 1e-9 and r["ms_fwd_bwd"] >= r["ms_fwd"] > 0
  text = (tmp_path / "cp_model.md").read_text()
  assert "Modelled, not measured" in text and "## Load imbalance" in text
  assert (tmp_path / "cp_model.png").stat().st_size > 0
