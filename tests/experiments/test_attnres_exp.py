"""``python -m experiments attnres``: the verdict rule on made-up results, and the smoke preset end to end
(interrupted, resumed, reported)."""

import json

import numpy as np
import pytest

from configs.attnres import PRESETS, AttnResConfig
from experiments import SUBCOMMANDS
from experiments.attnres import run as ar
from experiments.common.train import Interrupted


def test_registered_and_config_validation():
  assert "attnres" in SUBCOMMANDS
  with pytest.raises(ValueError, match="must start with 'none'"):
    AttnResConfig("x", modes=("full", "none"))
  with pytest.raises(ValueError, match="seeds must be distinct"):
    AttnResConfig("x", seeds=(0, 0))
  m = PRESETS["cpu"].model
  assert 2 * m.num_layers % m.block_size == 0


def _payload(d_full, d_block, diff=1e-7):
  cfg = PRESETS["cpu"]
  runs = {}
  for mode, d in (("none", (0.0, 0.0)), ("full", d_full), ("block", d_block)):
    for s, x in zip(cfg.seeds, d):
      runs[f"{mode}-s{s}"] = {"final": {"loss": 2.0 + x}, "history": [{"step": 1, "loss": 3.0}]}
  return {"runs": runs, "two_phase": {"block": {"max_abs_diff": diff, "one_phase_ms": 1.0, "two_phase_ms": 1.0}}}


def test_verdict_rule():
  cfg = PRESETS["cpu"]
  assert ar.verdict(cfg, _payload((-0.02, -0.03), (-0.01, -0.01))).startswith("VERDICT: reproduced")
  assert ar.verdict(cfg, _payload((-0.02, -0.03), (-0.01, 0.001))).startswith("VERDICT: partly")  # one seed worse
  assert ar.verdict(cfg, _payload((-0.004, -0.004), (0.01, 0.0))).startswith("VERDICT: not reproduced")  # margin
  line = ar.verdict(cfg, _payload((-0.02, -0.03), (-0.01, -0.01), diff=1e-2))
  assert line.startswith("VERDICT: not reproduced") and "not exact" in line
  assert "incomplete" in ar.verdict(cfg, {})


@pytest.mark.slow  # ~1-2 CPU-minutes: 3 models x (train, eval, timing, two-phase) compilations
def test_smoke_end_to_end_interrupt_resume_report(tmp_path, capsys):
  cfg = PRESETS["smoke"]
  out = tmp_path / "attnres"
  with pytest.raises(Interrupted):
    ar.run(cfg, out, progress=False, verbose=False, interrupt_after=4)  # after the checkpoint at step 3
  with pytest.raises(ValueError, match="--resume"):
    ar.run(cfg, out, progress=False, verbose=False)
  res = ar.run(cfg, out, resume=True, progress=False)
  printed = capsys.readouterr().out
  assert "resumed from step 3 of 6" in printed
  assert printed.strip().splitlines()[-1].startswith("VERDICT: ")
  for mode in cfg.modes:
    r = res["runs"][f"{mode}-s0"]
    assert r["steps"] == 6 and np.isfinite(r["final"]["loss"]) and [h["step"] for h in r["history"]] == [3, 6]
    assert res["overheads"][mode]["step_ms"] > 0 and res["overheads"][mode]["temp_bytes"] > 0
    assert len(res["rms"][mode]["input_rms"]) == 2 * cfg.model.num_layers
  assert res["params"]["full"] - res["params"]["none"] == 2 * cfg.model.features * (2 * cfg.model.num_layers + 1)
  for t in res["two_phase"].values():
    assert t["max_abs_diff"] <= 1e-4
  assert 0 < res["unigram_loss"] < np.log(256)
  for f in ("table.md", "verdict.txt", "loss_curves.png", "rms_by_depth.png", "metrics.jsonl"):
    assert (out / f).stat().st_size > 0
  table = (out / "table.md").read_text()
  assert "unigram" in table and "1.766" in table and "Two-phase" in table
  # --report rebuilds the outputs from results.json without computing
  (out / "table.md").unlink()
  rep = ar.run(cfg, out, report=True, progress=False, verbose=False)
  assert rep["verdict"] == res["verdict"] and (out / "table.md").exists()
  assert json.loads((out / "results.json").read_text())["verdict"] == res["verdict"]
