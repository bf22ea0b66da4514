"""``python -m experiments transnormer``: TransNormerLLM's claims at toy scale (``../shared/papers/efficient.md`` §1;
presets and the verdict rule in ``configs/transnormer.py``).

Steps (each recorded in ``results.json`` as it finishes, so ``--resume`` skips it):

1. quality: :class:`jaxattn.nn.TransNormerLM` vs a softmax transformer LM of equal parameters on the same bytes
   (:func:`experiments.textlm.train.train_grid`), every seed; test loss in nats/byte on held-out stdlib files,
   with the unigram byte model as the trivial baseline;
2. speed: forward and forward+backward time of ``jaxattn.linear_attention`` (per-head decay, as in TNL) vs causal
   ``jaxattn.softmax_attention`` against sequence length (:mod:`experiments.bench.timing`); a cell whose predicted
   cost exceeds ``speed.max_cell_s`` is skipped and listed as such.

Outputs (``--out``, default ``runs/transnormer/<preset>/``): ``results.json``, ``table.md``, ``verdict.txt``,
``loss_curves.png``, ``speed.png``, ``metrics.jsonl``; the last line printed is the verdict.
"""

from __future__ import annotations

import pathlib
import time

import numpy as np

from configs.transnormer import PAR_MARGIN, PRESETS, TransNormerConfig
from experiments.common import report as report_lib

__all__ = ["main", "run", "verdict", "model_fn", "speed_table"]

ARCHS = ("softmax", "tnl")
LABELS = {"softmax": "softmax transformer (baseline)", "tnl": "TransNormer (TNL)"}
# Table 11 of the paper (100K updates, loss), ``../shared/papers/efficient.md`` §1c
PAPER = {"softmax": "2.362 (385M) / 2.061 (1B)", "tnl": "2.248 (385M) / 1.896 (1B)"}
PAPER_SPEED = "Lightning-2 vs FlashAttention-2 fwd at n=32K (A100, bf16): 17.66 vs 162.90 ms; crossover ~2-4K"
MODES = ("fwd", "fwd+bwd")


def model_fn(cfg: TransNormerConfig, arch: str):
  """``rngs -> LM`` for ``arch`` in ``("softmax", "tnl")`` at the preset's size (equal parameters)."""
  from jaxattn.nn import AttnResLM, TransNormerLM
  m = cfg.model
  if arch == "tnl":
    return lambda rngs: TransNormerLM(256, m.features, m.num_layers, m.num_heads, glu_features=m.glu_features,
                                      rngs=rngs)
  if arch == "softmax":
    return lambda rngs: AttnResLM(256, m.features, m.num_layers, m.num_heads, mlp_features=m.softmax_mlp,
                                  mode="none", rngs=rngs)
  raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def _key(arch: str, seed: int) -> str:
  return f"{arch}-s{seed}"


def _loss(payload: dict, arch: str, seeds) -> list[float] | None:
  runs = payload.get("runs", {})
  vals = [runs[_key(arch, s)]["final"]["loss"] for s in seeds if _key(arch, s) in runs]
  return vals if len(vals) == len(seeds) else None


