"""``python -m experiments cab``: CAB's efficiency length and a mini CAB benchmark over the zoo of
:mod:`jaxattn.nn.efficient` (CAB, Zhang et al. 2023, arXiv:2210.07661; ``../shared/papers/efficient.md`` §5).

1. Efficiency length: forward time (median, :mod:`experiments.bench.timing`) and compiled memory (XLA's memory
   analysis: temporaries + output) of one attention layer, projections included, against sequence length, for
   every zoo member (pattern NS) and two dense baselines — softmax materialised
   (:class:`jaxattn.nn.efficient.VanillaSoftmax`, the ``T x S`` matrix) and jaxattn's blockwise ``xla`` path. The
   crossing with each dense baseline is computed as CAB does (quadratic vs line fit) and as measured
   (:func:`experiments.cab.metrics.crossing`).
2. Mini CAB: for each pattern two synthetic tasks (:class:`experiments.cab.metrics.TaskSource`); every member that
   supports the pattern is trained once per task, plus ``none`` (the attention layer removed; CAB's "benefit of
   attention" baseline) and chance. Scores are test accuracies; the compositional index (CI) per pattern is CAB's.
   Self patterns stack ``num_layers`` blocks of the member; cross patterns encode the source with one fixed softmax
   block, mix the target with one fixed softmax block (causal for CC) and then apply the member's cross-attention
   (as CAB swaps only the attention under test in an otherwise fixed model).
3. Ranking correlation: Spearman's rho between the CI rankings of each pair of patterns over the members both
   support (CAB's finding: rankings differ across patterns).

Outputs (``--out``, default ``runs/cab/<preset>/``): ``results.json`` (one row per finished cell, so ``--resume``
continues a killed run and ``--report`` rebuilds the rest), ``table.md``, ``time.png``, ``memory.png``,
``ci.png``, ``verdict.txt``; the last line printed is the verdict.
"""

from __future__ import annotations

import pathlib
import time
from typing import Sequence

from configs.cab import PRESETS, TASKS, CabConfig
from experiments.common import config as config_lib
from experiments.common import report as report_lib

__all__ = ["main", "run", "plan", "verdict", "tables"]

DENSE = ("softmax_dense", "softmax_xla")  # materialised T x S, blockwise (the efficiency baselines)
PAPER_CI = {  # CAB README leaderboard (papers/efficient.md §5b): average CI per pattern
    "NS": {"local": 0.978, "cosformer": 0.466, "longshort": 0.269, "softmax": -0.024, "lara": -0.032,
           "performer": -0.285, "nystrom": -0.440, "probsparse": -0.661, "abc": -0.686},
    "CS": {"s4d": 0.985, "longshort": 0.617, "local": -0.239, "abc": -0.623},
    "NC": {"softmax": 0.596, "abc": 0.204, "performer": 0.014, "cosformer": -0.815},
    "CC": {"softmax": 0.956, "abc": 0.058, "performer": -1.014},
}
LOW_CORRELATION = 0.5  # "rankings differ": mean Spearman rho between patterns below this


def _members(cfg: CabConfig, pattern: str) -> list[str]:
  from jaxattn.nn.efficient import ZOO
  return [m for m in cfg.bench.models if pattern in ZOO[m].patterns] + ["none"]


def plan(cfg: CabConfig) -> list[tuple]:
  """Every cell: ``("eff", model, N)`` then ``("bench", pattern, task, model)``."""
  cells = [("eff", m, n) for n in cfg.efficiency.lengths for m in (*DENSE, *cfg.efficiency.models)]
  for p in cfg.bench.patterns:
    for task in TASKS[p][:cfg.bench.tasks_per_pattern]:
      cells += [("bench", p, task, m) for m in _members(cfg, p)]
  return cells


def _key(cell) -> str:
  return "/".join(str(c) for c in cell)


# ======================================================================================= efficiency length
def _eff_kwargs(model: str, landmarks: int, window: int) -> dict:
  return {"softmax_xla": {"implementation": "xla"},
          "local": {"window": window, "implementation": "xla"}, "nystrom": {"num_landmarks": landmarks},
          "lara": {"num_landmarks": landmarks}, "abc": {"num_slots": landmarks},
          "longshort": {"window": window, "rank": landmarks},
          "performer": {"num_random_features": landmarks}}.get(model, {})


