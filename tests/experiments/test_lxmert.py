"""``python -m experiments lxmert``: presets, the question source, the frozen region features (the questions must be
answerable from them), equal-parameter matching, the verdict on made-up rows, and (slow) the smoke preset end to end
with resume and report."""

import dataclasses
import json

import numpy as np
import pytest

from configs.lxmert import PRESETS, LXMERTConfig
from experiments import SUBCOMMANDS
from experiments.lxmert import run as lx
from experiments.substrates import canvas, grammar


def test_registered_and_presets_validate():
  assert "lxmert" in SUBCOMMANDS
  with pytest.raises(ValueError, match="models"):
    LXMERTConfig("x", models=("cnn",))
  with pytest.raises(ValueError, match="qtypes"):
    LXMERTConfig("x", qtypes=("where",))
  with pytest.raises(ValueError, match="object_features"):
    LXMERTConfig("x", object_features="cnn")
  with pytest.raises(ValueError, match="feature_dim"):
    LXMERTConfig("x", feature_dim=0)
  assert lx.plan(PRESETS["cpu"]) == [(m, 0) for m in ("coattention", "single_stream", "question_only")]


def test_source_fields_and_majority_baseline():
  cfg = PRESETS["smoke"]
  a = lx.VQASource(cfg, 50, 0, "train").arrays
  assert a["question"].shape == (50, 13) and a["objects"].shape == (50, 4, cfg.feature_dim)
  pad = np.arange(4)[None] >= a["count"][:, None]
  assert pad.any() and (a["objects"][pad] == 0).all() and (a["objects"][~pad] >= 0).all()
  assert (a["boxes"] >= 0).all() and (a["boxes"] <= 1).all()
  assert (a["answer"] >= 0).all() and (a["question_len"] >= 6).all()
  m = lx.majority(cfg, 0)
  assert 0.0 < m["accuracy"] < 1.0 and set(m["per_type"]) == set(cfg.qtypes)


def _solve(words, labels, boxes):
  """The answer to one question from object labels and pixel boxes (the grammar's rules, written out again)."""
  if words[1] == "is" and words[2] == "there":
    return "yes" if int(words[4]) in labels else "no"
  if words[1] == "is":  # <bos> is the A REL of the B ?
    a, rel, b = int(words[3]), words[4], int(words[7])
    if a not in labels or b not in labels:
      return "?"
    return "yes" if grammar.relation_holds(rel, boxes[labels.index(a)], boxes[labels.index(b)]) else "no"
  rel, b = words[4], int(words[7])  # <bos> what digit is REL of the B ?
  if b not in labels:
    return "?"
  j = labels.index(b)
  best, dist = "none", np.inf
  for i, box in enumerate(boxes):
    if i != j and grammar.relation_holds(rel, box, boxes[j], grammar.MIN_OFFSET):
      d = np.hypot(*np.subtract(box, boxes[j])[:2])
      best, dist = (str(labels[i]), d) if d < dist else (best, dist)
  return best


def test_questions_are_answerable_from_the_region_features():
  """The data check the first version lacked: a digit read off each object's frozen region feature by a linear
  probe, plus the boxes, answers the held-out questions of every type far above the majority answer."""
  from sklearn.linear_model import LogisticRegression
  cfg = dataclasses.replace(PRESETS["smoke"], canvas=PRESETS["cpu"].canvas)
  w, b, acc = lx.region_encoder(cfg.canvas, cfg.feature_dim)
  assert acc >= 0.9 and w.shape == (64, cfg.feature_dim)
  assert np.array_equal(lx.region_encoder.__wrapped__(cfg.canvas, cfg.feature_dim)[0], w)  # deterministic
  tr, te = lx.VQASource(cfg, 400, 0, "train"), lx.VQASource(cfg, 300, 1000, "test")
  s_tr = canvas.make_scenes(cfg.canvas, 400, 0, "train")
  s_te = canvas.make_scenes(cfg.canvas, 300, 1000, "test")
  valid = s_tr["labels"] >= 0
  probe = LogisticRegression(max_iter=300).fit(tr.arrays["objects"][valid], s_tr["labels"][valid])
  v = grammar.Vocab(cfg.canvas)
  a = te.arrays
  hits = {q: [] for q in cfg.qtypes}
  for i in range(300):
    k = int(a["count"][i])
    pred = [int(c) for c in probe.predict(a["objects"][i, :k])]
    boxes = a["boxes"][i, :k] * cfg.canvas.size
    assert np.array_equal(boxes, s_te["boxes"][i, :k])  # the records carry the scene's boxes, in order
    q = grammar.QTYPES[a["qtype"][i]]
    hits[q].append(_solve(v.decode(a["question"][i]), pred, boxes) == grammar.ANSWERS[a["answer"][i]])
  m = lx.majority(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_train=400, num_eval=300)), 0)
  for q in cfg.qtypes:
    assert np.mean(hits[q]) >= 0.85 and np.mean(hits[q]) >= m["per_type"][q] + 0.3, (q, np.mean(hits[q]))


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
  rows = _rows(dict(majority=0.4, question_only=0.45, coattention=0.8, single_stream=0.7))
  for r in rows:  # both models learn "exists" but stay at the majority answer on the relational questions
    if r["model"] != "majority":
      r["per_type"].update(rel_yn=0.41, rel_what=0.4)
  line = lx.verdict(rows, cfg)
  assert line.startswith("VERDICT: not reproduced") and "relational" in line
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
