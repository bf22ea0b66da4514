"""``python -m experiments cross_saliency``: the seq2seq data and gold alignments, the agreement score, the verdict
on made-up results, and the smoke preset end to end (interrupted, resumed, reported)."""

import dataclasses
import json

import numpy as np
import pytest

from configs.cross_saliency import PRESETS, CrossSaliencyConfig, Variant
from experiments import SUBCOMMANDS
from experiments.common.train import Interrupted
from experiments.cross_saliency import run as cs


def test_registered_and_config_validation():
  assert "cross_saliency" in SUBCOMMANDS
  with pytest.raises(ValueError, match="task"):
    Variant("copy", 2)
  with pytest.raises(ValueError, match="distinct"):
    CrossSaliencyConfig("x", variants=(Variant("reverse", 2), Variant("reverse", 2)))


@pytest.mark.parametrize("task", ["reverse", "mix2"])
def test_source_targets_alignment_and_disjoint_splits(task):
  T, V = 7, 5
  tr = cs.Seq2SeqSource(task, T, V, 400, 0, "train").arrays
  te = cs.Seq2SeqSource(task, T, V, 60, 0, "test").arrays
  src, tgt = te["src"], te["tgt"]
  assert src.shape == tgt.shape == (60, T) and src.min() >= 1 and src.max() <= V
  assert (te["tgt_in"][:, 0] == 0).all() and np.array_equal(te["tgt_in"][:, 1:], tgt[:, :-1])
  gold = cs.gold_alignment(task, T)
  np.testing.assert_allclose(gold.sum(1), 1.0)
  # the target is a function of exactly the gold positions: recompute it from them
  for i in range(T):
    pos = np.flatnonzero(gold[i])
    want = src[:, pos[0]] if task == "reverse" else ((src[:, pos] - 1).sum(1) % V) + 1
    np.testing.assert_array_equal(tgt[:, i], want)
  assert not {r.tobytes() for r in tr["src"]} & {r.tobytes() for r in te["src"]}


def test_agreement_score_is_pearson_of_row_normalised_maps():
  rng = np.random.default_rng(0)
  a = rng.random((3, 4, 5))
  np.testing.assert_allclose(cs._r(a, 7.0 * a), 1.0, atol=1e-6)  # row normalisation removes the scale
  b = cs._rownorm(a)
  np.testing.assert_allclose(cs._r(a, 1.0 - b), -1.0, atol=1e-6)  # rows of 1 - b share one sum
  np.testing.assert_allclose(cs._r(a, rng.random((3, 4, 5))).mean(), 0.0, atol=0.6)


def _payload(allx, allh, single, gap_mix=None):
  def rows(x, h):
    r = {k: {s: 0.0 for s in (*cs.SALIENCY, "gold")} for k in ("single heads (mean)", "random attention (baseline)",
                                                              "all layers+heads mean")}
    r["all layers+heads mean"].update({"SM_X gxi": x, "SM_H gxi": h})
    r["single heads (mean)"]["SM_X gxi"] = single
    return {"rows": r}
  return {"variants": {"reverse_enc2": rows(allx, allh), "mix2_enc4": rows(allx - 0.1, allh + (gap_mix or 0.0))}}


def test_verdict_reads_the_claims():
  cfg = CrossSaliencyConfig("t")
  assert cs.verdict(cfg, _payload(0.55, 0.7, 0.3, 0.1)).startswith("VERDICT: reproduced")
  line = cs.verdict(cfg, _payload(0.85, 0.9, 0.8, 0.1))
  assert line.startswith("VERDICT: partly") and "far from 0.5" in line
  assert cs.verdict(cfg, _payload(0.2, 0.1, 0.5, -0.3)).startswith("VERDICT: not reproduced")
  assert "incomplete" in cs.verdict(cfg, {"variants": {}})


@pytest.mark.slow  # ~1-2 CPU-minutes idle: two trainings, the saliency compilations and the pictures
def test_smoke_end_to_end_interrupt_resume_report(tmp_path, capsys):
  cfg = PRESETS["smoke"]
  out = tmp_path / "cs"
  with pytest.raises(Interrupted):
    cs.run(cfg, out, progress=False, verbose=False, interrupt_after=30)  # after the checkpoint at step 20
  with pytest.raises(ValueError, match="--resume"):
    cs.run(cfg, out, progress=False, verbose=False)
  res = cs.run(cfg, out, resume=True, progress=False)
  assert "resumed from step 20" in capsys.readouterr().out
  assert set(res["variants"]) == {v.name for v in cfg.variants}
  for v in res["variants"].values():
    for name, r in v["rows"].items():
      assert all(-1.0 - 1e-6 <= x <= 1.0 + 1e-6 for x in r.values()), name
    assert abs(v["rows"]["gold alignment (oracle)"]["gold"] - 1.0) < 1e-6
    assert "random attention (baseline)" in v["rows"] and len(v["hist"]["random vs SM_X gxi"]) == cfg.num_test
  for f in ("table.md", "verdict.txt", "r_hist.png", "position_profile.png", "maps_reverse_enc1.png",
            "rollout_mix2_enc2.png"):
    assert (out / f).stat().st_size > 0, f
  rep = cs.run(cfg, out, report=True, progress=False)
  assert capsys.readouterr().out.rstrip().splitlines()[-1] == rep["verdict"] == res["verdict"]
  assert json.loads((out / "results.json").read_text())["variants"] == json.loads(json.dumps(res["variants"]))
