"""``python -m experiments transnormer``: equal parameters, the verdict rule on made-up results, the speed table's
skip rule, and the smoke preset end to end (interrupted, resumed, reported)."""

import dataclasses
import json

import numpy as np
import pytest

from configs.transnormer import PRESETS, ModelConfig, SpeedConfig
from experiments import SUBCOMMANDS
from experiments.common.train import Interrupted
from experiments.textlm.train import param_count
from experiments.transnormer import run as tn


def test_registered_and_equal_parameters():
  assert "transnormer" in SUBCOMMANDS
  cfg = PRESETS["cpu"]
  assert cfg.model.glu_features == 176 and cfg.model.softmax_mlp == 296
  p = {a: param_count(tn.model_fn(cfg, a)) for a in tn.ARCHS}
  D, L = cfg.model.features, cfg.model.num_layers
  # what differs: the softmax model's RMSNorm gains ((2 L + 1) D) and TNL's LRPE angles in layer 0 (H x d = D)
  assert p["softmax"] - p["tnl"] == (2 * L + 1) * D - D
  with pytest.raises(ValueError, match="arch must be one of"):
    tn.model_fn(cfg, "rnn")
  with pytest.raises(ValueError, match="must be a multiple of model.num_heads"):
    ModelConfig(features=30, num_heads=4)


def _payload(deltas, lin_ms, soft_ms):
  cfg = PRESETS["cpu"]
  runs = {}
  for s, d in zip(cfg.seeds, deltas):
    runs[f"softmax-s{s}"] = {"final": {"loss": 2.0}, "history": []}
    runs[f"tnl-s{s}"] = {"final": {"loss": 2.0 + d}, "history": []}
  speed = [dict(n=1024, kernel="linear", mode="fwd+bwd", ms=lin_ms), dict(n=1024, kernel="softmax", mode="fwd+bwd",
                                                                          ms=soft_ms),
           dict(n=4096, kernel="softmax", mode="fwd+bwd", skipped="predicted 99 s > 20 s")]
  return {"runs": runs, "speed": speed}


def test_verdict_rule():
  cfg = PRESETS["cpu"]
  assert tn.verdict(cfg, _payload((0.01, 0.02), 1.0, 3.0)).startswith("VERDICT: reproduced")
  assert tn.verdict(cfg, _payload((0.10, 0.12), 1.0, 3.0)).startswith("VERDICT: partly")
  assert tn.verdict(cfg, _payload((-0.1, 0.0), 3.0, 1.0)).startswith("VERDICT: partly")
  assert tn.verdict(cfg, _payload((0.10, 0.12), 3.0, 1.0)).startswith("VERDICT: not reproduced")
  assert "incomplete" in tn.verdict(cfg, {})
  md, notes = tn._table(cfg, _payload((0.01, 0.02), 1.0, 3.0))
  assert "3.00x" in md and any("N=4096 softmax fwd+bwd" in n for n in notes)


def test_speed_table_skips_cells_predicted_too_slow():
  cfg = dataclasses.replace(PRESETS["smoke"], speed=SpeedConfig(lengths=(32, 4096), heads=1, head_dim=8, repeats=1,
                                                                 max_cell_s=1e-4))
  rows = tn.speed_table(cfg, progress=False)
  assert len(rows) == 2 * 2 * 2
  first = [r for r in rows if r["n"] == 32]
  assert all(r["ms"] > 0 for r in first)
  assert all("skipped" in r for r in rows if r["n"] == 4096)


@pytest.mark.slow  # ~1 CPU-minute: 2 models x (train, eval) compilations and the speed cells
def test_smoke_end_to_end_interrupt_resume_report(tmp_path, capsys):
  cfg = PRESETS["smoke"]
  out = tmp_path / "tn"
  with pytest.raises(Interrupted):
    tn.run(cfg, out, progress=False, verbose=False, interrupt_after=4)
  with pytest.raises(ValueError, match="--resume"):
    tn.run(cfg, out, progress=False, verbose=False)
  res = tn.run(cfg, out, resume=True, progress=False)
  printed = capsys.readouterr().out
  assert "resumed from step 3 of 6" in printed
  assert printed.strip().splitlines()[-1].startswith("VERDICT: ")
  for arch in tn.ARCHS:
    r = res["runs"][f"{arch}-s0"]
    assert r["steps"] == 6 and np.isfinite(r["final"]["loss"])
  assert {(r["n"], r["kernel"], r["mode"]) for r in res["speed"]} == {
      (n, k, m) for n in cfg.speed.lengths for k in ("linear", "softmax") for m in tn.MODES}
  for f in ("table.md", "verdict.txt", "loss_curves.png", "speed.png", "metrics.jsonl"):
    assert (out / f).stat().st_size > 0
  (out / "verdict.txt").unlink()
  rep = tn.run(cfg, out, report=True, progress=False, verbose=False)
  assert rep["verdict"] == res["verdict"] and (out / "verdict.txt").exists()
  assert json.loads((out / "results.json").read_text())["verdict"] == res["verdict"]