def _eff_cell(cfg: CabConfig, model: str, n: int) -> dict:
  import jax
  from flax import nnx

  from experiments.bench.timing import time_fn
  from jaxattn.nn.efficient import VanillaSoftmax, make
  e = cfg.efficiency
  if model == "softmax_dense":  # CAB's vanilla: the [B, H, T, S] matrix in memory
    layer = VanillaSoftmax(e.num_heads, e.d_model, rngs=nnx.Rngs(0))
  else:
    layer = make("softmax" if model == "softmax_xla" else model, "NS", num_heads=e.num_heads, in_features=e.d_model,
                 rngs=nnx.Rngs(0), **_eff_kwargs(model, e.landmarks, e.window))
  graphdef, state = nnx.split(layer)
  f = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
  x = jax.random.normal(jax.random.key(1), (e.batch, n, e.d_model))
  compiled = f.lower(state, x).compile()
  mem = compiled.memory_analysis()
  temp = int(getattr(mem, "temp_size_in_bytes", 0) or 0)
  outb = int(getattr(mem, "output_size_in_bytes", 0) or 0)
  row = dict(memory_mb=(temp + outb) / 2 ** 20, temp_mb=temp / 2 ** 20)
  if temp > e.memory_limit_gb * 2 ** 30:
    return dict(row, status="skipped", error=f"{temp / 2 ** 30:.1f} GiB of temporaries > memory_limit_gb = "
                                             f"{e.memory_limit_gb}")
  t, _ = time_fn(compiled, state, x, repeats=e.repeats, warmup=1)
  return dict(row, status="ok", ms=t.ms, q20_ms=t.q20_ms, q80_ms=t.q80_ms)


