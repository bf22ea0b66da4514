"""``python -m experiments dse``: config validation, the verdict and table on made-up results, and the smoke preset
end to end (interrupted inside a training, resumed, reported)."""

import dataclasses
import json

import pytest

from configs.dse import PRESETS, DseConfig, ModelConfig
from experiments import SUBCOMMANDS
from experiments.dse import run as dse
from experiments.pair.train import Interrupted


def test_registered_and_config_validation():
  assert "dse" in SUBCOMMANDS
  with pytest.raises(ValueError, match="alphas"):
    DseConfig("x", alphas=(0.0,))
  with pytest.raises(ValueError, match="cross_pooling"):
    ModelConfig(cross_pooling="max")
  with pytest.raises(ValueError, match="temperature"):
    DseConfig("x", temperature=0.0)


def _payload(teacher, a0, a1, speed):
  cell = lambda acc: {"accuracy": acc, "spearman": 0.5}
  return {"cells": {"majority": {"accuracy": 0.5, "spearman": None}, "lexical": cell(0.6), "bi_untrained": cell(0.5),
                    "bi_contrastive": cell(0.8), "teacher": cell(teacher), "dse_a0": cell(a0), "dse_a1": cell(a1),
                    "throughput": dict(rank_n=100, bi_seconds=0.1, bi_pairs_per_s=1e5 * speed, cross_pairs_timed=10,
                                       cross_seconds=1.0, cross_pairs_per_s=1e5, speedup=speed,
                                       cross_seconds_extrapolated=0.1, device="cpu")}}


def test_verdict_and_table_read_the_cells():
  cfg = dataclasses.replace(PRESETS["smoke"], alphas=(1.0,))
  assert dse.verdict(cfg, _payload(0.95, 0.80, 0.92, 500)).startswith("VERDICT: reproduced")
  assert dse.verdict(cfg, _payload(0.95, 0.80, 0.92, 20)).startswith("VERDICT: partly")
  line = dse.verdict(cfg, _payload(0.80, 0.99, 0.85, 500))
  assert line.startswith("VERDICT: partly") and "weaker than the labels-only" in line
  assert dse.verdict(cfg, _payload(0.95, 0.60, 0.61, 20)).startswith("VERDICT: not reproduced")
  assert "incomplete" in dse.verdict(cfg, {})
  md, notes = dse._table(cfg, _payload(0.95, 0.80, 0.92, 500))
  for name in ("majority class", "lexical overlap", "untrained", "InfoNCE", "DSE distilled", "cross-encoder teacher",
               "speed-up", "~4.6%"):
    assert name in md
  assert any("Paper" in n for n in notes)


@pytest.mark.slow  # ~1.5 CPU-minutes idle: five small encoders compiled and trained, timings, plots
def test_smoke_end_to_end_interrupt_resume_report(tmp_path, capsys):
  cfg = PRESETS["smoke"]
  out = tmp_path / "dse"
  with pytest.raises(Interrupted):
    dse.run(cfg, out, progress=False, verbose=False, interrupt_after=12)  # inside the teacher's training
  with pytest.raises(ValueError, match="--resume"):
    dse.run(cfg, out, progress=False, verbose=False)
  res = dse.run(cfg, out, resume=True, progress=False)
  assert "resumed from step" in capsys.readouterr().out
  cells = res["cells"]
  for k in ("majority", "lexical", "bi_untrained", "bi_contrastive", "teacher", "dse_a0", "dse_a1", "throughput"):
    assert k in cells
  for k, c in cells.items():
    if k != "throughput":
      assert 0.0 <= c["accuracy"] <= 1.0
  assert cells["throughput"]["bi_pairs_per_s"] > 0 and cells["throughput"]["cross_pairs_per_s"] > 0
  for f in ("table.md", "verdict.txt", "accuracy_vs_speed.png", "metrics.jsonl"):
    assert (out / f).exists()
  assert res["verdict"].startswith("VERDICT: ")
  lines = capsys.readouterr().out.strip().splitlines()
  rep = dse.run(cfg, out, report=True, progress=False)
  assert rep["verdict"] == res["verdict"]
  assert json.loads((out / "results.json").read_text())["verdict"] == res["verdict"]
  assert (out / "verdict.txt").read_text().strip() == res["verdict"]
  del lines
