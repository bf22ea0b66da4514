"""``python -m experiments lxmert``: presets, the question source, equal-parameter matching, the verdict on made-up
rows, and (slow) the smoke preset end to end with resume and report."""

import dataclasses
import json

import numpy as np
import pytest

from configs.lxmert import PRESETS, LXMERTConfig
from experiments import SUBCOMMANDS
from experiments.lxmert import run as lx


def test_registered_and_presets_validate():
  assert "lxmert" in SUBCOMMANDS
  with pytest.raises(ValueError, match="models"):
    LXMERTConfig("x", models=("cnn",))
  with pytest.raises(ValueError, match="qtypes"):
    LXMERTConfig("x", qtypes=("where",))
  assert lx.plan(PRESETS["cpu"]) == [(m, 0) for m in ("coattention", "single_stream", "question_only")]


def test_source_fields_and_majority_baseline():
  cfg = PRESETS["smoke"]
  a = lx.VQASource(cfg, 50, 0, "train").arrays
  assert a["question"].shape == (50, 13) and a["objects"].shape == (50, 4, 64)
  assert (a["boxes"] >= 0).all() and (a["boxes"] <= 1).all()
  assert (a["answer"] >= 0).all() and (a["question_len"] >= 6).all()
  m = lx.majority(cfg, 0)
  assert 0.0 < m["accuracy"] < 1.0 and set(m["per_type"]) == set(cfg.qtypes)


@pytest.mark.slow
def test_single_stream_depth_matches_parameters_within_10_percent():
  layers, counts = lx.match_layers(PRESETS["cpu"])
  assert layers >= 1
  assert abs(counts["single_stream"] / counts["coattention"] - 1) <= 0.10


def _rows(acc):
  return [dict(model=m, seed=0, accuracy=a, per_type={"exists": a, "rel_yn": a, "rel_what": a})
          for m, a in acc.items()]


def test_verdict_reads_the_rows():
  cfg = PRESETS["cpu"]
  line = lx.verdict(_rows(dict(majority=0.4, question_only=0.45, coattention=0.8, single_stream=0.7)), cfg)
  assert line.startswith("VERDICT: reproduced")
  line = lx.verdict(_rows(dict(majority=0.4, question_only=0.45, coattention=0.7, single_stream=0.8)), cfg)
  assert line.startswith("VERDICT: not reproduced") and "single-stream model is better" in line
  line = lx.verdict(_rows(dict(majority=0.4, question_only=0.45, coattention=0.46, single_stream=0.46)), cfg)
  assert "language-prior" in line
  assert "incomplete" in lx.verdict(_rows(dict(majority=0.4)), cfg)
  md = lx.table(_rows(dict(majority=0.4, coattention=0.8)), cfg, {"coattention": 10})
  assert "| majority |" in md and "72.5" in md


@pytest.mark.slow
def test_smoke_end_to_end_resume_and_report(tmp_path, capsys):
  cfg = PRESETS["smoke"]
  out = tmp_path / "out"
  with pytest.raises(Exception):  # a simulated kill in the first training
    lx.run(cfg, out, progress=False, verbose=False, interrupt_after=20)
  res = lx.run(cfg, out, resume=True, progress=False, verbose=False)
  assert "resumed from step" in capsys.readouterr().out
  models = sorted(r["model"] for r in res["rows"])
  assert models == sorted(["majority", "coattention", "single_stream", "question_only"])
  for r in res["rows"]:
    assert 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["accuracy"])
  for f in ("results.json", "table.md", "accuracy.png", "verdict.txt"):
    assert (out / f).stat().st_size > 0
  assert (out / "verdict.txt").read_text().startswith("VERDICT: ")
  with pytest.raises(Exception, match="--resume"):
    lx.run(cfg, out, progress=False, verbose=False)
  again = lx.run(cfg, out, resume=True, progress=False, verbose=False)
  assert again["rows"] == res["rows"]
  rep = lx.run(cfg, out, report=True, progress=False, verbose=True)
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith("VERDICT: ")
  assert rep["verdict"] == res["verdict"]
  assert json.loads((out / "results.json").read_text())["fingerprint"] == res["fingerprint"]
  with pytest.raises(Exception, match="other settings"):
    lx.run(dataclasses.replace(cfg, seeds=(1,)), out, resume=True, progress=False, verbose=False)