# ============================================================================================ mini benchmark
def _net(cfg: CabConfig, member: str, pattern: str, task: str, rngs):
  """The benchmark model (see the module docstring): embeddings + positions, blocks, a classification head."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from experiments.cab.metrics import input_vocab, num_classes
  from jaxattn.masks import Causal
  from jaxattn.nn.attention import MultiHeadAttention
  from jaxattn.nn.efficient import make
  b = cfg.bench
  d = b.d_model
  cross = pattern[1] == "C"
  kw = {"nystrom": {"num_landmarks": b.landmarks}, "lara": {"num_landmarks": b.landmarks},
        "abc": {"num_slots": b.landmarks}, "local": {"window": b.window}, "longshort": {"window": b.window},
        "performer": {"num_random_features": b.landmarks}}.get(member, {})

  class Net(nnx.Module):
    def __init__(self):
      self.embed = nnx.Embed(input_vocab(b.vocab), d, rngs=rngs)
      self.pos = nnx.Param(jax.random.normal(rngs.params(), (max(b.seq_len, b.src_len), d)) * 0.1)
      n_blocks = 1 if cross else b.num_layers
      if cross:
        self.src_pos = nnx.Param(jax.random.normal(rngs.params(), (b.src_len, d)) * 0.1)
        self.src_norm = nnx.LayerNorm(d, rngs=rngs)
        self.src_enc = MultiHeadAttention(b.num_heads, d, rngs=rngs)  # the source encoder (non-causal)
        self.pre_norm = nnx.LayerNorm(d, rngs=rngs)
        self.pre = MultiHeadAttention(b.num_heads, d, mask=Causal() if pattern == "CC" else None, rngs=rngs)
      self.attn = nnx.List([make(member, pattern, num_heads=b.num_heads, in_features=d, rngs=rngs, **kw)
                            for _ in range(n_blocks)] if member != "none" else [])
      self.n1 = nnx.List([nnx.LayerNorm(d, rngs=rngs) for _ in range(n_blocks)])
      self.n2 = nnx.List([nnx.LayerNorm(d, rngs=rngs) for _ in range(n_blocks)])
      self.mlp1 = nnx.List([nnx.Linear(d, 2 * d, rngs=rngs) for _ in range(n_blocks)])
      self.mlp2 = nnx.List([nnx.Linear(2 * d, d, rngs=rngs) for _ in range(n_blocks)])
      self.head = nnx.Linear(d, num_classes(task, b.vocab), rngs=rngs)

    def __call__(self, x, src):  # x [B, T], src [B, S] -> logits [B, T, classes]
      h = self.embed(x) + self.pos[...][:x.shape[1]]
      ctx = None
      if cross:
        ctx = self.embed(src) + self.src_pos[...]
        ctx = ctx + self.src_enc(self.src_norm(ctx))
        h = h + self.pre(self.pre_norm(h))
      for i in range(len(self.n1)):
        if len(self.attn):
          h = h + self.attn[i](self.n1[i](h), ctx)
        h = h + self.mlp2[i](jax.nn.gelu(self.mlp1[i](self.n2[i](h))))
      return self.head(h)

  del jnp
  return Net()


def _bench_cell(cfg: CabConfig, pattern: str, task: str, member: str) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from experiments.cab.metrics import TaskSource
  from experiments.common.data import train_iterator
  b = cfg.bench
  src_len = b.src_len if pattern[1] == "C" else 1
  train = TaskSource(task, b.train_size, b.seq_len, src_len, b.vocab, b.seed)
  test = TaskSource(task, b.eval_size, b.seq_len, src_len, b.vocab, b.seed + 10_000)
  model = _net(cfg, member, pattern, task, nnx.Rngs(b.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  steps = b.cross_steps if pattern[1] == "C" else b.steps
  tx = optax.adam(optax.cosine_decay_schedule(b.lr, steps, 0.1))
  opt = tx.init(params)

  def loss_fn(p, batch):
    logits = nnx.merge(graphdef, p, rest)(batch["x"], batch["src"]).astype(jnp.float32)
    y = batch["y"]
    m = (y >= 0).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(y, 0))
    acc = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return jnp.sum(ce * m) / jnp.sum(m), jnp.sum(acc * m) / jnp.sum(m)

  @jax.jit
  def step(p, o, batch):
    (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch)
    upd, o = tx.update(g, o, p)
    return optax.apply_updates(p, upd), o, loss

  it = train_iterator(train, batch_size=b.batch_size, seed=b.seed)
  loss = float("nan")
  for _ in range(steps):
    batch = next(it)
    params, opt, loss = step(params, opt, {k: jnp.asarray(v) for k, v in batch.items()})
  test_loss, acc = jax.jit(loss_fn)(params, {k: jnp.asarray(v) for k, v in test.arrays.items()})
  return dict(accuracy=float(acc), test_loss=float(test_loss), train_loss=float(loss),
              params=int(sum(x.size for x in jax.tree.leaves(params))))


# ==================================================================================================== report
def _rows_by(rows, kind):
  return [r for r in rows if r["kind"] == kind]


def analyse(rows: list[dict], cfg: CabConfig) -> dict:
  """Crossings per (member, baseline, metric), CI per pattern, rank correlations between patterns."""
  from experiments.cab.metrics import compositional_index, crossing, spearman
  eff = {(r["model"], r["N"]): r for r in _rows_by(rows, "eff")}
  lengths = cfg.efficiency.lengths
  cross = {}
  for m in cfg.efficiency.models + ("softmax_xla",):
    for base in DENSE:
      if m == base:
        continue
      for metric in ("ms", "memory_mb"):
        pairs = [(n, eff.get((base, n), {}).get(metric), eff.get((m, n), {}).get(metric)) for n in lengths]
        pairs = [(n, a, c) for n, a, c in pairs if a is not None and c is not None]
        if len(pairs) >= 3:
          cross[f"{m}|{base}|{metric}"] = crossing(*zip(*pairs))
  scores, groups = {}, {}
  for r in _rows_by(rows, "bench"):
    if r["model"] != "none":
      scores.setdefault(f"{r['pattern']}/{r['task']}", {})[r["model"]] = r["accuracy"]
  for p in cfg.bench.patterns:
    groups[p] = [f"{p}/{t}" for t in TASKS[p][:cfg.bench.tasks_per_pattern]]
  ci = compositional_index(scores, groups)
  corr = {}
  pats = [p for p in cfg.bench.patterns if p in ci]
  for i, a in enumerate(pats):
    for b in pats[i + 1:]:
      common = sorted(set(ci[a]) & set(ci[b]))
      if len(common) >= 3:
        corr[f"{a}-{b}"] = dict(rho=spearman([ci[a][m] for m in common], [ci[b][m] for m in common]),
                                models=common)
  paper_corr = {}
  for p, ours in ci.items():
    common = sorted(set(ours) & set(PAPER_CI.get(p, {})))
    if len(common) >= 3:
      paper_corr[p] = dict(rho=spearman([ours[m] for m in common], [PAPER_CI[p][m] for m in common]),
                           models=common)
  return dict(crossings=cross, ci=ci, correlations=corr, paper_correlations=paper_corr)


def _fmt_n(c: dict | None, key: str) -> str:
  if c is None:
    return "—"
  v = c.get(key)
  if key == "measured" and c.get("below_at_min"):
    return f"≤{int(v)}"
  return "none" if v is None else f"{v:,.0f}"


def tables(rows: list[dict], cfg: CabConfig, an: dict) -> str:
  """Markdown: efficiency table (time / memory per length), crossings beside CAB's, benchmark accuracies and CI."""
  from jaxattn.nn.efficient import ZOO
  eff = {(r["model"], r["N"]): r for r in _rows_by(rows, "eff")}
  e = cfg.efficiency
  models = (*DENSE, *e.models)
  lines = [f"**Efficiency: forward ms / compiled MB of one layer** (pattern NS, batch {e.batch}, d_model {e.d_model}, "
           f"{e.num_heads} heads, landmarks/slots {e.landmarks}, window {e.window})\n",
           "| model | " + " | ".join(f"N={n}" for n in e.lengths) + " |", "|---|" + "---:|" * len(e.lengths)]
  for m in models:
    cells = []
    for n in e.lengths:
      r = eff.get((m, n))
      if r is None:
        cells.append("—")
      elif r.get("status") != "ok":
        cells.append(f"skip ({r.get('memory_mb', 0):.0f} MB)")
      else:
        cells.append(f"{r['ms']:.2f} / {r['memory_mb']:.1f}")
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  lines += ["", "**Efficiency length (tokens)**: where the member gets cheaper than dense softmax — CAB's fit "
                "(quadratic dense, linear member) / measured (interpolated); CAB's own numbers at D=512, 8 heads, "
                "batch 4 on a GPU\n",
            "| model | time vs materialised (fit / measured) | time vs blockwise xla | memory vs materialised | "
            "memory vs blockwise | CAB time | CAB memory |", "|---|---:|---:|---:|---:|---:|---:|"]
  cx = an["crossings"]
  for m in (*e.models, "softmax_xla"):
    cab = ZOO[m].cab_efficiency_length if m in ZOO else None
    c = lambda base, metric: cx.get(f"{m}|{base}|{metric}")
    fm = lambda base, metric: f"{_fmt_n(c(base, metric), 'fit')} / {_fmt_n(c(base, metric), 'measured')}"
    lines.append(f"| {m} | {fm('softmax_dense', 'ms')} | "
                 f"{fm('softmax_xla', 'ms') if m != 'softmax_xla' else '—'} | {fm('softmax_dense', 'memory_mb')} | "
                 f"{fm('softmax_xla', 'memory_mb') if m != 'softmax_xla' else '—'} | "
                 f"{f'{cab[0]:,}' if cab else '—'} | {f'{cab[1]:,}' if cab else '—'} |")
  bench = {(r["pattern"], r["task"], r["model"]): r for r in _rows_by(rows, "bench")}
  from experiments.cab.metrics import num_classes
  for p in cfg.bench.patterns:
    tasks = TASKS[p][:cfg.bench.tasks_per_pattern]
    lines += ["", f"**Mini CAB, pattern {p}** — test accuracy per task, compositional index (ours) and CAB's "
                  f"average CI for {p}\n",
              "| model | " + " | ".join(tasks) + " | CI | CAB CI |", "|---|" + "---:|" * (len(tasks) + 2)]
    order = sorted(_members(cfg, p), key=lambda m: -an["ci"].get(p, {}).get(m, -99.0))
    for m in order:
      acc = [bench.get((p, t, m)) for t in tasks]
      ci = an["ci"].get(p, {}).get(m)
      lines.append(f"| {m} | " + " | ".join("—" if a is None else f"{a['accuracy']:.3f}" for a in acc) +
                   f" | {'—' if ci is None else f'{ci:+.2f}'} | {PAPER_CI.get(p, {}).get(m, '—')} |")
    chance = " | ".join(f"{1 / num_classes(t, cfg.bench.vocab):.3f}" for t in tasks)
    lines.append(f"| chance | {chance} | — | — |")
  if an["correlations"]:
    lines += ["", "**Ranking correlation across patterns** (Spearman rho of the CI over the members both patterns "
                  "support; CAB: low)\n", "| patterns | rho | members |", "|---|---:|---|"]
    for k, v in an["correlations"].items():
      lines.append(f"| {k} | {v['rho']:+.2f} | {', '.join(v['models'])} |")
  if an["paper_correlations"]:
    lines += ["", "Rank agreement with CAB's CI leaderboard, per pattern: " + "; ".join(
        f"{p} rho {v['rho']:+.2f} over {len(v['models'])}" for p, v in an["paper_correlations"].items())]
  return "\n".join(lines)


