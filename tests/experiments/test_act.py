"""``python -m experiments act``: the in-context classification data, the verdict on made-up results, and the smoke
preset end to end (interrupted, resumed, reported)."""

import dataclasses
import json

import numpy as np
import pytest

from configs.act import PRESETS, ActConfig, TaskConfig
from experiments import SUBCOMMANDS
from experiments.act import run as act
from experiments.common.train import Interrupted


def test_registered_and_config_validation():
  assert "act" in SUBCOMMANDS
  with pytest.raises(ValueError, match="label_noise"):
    TaskConfig(label_noise=1.0)
  with pytest.raises(ValueError, match="at least one"):
    ActConfig("x", skip_first=2, skip_last=2)
  assert PRESETS["cpu"].task.seq_len == 35


def test_icl_source_layout_answers_and_disjoint_splits():
  task = TaskConfig(num_classes=3, items_per_class=4, shots=5, label_noise=0.0, num_train=300, num_calib=40,
                    num_test=50)
  tr, te = act.ICLSource(task, "train").arrays, act.ICLSource(task, "test").arrays
  assert tr["tokens"].shape == (300, task.seq_len) and te["tokens"].shape == (50, task.seq_len)
  assert np.array_equal(act.ICLSource(task, "test").arrays["tokens"], te["tokens"])  # deterministic
  tok = te["tokens"]
  assert (tok[:, 0] == act.BOS).all() and (tok[:, 2::4] == act.COLON).all() and (tok[:, 4:-2:4] == act.COMMA).all()
  types = act.token_types(tok, task.num_classes)
  assert (types[:, 3:-2:4] == 3).all() and (types[:, 1::4] == 4).all()
  for row, ans in zip(tok, te["answer"]):  # noise-free: a demonstration of the query's class shows the answer
    items, labels = row[1:-2:4], row[3:-2:4]
    cls = (items - 3 - task.num_classes) // task.items_per_class
    qcls = (row[-2] - 3 - task.num_classes) // task.items_per_class
    assert qcls in cls and set(labels[cls == qcls]) == {ans}
  assert (te["targets"][:, -1] == te["answer"]).all()
  assert not {r.tobytes() for r in tr["tokens"]} & {r.tobytes() for r in te["tokens"]}
  noisy = act.ICLSource(dataclasses.replace(task, label_noise=0.5), "train").arrays
  assert (noisy["targets"][:, 2:-2:4] == noisy["tokens"][:, 3:-2:4]).all()  # targets: the shown (noisy) labels


def _payload(gain, freq):
  return {"stats": {"hidden_sink_freq": freq, "first_token_mass": freq, "hidden_sinks_by_type": {"BOS": 1}},
          "test": dict(n=1000, none=0.6, searched=0.6 + gain, searched_k=2, top1=0.6, all=0.5, num_heads_total=4,
                       random=[0.6, 0.6], searched_k_random=2, paired_se=0.002),
          "search": {"baseline": 0.6, "ranked": [[[1, 0], 0.01], [[1, 1], -0.01]], "kept": [[1, 0]]}}


def test_verdict_reads_both_claims():
  cfg = PRESETS["smoke"]
  assert act.verdict(cfg, _payload(0.05, [[0.9, 0.0]])).startswith("VERDICT: reproduced")
  line = act.verdict(cfg, _payload(0.0, [[0.9, 0.0]]))
  assert line.startswith("VERDICT: partly") and "null result" in line
  assert act.verdict(cfg, _payload(0.0, [[0.1, 0.0]])).startswith("VERDICT: not reproduced")
  assert "incomplete" in act.verdict(cfg, {})


@pytest.mark.slow  # ~1 CPU-minute idle (training, 1 + 2 x 2 head-search compilations, pictures)
def test_smoke_end_to_end_interrupt_resume_report(tmp_path, capsys):
  cfg = dataclasses.replace(PRESETS["smoke"], train=dataclasses.replace(PRESETS["smoke"].train, steps=40))
  out = tmp_path / "act"
  with pytest.raises(Interrupted):
    act.run(cfg, out, progress=False, verbose=False, interrupt_after=35)  # after the checkpoint at step 30
  with pytest.raises(ValueError, match="--resume"):
    act.run(cfg, out, progress=False, verbose=False)
  res = act.run(cfg, out, resume=True, progress=False)
  assert "resumed from step" in capsys.readouterr().out
  L, H = cfg.model.num_layers, cfg.model.num_heads
  assert np.asarray(res["stats"]["first_token_mass"]).shape == (L, H)
  assert len(res["search"]["ranked"]) == (L - cfg.skip_first - cfg.skip_last) * H
  t = res["test"]
  for k in ("none", "searched", "all", "top1"):
    assert 0.0 <= t[k] <= 1.0
  assert len(t["random"]) == cfg.random_draws
  for f in ("table.md", "verdict.txt", "first_token_mass.png", "hidden_sinks.png", "search_gains.png",
            "column_scores.png", "attention_maps.png", "position_profile.png"):
    assert (out / f).stat().st_size > 0, f
  assert res["verdict"].startswith("VERDICT:") and "random candidate heads" in res["table_markdown"]
  rep = act.run(cfg, out, report=True, progress=False)
  assert capsys.readouterr().out.rstrip().splitlines()[-1] == rep["verdict"] == res["verdict"]
  assert json.loads((out / "results.json").read_text())["test"] == t
