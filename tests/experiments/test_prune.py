"""``python -m experiments prune``: the canvases, the model's two executors, the verdict on made-up results, and the
smoke preset end to end (interrupted, resumed, reported)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.prune import PRESETS, ModelConfig, PruneConfig, TaskConfig
from experiments import SUBCOMMANDS
from experiments.common.train import Interrupted
from experiments.prune import data
from experiments.prune import run as prune_run
from jaxattn import prune, testing


def test_registered_and_config_validation():
  assert "prune" in SUBCOMMANDS
  with pytest.raises(ValueError, match="keep fractions"):
    PruneConfig("x", keep=(0.5, 0.0))
  with pytest.raises(ValueError, match="lm_layer=4"):
    PruneConfig("x", lm_layer=4)
  with pytest.raises(ValueError, match="same mean"):
    PruneConfig("x", stage_factors=(1.0, 1.0, 0.5))
  with pytest.raises(ValueError, match="num_distractors"):
    TaskConfig(size=16, num_distractors=3, pad_rows=1)
  with pytest.raises(ValueError, match="feature_layer"):
    ModelConfig(feature_layer=3)
  assert PRESETS["cpu"].task.num_tokens == 64


def test_records_layout_and_splits():
  task = dataclasses.replace(PRESETS["cpu"].task, pad_prob=0.5)
  r = data.make_records(task, 120, "test")
  assert np.array_equal(data.make_records(task, 120, "test")["image"], r["image"])  # deterministic
  np.testing.assert_allclose(r["target"].sum(1), 4.0)  # an 8 x 8 box covers 4 patches of 4 x 4 pixels
  g = task.size // task.patch
  padded = r["pad"].any(1)
  assert 0.3 < padded.mean() < 0.7 and (r["pad"][padded].sum(1) == task.pad_rows * g).all()
  assert (r["image"][padded][:, -task.pad_rows * task.patch:] == 0).all()  # padding: exactly 0, no noise
  assert (r["target"][r["pad"]] == 0).all()  # the digit is never on padding
  ids = {w: data.word(w) for w in ("what", "is", "yes", "no")}
  for tok, n, ans, lab in zip(r["tokens"], r["length"], r["answer"], r["label"]):
    words = [data.WORDS[t] for t in tok[:n]]
    assert words[0] == "<bos>" and words[-1] == "?" and (tok[n:] == 0).all()
    if words[1] == "what":
      assert data.WORDS[ans] == str(lab)
    else:
      assert ans == (ids["yes"] if words[4] == str(lab) else ids["no"])
  tr = data.make_records(task, 30, "train")
  assert not {x.tobytes() for x in tr["image"]} & {x.tobytes() for x in r["image"]}


def test_model_executors_agree_and_scores_cover_survivors():
  from flax import nnx

  from experiments.prune.model import PruneVLM, layer_qk, lm_forward, vit_forward
  cfg = PRESETS["smoke"]
  model = nnx.jit(lambda: PruneVLM(cfg.model, cfg.task, rngs=nnx.Rngs(0)))()  # eager NNX init is slow
  r = data.make_records(cfg.task, 4, "test")
  N = cfg.task.num_tokens
  s1 = prune.topk_keep_order(jax.random.normal(jax.random.key(0), (4, N)), 8)
  s2 = prune.compose(s1, prune.topk_keep_order(jax.random.normal(jax.random.key(1), (4, 8)), 3))

  @nnx.jit
  def go(model, images, tokens, length, s1, s2):
    vis, cls_logits, qks = vit_forward(model, images, want_qk=True)
    plan = ((1, s1), (2, s2))
    g = lm_forward(model, vis, tokens, plan)
    m = lm_forward(model, vis, tokens, plan, executor="mask")
    full = lm_forward(model, vis, tokens)
    x, n = lm_forward(model, vis, tokens, plan[:1], stop=2)
    q, k = layer_qk(model.lm[2], x)
    valid = jnp.arange(data.PROMPT)[None] < length[:, None]
    s = prune.text_to_visual(q[:, n:], k[:, :n], k[:, n:], text_valid=valid)
    return vis, cls_logits, len(qks), g, m, full, x, s

  vis, cls_logits, nq, g, m, full, x, s = go(model, r["image"], r["tokens"], r["length"], s1, s2)
  assert vis.shape == (4, N, cfg.model.lm_dim) and cls_logits.shape == (4, 10) and nq == cfg.model.vit_layers
  testing.assert_close(g, m)  # gathering the kept tokens == segment ids over the full sequence
  assert float(jnp.abs(full - g).max()) > 1e-4  # pruning changed something
  assert x.shape[1] == 8 + data.PROMPT
  assert s.shape == (4, 8) and bool(jnp.isfinite(s).all())


def _cells(cfg, acc):
  return {f"{r:g}": {s: dict(accuracy=acc(s, r), retained=acc(s, r) / 0.9, target_kept=0.5, k=1, keep=r)
                     for s in prune_run.SCORERS} for r in cfg.keep}


def test_verdict_reads_the_three_claims():
  cfg = PRESETS["cpu"]
  good = {"random": 0.3, "random@lm": 0.5, "norm": 0.4, "oracle": 0.9, "fastv": 0.7, "adaptinfer": 0.8, "adaptinfer+debias": 0.85}
  acc = lambda s, r: good.get(s, 0.86 if "cls" in s or "multi" in s else 0.7)
  line = prune_run.verdict(cfg, {"cells": _cells(cfg, acc)})
  assert line.startswith("VERDICT: reproduced"), line
  bad = lambda s, r: 0.3
  assert prune_run.verdict(cfg, {"cells": _cells(cfg, bad)}).startswith("VERDICT: not reproduced")
  half = lambda s, r: 0.3 if "cls" in s else acc(s, r)
  assert prune_run.verdict(cfg, {"cells": _cells(cfg, half)}).startswith("VERDICT: partly")
  mixed = lambda s, r: 0.86 if s == "random@lm" else acc(s, r)  # random at the LM layer as good: not shown
  line = prune_run.verdict(cfg, {"cells": _cells(cfg, mixed)})
  assert line.startswith("VERDICT: partly") and "AdaptInfer no" in line
  assert "incomplete" in prune_run.verdict(cfg, {"cells": {}})


@pytest.mark.slow  # ~1.5 CPU-minutes idle: training plus ~15 small compilations (scorers, pruned forwards)
def test_smoke_end_to_end_interrupt_resume_report(tmp_path, capsys):
  cfg = PRESETS["smoke"]
  out = tmp_path / "prune"
  with pytest.raises(Interrupted):
    prune_run.run(cfg, out, progress=False, verbose=False, interrupt_after=25)  # after the checkpoint at step 20
  with pytest.raises(ValueError, match="--resume"):
    prune_run.run(cfg, out, progress=False, verbose=False)
  res = prune_run.run(cfg, out, resume=True, progress=False)
  assert "resumed from step" in capsys.readouterr().out
  assert set(res["cells"]) == {f"{r:g}" for r in cfg.keep}
  for key, cells in res["cells"].items():
    assert set(cells) == set(prune_run.SCORERS)
    k = prune.keep_count(cfg.task.num_tokens, float(key))
    for name, c in cells.items():
      assert 0.0 <= c["accuracy"] <= 1.0 and 0.0 <= c["target_kept"] <= 1.0 + 1e-6
      if "multi" not in name:
        assert c["k"] == k
    assert cells["oracle"]["target_kept"] >= cells["random"]["target_kept"]
    assert cells["adaptinfer+pad"]["pad_kept"] == 0.0  # suppression never keeps padding (k <= non-pad tokens)
  assert len(res["calibration"]["shift"]) == cfg.model.lm_layers - 1
  assert len(res["timing"]["rows"]) == len(cfg.keep) and res["timing"]["full_s"] > 0
  for f in ("table.md", "verdict.txt", "accuracy_vs_kept.png", "position_trend.png"):
    assert (out / f).stat().st_size > 0, f
  assert "random" in res["table_markdown"] and "oracle" in res["table_markdown"] and "93.1%" in res["table_markdown"]
  rep = prune_run.run(cfg, out, report=True, progress=False)
  assert capsys.readouterr().out.rstrip().splitlines()[-1] == rep["verdict"] == res["verdict"]
  assert json.loads((out / "results.json").read_text())["cells"] == res["cells"]
