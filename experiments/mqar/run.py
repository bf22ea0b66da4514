"""``python -m experiments mqar``: Zoology's multi-query associative recall sweep (arXiv:2312.04927).

Trains the 2-layer Zoology scaffold (:mod:`experiments.mqar.zoology`) with each sequence mixer on MQAR for every
(task, mixer, d_model, lr) of a preset (``configs/mqar.py``), showing overall progress (run k of M, elapsed, ETA),
then prints the finding: the test-accuracy table (best learning rate per cell, as in Zoology's Figure 2) with the
method (attention, the sparse-attention hybrid) next to the baseline (BaseConv) and Zoology's claim beside ours,
and a one-line verdict (:func:`verdict`: reproduced / partly / not, with the reason). It writes to the output folder
(``--out``; default ``runs/mqar/``, git-ignored):

- ``results.json``: one row per run (mixer, N, D, d_model, lr, final and best accuracy, steps, early stop, wall
  time, state size, parameter count) plus the tables, the verdict, the config and the environment;
- ``results.md``: the finding table and the verdict; ``mqar_accuracy.png``: accuracy against d_model, one panel per N;
- ``metrics.jsonl`` (every run's training and evaluation rows), ``config.json``, ``tensorboard/`` when
  tensorboardX is installed, and ``checkpoints/<run>/`` while a run is in progress.

The sweep is resumable: re-running the same command skips finished runs (saying so) and resumes an interrupted run
from its last Orbax checkpoint (parameters, optimizer state and Grain iterator position), ending with exactly the
parameters an uninterrupted run would have. One compiled train/eval step serves every learning rate of an
architecture. The committed reference results (``experiments/results/mqar/``) are never a default output or
resume point; name them with ``--out`` to rebuild them.

Examples::

  python -m experiments mqar                          # default preset, about 9 minutes on 2 idle CPU cores
  python -m experiments mqar --preset smoke           # under 2 minutes
  python -m experiments mqar --preset gpu --out /tmp/mqar_gpu
  python -m experiments mqar --mixers attention,baseconv --d_models 64 --train.epochs 2 --out /tmp/mqar_x
  python -m experiments mqar --preset cpu_long --tasks 128:8 --d_models 64   # part of a sweep now, the rest later
  python -m experiments mqar --preset cpu_long --report   # the table of whatever has finished so far
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import platform
import shutil
import sys
import time
from typing import Sequence

from configs import mqar as mqar_configs
from configs.mqar import MQARConfig, Task
from experiments.common import config as config_lib
from experiments.common.paths import default_out_dir

__all__ = ["main", "run_sweep", "Run", "plan_runs", "accuracy_table"]

DEFAULT_WORKDIR = default_out_dir("mqar")  # runs/mqar (git-ignored); the reference: experiments/results/mqar/


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep."""

  task: Task
  mixer: str
  d_model: int
  lr: float

  @property
  def name(self) -> str:
    bs = f"-b{self.task.batch_size}" if self.task.batch_size else ""
    return f"{self.mixer}-N{self.task.seq_len}-D{self.task.num_kv_pairs}{bs}-d{self.d_model}-lr{self.lr:g}"

  @property
  def arch(self) -> tuple:
    """Runs with the same ``arch`` share compiled steps."""
    return (self.task, self.mixer, self.d_model)


def plan_runs(cfg: MQARConfig) -> list[Run]:
  """Every run of the sweep, grouped by architecture (task, mixer, d_model), learning rates innermost."""
  return [Run(t, m, d, lr) for t in cfg.tasks for m in cfg.mixers for d in cfg.d_models for lr in cfg.lrs]


def _settings_fingerprint(cfg: MQARConfig) -> str:
  """Hash of the settings every run shares; finished runs are reused only when it matches."""
  return config_lib.fingerprint({"data": cfg.data, "model": cfg.model, "train": cfg.train})


