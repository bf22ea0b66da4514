"""``python -m experiments recycled``: the recovery curve's invariants on made-up probabilities, every cache policy's
decode on a random-init tiny LM (recovery in [0, 1], dense = 1, set sizes), the verdict on made-up rows, and a
smoke run end to end with resume and report."""

import dataclasses
import json

import numpy as np
import pytest

from configs.longctx import get_config
from configs.recycled import POLICIES, PRESETS, RecycledConfig, stride_of
from experiments import SUBCOMMANDS
from experiments.recycled import run as rc


def test_registered_and_config_validates():
  assert "recycled" in SUBCOMMANDS
  assert stride_of("recycled_s10") == 10 and stride_of("recycled_qs") is None and stride_of("h2o") is None
  with pytest.raises(ValueError, match="start with 'vanilla'"):
    RecycledConfig("x", policies=("h2o", "vanilla"))
  with pytest.raises(ValueError, match="policies must be"):
    RecycledConfig("x", policies=("vanilla", "quest"))
  with pytest.raises(ValueError, match="recovery_steps"):
    RecycledConfig("x", decode_len=8, recovery_steps=10, lengths=(256,))
  assert RecycledConfig("x", policies=("vanilla", "recycled_s3")).policies[1] == "recycled_s3"
  cfg = PRESETS["cpu"]
  assert [cfg.budget(n) for n in cfg.lengths] == [32, 64]  # K = N/8
  assert len(rc.plan(cfg)) == len(POLICIES) * 2


def _probs(rng, A, nl, B, H, T, P):
  """Random causal probability rows: step t sees P + t + 1 keys."""
  p = np.zeros((A, nl, B, H, T))
  for t in range(A):
    n = P + t + 1
    x = rng.gamma(0.3, size=(nl, B, H, n))
    p[t, ..., :n] = x / x.sum(-1, keepdims=True)
  return p


def test_recovery_curve_invariants():
  rng = np.random.default_rng(0)
  A, nl, B, H, G, T, P, K = 8, 2, 3, 4, 2, 48, 40, 6
  p = _probs(rng, A, nl, B, H, T, P)
  # a top-K selection per step and kv head (distinct written slots), as select_topk_from_probs returns it
  sel = np.stack([[[[rng.choice(P + t + 1, K, replace=False) for _ in range(G)] for _ in range(B)]
                   for _ in range(nl)] for t in range(A)])
  c = rc.recovery_curve(p, sel, prompt_len=P, k=K, sinks=2, steps=3)
  for name in ("recycled", "sink_window", "dense"):
    assert len(c[name]) == 4
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in c[name])
  np.testing.assert_allclose(c["dense"], 1.0, atol=1e-9)
  assert np.asarray(c["recycled_per_layer"]).shape == (nl, 4)
  # a set chosen on identical, K-sparse rows recovers everything; the sink + window set of equal size does not
  q = np.zeros_like(p)
  keys = rng.choice(np.arange(4, P - K), K, replace=False)  # outside the sinks and every window
  q[..., keys] = 1.0 / K
  sel_q = np.broadcast_to(keys, (A, nl, B, G, K))
  c = rc.recovery_curve(q, sel_q, prompt_len=P, k=K, sinks=2, steps=3)
  np.testing.assert_allclose(c["recycled"], 1.0, atol=1e-9)
  np.testing.assert_allclose(c["sink_window"], 0.0, atol=1e-9)
  # the sink + window set has exactly K keys: a uniform row over n keys gives K / n
  u = np.zeros_like(p)
  for t in range(A):
    u[t, ..., :P + t + 1] = 1.0 / (P + t + 1)
  c = rc.recovery_curve(u, sel, prompt_len=P, k=K, sinks=2, steps=0)
  expect = np.mean([K / (P + t + 1) for t in range(A)])
  np.testing.assert_allclose(c["sink_window"][0], expect, rtol=1e-9)
  np.testing.assert_allclose(c["recycled"][0], expect, rtol=1e-9)  # K distinct keys, uniform row


