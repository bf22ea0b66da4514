"""``python -m experiments pink``: presets, scoring of box-as-text answers, the random baseline, the verdict on
made-up rows, and (slow) the smoke preset end to end with resume and report."""

import json

import numpy as np
import pytest

from configs.pink import PRESETS, PinkConfig
from configs.substrates import VLMConfig
from experiments import SUBCOMMANDS
from experiments.pink import run as pink


def test_registered_and_presets_validate():
  assert "pink" in SUBCOMMANDS
  with pytest.raises(ValueError, match="cells"):
    PinkConfig("x", cells=("oracle",))
  with pytest.raises(ValueError, match="referring"):
    PinkConfig("x", vlm=VLMConfig("v", qtypes=("exists",)))


def test_scoring_of_reference_and_random_answers():
  cfg = PRESETS["smoke"]
  src = pink._test_source(cfg)
  a = src.arrays
  idx = a["answer_start"][:, None] + np.arange(4)[None]
  ref = np.take_along_axis(a["tokens"], idx, axis=1)
  ref = np.where(np.arange(4)[None] < a["answer_len"][:, None], ref, 0)
  perfect = pink.score(ref, src, 0.5)
  assert perfect["where_acc50"] == perfect["where_miou"] == perfect["where_exact"] == perfect["which_acc"] == 1.0
  assert perfect["where_n"] + perfect["which_n"] == cfg.num_test
  rnd = pink.score(pink.random_answers(src), src, 0.5)
  assert 0.0 <= rnd["where_miou"] < 0.3 and 0.0 <= rnd["which_acc"] < 0.4
  # a box answer that is not four coordinate tokens scores IoU 0
  bad = ref.copy()
  bad[:, 1] = 0
  assert pink.score(bad, src, 0.5)["where_miou"] == 0.0


def test_verdict_reads_the_rows():
  cfg = PRESETS["cpu"]
  base = [dict(cell="random", where_acc50=0.02, which_acc=0.1), dict(cell="no_image", where_acc50=0.03,
                                                                       which_acc=0.12)]
  assert pink.verdict(base + [dict(cell="vlm", where_acc50=0.6, which_acc=0.7)], cfg).startswith(
      "VERDICT: reproduced")
  assert pink.verdict(base + [dict(cell="vlm", where_acc50=0.05, which_acc=0.7)], cfg).startswith("VERDICT: partly")
  assert pink.verdict(base + [dict(cell="vlm", where_acc50=0.05, which_acc=0.15)], cfg).startswith(
      "VERDICT: not reproduced")
  assert "has not run" in pink.verdict(base, cfg)
  assert "88.7" in pink.table(base, cfg) or "0.887" in pink.table(base, cfg)


@pytest.mark.slow
def test_smoke_end_to_end_resume_and_report(tmp_path, capsys):
  cfg = PRESETS["smoke"]
  out = tmp_path / "out"
  with pytest.raises(Exception):  # a simulated kill in the first training
    pink.run(cfg, out, progress=False, verbose=False, interrupt_after=12)
  res = pink.run(cfg, out, resume=True, progress=False, verbose=False)
  assert "resumed from step" in capsys.readouterr().out
  assert [r["cell"] for r in res["rows"]] == list(cfg.cells)
  for r in res["rows"]:
    assert 0.0 <= r["where_miou"] <= 1.0 and 0.0 <= r["which_acc"] <= 1.0
  for f in ("results.json", "table.md", "grounding.png", "verdict.txt"):
    assert (out / f).stat().st_size > 0
  with pytest.raises(Exception, match="--resume"):
    pink.run(cfg, out, progress=False, verbose=False)
  again = pink.run(cfg, out, resume=True, progress=False, verbose=False)
  assert again["rows"] == res["rows"]
  rep = pink.run(cfg, out, report=True, progress=False, verbose=True)
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith("VERDICT: ")
  assert rep["verdict"] == res["verdict"]
  assert json.loads((out / "results.json").read_text())["fingerprint"] == res["fingerprint"]
