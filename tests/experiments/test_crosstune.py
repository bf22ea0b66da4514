"""``python -m experiments crosstune``: presets, the synthetic data's invariants, the verdict logic on made-up rows,
and the smoke preset end to end with resume and report."""

import dataclasses
import json

import numpy as np
import pytest

from configs.crosstune import PRESETS, CrossTuneConfig
from experiments import SUBCOMMANDS
from experiments.crosstune import run as ct


def test_registered_and_presets_validate():
  assert "crosstune" in SUBCOMMANDS
  assert set(PRESETS) == {"smoke", "cpu", "gpu"}
  with pytest.raises(ValueError, match="desc_words"):
    CrossTuneConfig("x", desc_words=30)
  with pytest.raises(ValueError, match="shots"):
    CrossTuneConfig("x", shots=(0,))


def test_sentences_hold_their_topic_words_and_one_distractor():
  cfg = PRESETS["cpu"]
  labels = np.repeat(np.arange(cfg.num_topics), 5)
  toks = ct.make_data(cfg, np.random.default_rng(0), labels)
  assert toks.shape == (len(labels), cfg.seq_len)
  topic = np.where(toks < cfg.num_topics * cfg.topic_words, toks // cfg.topic_words, -1)
  own = (topic == labels[:, None]).sum(1)
  other = ((topic >= 0) & (topic != labels[:, None])).sum(1)
  assert (own == cfg.topic_tokens).all() and (other == 1).all()
  desc = ct.descriptions(cfg)
  assert (desc // cfg.topic_words == np.arange(cfg.num_topics)[:, None]).all()
  assert (ct.descriptions(cfg, noise=True) >= cfg.num_topics * cfg.topic_words).all()


def _rows(cfg, crosstune, noise):
  rows = []
  for s in cfg.shots:
    for k in range(cfg.seeds):
      rows.append(dict(shots=s, seed=k, random=0.125, zero_shot_desc=0.3, prototype=0.4, linear_probe=0.5,
                       crosstune=crosstune, crosstune_noise_desc=noise))
  return rows


def test_verdict_reads_the_gain_off_the_rows():
  cfg = PRESETS["cpu"]
  assert ct.verdict(_rows(cfg, 0.6, 0.5), cfg).startswith("VERDICT: reproduced")
  assert ct.verdict(_rows(cfg, 0.5, 0.6), cfg).startswith("VERDICT: not reproduced")
  assert ct.verdict(_rows(cfg, 0.51, 0.4), cfg).startswith("VERDICT: partly")
  t = ct.table(_rows(cfg, 0.6, 0.5), cfg)
  assert "+5.7" in t and "linear_probe" in t and "+0.100" in t


def test_smoke_end_to_end_resume_and_report(tmp_path):
  cfg = PRESETS["smoke"]
  out = tmp_path / "out"
  res = ct.run(cfg, out, progress=False, verbose=False)
  assert len(res["rows"]) == len(cfg.shots) * cfg.seeds
  for r in res["rows"]:
    for m in ct.METHODS:
      assert 0.0 <= r[m] <= 1.0
    assert np.isfinite(r["crosstune_final_loss"])
  for f in ("results.json", "table.md", "accuracy.png", "verdict.txt"):
    assert (out / f).stat().st_size > 0
  assert (out / "verdict.txt").read_text().startswith("VERDICT:")
  with pytest.raises(Exception, match="--resume"):
    ct.run(cfg, out, progress=False, verbose=False)
  again = ct.run(cfg, out, resume=True, progress=False, verbose=False)
  assert again["rows"] == res["rows"]  # nothing re-run
  rep = ct.run(cfg, out, report=True, progress=False, verbose=False)
  assert rep["verdict"] == res["verdict"]
  assert json.loads((out / "results.json").read_text())["fingerprint"] == res["fingerprint"]
  with pytest.raises(Exception, match="other settings"):
    ct.run(dataclasses.replace(cfg, steps=21), out, resume=True, progress=False, verbose=False)