@pytest.mark.slow
def test_every_policy_decodes_with_equal_budgets():
  """Random-init smoke model (no training): recovery in [0, 1], dense = 1, and the attended set sizes."""
  from experiments.longctx.tasks import LongCtxSource
  from experiments.longctx.train import build
  mcfg = get_config("smoke")
  model = build(mcfg)
  cfg = RecycledConfig("t", model="smoke", lengths=(64,), decode_len=24, samples_per_task=1,
                       policies=("vanilla", "streaming", "h2o", "snapkv", "recycled_s5", "recycled_qs"),
                       recovery_steps=5)
  src = LongCtxSource(64, 3, 7, mcfg.data)
  toks, ans = np.asarray(src.arrays["tokens"]), np.asarray(src.arrays["answer"])
  n, K, P, A = 64, 8, 40, 24
  lengths = P + 1 + np.arange(A)  # keys seen at each decode step
  rows = {p: rc._eval_cell(model, cfg, p, n, toks, ans) for p in cfg.policies}
  for p, r in rows.items():
    assert 0.0 <= r["recovery"] <= 1.0 + 1e-6 and np.isfinite(r["nll"]), (p, r)
    assert r["K"] == K and r["prompt_len"] == P
  assert rows["vanilla"]["recovery"] == pytest.approx(1.0, abs=1e-5)
  assert rows["vanilla"]["keys_relative"] == pytest.approx(1.0) and rows["vanilla"]["full_fraction"] == 1.0
  # StreamingLLM: exactly K keys; H2O: K kept + the new one; SnapKV: K + every decoded token
  assert rows["streaming"]["keys_relative"] == pytest.approx(np.mean(K / lengths), rel=1e-5)
  assert rows["h2o"]["keys_relative"] == pytest.approx(np.mean((K + 1) / lengths), rel=1e-5)
  assert rows["snapkv"]["keys_relative"] == pytest.approx(np.mean((K + 1 + np.arange(A)) / lengths), rel=1e-5)
  # fixed stride 5: steps 4, 9, 14, 19 are full (the prefill's last token counts as the first full step)
  assert rows["recycled_s5"]["full_fraction"] == pytest.approx(4 / A)
  assert rows["streaming"]["full_fraction"] == 0.0
  assert rows["recycled_s5"]["recovery"] > rows["snapkv"]["recovery"] - 1e-6 or \
      rows["recycled_s5"]["full_fraction"] > 0  # full steps recover everything


def _rows(cfg, nll):
  return [dict(policy=p, N=n, nll=nll[p], nll_answer=nll[p], accuracy=0.05, recovery=0.5, full_fraction=0.0,
               keys_relative=0.2) for p, n in rc.plan(cfg)]


def test_verdict_reads_ordering_and_recovery():
  cfg = PRESETS["cpu"]
  good = dict(vanilla=1.0, streaming=1.5, h2o=1.4, snapkv=1.45, recycled_s5=1.1, recycled_s10=1.2, recycled_qs=1.15)
  curve = {"recycled": [0.9, 0.8] + [0.7] * 9, "sink_window": [0.3] * 11, "dense": [1.0] * 11}
  curves = {str(n): curve for n in cfg.lengths}
  line, notes = rc.verdict(_rows(cfg, good), curves, cfg)
  assert line.startswith("VERDICT: reproduced"), line
  assert any("not testable" in n for n in notes)  # dense accuracy 0.05
  bad = dict(good, recycled_s10=1.6)
  line, _ = rc.verdict(_rows(cfg, bad), curves, cfg)
  assert line.startswith("VERDICT: partly"), line
  flat = {"recycled": [0.3] * 11, "sink_window": [0.4] * 11, "dense": [1.0] * 11}
  line, _ = rc.verdict(_rows(cfg, bad), {str(n): flat for n in cfg.lengths}, cfg)
  assert line.startswith("VERDICT: not reproduced"), line
  line, _ = rc.verdict([], {}, cfg)
  assert "incomplete" in line
  assert "paper PPL" in rc.table(_rows(cfg, good), curves, cfg)


@pytest.mark.slow
def test_smoke_run_end_to_end_resume_and_report(tmp_path):
  cfg = dataclasses.replace(PRESETS["smoke"], lengths=(64,), policies=("vanilla", "streaming"))
  out = tmp_path / "out"
  res = rc.run(cfg, out, progress=False, model_root=tmp_path / "models", verbose=False)
  assert [(r["policy"], r["N"]) for r in res["rows"]] == rc.plan(cfg)
  assert set(res["recovery"]) == {"64"}
  for f in ("results.json", "table.md", "recovery.png", "loss.png", "verdict.txt"):
    assert (out / f).stat().st_size > 0
  assert res["verdict"].startswith("VERDICT:")
  assert (out / "verdict.txt").read_text().strip() == res["verdict"]
  with pytest.raises(Exception, match="--resume"):
    rc.run(cfg, out, progress=False, model_root=tmp_path / "models", verbose=False)
  # a killed run: drop the last cell and resume; the finished cell is not re-evaluated
  saved = json.loads((out / "results.json").read_text())
  kept = saved["rows"][0]
  saved["rows"] = saved["rows"][:1]
  (out / "results.json").write_text(json.dumps(saved))
  again = rc.run(cfg, out, resume=True, progress=False, model_root=tmp_path / "models", verbose=False)
  assert again["rows"][0] == kept and len(again["rows"]) == 2
  assert again["rows"][1]["nll"] == pytest.approx(res["rows"][1]["nll"], rel=1e-5)
  rep = rc.run(cfg, out, report=True, progress=False, verbose=False)
  assert rep["verdict"] == again["verdict"] and rep["rows"] == again["rows"]
