"""``python -m experiments bayes_pfl``: presets, the canvases' invariants (unseen classes only in the test set,
masks on the digit), the verdict logic on made-up rows, and the smoke preset end to end with resume and report."""

import dataclasses
import json

import numpy as np
import pytest

from configs.bayes_pfl import PRESETS, BayesPFLConfig
from experiments import SUBCOMMANDS
from experiments.bayes_pfl import run as bp


def test_registered_and_presets_validate():
  assert "bayes_pfl" in SUBCOMMANDS
  assert set(PRESETS) == {"smoke", "cpu", "gpu"}
  with pytest.raises(ValueError, match="multiple of patch"):
    BayesPFLConfig("x", canvas=26)
  with pytest.raises(ValueError, match="proper subset"):
    BayesPFLConfig("x", train_classes=tuple(range(10)))


def test_canvases_split_classes_and_mark_the_digit():
  cfg = PRESETS["smoke"]
  rng = np.random.default_rng(0)
  img, mask, lab = bp.make_canvases(cfg, rng, cfg.train_classes)
  P = (cfg.canvas // cfg.patch) ** 2
  assert img.shape == (cfg.n_train, cfg.canvas, cfg.canvas) and mask.shape == (cfg.n_train, P)
  assert set(lab.tolist()) <= set(cfg.train_classes)
  _, _, lab_te = bp.make_canvases(cfg, rng, (5, 6, 7, 8, 9))
  assert not set(lab_te.tolist()) & set(cfg.train_classes)
  frac = mask.mean(1)
  assert (frac > 0).all() and (frac <= 9 / P).all()  # an 8x8 digit covers at most 3x3 patches of 4


def test_verdict_reads_the_rows():
  rows = [dict(seed=0, random=0.5, intensity=0.7, static_prompts=0.8, rca=0.85)]
  assert bp.verdict(rows, PRESETS["cpu"]).startswith("VERDICT: reproduced")
  rows = [dict(seed=0, random=0.5, intensity=0.9, static_prompts=0.8, rca=0.79)]
  assert bp.verdict(rows, PRESETS["cpu"]).startswith("VERDICT: not reproduced")
  rows = [dict(seed=0, random=0.5, intensity=0.9, static_prompts=0.8, rca=0.805)]
  assert bp.verdict(rows, PRESETS["cpu"]).startswith("VERDICT: partly")


def test_smoke_end_to_end_resume_and_report(tmp_path):
  cfg = PRESETS["smoke"]
  out = tmp_path / "out"
  res = bp.run(cfg, out, progress=False, verbose=False)
  assert len(res["rows"]) == cfg.seeds
  for r in res["rows"]:
    for m in bp.METHODS:
      assert 0.0 <= r[m] <= 1.0
    assert np.isfinite(r["rca_final_loss"]) and np.isfinite(r["static_prompts_final_loss"])
  for f in ("results.json", "table.md", "maps.png", "verdict.txt"):
    assert (out / f).stat().st_size > 0
  assert "static_prompts" in (out / "table.md").read_text()
  with pytest.raises(Exception, match="--resume"):
    bp.run(cfg, out, progress=False, verbose=False)
  again = bp.run(cfg, out, resume=True, progress=False, verbose=False)
  assert again["rows"] == res["rows"]
  rep = bp.run(cfg, out, report=True, progress=False, verbose=False)
  assert rep["verdict"] == res["verdict"]
  assert json.loads((out / "results.json").read_text())["fingerprint"] == res["fingerprint"]
  with pytest.raises(Exception, match="other settings"):
    bp.run(dataclasses.replace(cfg, steps=21), out, resume=True, progress=False, verbose=False)