def _median(xs):
  import numpy as np
  xs = [x for x in xs if x is not None]
  return float(np.median(xs)) if xs else None


def verdict(rows: list[dict], cfg: CabConfig, an: dict) -> tuple[str, list[str]]:
  """Three CAB claims: (1) efficient members beat dense in time only from ~2-6K tokens (CAB's efficiency lengths
  1.9K-6K; median 3.0K); (2) the memory crossing comes far earlier than the time crossing; (3) rankings are
  inconsistent across patterns (mean Spearman rho < LOW_CORRELATION)."""
  import numpy as np
  notes = []
  e = cfg.efficiency
  if len({(r["model"], r["N"]) for r in _rows_by(rows, "eff")}) < len(e.lengths) * (len(e.models) + 2):
    return report_lib.verdict_line("not reproduced", "the sweep is incomplete; rerun with --resume"), notes
  cx = an["crossings"]

  def meas(m, base, metric):
    c = cx.get(f"{m}|{base}|{metric}")
    if c is None or c["measured"] is None:
      return None
    return c["measured"]
  t_dense = [meas(m, "softmax_dense", "ms") for m in e.models]
  t_xla = [meas(m, "softmax_xla", "ms") for m in e.models]
  m_dense = [meas(m, "softmax_dense", "memory_mb") for m in e.models]
  never = [m for m, v in zip(e.models, t_dense) if v is None]
  med_t, med_x, med_m = _median(t_dense), _median(t_xla), _median(m_dense)
  notes.append(f"time crossing vs materialised softmax: median {med_t and round(med_t)} tokens over "
               f"{sum(v is not None for v in t_dense)} of {len(e.models)} members (never within "
               f"{e.lengths[-1]}: {', '.join(never) or 'none'}); CAB median 3,045 (range 1,877-6,011)")
  notes.append(f"time crossing vs jaxattn's blockwise xla softmax: median {med_x and round(med_x)} tokens")
  notes.append(f"memory crossing vs materialised softmax: median {med_m and round(med_m)} tokens (CAB: 37-1,169)")
  claim1 = med_t is not None and 1000 <= med_t <= 8000 and len(never) <= len(e.models) // 3
  claim2 = med_m is not None and med_t is not None and med_m < med_t
  rhos = [v["rho"] for v in an["correlations"].values() if np.isfinite(v["rho"])]
  mean_rho = float(np.mean(rhos)) if rhos else None
  claim3 = mean_rho is not None and mean_rho < LOW_CORRELATION
  rho_s = "n/a" if mean_rho is None else f"{mean_rho:.2f}"
  notes.append(f"mean Spearman rho between patterns' CI rankings: {rho_s}"
               f" over {len(rhos)} pattern pairs (CAB: low, inconsistent rankings)")
  for k, v in an["paper_correlations"].items():
    notes.append(f"{k}: our CI ranking vs CAB's leaderboard, rho {v['rho']:+.2f} over {len(v['models'])} members")
  held = sum((claim1, claim2, claim3))
  head = "reproduced" if held == 3 else "partly" if held else "not reproduced"
  tok = lambda v: f"{v:,.0f} tokens" if v is not None else f"no crossing within {e.lengths[-1]:,} tokens"
  n_bench, n_plan = len(_rows_by(rows, "bench")), sum(c[0] == "bench" for c in plan(cfg))
  ranks = (f"mini-CAB incomplete ({n_bench} of {n_plan} cells; continue with --resume)" if n_bench < n_plan else
           "mini-CAB rankings: too few patterns to correlate" if mean_rho is None else
           f"mini-CAB rankings {'differ' if claim3 else 'agree'} across patterns (mean Spearman rho {mean_rho:.2f})")
  why = (f"efficient members overtake materialised softmax in time at a median {tok(med_t)} "
         f"({'inside' if claim1 else 'outside'} CAB's 1-8K band around its 1.9-6K) and blockwise softmax at "
         f"{tok(med_x)}; memory crossings come {'earlier' if claim2 else 'NOT earlier'} ({tok(med_m)}); {ranks} "
         f"(CPU, toy tasks)")
  return report_lib.verdict_line(head, why), notes


