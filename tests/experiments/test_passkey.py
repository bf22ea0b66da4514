"""Passkey experiment: prompt generator, presets, and an end-to-end smoke run of ``python -m experiments passkey``."""

import json

import numpy as np
import pytest

from configs.passkey import PRESETS, PasskeyConfig
from experiments import SUBCOMMANDS
from experiments.passkey import data
from jaxattn.ops.landmark import data as lm_data


def test_prompts_have_the_key_twice_and_as_answer():
  rng = np.random.default_rng(0)
  for length in (256, 1024):
    toks, keys, depth = data.make_batch(rng, 4, length, 16)
    assert toks.shape == (4, data.regular_length(length, 16))
    assert lm_data.insert_landmarks(toks, 16, data.LANDMARK).shape == (4, length)
    assert np.all((depth >= 0) & (depth <= 1)) and np.all((keys >= 1) & (keys <= data.MAX_KEY))
    for row, key in zip(toks, keys):
      digits = [data.TOKEN[c] for c in f"{key:05d}"]
      text = data.decode(row)
      assert text.startswith("<bos> there is an important info")
      assert text.count(" ".join(f"{key:05d}")) == 3
      assert list(row[-5:]) == digits
      assert "what is the pass key ? the pass key is" in text
      assert data.LANDMARK not in row and data.PAD not in row


def test_regular_length_and_config_validation():
  assert data.regular_length(256, 16) == 240
  with pytest.raises(ValueError, match="multiple of block_size"):
    data.regular_length(250, 16)
  with pytest.raises(ValueError, match="fewer than"):
    data.regular_length(64, 16)
  with pytest.raises(ValueError, match="chunk_size=100 must be a multiple of block_size=16"):
    PasskeyConfig(chunk_size=100)
  assert PRESETS["cpu"].mem_blocks == 4096 // 16
  assert "passkey" in SUBCOMMANDS


def test_smoke_run_writes_table_json_and_plot(tmp_path):
  from experiments.passkey import run

  assert run.main(["--preset", "smoke", "--out", str(tmp_path), "--quiet"]) == 0
  result = json.loads((tmp_path / "passkey.json").read_text())
  cfg = PRESETS["smoke"]
  assert {(r["length"], r["method"]) for r in result["results"]} == {
      (L, m) for L in cfg.eval_lengths for m in ["window"] + [f"landmark top-k={k}" for k in cfg.top_ks]}
  assert all(0.0 <= r["accuracy"] <= 1.0 and r["samples"] == cfg.eval_samples for r in result["results"])
  assert len(result["train_curve"]) == cfg.steps
  assert "| window |" in (tmp_path / "passkey.md").read_text()
  assert (tmp_path / "passkey.png").stat().st_size > 0
