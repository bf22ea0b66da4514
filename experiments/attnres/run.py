"""``python -m experiments attnres``: Attention Residuals (Kimi Team 2026; ``../shared/papers/efficient.md`` §10) on
a tiny byte-level LM over the Python standard library's sources (``configs/attnres.py``, ``configs/textlm.py``).

Steps (each recorded in ``results.json`` as it finishes, so ``--resume`` skips it):

1. train standard pre-norm residuals, Full AttnRes and Block AttnRes (:class:`jaxattn.nn.AttnResLM`, same width
   and depth) for every seed on the same bytes (:func:`experiments.textlm.train.train_grid`); test loss in
   nats/byte on held-out stdlib files, with the unigram byte model as the trivial baseline;
2. overheads: median train-step time (fwd + bwd + AdamW) and the compiled step's temporary memory of each residual
   kind, reported per sub-layer relative to the standard residual;
3. two-phase inference: forward time of the trained Block model with the one-phase and the two-phase schedule and
   the largest logit difference; per-sub-layer input/output RMS of each trained model (``rms_by_depth.png``).

The verdict rule is fixed in ``configs/attnres.py`` (written before any run). Outputs (``--out``, default
``runs/attnres/<preset>/``): ``results.json``, ``table.md``, ``verdict.txt``, ``loss_curves.png``,
``rms_by_depth.png``, ``metrics.jsonl``; the last line printed is the verdict.
"""

from __future__ import annotations

import pathlib
import time
from typing import Sequence

import numpy as np

from configs.attnres import MAX_TWO_PHASE_DIFF, MIN_GAIN, PRESETS, AttnResConfig
from experiments.common import report as report_lib

__all__ = ["main", "run", "verdict", "model_fn", "PAPER_LOSS"]

# Table 4 of the paper (16-layer model, final training loss) [../shared/papers/efficient.md §10b]
PAPER_LOSS = {"none": 1.766, "full": 1.737, "block": 1.746}
LABELS = {"none": "standard residual (PreNorm)", "full": "Full AttnRes", "block": "Block AttnRes"}


def model_fn(cfg: AttnResConfig, mode: str):
  """``rngs -> AttnResLM`` of the preset's size with residual ``mode``."""
  from jaxattn.nn import AttnResLM
  m = cfg.model

  def make(rngs):
    return AttnResLM(256, m.features, m.num_layers, m.num_heads, mlp_features=m.mlp_ratio * m.features, mode=mode,
                     block_size=m.block_size, rngs=rngs)
  return make


def _key(mode: str, seed: int) -> str:
  return f"{mode}-s{seed}"


def _loss(payload: dict, mode: str, seeds: Sequence[int]) -> list[float] | None:
  runs = payload.get("runs", {})
  vals = [runs[_key(mode, s)]["final"]["loss"] for s in seeds if _key(mode, s) in runs]
  return vals if len(vals) == len(seeds) else None