def _plots(rows, cfg: CabConfig, an: dict, out: pathlib.Path) -> list[str]:
  from experiments.common.plots import line_panels
  eff = {(r["model"], r["N"]): r for r in _rows_by(rows, "eff")}
  e = cfg.efficiency
  files = []
  for metric, fname, label in (("ms", "time.png", "forward ms"), ("memory_mb", "memory.png", "compiled MB")):
    series = {}
    for m in (*DENSE, *e.models):
      pts = [(n, eff[(m, n)].get(metric)) for n in e.lengths if (m, n) in eff and eff[(m, n)].get(metric)]
      if pts:
        import math
        series[m] = ([p[0] for p in pts], [math.log10(p[1]) for p in pts])
    line_panels({f"{label} (log10) vs N": series}, out / fname, xlabel="sequence length N", ylabel=f"log10 {label}",
                log2_x=True, title=f"cab ({cfg.name}): {label} of one layer")
    files.append(fname)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  pats = [p for p in cfg.bench.patterns if p in an["ci"]]
  if pats:
    fig, axes = plt.subplots(1, len(pats), figsize=(3.6 * len(pats), 3.4), squeeze=False)
    for ax, p in zip(axes[0], pats):
      items = sorted(an["ci"][p].items(), key=lambda kv: -kv[1])
      ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1])
      ax.set_title(f"CI, {p}")
      ax.axvline(0, color="k", lw=0.5)
    fig.tight_layout()
    fig.savefig(out / "ci.png", dpi=100)
    plt.close(fig)
    files.append("ci.png")
  return files


