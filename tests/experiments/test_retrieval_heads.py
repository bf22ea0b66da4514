"""``python -m experiments retrieval_heads``: the needle data, the decode loop's invariants (no mask = baseline,
decode-only masking, argmax positions), the verdict logic on made-up results, and the smoke preset end to end with
a kill-and-resume and ``--report``."""

import dataclasses
import json

import numpy as np
import pytest

from configs.retrieval_heads import PRESETS, RESERVED, RetrievalHeadsConfig, TaskConfig
from experiments import SUBCOMMANDS
from experiments.common.train import Interrupted
from experiments.retrieval_heads import lm
from experiments.retrieval_heads import run as rh

SMOKE = PRESETS["smoke"]


def test_registered_and_presets_validate():
  assert "retrieval_heads" in SUBCOMMANDS
  with pytest.raises(ValueError, match="exclude_top"):
    RetrievalHeadsConfig("x", ks=(1, 8), exclude_top=4)
  with pytest.raises(ValueError, match="ks must be increasing"):
    RetrievalHeadsConfig("x", ks=(4, 2))
  with pytest.raises(ValueError, match="vocab"):
    TaskConfig(vocab=6, needle_len=4)
  assert rh.plan(PRESETS["cpu"])[0] == ("none", 0, 0) and len(rh.plan(PRESETS["cpu"])) == 1 + 4 * (1 + 3)


def test_needles_are_unique_in_the_prompt_and_held_out():
  t = TaskConfig(length=40, needle_len=4, vocab=24, train_size=300, detect_size=50, test_size=50, seed=3)
  train = lm.NeedleSource(t, "train").batch()
  test = lm.NeedleSource(t, "test").batch()
  assert not {tuple(a) for a in train.answer.tolist()} & {tuple(a) for a in test.answer.tolist()}
  for b in (train, test):
    assert b.tokens.shape == (len(b.answer), 40) and (b.tokens[:, 0] == lm.BOS).all()
    assert (b.tokens[:, -1] == lm.QUERY).all()
    for row, ans, s0, s1 in zip(b.tokens, b.answer, b.needle_start, b.needle_end):
      assert (row[s0:s1] == ans).all() and row[s0 - 1] == row[s1] == lm.MARK
      assert len(set(ans.tolist())) == 4 and ans.min() >= RESERVED
      rest = np.concatenate([row[:s0], row[s1:]])
      assert not np.isin(ans, rest).any()  # no decoy: each needle token occurs once in the prompt
  again = lm.NeedleSource(t, "test").batch()
  assert (again.tokens == test.tokens).all()  # deterministic


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("rh") / "out"
  return out, rh.run(SMOKE, out, progress=False, verbose=False)


def test_smoke_end_to_end_outputs_and_invariants(smoke_run):
  out, res = smoke_run
  for f in ("results.json", "table.md", "verdict.txt", "scores.png", "masking.png", "attention.png",
            "metrics.jsonl"):
    assert (out / f).stat().st_size > 0, f
  s = np.asarray(res["scores"]["score"])
  L, H = SMOKE.model.num_layers, SMOKE.model.num_heads
  assert s.shape == (L, H) and (s >= 0).all() and (s <= 1).all()
  assert res["scores"]["fraction"] == pytest.approx(np.mean(s > SMOKE.threshold))
  rows = {(r["method"], r["k"], r["draw"]): r for r in res["rows"]}
  assert set(rows) == set(rh.plan(SMOKE))
  for r in res["rows"]:
    assert 0 <= r["exact"] <= r["rouge1"] <= 1  # an exact match recalls every needle token
  top = {tuple(h) for h in rows[("top", 2, 0)]["heads"]}
  rnd = {tuple(h) for h in rows[("random", 2, 0)]["heads"]}
  ranked = [tuple(h) for h, _ in res["scores"]["top"]]
  assert top == set(ranked[:2]) and len(rnd) == 2 and not rnd & set(ranked[:SMOKE.exclude_top])
  assert rows[("none", 0, 0)]["heads"] == []
  line = (out / "verdict.txt").read_text().strip()
  assert line.startswith("VERDICT: ") and line == res["verdict"]
  assert "top-k retrieval heads" in (out / "table.md").read_text()


