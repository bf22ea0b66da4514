"""``python -m experiments posir``: config validation, bucketed batches, the verdict / table / bias on made-up
results, and the smoke preset end to end (interrupted inside a training, resumed, reported)."""

import dataclasses
import json

import numpy as np
import pytest

from configs.posir import CPU_GRID, DEFAULT_GRID, PRESETS, CorpusConfig, PosirConfig, Retriever
from experiments import SUBCOMMANDS
from experiments.pair.train import Interrupted
from experiments.posir import run as posir


def test_registered_and_config_validation():
  assert "posir" in SUBCOMMANDS
  with pytest.raises(ValueError, match="doc_lengths"):
    CorpusConfig(doc_lengths=(1024,))
  with pytest.raises(ValueError, match="pooling"):
    Retriever("x", True, "max")
  with pytest.raises(ValueError, match="distinct names"):
    PosirConfig("x", retrievers=(CPU_GRID[0], CPU_GRID[0]))
  names = {r.name for r in DEFAULT_GRID}
  assert {r.name for r in CPU_GRID} <= names and len(DEFAULT_GRID) > len(CPU_GRID)
  assert {(r.causal, r.pooling) for r in CPU_GRID} == {(True, "last"), (True, "mean"), (False, "last"),
                                                      (False, "mean")}


def test_bucket_batches_hold_one_length():
  cfg = PRESETS["smoke"]
  data = posir._corpus(cfg, "train")
  fn = posir._bucket_batches(data, 8, 0, cfg.corpus.doc_lengths)
  seen = set()
  for step in range(6):
    b = fn(step)
    L = b["doc"].shape[1]
    seen.add(L)
    assert L in cfg.corpus.doc_lengths and (b["doc_len"] == L).all() and b["hard_neg"].shape[2] == L
  np.testing.assert_array_equal(fn(3)["doc"], fn(3)["doc"])  # a pure function of the step
  assert len(seen) == 2


def _cell(profile, se=0.01, sal=None):
  p = np.asarray(profile, float)
  return dict(recall_at_1=0.3, recall_at_10=0.8, mrr=0.5, ndcg_at_10=0.6, profile=p.tolist(),
              profile_se=np.full(p.shape, se).tolist(), bias=posir.bias(p).tolist(),
              saliency=(sal if sal is not None else (p / p.sum(1, keepdims=True))).tolist())


def _payload(cfg, profiles):
  cells = {r.name: _cell(p) for r, p in zip(cfg.retrievers, profiles)}
  cells["baselines"] = {"bm25": _cell([[0.5, 0.5], [0.5, 0.5]]), "random": dict(recall_at_1=0.01, recall_at_10=0.1,
                                                                                 mrr=0.05, ndcg_at_10=0.04)}
  return {"cells": cells}


def test_verdict_and_table():
  cfg = PRESETS["smoke"]
  recency = [[0.5, 0.55], [0.3, 0.8]]  # grows with length; saliency mirrors (built from the profile)
  line = posir.verdict(cfg, _payload(cfg, [recency, recency]))
  assert line.startswith("VERDICT: reproduced") and "causal + last +0.50" in line
  flat = [[0.5, 0.5], [0.5, 0.5]]
  p = _payload(cfg, [flat, flat])
  for c in p["cells"].values():
    if "saliency" in c:
      c["saliency"] = [[0.5, 0.5], [0.5, 0.5]]
  assert posir.verdict(cfg, p).startswith("VERDICT: not reproduced")
  assert "incomplete" in posir.verdict(cfg, {"cells": {}})
  md, notes = posir._table(cfg, _payload(cfg, [recency, flat]))
  for name in ("random (expected)", "BM25", "causal + last", "bidir + mean", "+0.50"):
    assert name in md
  assert any("PosIR" in n for n in notes)
  np.testing.assert_allclose(posir.bias([[0.2, 0.4, 0.9]]), [0.7])


@pytest.mark.slow  # ~2 CPU-minutes idle: BM25, a causal LM and two retrievers compiled per length bucket
def test_smoke_end_to_end_interrupt_resume_report(tmp_path, capsys):
  cfg = PRESETS["smoke"]
  out = tmp_path / "posir"
  with pytest.raises(Interrupted):
    posir.run(cfg, out, progress=False, verbose=False, interrupt_after=3)  # inside the pre-training
  with pytest.raises(ValueError, match="--resume"):
    posir.run(cfg, out, progress=False, verbose=False)
  res = posir.run(cfg, out, resume=True, progress=False)
  assert "resumed from step" in capsys.readouterr().out
  cells = res["cells"]
  nb, nk = len(cfg.corpus.doc_lengths), cfg.corpus.position_bins
  assert {"baselines", "pretrain"} | {r.name for r in cfg.retrievers} <= set(cells)
  for r in cfg.retrievers:
    c = cells[r.name]
    assert 0 <= c["recall_at_1"] <= c["recall_at_10"] <= 1 and 0 < c["mrr"] <= 1
    assert np.asarray(c["profile"]).shape == (nb, nk) and np.asarray(c["saliency"]).shape == (nb, nk)
    np.testing.assert_allclose(np.asarray(c["saliency"]).sum(1), 1.0, atol=1e-3)  # shares of the gradient mass
    assert sum(map(sum, c["profile_counts"])) == cfg.corpus.test_queries
  assert cells["baselines"]["bm25"]["mrr"] > cells["baselines"]["random"]["mrr"]
  for f in ("table.md", "verdict.txt", "position_profile.png", "saliency_profile.png", "metrics.jsonl"):
    assert (out / f).exists()
  rep = posir.run(cfg, out, report=True, progress=False)
  assert rep["verdict"] == res["verdict"] == (out / "verdict.txt").read_text().strip()
  assert json.loads((out / "results.json").read_text())["verdict"].startswith("VERDICT: ")