def _atomic_write(path: pathlib.Path, text: str) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def accuracy_table(rows: list[dict], cfg: MQARConfig) -> tuple[str, dict]:
  """Markdown table of the final test accuracy, best learning rate per (mixer, N, d_model) cell (rows of runs
  outside ``cfg``'s grid are ignored).

  Returns:
    ``(markdown, cells)`` with ``cells[mixer][task_name][d_model] = accuracy`` (missing runs are absent).
  """
  cells: dict = {}
  planned = {r.name for r in plan_runs(cfg)}
  for r in rows:
    if r["run"] not in planned:
      continue
    c = cells.setdefault(r["mixer"], {}).setdefault(r["task"], {})
    c[r["d_model"]] = max(c.get(r["d_model"], -1.0), r["accuracy"])
  cols = [(t, d) for t in cfg.tasks for d in cfg.d_models]
  header = "| mixer | " + " | ".join(f"N={t.seq_len} D={t.num_kv_pairs} d={d}" for t, d in cols) + " |"
  lines = [header, "|---|" + "---:|" * len(cols)]
  for m in cfg.mixers:
    vals = [cells.get(m, {}).get(t.name, {}).get(d) for t, d in cols]
    lines.append(f"| {m} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in vals) + " |")
  return "\n".join(lines), cells


# Zoology's Figure 2 (Arora et al. 2023), per mixer: what the paper reports for 2-layer models trained to
# convergence (V=8192, 100K examples x 64 epochs, best of four learning rates).
PAPER_CLAIMS: dict[str, str] = {
    "attention": "solves MQAR (~1.0) at every d_model and N",
    "sliding_window": "fails once queries fall outside the window",
    "baseconv": "fails at small d_model; needs d_model growing with N (and D)",
    "linear": "degrades as N grows at fixed d_model",
    "based": "close to attention",
    "hybrid": "close to attention (input-dependent sparse attention closes the gap)",
}
SOLVED = 0.9  # a mixer "solves" a setting at test accuracy >= this


def plateau_ceiling(num_kv_pairs: int) -> float:
  """Accuracy still counted as the ``1/D`` plateau (answering with one of the ``D`` values seen, or the last one):
  ``1.5 / D``, i.e. 0.375 for D = 4."""
  return 1.5 / num_kv_pairs


def verdict(cells: dict, cfg: MQARConfig) -> tuple[str, list[dict]]:
  """Zoology's separation, checked per setting (task, d_model): attention and the hybrid reach :data:`SOLVED`
  test accuracy while BaseConv stays at its ``1/D`` plateau (below :func:`plateau_ceiling`).

  Returns:
    ``(line, settings)``: a one-line verdict (``reproduced`` when every setting separates and there are at least
    two, ``partly`` when some do, ``not reproduced`` when none does, with the reason) and one dict per setting
    (``task``, ``d_model``, ``separates``, ``why``). Mixers missing from the sweep or the results are reported as
    missing, never assumed.
  """
  need = ("attention", "baseconv", "hybrid")
  missing = [m for m in need if m not in cfg.mixers]
  if missing:
    return (f"verdict: not tested: the separation needs {', '.join(need)} in the sweep "
            f"(missing {', '.join(missing)})"), []
  settings = []
  for t in cfg.tasks:
    for d in cfg.d_models:
      acc = {m: cells.get(m, {}).get(t.name, {}).get(d) for m in need}
      name = f"N={t.seq_len} D={t.num_kv_pairs} d={d}"
      why = []
      for m in need:
        if acc[m] is None:
          why.append(f"{m} not run")
      if not why:
        for m in ("attention", "hybrid"):
          if acc[m] < SOLVED:
            why.append(f"{m} {acc[m]:.2f} < {SOLVED}")
        if acc["baseconv"] >= plateau_ceiling(t.num_kv_pairs):
          why.append(f"baseconv {acc['baseconv']:.2f} left its 1/D={1 / t.num_kv_pairs:.2f} plateau")
      settings.append({"setting": name, "task": t.name, "d_model": d, "separates": not why,
                       "why": "; ".join(why)})
  good = [s["setting"] for s in settings if s["separates"]]
  bad = [f"{s['setting']} ({s['why']})" for s in settings if not s["separates"]]
  rule = (f"attention and hybrid >= {SOLVED}, baseconv < 1.5/D")
  if good and not bad and len(good) >= 2:
    line = (f"verdict: reproduced: Zoology's separation ({rule}) holds in all {len(good)} settings "
            f"({', '.join(good)})")
  elif good:
    line = (f"verdict: partly reproduced: the separation ({rule}) holds in {len(good)} of {len(settings)} "
            f"setting(s) ({', '.join(good)})" + (f"; not in {'; '.join(bad)}" if bad else
                                                 "; Zoology's claim needs at least two"))
  else:
    line = f"verdict: not reproduced: no setting separates ({rule}): {'; '.join(bad)}"
  return line, settings


def finding_table(cells: dict, cfg: MQARConfig) -> str:
  """Markdown: the method (attention, hybrid) next to the baseline (BaseConv) and the other mixers, one column per
  setting, then the ``1/D`` plateau and Zoology's claim for each mixer beside ours."""
  cols = [(t, d) for t in cfg.tasks for d in cfg.d_models]
  order = [m for m in ("attention", "hybrid", "baseconv") if m in cfg.mixers]
  order += [m for m in cfg.mixers if m not in order]
  lines = ["| mixer | " + " | ".join(f"N={t.seq_len} D={t.num_kv_pairs} d={d}" for t, d in cols)
           + " | Zoology, Figure 2 (paper) |", "|---|" + "---:|" * len(cols) + "---|"]
  for m in order:
    vals = [cells.get(m, {}).get(t.name, {}).get(d) for t, d in cols]
    lines.append(f"| {m} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in vals)
                 + f" | {PAPER_CLAIMS.get(m, '')} |")
  lines.append("| *1/D plateau* | " + " | ".join(f"{1 / t.num_kv_pairs:.3f}" for t, _ in cols)
               + " | chance among the D values in context |")
  return "\n".join(lines)


def _plot(cells: dict, cfg: MQARConfig, path: pathlib.Path) -> None:
  from experiments.common.plots import line_panels
  panels = {}
  for t in cfg.tasks:
    series = {}
    for m in cfg.mixers:
      pts = sorted(cells.get(m, {}).get(t.name, {}).items())
      if pts:
        series[m] = ([d for d, _ in pts], [a for _, a in pts])
    panels[f"N={t.seq_len}, D={t.num_kv_pairs}"] = series
  line_panels(panels, path, xlabel="d_model", ylabel="MQAR test accuracy (best lr)", log2_x=True,
              ylim=(-0.02, 1.02), title=f"MQAR, preset {cfg.name} (V={cfg.data.vocab_size})")


def _environment() -> dict:
  import jax
  return {"jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
          "python": platform.python_version(), "cpu_count": os.cpu_count(), "processes": jax.process_count()}


def _prepare_workdir(workdir: pathlib.Path, cfg: MQARConfig, fresh: bool) -> list[dict]:
  """Creates the work directory, checks it belongs to these settings, returns finished runs' rows."""
  results_path = workdir / "results.json"
  if fresh:
    for name in ("results.json", "results.md", "mqar_accuracy.png", "metrics.jsonl", "config.json"):
      (workdir / name).unlink(missing_ok=True)
    for name in ("checkpoints", "tensorboard"):
      shutil.rmtree(workdir / name, ignore_errors=True)
  workdir.mkdir(parents=True, exist_ok=True)
  fp = _settings_fingerprint(cfg)
  if results_path.exists():
    old = json.loads(results_path.read_text())
    if old.get("settings_fingerprint") != fp:
      raise SystemExit(f"{workdir} holds results of different data/model/train settings (fingerprint "
                       f"{old.get('settings_fingerprint')} != {fp}); pass --fresh to discard them or choose "
                       f"another --workdir")
    return list(old.get("runs", []))
  return []


def run_sweep(cfg: MQARConfig, workdir: str | pathlib.Path, *, progress: bool = True, fresh: bool = False,
              interrupt_after: int | None = None, verbose: bool = True, train: bool = True) -> dict:
  """Runs (or resumes) the sweep and writes the outputs; returns the ``results.json`` content.

  Args:
    cfg: the sweep.
    workdir: output folder.
    progress: tqdm bars.
    fresh: discard earlier results in ``workdir`` first.
    interrupt_after: stop (raising :class:`experiments.common.train.Interrupted`) after this many training steps
      of the current run, without saving: a simulated kill, for tests.
    verbose: print one line per finished run and the table.
    train: False only rebuilds the table, ``results.md`` and the plot from the runs already finished in
      ``workdir`` (missing cells show as "—"), training nothing.
  """
  import jax
  from experiments.common.distributed import shard_indices
  from experiments.common.metrics import MetricWriter, tensorboard_available
  from experiments.common.train import fit
  from experiments.data.mqar import IGNORE_INDEX, MQARSource

  workdir = pathlib.Path(workdir)
  main_process = jax.process_index() == 0
  done_rows = _prepare_workdir(workdir, cfg, fresh) if main_process else []
  fp = _settings_fingerprint(cfg)
  if main_process:
    _atomic_write(workdir / "config.json", json.dumps(config_lib.to_dict(cfg), indent=2) + "\n")
  done = {r["run"]: r for r in done_rows}
  runs = plan_runs(cfg)
  archs = list(dict.fromkeys(r.arch for r in runs))
  my_archs = {archs[i] for i in shard_indices(len(archs))}  # multi-host: architectures split across processes
  ckpt_root = workdir / "checkpoints" if jax.process_count() == 1 else workdir / f"checkpoints_p{jax.process_index()}"
  tb_dir = workdir / "tensorboard" if cfg.tensorboard and tensorboard_available() else None
  sources: dict[Task, tuple] = {}
  env = _environment()
  t_sweep = time.time()
  new_rows = []

  def record(rows_all):
    table, cells = accuracy_table(rows_all, cfg)
    out = {"preset": cfg.name, "settings_fingerprint": fp, "environment": env, "config": config_lib.to_dict(cfg),
           "table_markdown": table, "table": {m: {t: {str(d): a for d, a in v.items()} for t, v in c.items()}
                                              for m, c in cells.items()},
           "runs": rows_all}
    _atomic_write(workdir / "results.json", json.dumps(out, indent=1) + "\n")
    return out, table, cells

  todo = [r for r in runs if train and r.name not in done and r.arch in my_archs]
  if verbose and main_process and train:
    finished = sum(r.name in done for r in runs)
    if finished:
      print(f"{finished} of {len(runs)} runs already finished in {workdir}/ (same settings): "
            f"{'skipping them' if todo else 'nothing to train'}; --fresh retrains", flush=True)
  from tqdm.auto import tqdm
  overall = tqdm(total=len(todo), unit="run", disable=not (progress and main_process and todo), dynamic_ncols=True,
                 bar_format="{desc}({n_fmt} done) |{bar}| elapsed {elapsed}, ETA {remaining}")
  for k, run in enumerate(todo):
    overall.set_description(f"mqar: run {k + 1} of {len(todo)}")
    task = run.task
    if task not in sources:
      d = cfg.data
      sources[task] = (MQARSource(d.vocab_size, task.seq_len, task.num_kv_pairs, d.num_train, d.seed, d.power_a,
                                  d.random_non_queries, per_record=d.per_record_train),
                       MQARSource(d.vocab_size, task.seq_len, task.num_kv_pairs, d.num_test, d.seed + 1,
                                  d.power_a, d.random_non_queries))
    train_src, test_src = sources[task]
    total = cfg.total_steps(task)
    trainer = _trainer(task, run.mixer, run.d_model, cfg.model, cfg.data.vocab_size, total, cfg.train)
    eval_every = cfg.train.eval_every or cfg.steps_per_epoch(task)
    writer = MetricWriter(workdir / "metrics.jsonl", tensorboard_dir=tb_dir, run=run.name)
    res = fit(trainer, lr=run.lr, seed=cfg.train.seed, train_source=train_src, eval_source=test_src,
              batch_size=cfg.batch_size(task), eval_batch_size=cfg.train.eval_batch_size, eval_every=eval_every,
              checkpoint_dir=ckpt_root / run.name, checkpoint_every=cfg.train.checkpoint_every,
              early_stop=None if cfg.train.early_stop is None else ("accuracy", cfg.train.early_stop),
              writer=writer, log_every=cfg.train.log_every, pad_values={"labels": IGNORE_INDEX},
              interrupt_after=interrupt_after, progress=progress and main_process, desc=run.name)
    writer.close()
    model = trainer.model(res.state.params)
    row = {"run": run.name, "mixer": run.mixer, "task": task.name, "seq_len": task.seq_len,
           "num_kv_pairs": task.num_kv_pairs, "d_model": run.d_model, "lr": run.lr,
           "accuracy": res.final.get("accuracy", float("nan")),
           "best_accuracy": max((h["accuracy"] for h in res.history), default=float("nan")),
           "test_loss": res.final.get("loss", float("nan")), "steps": res.steps, "total_steps": total,
           "stopped_early": res.stopped_early, "wall_s": round(res.wall_s, 2),
           "state_size": model.state_size(task.seq_len),
           "num_params": int(sum(x.size for x in jax.tree.leaves(res.state.params)))}
    new_rows.append(row)
    if main_process:
      done[run.name] = row
      record(list(done.values()))
    if not cfg.keep_checkpoints:
      shutil.rmtree(ckpt_root / run.name, ignore_errors=True)
    overall.update(1)
    if verbose and main_process:
      overall.write(f"[{k + 1}/{len(todo)}, {time.time() - t_sweep:.0f} s] {run.name:<34} acc {row['accuracy']:.3f} "
                    f"(best {row['best_accuracy']:.3f}) steps {row['steps']:>5}/{total} "
                    f"{'early stop ' if row['stopped_early'] else ''}{row['wall_s']:.1f}s")
  overall.close()

  if ckpt_root.exists() and not any(ckpt_root.iterdir()):
    ckpt_root.rmdir()
  if jax.process_count() > 1:
    done = _gather_rows(done, new_rows)
  # every finished run in the work directory stays in results.json (a sweep resumed with a narrower grid must not
  # drop the others): this plan's runs first, in plan order, then the rest in the order they finished
  order = {r.name: i for i, r in enumerate(runs)}
  rows_all = sorted(done.values(), key=lambda r: order.get(r["run"], len(order)))
  out, table, cells = record(rows_all) if main_process else ({}, "", {})
  if main_process:
    findings = finding_table(cells, cfg)
    line, settings = verdict(cells, cfg)
    out["finding_markdown"], out["verdict"], out["settings"] = findings, line, settings
    _atomic_write(workdir / "results.json", json.dumps(out, indent=1) + "\n")
    _atomic_write(workdir / "results.md", f"# MQAR, preset {cfg.name}\n\n{cfg.description}\n\n"
                  f"Test accuracy ({cfg.data.num_test} examples, best lr per cell):\n\n{findings}\n\n{line}\n")
    _plot(cells, cfg, workdir / "mqar_accuracy.png")
    if verbose:
      print(f"\n{len(new_rows)} runs trained in {time.time() - t_sweep:.1f} s; outputs in {workdir}/ "
            f"(results.json, results.md, mqar_accuracy.png, metrics.jsonl)")
      print(f"\nMQAR test accuracy (best lr per cell), preset {cfg.name}, V={cfg.data.vocab_size}:\n\n"
            f"{findings}\n\n{line}", flush=True)
  return out


@functools.lru_cache(maxsize=2)
def _trainer(task: Task, mixer: str, d_model: int, model_cfg, vocab_size: int, total_steps: int, train_cfg):
  """Compiled steps for one architecture; cached (the last two) so the learning rates of a sweep, and repeated
  sweeps in one process (tests, notebooks), reuse them."""
  from experiments.common.train import Trainer
  from experiments.mqar.task import build_model, task_fns
  loss, evaluate = task_fns(task)
  return Trainer(lambda rngs: build_model(model_cfg, vocab_size, task, mixer, d_model, rngs), loss, evaluate,
                 total_steps=total_steps, settings=train_cfg)


def _gather_rows(done: dict, new_rows: list[dict]) -> dict:
  """Multi-host: every process sends its new rows to all (as JSON bytes through ``process_allgather``)."""
  import numpy as np
  from jax.experimental import multihost_utils
  payload = np.frombuffer(json.dumps(new_rows).encode(), np.uint8)
  size = multihost_utils.process_allgather(np.asarray([payload.size], np.int64))
  buf = np.zeros(int(np.max(size)), np.uint8)
  buf[:payload.size] = payload
  everything = multihost_utils.process_allgather(buf)
  merged = dict(done)
  for n, chunk in zip(np.asarray(size).reshape(-1), np.asarray(everything)):
    for row in json.loads(bytes(chunk[:int(n)]).decode()):
      merged[row["run"]] = row
  return merged


def _build_parser(cfg: MQARConfig) -> argparse.ArgumentParser:
  p = config_lib.ArgumentParser(  # one-line errors
      prog="python -m experiments mqar", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="presets:\n" + "\n".join(f"  {n}: {c.description}" for n, c in mqar_configs.PRESETS.items()))
  p.add_argument("--preset", default="default", choices=sorted(mqar_configs.PRESETS),
                 help="the sweep (default: default)")
  p.add_argument("--out", "--workdir", dest="workdir", default=None,
                 help=f"output folder, also the resume point (default {DEFAULT_WORKDIR}/ for the default preset, "
                      f"{DEFAULT_WORKDIR}/<preset>/ otherwise; the committed reference results under "
                      f"experiments/results/mqar/ are read or overwritten only when named here)")
  p.add_argument("--fresh", action="store_true", help="discard earlier results in the work directory")
  p.add_argument("--report", action="store_true",
                 help="train nothing: rebuild the table, results.md and the plot from the finished runs")
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() first (multi-host TPU: architectures are split across "
                      "processes, process 0 writes the outputs)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
  config_lib.add_flags(p, cfg, exclude=("name", "description"))
  return p


def parse(argv: Sequence[str]) -> tuple[MQARConfig, argparse.Namespace]:
  """The resolved config (preset + overrides) and the parsed arguments; exits with a clear message on bad values."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--preset", default="default")
  known, _ = pre.parse_known_args(argv)
  base = mqar_configs.PRESETS.get(known.preset, mqar_configs.DEFAULT)
  parser = _build_parser(base)
  args = parser.parse_args(argv)
  try:
    cfg = config_lib.apply_flags(mqar_configs.get_config(args.preset), args)
  except (config_lib.ConfigError, ValueError) as e:
    parser.error(str(e))
  return cfg, args


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point (``python -m experiments mqar --help``)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  cfg, args = parse(argv)
  if args.print_config:
    print(json.dumps(config_lib.to_dict(cfg), indent=2))
    return 0
  from experiments.common.distributed import initialize
  initialize(args.distributed)  # before anything touches the devices
  workdir = pathlib.Path(args.workdir) if args.workdir else (
      DEFAULT_WORKDIR if cfg.name == "default" else DEFAULT_WORKDIR / cfg.name)
  if args.report and args.fresh:
    raise SystemExit("--report and --fresh together would discard the results the report is built from")
  run_sweep(cfg, workdir, progress=not args.no_progress, fresh=args.fresh, train=not args.report)
  return 0