# ------------------------------------------------------------------------------------------------------ speed
def speed_table(cfg: TransNormerConfig, progress: bool = True) -> list[dict]:
  """One row per (length, kernel, mode): ``ms`` or ``skipped`` with the predicted seconds."""
  import jax
  import jax.numpy as jnp
  from tqdm.auto import tqdm

  import jaxattn
  from experiments.bench.timing import make_step, time_fn
  from jaxattn import masks
  sp = cfg.speed
  dtype = jnp.dtype(sp.dtype)
  slopes = jnp.asarray(np.exp2(-8.0 * (np.arange(sp.heads) + 1) / sp.heads), jnp.float32)  # TNL layer-0 ALiBi

  kernels = {
      "linear": (lambda q, k, v: jaxattn.linear_attention(q, k, v, log_decay=-slopes, scale=1.0,
                                                          implementation=sp.linear_impl), 1),
      "softmax": (lambda q, k, v: jaxattn.softmax_attention(q, k, v, mask=masks.Causal(),
                                                            implementation=sp.softmax_impl), 2),
  }
  rows, last = [], {}
  calls = 3 + sp.repeats  # compile + warm-up + sizing sample + repeats (slow cells: inner = 1)
  cells = [(n, name, mode) for n in sp.lengths for name in kernels for mode in MODES]
  bar = tqdm(cells, disable=not progress, dynamic_ncols=True, desc="speed")
  for n, name, mode in bar:
    bar.set_description(f"speed: N={n} {name} {mode}")
    fn, power = kernels[name]
    prev = last.get((name, mode))
    if prev is not None:
      pred = prev[1] / 1e3 * (n / prev[0]) ** power * calls
      if pred > sp.max_cell_s:
        rows.append(dict(n=n, kernel=name, mode=mode, skipped=f"predicted {pred:.0f} s > {sp.max_cell_s:g} s"))
        last[(name, mode)] = (n, prev[1] * (n / prev[0]) ** power)
        continue
    ks = jax.random.split(jax.random.PRNGKey(n), 3)
    shape = (sp.batch, n, sp.heads, sp.head_dim)
    # keys/values scaled down so the undecayed sums stay moderate; q, k >= 0 like TNL's SiLU features
    q, k, v = (jax.random.uniform(kk, shape, jnp.float32).astype(dtype) * 0.1 for kk in ks)
    timing, _ = time_fn(make_step(fn, mode), q, k, v, repeats=sp.repeats, warmup=1, max_inner=20)
    last[(name, mode)] = (n, timing.ms)
    rows.append(dict(n=n, kernel=name, mode=mode, ms=round(timing.ms, 3), compile_s=round(timing.compile_s, 2)))
  return rows


# ----------------------------------------------------------------------------------------------------- report
def _speed_lookup(rows):
  return {(r["n"], r["kernel"], r["mode"]): r for r in rows}