# ======================================================================================================= run
def run(cfg: CabConfig, out: str | pathlib.Path, *, resume: bool = False, report: bool = False,
        progress: bool = True, verbose: bool = True, explicit_out: bool = True) -> dict:
  """Runs (or resumes, or only reports) the experiment; returns the ``results.json`` content."""
  out = pathlib.Path(out)
  fp = config_lib.fingerprint(cfg)
  old = report_lib.prepare_out_dir(out, fingerprint=fp, resume=resume, report=report, explicit_out=explicit_out)
  rows = list(old["rows"]) if old else []
  payload = dict(preset=cfg.name, fingerprint=fp, config=config_lib.to_dict(cfg),
                 environment=report_lib.environment(), rows=rows,
                 cpu_seconds=old.get("cpu_seconds", 0.0) if old else 0.0,
                 wall_seconds=old.get("wall_seconds", 0.0) if old else 0.0)
  if not report:
    from tqdm.auto import tqdm
    done = {r["key"] for r in rows}
    todo = [c for c in plan(cfg) if _key(c) not in done]
    if done and verbose:
      print(f"resumed from step {len(done)} of {len(done) + len(todo)} ({out}/)", flush=True)
    bar = tqdm(total=len(todo), unit="cell", disable=not progress or not todo, dynamic_ncols=True,
               bar_format="{desc} |{bar}| elapsed {elapsed}, ETA {remaining}")
    for k, cell in enumerate(todo):
      bar.set_description(f"cab: run {k + 1} of {len(todo)} ({' '.join(map(str, cell))})")
      t0, c0 = time.time(), time.process_time()
      if cell[0] == "eff":
        row = dict(kind="eff", model=cell[1], N=cell[2], **_eff_cell(cfg, cell[1], cell[2]))
      else:
        row = dict(kind="bench", pattern=cell[1], task=cell[2], model=cell[3], **_bench_cell(cfg, *cell[1:]))
      row.update(key=_key(cell), seconds=round(time.time() - t0, 2), cpu_seconds=round(time.process_time() - c0, 2))
      rows.append(row)
      payload["cpu_seconds"] = round(payload["cpu_seconds"] + row["cpu_seconds"], 1)
      payload["wall_seconds"] = round(payload["wall_seconds"] + row["seconds"], 1)
      report_lib.write_json(out / "results.json", payload)
      bar.update(1)
    bar.close()
  an = analyse(rows, cfg)
  md = tables(rows, cfg, an)
  line, notes = verdict(rows, cfg, an)
  notes.append(f"{payload['cpu_seconds']:.0f} CPU-seconds, {payload['wall_seconds']:.0f} s wall over the cells "
               f"({payload['environment']['device']}, {payload['environment']['cpu_count']} CPUs)")
  payload["analysis"] = an
  plots = _plots(rows, cfg, an, out)
  report_lib.write_report(out, payload, title=f"CAB at toy scale, preset {cfg.name}", table=md, verdict=line,
                          notes=notes, plots=plots, verbose=verbose)
  return {**payload, "table_markdown": md, "notes": notes, "verdict": line}


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m experiments cab``: see :func:`experiments.common.report.preset_main`."""
  return report_lib.preset_main("cab", __doc__, PRESETS, run, argv)