def test_report_rebuilds_from_results(smoke_run):
  out, res = smoke_run
  (out / "table.md").unlink()
  rep = rh.run(SMOKE, out, report=True, progress=False, verbose=False)
  assert rep["verdict"] == res["verdict"] and rep["rows"] == res["rows"]
  assert (out / "table.md").exists()
  with pytest.raises(ValueError, match="--resume"):
    rh.run(SMOKE, out, progress=False, verbose=False)


def test_no_mask_is_the_baseline_and_masks_touch_only_the_decode(smoke_run):
  # a fresh (untrained) model: generation with an empty mask equals plain generation, the argmax positions lie in
  # the causal range, and a mask changes nothing about the prefill (the cache written before decoding)
  from flax import nnx

  from jaxattn import analysis
  model = lm.Decoder(SMOKE.model, SMOKE.task.vocab, rngs=nnx.Rngs(1))
  b = lm.NeedleSource(SMOKE.task, "test").batch()
  P, K = SMOKE.task.length, SMOKE.task.needle_len
  g0, am = lm.generate(model, b.tokens, K, capture_argmax=True)
  g1, _ = lm.generate(model, b.tokens, K, head_mask=analysis.HeadMask(frozenset()))
  assert (g0 == g1).all()
  assert am.shape == (len(b.tokens), K, SMOKE.model.num_layers, SMOKE.model.num_heads)
  assert (am >= 0).all() and (am <= (P - 1 + np.arange(K))[None, :, None, None]).all()
  lm.generate(model, b.tokens, K, head_mask=analysis.HeadMask(frozenset({(0, 0), (1, 1)})))
  masked_cache = np.asarray(model.blocks[1].attn.cached_key[...])[:, :P - 1]
  lm.generate(model, b.tokens, K)
  plain_cache = np.asarray(model.blocks[1].attn.cached_key[...])[:, :P - 1]
  np.testing.assert_array_equal(masked_cache, plain_cache)


@pytest.mark.slow  # ~35 CPU-seconds: two partial smoke runs
def test_kill_during_training_then_resume(tmp_path, capsys):
  out = tmp_path / "out"
  with pytest.raises(Interrupted):
    rh.run(SMOKE, out, progress=False, verbose=False, interrupt_after=25)  # checkpoint at step 20
  res = rh.run(SMOKE, out, resume=True, progress=False, verbose=False)
  assert "resumed from step 20 of 40" in capsys.readouterr().out
  assert res["train"]["steps"] == 40 and len(res["rows"]) == len(rh.plan(SMOKE))
  assert json.loads((out / "results.json").read_text())["verdict"] == res["verdict"]


def _payload(cfg, base, top, rand, above, mx):
  rows = [dict(method="none", k=0, draw=0, heads=[], exact=base, rouge1=base)]
  for k in cfg.ks:
    rows.append(dict(method="top", k=k, draw=0, heads=[], exact=top, rouge1=top))
    rows += [dict(method="random", k=k, draw=d, heads=[], exact=rand, rouge1=rand) for d in range(cfg.random_draws)]
  n = cfg.model.num_layers * cfg.model.num_heads
  return dict(rows=rows, scores=dict(above=above, fraction=above / n, max=mx, mean=0.05, kept=60, prompts=64,
                                     top=[[[0, 0], mx]], score=[[0.0] * cfg.model.num_heads] * cfg.model.num_layers))


def test_verdict_logic():
  cfg = PRESETS["cpu"]
  assert rh.verdict(_payload(cfg, 0.9, 0.1, 0.85, 2, 0.8), cfg)[0].startswith("VERDICT: reproduced")
  assert rh.verdict(_payload(cfg, 0.9, 0.1, 0.85, 0, 0.05), cfg)[0].startswith("VERDICT: partly")
  assert rh.verdict(_payload(cfg, 0.9, 0.8, 0.85, 0, 0.05), cfg)[0].startswith("VERDICT: not reproduced")
  assert "not testable" in rh.verdict(_payload(cfg, 0.1, 0.0, 0.1, 2, 0.8), cfg)[0]
  assert "incomplete" in rh.verdict(dict(rows=[]), cfg)[0]
  assert "top-k retrieval heads" in rh.table(_payload(cfg, 0.9, 0.1, 0.85, 2, 0.8), cfg)