def _table(cfg: TransNormerConfig, payload: dict) -> tuple[str, list[str]]:
  seeds = cfg.seeds
  m = cfg.model
  lines = [f"Models: D={m.features}, {m.num_layers} layers, {m.num_heads} heads; TNL SGLU {m.glu_features}, softmax "
           f"GELU MLP {m.softmax_mlp}; {cfg.train.steps} steps of {cfg.train.batch_size} x {cfg.corpus.seq_len} "
           f"bytes (same bytes, same order); test = held-out stdlib files.\n",
           "| model | params | " + " | ".join(f"test loss seed {s}" for s in seeds)
           + " | mean (nats/byte) | Δ vs softmax | paper (Table 11, loss) |",
           "|---|---:|" + "---:|" * len(seeds) + "---:|---:|---|"]
  base = _loss(payload, "softmax", seeds)
  uni = payload.get("unigram_loss")
  if uni is not None:
    d = "—" if base is None else f"{uni - np.mean(base):+.4f}"
    lines.append("| unigram bytes (trivial baseline) | 256 | " + " | ".join("" for _ in seeds)
                 + f" | {uni:.4f} | {d} | — |")
  for arch in ARCHS:
    vals = _loss(payload, arch, seeds)
    params = payload.get("params", {}).get(arch, "")
    if vals is None:
      lines.append(f"| {LABELS[arch]} | {params} | " + " | ".join("—" for _ in seeds) + f" | — | — | {PAPER[arch]} |")
      continue
    d = "—" if arch == "softmax" or base is None else f"{np.mean(vals) - np.mean(base):+.4f}"
    lines.append(f"| {LABELS[arch]} | {params} | " + " | ".join(f"{v:.4f}" for v in vals)
                 + f" | {np.mean(vals):.4f} | {d} | {PAPER[arch]} |")
  rows = payload.get("speed")
  if rows:
    sp = cfg.speed
    look = _speed_lookup(rows)
    lines += ["", f"**Speed** (ms per call, median of {sp.repeats}; B={sp.batch}, H={sp.heads}, d={sp.head_dim}, "
              f"{sp.dtype}, causal; linear = jaxattn.linear_attention with per-head decay "
              f"[{sp.linear_impl or 'default'}], softmax = jaxattn.softmax_attention "
              f"[{sp.softmax_impl or 'default'}]; device {payload.get('environment', {}).get('device', '?')})\n",
              "| N | linear fwd | softmax fwd | speed-up fwd | linear fwd+bwd | softmax fwd+bwd | speed-up fwd+bwd |",
              "|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(n, k, mode):
      r = look.get((n, k, mode))
      return "—" if r is None else (f"{r['ms']:.2f}" if "ms" in r else "skipped")

    def ratio(n, mode):
      a, b = look.get((n, "linear", mode)), look.get((n, "softmax", mode))
      return f"{b['ms'] / a['ms']:.2f}x" if a and b and "ms" in a and "ms" in b else "—"
    for n in sp.lengths:
      lines.append(f"| {n} | {cell(n, 'linear', 'fwd')} | {cell(n, 'softmax', 'fwd')} | {ratio(n, 'fwd')} | "
                   f"{cell(n, 'linear', 'fwd+bwd')} | {cell(n, 'softmax', 'fwd+bwd')} | {ratio(n, 'fwd+bwd')} |")
  notes = [f"Paper: Table 11 (385M / 1B models, 100K updates; ``../shared/papers/efficient.md`` §1c), TNL better "
           f"than the transformer; speed: {PAPER_SPEED}. Our losses are nats/byte on stdlib text at toy scale.",
           f"Verdict rule (fixed before the runs, configs/transnormer.py): on par = mean paired Δ <= {PAR_MARGIN} "
           f"nats/byte; speed = linear fwd+bwd faster than softmax at the longest length where both ran."]
  skipped = [r for r in rows or [] if "skipped" in r]
  if skipped:
    notes.append("Skipped speed cells: " + "; ".join(f"N={r['n']} {r['kernel']} {r['mode']} ({r['skipped']})"
                                                    for r in skipped) + ".")
  notes.append("Timings come from a shared, loaded 2-core machine: compare them within one table only.")
  if payload.get("cpu_s") is not None:
    notes.append(f"CPU time: {payload['cpu_s']:.0f} process CPU-seconds ({payload.get('wall_s', 0):.0f} s wall) "
                 f"on {payload.get('environment', {}).get('cpu_count', '?')} CPUs.")
  return "\n".join(lines), notes


def _speed_claim(cfg: TransNormerConfig, rows) -> tuple[bool, str] | None:
  look = _speed_lookup(rows)
  both = [n for n in cfg.speed.lengths if all("ms" in look.get((n, k, "fwd+bwd"), {}) for k in ("linear", "softmax"))]
  if not both:
    return None
  n = max(both)
  a, b = look[(n, "linear", "fwd+bwd")]["ms"], look[(n, "softmax", "fwd+bwd")]["ms"]
  cross = next((x for x in both if look[(x, "linear", "fwd+bwd")]["ms"] < look[(x, "softmax", "fwd+bwd")]["ms"]),
               None)
  return a < b, (f"linear fwd+bwd {b / a:.1f}x {'faster' if a < b else 'slower'} than softmax at N={n}"
                 + (f" (faster from N={cross})" if cross is not None else ""))


def verdict(cfg: TransNormerConfig, payload: dict) -> str:
  """Applies the rule in ``configs/transnormer.py`` (fixed before any run)."""
  from experiments.common.report import verdict_line
  base, tnl = _loss(payload, "softmax", cfg.seeds), _loss(payload, "tnl", cfg.seeds)
  rows = payload.get("speed")
  if base is None or tnl is None or not rows:
    return verdict_line("not reproduced", "the run is incomplete; rerun with --resume")
  d = np.asarray(tnl) - np.asarray(base)
  par = bool(d.mean() <= PAR_MARGIN)
  sc = _speed_claim(cfg, rows)
  fast = bool(sc and sc[0])
  what = (f"TNL {np.mean(tnl):.3f} vs softmax {np.mean(base):.3f} nats/byte (Δ {d.mean():+.3f}, seeds "
          f"{', '.join(f'{x:+.3f}' for x in d)}; on par needs <= {PAR_MARGIN}; paper: TNL better by 0.11-0.17 "
          f"at 385M-1B); " + (sc[1] if sc else "no speed cell measured for both kernels"))
  if par and fast:
    return verdict_line("reproduced", what)
  if par or fast:
    return verdict_line("partly", what + (" — quality not on par at this toy scale" if not par else
                                          " — the speed claim does not show on this device"))
  return verdict_line("not reproduced", what)


def _plots(cfg: TransNormerConfig, payload: dict, out: pathlib.Path) -> list[str]:
  from experiments.common import plots
  files = []
  runs = payload.get("runs", {})
  if runs:
    series = {}
    for arch in ARCHS:
      for s in cfg.seeds:
        r = runs.get(_key(arch, s))
        if r:
          series[f"{LABELS[arch]} seed {s}"] = ([h["step"] for h in r["history"]], [h["loss"] for h in r["history"]])
    plots.line_panels({"test loss": series}, out / "loss_curves.png", xlabel="step", ylabel="test loss (nats/byte)",
                      title="TNL vs softmax, equal params")
    files.append("loss_curves.png")
  rows = payload.get("speed")
  if rows:
    panels = {}
    for mode in MODES:
      panels[mode] = {}
      for k in ("linear", "softmax"):
        pts = [(r["n"], r["ms"]) for r in rows if r["kernel"] == k and r["mode"] == mode and "ms" in r]
        if pts:
          panels[mode][k] = ([p[0] for p in pts], [p[1] for p in pts])
    plots.line_panels(panels, out / "speed.png", xlabel="sequence length", ylabel="ms per call", log2_x=True,
                      title="linear (decayed) vs softmax attention, causal")
    files.append("speed.png")
  return files


# -------------------------------------------------------------------------------------------------------- run
def run(cfg: TransNormerConfig, out, *, resume: bool = False, report: bool = False, progress: bool = True,
        verbose: bool = True, interrupt_after: int | None = None, explicit_out: bool = True) -> dict:
  """Runs (or resumes, or only reports) the experiment; returns the ``results.json`` content."""
  return report_lib.run_experiment(
      cfg, out, title=f"TransNormer vs softmax at toy scale, preset {cfg.name}",
      resume=resume, report=report, explicit_out=explicit_out, verbose=verbose,
      compute=lambda out, payload: _compute(cfg, out, payload, progress, interrupt_after),
      table=lambda payload: _table(cfg, payload), verdict=lambda payload: verdict(cfg, payload),
      plots=lambda out, payload: _plots(cfg, payload, out))


def _compute(cfg, out, payload, progress, interrupt_after):
  from experiments.common.report import environment, write_json
  from experiments.textlm import corpus as corpus_lib
  from experiments.textlm.train import lm_trainer, param_count, train_grid, unigram_loss

  c0, t0 = time.process_time(), time.time()
  cpu_before, wall_before = payload.get("cpu_s", 0.0), payload.get("wall_s", 0.0)

  def save():
    payload["cpu_s"] = round(cpu_before + time.process_time() - c0, 1)
    payload["wall_s"] = round(wall_before + time.time() - t0, 1)
    write_json(out / "results.json", payload)

  payload["environment"] = environment()
  payload["corpus"] = corpus_lib.describe(cfg.corpus)
  payload["unigram_loss"] = unigram_loss(cfg.corpus)
  payload["params"] = {a: param_count(model_fn(cfg, a)) for a in ARCHS}
  save()  # from now on the folder holds a run: only --resume continues it
  trainers = {a: lm_trainer(model_fn(cfg, a), cfg.train) for a in ARCHS}
  cells = [(_key(a, s), a, s) for s in cfg.seeds for a in ARCHS]
  train_grid(cells, trainers, cfg.corpus, cfg.train, payload=payload, out=out, save=save, progress=progress,
             interrupt_after=interrupt_after, name="transnormer")
  if "speed" not in payload:
    payload["speed"] = speed_table(cfg, progress)
  save()


def main(argv=None) -> int:
  return report_lib.preset_main("transnormer", __doc__, PRESETS, run, argv)
