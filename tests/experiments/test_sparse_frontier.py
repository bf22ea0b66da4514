"""``python -m experiments sparse_frontier``: the plan, budgets per cell, the verdict logic on made-up rows, and an
end-to-end micro run (slow) with resume and report."""

import dataclasses
import json

import pytest

from configs.sparse_frontier import PRESETS, SparseFrontierConfig
from experiments import SUBCOMMANDS
from experiments.sparse_frontier import run as sf


def test_registered_and_presets_validate():
  assert "sparse_frontier" in SUBCOMMANDS
  with pytest.raises(ValueError, match="start with 0.0"):
    SparseFrontierConfig("x", sparsities=(0.5,))
  with pytest.raises(ValueError, match="prefill_patterns"):
    SparseFrontierConfig("x", prefill_patterns=("quest",))
  cells = sf.plan(PRESETS["cpu"])
  assert len(cells) == 2 * (1 + 4 * 4 + 1 + 3 * 4)
  assert ("decode", "dense", 512, 0.0) in cells


def test_budgets_follow_the_target_sparsity():
  cfg = PRESETS["cpu"]
  for s in (0.5, 0.8, 0.9, 0.95):
    spec, _ = sf._spec(cfg, 16, "decode", "quest", 256, s)
    assert spec.budget % cfg.page_size == 0 and spec.budget >= cfg.page_size
    assert abs(spec.budget - (1 - s) * 240) <= cfg.page_size / 2 + 1e-9 or spec.budget == cfg.page_size
  # twice the context, same s: twice the keys (budgets proportional to N)
  a, _ = sf._spec(cfg, 16, "decode", "quest", 256, 0.8)
  b, _ = sf._spec(cfg, 16, "decode", "quest", 512, 0.8)
  assert abs(b.budget - 2 * a.budget) <= cfg.page_size
  vs, _ = sf._spec(cfg, 16, "prefill", "vertical_slash", 512, 0.9)
  static, _ = sf._spec(cfg, 16, "prefill", "sink_window", 512, 0.9)
  assert (static.builder.n_vertical, static.builder.n_slash) == (vs.builder.n_vertical, vs.builder.n_slash)
  assert static.builder.force_first == vs.builder.n_vertical  # nothing chosen from the inputs


def _rows(cfg, acc):
  """Made-up rows: ``acc(phase, pattern, n, s)`` gives the accuracy."""
  return [dict(phase=ph, pattern=p, N=n, s=s, accuracy=acc(ph, p, n, s), recall=1.0, sparsity=s, exact=0.0)
          for ph, p, n, s in sf.plan(cfg)]


def test_verdict_reads_the_claims_off_the_cells():
  cfg = PRESETS["cpu"]

  def paper_like(ph, p, n, s):  # decode flat, prefill drops after 0.5, the longer sequence drops later
    if s == 0 or ph == "decode":
      return 0.9
    return 0.9 if s <= (0.5 if n == 256 else 0.8) else 0.3

  line, notes = sf.verdict(_rows(cfg, paper_like), cfg)
  assert line.startswith("VERDICT: reproduced"), line
  line, _ = sf.verdict(_rows(cfg, lambda ph, p, n, s: 0.9 if s == 0 or ph == "prefill" else 0.1), cfg)
  assert line.startswith("VERDICT: not reproduced") or line.startswith("VERDICT: partly"), line
  assert "does NOT hold" in line
  line, _ = sf.verdict(_rows(cfg, lambda *a: 0.1), cfg)
  assert "not testable" in line
  assert "tolerated s" in sf.table(_rows(cfg, paper_like), cfg)


@pytest.mark.slow
def test_micro_run_end_to_end_resume_and_report(tmp_path):
  cfg = dataclasses.replace(PRESETS["smoke"], lengths=(64,), sparsities=(0.0, 0.5),
                            prefill_patterns=("vertical_slash",), decode_patterns=("quest",))
  out = tmp_path / "out"
  res = sf.run(cfg, out, progress=False, model_root=tmp_path / "models", verbose=False)
  assert len(res["rows"]) == len(sf.plan(cfg)) == 4
  for r in res["rows"]:
    assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["recall"] <= 1.0 + 1e-6
    assert len(r["recall_per_layer"]) == 1 and set(r["per_task"]) == set(("niah_single", "niah_multi", "mqar", "vt",
                                                                          "cok"))
  assert res["verdict"].startswith("VERDICT:")
  for f in ("results.json", "table.md", "accuracy.png", "recall.png", "verdict.txt"):
    assert (out / f).stat().st_size > 0
  with pytest.raises(Exception, match="--resume"):
    sf.run(cfg, out, progress=False, model_root=tmp_path / "models", verbose=False)
  again = sf.run(cfg, out, resume=True, progress=False, model_root=tmp_path / "models", verbose=False)
  assert again["rows"] == res["rows"]  # nothing re-evaluated
  rep = sf.run(cfg, out, report=True, progress=False, verbose=False)
  assert rep["verdict"] == res["verdict"]
  assert json.loads((out / "results.json").read_text())["fingerprint"] == res["fingerprint"]
