"""``python -m experiments halonet``: presets, equal parameters, the verdict logic on made-up rows, and a micro run
end to end with an interrupted-then-resumed training run and --report."""

import dataclasses
import json

import jax
import pytest
from flax import nnx

from configs.halonet import PRESETS, HaloNetConfig
from experiments import SUBCOMMANDS
from experiments.common.config import ConfigError
from experiments.common.train import Interrupted
from experiments.halonet import run as hn


def _params(cfg, kind):
  model = nnx.eval_shape(lambda: hn.build_model(cfg, kind, nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_registered_presets_validate_and_parameters_match():
  assert "halonet" in SUBCOMMANDS
  with pytest.raises(ValueError, match="models must be"):
    HaloNetConfig("x", models=("resnet",))
  with pytest.raises(ValueError, match=r"halo must lie in \[0, block=4\], got 5"):
    HaloNetConfig("x", halo=5)
  with pytest.raises(ValueError, match="canvas must be"):
    HaloNetConfig("x", canvas=12)
  for preset in ("cpu", "gpu"):
    cfg = dataclasses.replace(PRESETS[preset], models=("conv", "halo", "halo_h0", "global"))
    counts = {m: _params(cfg, m) for m in cfg.models}
    for m, n in counts.items():
      assert abs(n / counts["conv"] - 1) <= 0.10, (preset, counts)


def _rows(cfg, acc):
  return [dict(model=m, seed=s, accuracy=acc[m] + 0.01 * s, params=1000, xla_flops=1e6,
               attention_flops={"conv": 0, "halo": 1e5, "halo_h0": 5e4, "global": 4e5}[m]) for m, s in hn.plan(cfg)]


def test_verdict_reads_the_claims_off_the_rows():
  cfg = PRESETS["cpu"]
  line, _ = hn.verdict(_rows(cfg, dict(conv=0.9, halo=0.9, **{"global": 0.8})), cfg)
  assert line.startswith("VERDICT: reproduced"), line
  line, _ = hn.verdict(_rows(cfg, dict(conv=0.9, halo=0.7, **{"global": 0.8})), cfg)
  assert line.startswith("VERDICT: partly") and "does NOT match" in line, line
  line, _ = hn.verdict(_rows(cfg, dict(conv=0.2, halo=0.2, **{"global": 0.2})), cfg)
  assert "not testable" in line
  line, _ = hn.verdict(_rows(cfg, dict(conv=0.9, halo=0.9, **{"global": 0.8}))[:2], cfg)
  assert "incomplete" in line
  line, _ = hn.verdict(_rows(cfg, dict(conv=0.9, halo=0.9, **{"global": 0.8}))[:3], cfg)
  assert line.startswith("VERDICT: partly") and "3 of 6 runs" in line, line
  assert hn.attention_flops(cfg, "global") > hn.attention_flops(cfg, "halo") > 0 == hn.attention_flops(cfg, "conv")
  assert "paper" in hn.table(_rows(cfg, dict(conv=0.9, halo=0.9, **{"global": 0.8})), cfg)


@pytest.mark.slow
def test_micro_run_interrupted_resumed_and_reported(tmp_path, capsys):
  cfg = dataclasses.replace(PRESETS["smoke"], canvas=8, steps=4)
  out = tmp_path / "run"
  with pytest.raises(Interrupted):
    hn.run(cfg, out, progress=False, verbose=False, interrupt_after=2)
  res = hn.run(cfg, out, resume=True, progress=False, verbose=False)
  assert "resumed from step" in capsys.readouterr().out
  assert [(r["model"], r["seed"]) for r in res["rows"]] == hn.plan(cfg)
  for r in res["rows"]:
    assert 0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 4 and r["xla_flops"] > 0 and r["params"] > 0
  assert res["rows"][1]["attention_flops"] > 0 == res["rows"][0]["attention_flops"]
  for f in ("results.json", "table.md", "verdict.txt", "accuracy.png", "metrics.jsonl"):
    assert (out / f).stat().st_size > 0
  assert not (out / "ckpt").exists()
  assert res["verdict"].startswith("VERDICT:") and "conv" in res["table_markdown"]
  with pytest.raises(ConfigError, match="--resume"):
    hn.run(cfg, out, progress=False, verbose=False)
  rep = hn.run(cfg, out, report=True, progress=False, verbose=True)
  assert rep["verdict"] == res["verdict"]
  assert capsys.readouterr().out.rstrip().splitlines()[-1] == res["verdict"]
  assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]
