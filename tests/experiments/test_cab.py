"""``python -m experiments cab``: CAB's measures on hand-made numbers, the synthetic tasks' invariants, the verdict
logic, and the smoke preset end to end with resume and report."""

import dataclasses
import json
import math

import numpy as np
import pytest

from configs.cab import ALL_MODELS, PRESETS, TASKS, BenchConfig, EfficiencyConfig
from experiments import SUBCOMMANDS
from experiments.cab import metrics
from experiments.cab import run as cab
from experiments.common.config import ConfigError


def test_registered_presets_and_zoo_agree():
  from jaxattn.nn.efficient import ZOO
  assert "cab" in SUBCOMMANDS
  assert set(ALL_MODELS) == set(ZOO)
  with pytest.raises(ValueError, match="lengths"):
    EfficiencyConfig(lengths=(512, 256))
  with pytest.raises(ValueError, match="models"):
    BenchConfig(models=("flash",))
  cfg = PRESETS["cpu"]
  cells = cab.plan(cfg)
  assert sum(c[0] == "eff" for c in cells) == len(cfg.efficiency.lengths) * (len(cfg.efficiency.models) + 2)
  bench = [c for c in cells if c[0] == "bench"]
  # every member that supports a pattern, plus the no-attention baseline, on both tasks of each pattern
  for p in "NS", "CS", "NC", "CC":
    members = {c[3] for c in bench if c[1] == p}
    assert members == {m for m in ALL_MODELS if p in ZOO[m].patterns} | {"none"}
    assert {c[2] for c in bench if c[1] == p} == set(TASKS[p])


def test_compositional_index_is_the_mean_z_score():
  scores = {"a": {"m1": 1.0, "m2": 2.0, "m3": 3.0}, "b": {"m1": 10.0, "m2": 10.0, "m3": 40.0}}
  ci = metrics.compositional_index(scores, {"P": ["a", "b"]})["P"]
  za = (np.array([1.0, 2.0, 3.0]) - 2.0) / np.std([1.0, 2.0, 3.0])
  zb = (np.array([10, 10, 40]) - 20) / np.std([10, 10, 40])
  for i, m in enumerate(("m1", "m2", "m3")):
    assert ci[m] == pytest.approx((za[i] + zb[i]) / 2)
  low = metrics.compositional_index(scores, {"P": ["a"]}, signs={"a": -1.0})["P"]
  assert low["m1"] > low["m3"]  # lower is better flips the order
  # a model missing from one task is left out of the pattern's index
  assert set(metrics.compositional_index({"a": {"x": 1, "y": 2}, "b": {"x": 1}}, {"P": ["a", "b"]})["P"]) == {"x"}


def test_crossing_finds_the_intersection():
  n = np.array([256, 512, 1024, 2048, 4096, 8192], float)
  dense = 1e-4 * n ** 2  # quadratic
  eff = 0.3 * n + 50.0  # line: 1e-4 N^2 = 0.3 N + 50  ->  N ~ 3016.6
  c = metrics.crossing(n, dense, eff)
  root = (0.3 + math.sqrt(0.09 + 4e-4 * 50)) / 2e-4
  assert c["fit"] == pytest.approx(root, rel=1e-6)
  assert 2048 < c["measured"] < 4096 and not c["below_at_min"]
  never = metrics.crossing(n, dense, dense * 2)
  assert never["measured"] is None
  always = metrics.crossing(n, dense, dense / 2)
  assert always["below_at_min"] and always["measured"] == 256


def test_spearman():
  assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert metrics.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  assert math.isnan(metrics.spearman([1, 1, 1], [1, 2, 3]))


@pytest.mark.parametrize("task", sorted({t for ts in TASKS.values() for t in ts}))
def test_task_labels_follow_their_definition(task):
  V, T, S = 6, 24, 16
  src = metrics.TaskSource(task, 20, T, S, V, seed=3)
  a = src.arrays
  x, s, y = a["x"], a["src"], a["y"]
  assert x.shape == y.shape == (20, T) and s.shape == (20, S)
  assert x.max() < metrics.input_vocab(V) and s.max() < metrics.input_vocab(V)
  ncls = metrics.num_classes(task, V)
  assert y.max() < ncls and y.min() >= -1 and (y >= 0).sum() > 0
  again = metrics.TaskSource(task, 20, T, S, V, seed=3).arrays
  assert all(np.array_equal(a[k], again[k]) for k in a)  # deterministic
  other = metrics.TaskSource(task, 20, T, S, V, seed=4).arrays
  assert not np.array_equal(a["x"], other["x"]) or not np.array_equal(a["src"], other["src"])
  for r in range(20):
    for i in range(T):
      if y[r, i] < 0:
        continue
      t = x[r, i - 1] if task.endswith("_prev") else x[r, i]
      if task == "reverse":
        want = x[r, T - 1 - i]
      elif task == "count":
        want = min((x[r] == x[r, i]).sum(), 7)
      elif task == "count_prefix":
        want = min((x[r, :i + 1] == x[r, i]).sum(), 7)
      elif task == "recall":
        pos = [j for j in range(0, i, 2) if x[r, j] == x[r, i] and x[r, j + 1] >= V]
        want = x[r, pos[0] + 1] - V
      elif task.startswith("lookup"):
        j = int(np.flatnonzero(s[r, 0:2 * V:2] == t)[0]) * 2
        want = s[r, j + 1] - V
      else:
        want = min((s[r] == t).sum(), 7)
      assert y[r, i] == want, (task, r, i)
    if task.endswith("_prev"):
      assert y[r, 0] == -1


