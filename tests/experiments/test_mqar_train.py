"""MQAR training: a tiny run beats chance, and a killed run resumes to exactly the parameters of an uninterrupted
one (in the training loop and through the ``python -m experiments mqar`` command)."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import mqar
from experiments.common.train import Interrupted, fit, tree_equal
from experiments.data.mqar import IGNORE_INDEX, MQARSource
from experiments.mqar import run as mqar_run

# the "test" preset: N=16, D=2, V=32, attention d=16, 32 steps of 32 examples, evaluation every 8 steps
CFG = dataclasses.replace(mqar.get_config("test"),
                          model=dataclasses.replace(mqar.TEST.model, embed_dropout=0.1),  # exercise dropout keys
                          train=dataclasses.replace(mqar.TEST.train, checkpoint_every=6))
TASK = CFG.tasks[0]


def _fit(trainer, ckpt_dir, **kw):
  d = CFG.data
  train = MQARSource(d.vocab_size, TASK.seq_len, TASK.num_kv_pairs, d.num_train, d.seed)
  test = MQARSource(d.vocab_size, TASK.seq_len, TASK.num_kv_pairs, d.num_test, d.seed + 1)
  return fit(trainer, lr=CFG.lrs[0], seed=0, train_source=train, eval_source=test, batch_size=CFG.train.batch_size,
             eval_batch_size=CFG.train.eval_batch_size, eval_every=CFG.train.eval_every, checkpoint_dir=ckpt_dir,
             checkpoint_every=CFG.train.checkpoint_every, pad_values={"labels": IGNORE_INDEX}, progress=False, **kw)


@pytest.fixture(scope="module")
def trainer():
  return mqar_run._trainer(TASK, "attention", CFG.d_models[0], CFG.model, CFG.data.vocab_size, CFG.total_steps(TASK),
                           CFG.train)


def test_kill_and_resume_gives_bitwise_identical_parameters(trainer, tmp_path):
  full = _fit(trainer, tmp_path / "full")
  assert full.steps == CFG.total_steps(TASK) == 32 and full.resumed_from is None
  with pytest.raises(Interrupted) as e:
    _fit(trainer, tmp_path / "killed", interrupt_after=15)  # killed at step 15: steps 13-15 are lost
  assert e.value.step == 15
  resumed = _fit(trainer, tmp_path / "killed")
  assert resumed.resumed_from == 12  # the last checkpoint (every 6 steps) before the kill
  assert tree_equal(resumed.state.params, full.state.params)
  assert tree_equal(resumed.state.opt_state, full.state.opt_state)
  assert resumed.history == full.history
  again = _fit(trainer, tmp_path / "killed")  # a finished run returns its stored result without training
  assert again.resumed_from == 32 and again.history == full.history
  assert tree_equal(again.state.params, full.state.params)


def test_smoke_training_beats_chance(tmp_path):
  """The test preset trained for 96 steps (a few seconds): well above guessing a value token at random."""
  cfg = dataclasses.replace(mqar.get_config("test"), train=dataclasses.replace(mqar.TEST.train, epochs=6))
  rows = mqar_run.run_sweep(cfg, tmp_path, progress=False, verbose=False)["runs"]
  chance = 1 / (cfg.data.vocab_size // 2)
  assert rows[0]["steps"] == 96
  assert rows[0]["accuracy"] > 3 * chance, rows
  assert rows[0]["test_loss"] < np.log(cfg.data.vocab_size // 2)


def _final_params(workdir: pathlib.Path) -> dict:
  (run_dir,) = (workdir / "checkpoints").iterdir()
  step = max(int(p.name) for p in run_dir.iterdir() if p.name.isdigit())
  return ocp.StandardCheckpointer().restore(run_dir / str(step) / "state")["params"]


def test_sweep_command_resumes_after_kill(tmp_path, capsys):
  argv = ["--preset", "test", "--keep_checkpoints", "true", "--train.checkpoint_every", "6", "--no-progress"]
  cfg, _ = mqar_run.parse(argv)
  mqar_run.main(argv + ["--workdir", str(tmp_path / "full")])
  with pytest.raises(Interrupted):
    mqar_run.run_sweep(cfg, tmp_path / "killed", interrupt_after=10, progress=False)
  mqar_run.main(argv + ["--workdir", str(tmp_path / "killed")])  # the same command again
  out = capsys.readouterr().out
  assert "| attention |" in out and "runs trained in" in out
  assert out.rstrip().splitlines()[-1].startswith("verdict: not tested")  # the test preset has attention only
  full = json.loads((tmp_path / "full" / "results.json").read_text())
  resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
  strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
  assert strip(resumed["runs"]) == strip(full["runs"])
  assert tree_equal(_final_params(tmp_path / "killed"), _final_params(tmp_path / "full"))
  for name in ("results.json", "results.md", "mqar_accuracy.png", "metrics.jsonl", "config.json"):
    assert (tmp_path / "killed" / name).exists(), name
  # a finished sweep is not retrained; other data/model/train settings are refused
  t0 = time.time()
  mqar_run.main(argv + ["--out", str(tmp_path / "full")])  # --out is --workdir
  out = capsys.readouterr().out
  assert "0 runs trained" in out and time.time() - t0 < 30
  assert "1 of 1 runs already finished" in out and "nothing to train; --fresh retrains" in out
  with pytest.raises(SystemExit, match="different data/model/train settings"):
    mqar_run.main(argv + ["--workdir", str(tmp_path / "full"), "--train.epochs", "3"])
  # --report with a larger grid trains nothing and tables what has finished
  mqar_run.main(argv + ["--workdir", str(tmp_path / "full"), "--lrs", "0.01,0.03", "--report"])
  out = capsys.readouterr().out
  assert "0 runs trained" in out and "| attention |" in out
  assert json.loads((tmp_path / "full" / "results.json").read_text())["runs"] == full["runs"]
  # a sweep resumed with a narrower grid keeps the other finished runs in results.json (and out of its table)
  mqar_run.main(argv + ["--workdir", str(tmp_path / "full"), "--lrs", "0.03"])
  out = capsys.readouterr().out
  assert "1 runs trained" in out
  narrowed = json.loads((tmp_path / "full" / "results.json").read_text())
  runs = narrowed["runs"]
  assert [r["lr"] for r in runs] == [0.03, 0.01] and runs[1] == full["runs"][0]
  assert narrowed["table"]["attention"][TASK.name][str(CFG.d_models[0])] == runs[0]["accuracy"]


@pytest.mark.slow
def test_sigkill_and_rerun_matches(tmp_path):
  """A real kill (SIGKILL of the process mid-run), then the same command: same results as an uninterrupted run."""
  argv = [sys.executable, "-m", "experiments", "mqar", "--preset", "test", "--train.epochs", "8",
          "--train.checkpoint_every", "5", "--no-progress"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run(argv + ["--workdir", str(tmp_path / "full")], check=True, env=env, capture_output=True)
  proc = subprocess.Popen(argv + ["--workdir", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = tmp_path / "killed" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and not (ckpts.exists() and any(p.name.isdigit() and int(p.name) >= 10
                                                              for d in ckpts.iterdir() for p in d.iterdir())):
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  subprocess.run(argv + ["--workdir", str(tmp_path / "killed")], check=True, env=env, capture_output=True)
  full = json.loads((tmp_path / "full" / "results.json").read_text())["runs"]
  resumed = json.loads((tmp_path / "killed" / "results.json").read_text())["runs"]
  assert [(r["accuracy"], r["test_loss"], r["steps"]) for r in resumed] == \
      [(r["accuracy"], r["test_loss"], r["steps"]) for r in full]


def test_multihost_row_gather_single_process():
  rows = [{"run": "a", "accuracy": 0.5}, {"run": "b", "accuracy": 0.25}]
  merged = mqar_run._gather_rows({"old": {"run": "old"}}, rows)
  assert merged == {"old": {"run": "old"}, "a": rows[0], "b": rows[1]}
  assert mqar_run._gather_rows({}, []) == {}


def test_plan_runs_groups_learning_rates_per_architecture():
  runs = mqar_run.plan_runs(mqar.PIPELINE)
  assert len(runs) == 2 * 3 * 4 * 2 == len({r.name for r in runs})
  assert runs[0].name == "attention-N64-D4-d32-lr0.001" and runs[1].arch == runs[0].arch
  assert mqar.Task(64, 4, 512).name == "N64-D4" and mqar_run.Run(mqar.Task(64, 4, 512), "linear", 64, 1e-2).name == \
      "linear-N64-D4-b512-d64-lr0.01"


def test_default_preset_is_the_finding_within_budget_and_writes_to_runs():
  """The default sweep: attention / hybrid / BaseConv at two widths of one task (two settings), a bounded number
  of optimizer steps (879 CPU-seconds of user time, about 9 minutes on 2 idle cores), and a git-ignored default output
  folder that is not the committed reference."""
  from experiments.common.paths import is_reference_results
  cfg = mqar.DEFAULT
  runs = mqar_run.plan_runs(cfg)
  assert {"attention", "hybrid", "baseconv"} <= set(cfg.mixers)
  assert len(cfg.tasks) * len(cfg.d_models) >= 2
  assert sum(cfg.total_steps(r.task) for r in runs) <= 6 * 2500
  assert cfg.data.per_record_train and cfg.data.num_train >= max(cfg.total_steps(t) * cfg.batch_size(t)
                                                                 for t in cfg.tasks)  # every example seen once
  assert mqar_run.DEFAULT_WORKDIR == pathlib.Path("runs/mqar") and not is_reference_results(mqar_run.DEFAULT_WORKDIR)
  cfg_cli, args = mqar_run.parse([])
  assert cfg_cli == cfg and args.workdir is None


def _cells(att, hyb, conv, task="N64-D4", widths=(32, 64)):
  return {m: {task: dict(zip(widths, v))} for m, v in (("attention", att), ("hybrid", hyb), ("baseconv", conv))}


def test_verdict_reproduced_partly_not_and_untested():
  cfg = dataclasses.replace(mqar.DEFAULT, d_models=(32, 64))
  line, settings = mqar_run.verdict(_cells((0.95, 0.99), (0.99, 0.995), (0.26, 0.27)), cfg)
  assert line.startswith("verdict: reproduced") and [s["separates"] for s in settings] == [True, True]
  line, settings = mqar_run.verdict(_cells((0.27, 0.93), (0.99, 0.995), (0.26, 0.27)), cfg)
  assert line.startswith("verdict: partly reproduced") and "attention 0.27 < 0.9" in line
  assert [s["separates"] for s in settings] == [False, True]
  # BaseConv leaving its plateau breaks the separation even when attention solves the task
  line, _ = mqar_run.verdict(_cells((0.95, 0.99), (0.99, 0.995), (0.26, 0.60)), cfg)
  assert line.startswith("verdict: partly") and "baseconv 0.60 left its 1/D=0.25 plateau" in line
  line, _ = mqar_run.verdict(_cells((0.27, 0.25), (0.5, 0.3), (0.26, 0.27)), cfg)
  assert line.startswith("verdict: not reproduced")
  one = dataclasses.replace(cfg, d_models=(64,))
  line, _ = mqar_run.verdict(_cells((0.99,), (0.99,), (0.25,), widths=(64,)), one)
  assert line.startswith("verdict: partly reproduced") and "needs at least two" in line
  line, _ = mqar_run.verdict({"attention": {}}, cfg)  # runs missing from the results: never assumed
  assert line.startswith("verdict: not reproduced") and "hybrid not run" in line
  line, _ = mqar_run.verdict({}, dataclasses.replace(cfg, mixers=("attention",)))
  assert line.startswith("verdict: not tested") and "baseconv" in line


def test_finding_table_puts_the_paper_beside_ours():
  cfg = dataclasses.replace(mqar.DEFAULT, d_models=(32, 64))
  table = mqar_run.finding_table(_cells((0.25, 0.95), (0.99, 0.995), (0.26, 0.27)), cfg)
  lines = table.splitlines()
  assert lines[0] == "| mixer | N=64 D=4 d=32 | N=64 D=4 d=64 | Zoology, Figure 2 (paper) |"
  assert lines[2].startswith("| attention | 0.250 | 0.950 | solves MQAR")
  assert lines[3].startswith("| hybrid | 0.990 | 0.995 |") and lines[4].startswith("| baseconv | 0.260 | 0.270 |")
  assert lines[-1].startswith("| *1/D plateau* | 0.250 | 0.250 |")