# ------------------------------------------------------------------------------------------------- measurements
def _overheads(cfg: AttnResConfig, trainers: dict, states: dict, corpus_tokens: np.ndarray) -> dict:
  """Median train-step ms and compiled temporary bytes per residual kind (same batch, trained parameters)."""
  from experiments.bench.timing import time_fn
  batch = {"tokens": corpus_tokens[:cfg.timing.batch_size]}
  out = {}
  for mode in cfg.modes:
    tr = trainers[mode]
    state = states[_key(mode, cfg.seeds[0])]
    compiled = tr.train_step.lower(state, batch).compile()  # one compile serves the memory stats and the timing
    mem = compiled.memory_analysis()
    timing, _ = time_fn(compiled, state, batch, repeats=cfg.timing.repeats, warmup=1)
    out[mode] = {"step_ms": timing.ms, "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0) or 0)}
  return out


def _two_phase(cfg: AttnResConfig, trainers: dict, states: dict, test_tokens: np.ndarray) -> dict:
  """One-phase vs two-phase forward of each trained AttnRes model: ms and max |logit difference|."""
  import jax
  from flax import nnx

  from experiments.bench.timing import time_fn
  tokens = test_tokens[:cfg.timing.batch_size, :-1]
  out = {}
  for mode in cfg.modes:
    if mode == "none":
      continue
    model = trainers[mode].model(states[_key(mode, cfg.seeds[0])].params)
    graphdef, params = nnx.split(model)

    def fwd(params, tokens, two_phase):
      return nnx.merge(graphdef, params)(tokens, two_phase=two_phase)
    one = jax.jit(lambda p, t: fwd(p, t, False))
    two = jax.jit(lambda p, t: fwd(p, t, True))
    t1, y1 = time_fn(one, params, tokens, repeats=cfg.timing.repeats, warmup=1)
    t2, y2 = time_fn(two, params, tokens, repeats=cfg.timing.repeats, warmup=1)
    out[mode] = {"one_phase_ms": t1.ms, "two_phase_ms": t2.ms,
                 "max_abs_diff": float(np.max(np.abs(np.asarray(y1) - np.asarray(y2))))}
  return out


def _rms(cfg: AttnResConfig, trainers: dict, states: dict, test_tokens: np.ndarray) -> dict:
  """Per-sub-layer input and output RMS (mean over a test batch) of each trained model (first seed)."""
  import jax
  from flax import nnx
  tokens = test_tokens[:cfg.timing.batch_size, :-1]
  out = {}
  for mode in cfg.modes:
    model = trainers[mode].model(states[_key(mode, cfg.seeds[0])].params)
    graphdef, params = nnx.split(model)

    @jax.jit
    def stats(params, tokens):
      lm = nnx.merge(graphdef, params)
      return lm.decoder(lm.embed(tokens), return_stats=True)[1]
    s = jax.device_get(stats(params, tokens))
    out[mode] = {k: [round(float(x), 5) for x in v] for k, v in s.items()}
  return out


# ---------------------------------------------------------------------------------------------------- report
def _table(cfg: AttnResConfig, payload: dict) -> tuple[str, list[str]]:
  seeds = cfg.seeds
  lines = [f"Model: D={cfg.model.features}, {cfg.model.num_layers} layers ({2 * cfg.model.num_layers} sub-layers), "
           f"{cfg.model.num_heads} heads, Block S={cfg.model.block_size} sub-layers; {cfg.train.steps} steps of "
           f"{cfg.train.batch_size} x {cfg.corpus.seq_len} bytes; test = held-out stdlib files "
           f"({payload.get('corpus', {}).get('test', {}).get('bytes', '?')} bytes).\n",
           "| residual | params | " + " | ".join(f"test loss seed {s}" for s in seeds)
           + " | mean (nats/byte) | Δ vs standard | paper Table 4 loss | paper Δ |",
           "|---|---:|" + "---:|" * len(seeds) + "---:|---:|---:|---:|"]
  base = _loss(payload, "none", seeds)
  uni = payload.get("unigram_loss")
  if uni is not None:
    d = "—" if base is None else f"{uni - np.mean(base):+.4f}"
    lines.append("| unigram bytes (trivial baseline) | 256 | " + " | ".join("" for _ in seeds)
                 + f" | {uni:.4f} | {d} | — | — |")
  for mode in cfg.modes:
    vals = _loss(payload, mode, seeds)
    params = payload.get("params", {}).get(mode, "")
    if vals is None:
      lines.append(f"| {LABELS[mode]} | {params} | " + " | ".join("—" for _ in seeds) + " | — | — | "
                   f"{PAPER_LOSS[mode]} | |")
      continue
    d = "—" if mode == "none" or base is None else f"{np.mean(vals) - np.mean(base):+.4f}"
    pd = "—" if mode == "none" else f"{PAPER_LOSS[mode] - PAPER_LOSS['none']:+.3f}"
    lines.append(f"| {LABELS[mode]} | {params} | " + " | ".join(f"{v:.4f}" for v in vals)
                 + f" | {np.mean(vals):.4f} | {d} | {PAPER_LOSS[mode]} | {pd} |")
  ov = payload.get("overheads")
  if ov:
    n_sub = 2 * cfg.model.num_layers
    b = ov["none"]
    lines += ["", f"**Overheads** (trained parameters, batch {cfg.timing.batch_size} x {cfg.corpus.seq_len}, median "
              f"of {cfg.timing.repeats}; per sub-layer = (kind - standard) / {n_sub} sub-layers, relative to the "
              f"standard step)\n",
              "| residual | train step ms | overhead per sub-layer | compiled temp memory (MiB) | memory overhead per "
              "sub-layer | paper |", "|---|---:|---:|---:|---:|---|"]
    for mode in cfg.modes:
      o = ov[mode]
      dt = (o["step_ms"] - b["step_ms"]) / n_sub / b["step_ms"]
      dm = (o["temp_bytes"] - b["temp_bytes"]) / n_sub / max(b["temp_bytes"], 1)
      paper = "" if mode == "none" else "< 4 % training overhead (whole model, pipeline parallel)"
      lines.append(f"| {LABELS[mode]} | {o['step_ms']:.1f} | {'—' if mode == 'none' else f'{100 * dt:+.2f} %'} | "
                   f"{o['temp_bytes'] / 2 ** 20:.2f} | {'—' if mode == 'none' else f'{100 * dm:+.2f} %'} | {paper} |")
  tp = payload.get("two_phase")
  if tp:
    lines += ["", "**Two-phase inference** (forward of the trained model, one-phase vs two-phase schedule)\n",
              "| model | one-phase ms | two-phase ms | max abs logit difference | paper |", "|---|---:|---:|---:|---|"]
    for mode, t in tp.items():
      lines.append(f"| {LABELS[mode]} | {t['one_phase_ms']:.2f} | {t['two_phase_ms']:.2f} | "
                   f"{t['max_abs_diff']:.2e} | exact; < 2 % inference latency |")
  notes = [f"Paper numbers: Table 4 of the paper (16-layer model, final training loss, its own data), "
           f"``../shared/papers/efficient.md`` §10b; ours are test losses in nats/byte on stdlib text at toy scale — "
           f"compare the signs and rough sizes of the Δ columns, not the absolute losses.",
           f"Verdict rule (fixed before the runs, configs/attnres.py): a variant improves when every seed's paired "
           f"Δ < 0 and the mean Δ <= -{MIN_GAIN}; reproduced = both improve and two-phase max |diff| <= "
           f"{MAX_TWO_PHASE_DIFF:g}."]
  rms = payload.get("rms")
  if rms:
    notes.append("Input RMS of the sub-layers, first -> last (trained, first seed): " + "; ".join(
        f"{LABELS[m]} {v['input_rms'][0]:.2f} -> {max(v['input_rms']):.2f} (max) -> {v['input_rms'][-1]:.2f}"
        for m, v in rms.items()) + " (paper: AttnRes keeps the magnitudes bounded over depth; rms_by_depth.png).")
  notes.append("Timings come from a shared, loaded 2-core machine: compare them within one table only.")
  if payload.get("cpu_s") is not None:
    notes.append(f"CPU time: {payload['cpu_s']:.0f} process CPU-seconds ({payload.get('wall_s', 0):.0f} s wall) "
                 f"on {payload.get('environment', {}).get('cpu_count', '?')} CPUs.")
  return "\n".join(lines), notes


def verdict(cfg: AttnResConfig, payload: dict) -> str:
  """Applies the rule in ``configs/attnres.py`` (fixed before any run)."""
  from experiments.common.report import verdict_line
  base = _loss(payload, "none", cfg.seeds)
  variants = [m for m in cfg.modes if m != "none"]
  vals = {m: _loss(payload, m, cfg.seeds) for m in variants}
  tp = payload.get("two_phase")
  if base is None or any(v is None for v in vals.values()) or tp is None:
    return verdict_line("not reproduced", "the run is incomplete; rerun with --resume")
  improves, parts = {}, []
  for m in variants:
    d = np.asarray(vals[m]) - np.asarray(base)
    improves[m] = bool(np.all(d < 0) and d.mean() <= -MIN_GAIN)
    parts.append(f"{LABELS[m]} {d.mean():+.4f} nats/byte vs standard (seeds {', '.join(f'{x:+.4f}' for x in d)}; "
                 f"paper {PAPER_LOSS[m] - PAPER_LOSS['none']:+.3f})")
  diff = max(t["max_abs_diff"] for t in tp.values())
  exact = diff <= MAX_TWO_PHASE_DIFF
  what = "; ".join(parts) + f"; two-phase inference max |diff| {diff:.1e}"
  n = sum(improves.values())
  if n == len(variants) and exact:
    return verdict_line("reproduced", what)
  if n >= 1 and exact:
    return verdict_line("partly", what + f" — only {', '.join(LABELS[m] for m in variants if improves[m])} "
                                         f"clears the fixed margin")
  return verdict_line("not reproduced", what + (" — two-phase inference is not exact" if not exact else
                                                " — neither variant clears the fixed margin; a null result at toy "
                                                "scale"))


def _plots(cfg: AttnResConfig, payload: dict, out: pathlib.Path) -> list[str]:
  from experiments.common import plots
  files = []
  runs = payload.get("runs", {})
  if runs:
    series = {}
    for mode in cfg.modes:
      for s in cfg.seeds:
        r = runs.get(_key(mode, s))
        if r:
          series[f"{LABELS[mode]} seed {s}"] = ([h["step"] for h in r["history"]], [h["loss"] for h in r["history"]])
    panels = {"test loss": series}
    uni = payload.get("unigram_loss")
    plots.line_panels(panels, out / "loss_curves.png", xlabel="step", ylabel="test loss (nats/byte)",
                      title=f"AttnRes vs standard (unigram {uni:.2f})" if uni else None)
    files.append("loss_curves.png")
  rms = payload.get("rms")
  if rms:
    panels = {k: {LABELS[m]: (list(range(len(v[k]))), v[k]) for m, v in rms.items()}
              for k in ("input_rms", "output_rms")}
    plots.line_panels(panels, out / "rms_by_depth.png", xlabel="sub-layer", ylabel="RMS",
                      title="per-sub-layer input / output RMS (trained, first seed)")
    files.append("rms_by_depth.png")
  return files


# ------------------------------------------------------------------------------------------------------- run
def run(cfg: AttnResConfig, out, *, resume: bool = False, report: bool = False, progress: bool = True,
        verbose: bool = True, interrupt_after: int | None = None, explicit_out: bool = True) -> dict:
  """Runs (or resumes, or only reports) the experiment; returns the ``results.json`` content."""
  return report_lib.run_experiment(
      cfg, out, title=f"Attention Residuals at toy scale, preset {cfg.name}",
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
  payload["params"] = {m: param_count(model_fn(cfg, m)) for m in cfg.modes}
  save()  # from now on the folder holds a run: only --resume continues it
  trainers = {m: lm_trainer(model_fn(cfg, m), cfg.train) for m in cfg.modes}
  cells = [(_key(m, s), m, s) for s in cfg.seeds for m in cfg.modes]
  states = train_grid(cells, trainers, cfg.corpus, cfg.train, payload=payload, out=out, save=save,
                      progress=progress, interrupt_after=interrupt_after, name="attnres")
  train_tokens = corpus_lib.ByteWindows(cfg.corpus, "train").arrays["tokens"]
  test_tokens = corpus_lib.ByteWindows(cfg.corpus, "test").arrays["tokens"]
  if "overheads" not in payload:
    payload["overheads"] = _overheads(cfg, trainers, states, train_tokens)
    save()
  if "two_phase" not in payload:
    payload["two_phase"] = _two_phase(cfg, trainers, states, test_tokens)
    save()
  if "rms" not in payload:
    payload["rms"] = _rms(cfg, trainers, states, test_tokens)
  save()


def main(argv=None) -> int:
  return report_lib.preset_main("attnres", __doc__, PRESETS, run, argv)