def _fake_rows(cfg, t_dense, t_eff, ci_of):
  rows = []
  for n in cfg.efficiency.lengths:
    for m in ("softmax_dense", "softmax_xla", *cfg.efficiency.models):
      ms = t_dense(n) if m == "softmax_dense" else t_dense(n) / 2 if m == "softmax_xla" else t_eff(n)
      mem = n * n * 1e-3 if m == "softmax_dense" else n * 1e-3
      rows.append(dict(kind="eff", model=m, N=n, status="ok", ms=ms, memory_mb=mem))
  for p in cfg.bench.patterns:
    for t in TASKS[p][:cfg.bench.tasks_per_pattern]:
      for m in cab._members(cfg, p):
        rows.append(dict(kind="bench", pattern=p, task=t, model=m, accuracy=ci_of(p, m)))
  return rows


def test_verdict_reads_the_claims():
  cfg = PRESETS["cpu"]
  rank = {m: i for i, m in enumerate(ALL_MODELS)} | {"none": 0}
  paper_like = _fake_rows(cfg, lambda n: 1e-4 * n * n, lambda n: 0.3 * n + 50,
                          lambda p, m: (rank[m] * (7 if p in ("CS", "CC") else 1)) % 11 / 11)
  an = cab.analyse(paper_like, cfg)
  line, notes = cab.verdict(paper_like, cfg, an)
  assert line.startswith("VERDICT: reproduced"), (line, an["correlations"])
  agree = _fake_rows(cfg, lambda n: 1e-4 * n * n, lambda n: 0.3 * n + 50, lambda p, m: rank[m] / 11)
  line, _ = cab.verdict(agree, cfg, cab.analyse(agree, cfg))
  assert line.startswith("VERDICT: partly") and "agree" in line
  slow = _fake_rows(cfg, lambda n: 1e-4 * n * n, lambda n: 10.0 * n, lambda p, m: rank[m] / 11)
  line, _ = cab.verdict(slow, cfg, cab.analyse(slow, cfg))
  assert "outside" in line
  md = cab.tables(paper_like, cfg, an)
  assert "| chance |" in md and "| none |" in md and "CAB time" in md and "1,877" in md
  incomplete = [r for r in paper_like if not (r["kind"] == "eff" and r["model"] == "abc")]
  assert "incomplete" in cab.verdict(incomplete, cfg, cab.analyse(incomplete, cfg))[0]


@pytest.mark.slow
def test_smoke_end_to_end_resume_and_report(tmp_path):
  cfg = PRESETS["smoke"]
  out = tmp_path / "run"
  res = cab.run(cfg, out, progress=False, verbose=False)
  keys = [r["key"] for r in res["rows"]]
  assert len(keys) == len(set(keys)) == len(cab.plan(cfg))
  for r in res["rows"]:
    if r["kind"] == "eff":
      assert r["status"] == "ok" and r["ms"] > 0 and r["memory_mb"] > 0
    else:
      assert 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["test_loss"])
  # the materialised baseline's memory grows faster than the blockwise one's
  eff = {(r["model"], r["N"]): r["memory_mb"] for r in res["rows"] if r["kind"] == "eff"}
  assert eff[("softmax_dense", 128)] / eff[("softmax_dense", 32)] > eff[("softmax_xla", 128)] / eff[("softmax_xla", 32)]
  assert set(res["analysis"]["ci"]) == {"NS", "CS"}
  assert res["verdict"].startswith("VERDICT: ")
  for f in ("results.json", "table.md", "time.png", "memory.png", "ci.png", "verdict.txt"):
    assert (out / f).stat().st_size > 0
  assert (out / "verdict.txt").read_text().strip() == res["verdict"]
  with pytest.raises(ConfigError, match="--resume"):
    cab.run(cfg, out, progress=False, verbose=False)
  # simulate a run killed before its last two cells: resume recomputes exactly those
  payload = json.loads((out / "results.json").read_text())
  payload["rows"] = payload["rows"][:-2]
  (out / "results.json").write_text(json.dumps(payload))
  again = cab.run(cfg, out, resume=True, progress=False, verbose=False)
  assert [r["key"] for r in again["rows"]] == keys
  assert again["rows"][:-2] == res["rows"][:-2]
  rep = cab.run(cfg, out, report=True, progress=False, verbose=False)
  assert rep["rows"] == again["rows"] and rep["verdict"] == again["verdict"]
  other = dataclasses.replace(cfg, bench=dataclasses.replace(cfg.bench, steps=4))
  with pytest.raises(ConfigError, match="other settings"):
    cab.run(other, out, resume=True, progress=False, verbose=False)


def test_cli_errors_name_the_flag(capsys):
  with pytest.raises(SystemExit) as e:
    cab.main(["--preset", "huge"])
  assert e.value.code == 2 and "--preset" in capsys.readouterr().err
