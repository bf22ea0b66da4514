"""``python -m experiments prune``: attention-guided visual-token pruning on a toy VLM — accuracy retained against the
kept fraction for every scorer (FasterVLM's [CLS] attention, FastV / PDrop / AdaptInfer text->visual attention,
Attention Debiasing on/off, single- vs multi-stage) beside random, feature-norm and oracle baselines, and the LM
prefill time saved (``../shared/papers/cross.md`` §10, §11, §17; task and presets in ``configs/prune.py``).

Steps (recorded in ``results.json`` as they finish, so ``--resume`` skips them):

1. train the toy VLM (:func:`experiments.common.train.fit`, Orbax checkpoints under ``<out>/ckpt``);
2. calibrate the debiasing trends (``jaxattn.prune.fit_position_trend``, log space, non-pad positions) on the
   calibration split, and measure the layer-to-layer text->visual attention shift (inflection layers);
3. for each kept fraction: test accuracy of every scorer (``jaxattn.prune``: scores from the softmax statistics
   mode, order-keeping top-k, gathered tokens), and the fraction of the real digit's patches kept;
4. LM prefill time (CPU wall clock, jit, median) with the kept tokens gathered before the LM and at ``lm_layer``.

Outputs (``--out``, default ``runs/prune/<preset>/``): ``results.json``, ``table.md``, ``verdict.txt``,
``accuracy_vs_kept.png``, ``position_trend.png``, ``metrics.jsonl``; the last line printed is the verdict.
"""

from __future__ import annotations

import pathlib
import time
from typing import Sequence

import numpy as np

from configs.prune import PRESETS, PruneConfig
from experiments.common import config as config_lib
from experiments.common import report as report_lib
from experiments.prune.data import PruneSource, make_records

__all__ = ["SCORERS", "main", "run", "verdict"]

# scorer id -> (label, group, where it prunes)
SCORERS = {
    "random": ("random", "baseline", "before LM"),
    "norm": ("feature norm", "baseline", "before LM"),
    "oracle": ("oracle (real digit's box)", "baseline", "before LM"),
    "random@lm": ("random", "baseline", "LM layer"),
    "cls_last": ("[CLS] attn, last ViT layer", "FasterVLM", "before LM"),
    "cls_penult": ("[CLS] attn, penultimate ViT layer", "FasterVLM", "before LM"),
    "fastv": ("last-token attn (FastV)", "LM text->visual", "LM layer"),
    "pdrop": ("mean text attn (PDrop)", "LM text->visual", "LM layer"),
    "adaptinfer": ("importance-weighted text attn (AdaptInfer)", "LM text->visual", "LM layer"),
    "fastv+debias": ("FastV + detrend + pad suppression", "Debiasing", "LM layer"),
    "adaptinfer+detrend": ("AdaptInfer + detrend", "Debiasing", "LM layer"),
    "adaptinfer+pad": ("AdaptInfer + pad suppression", "Debiasing", "LM layer"),
    "adaptinfer+debias": ("AdaptInfer + detrend + pad suppression", "Debiasing", "LM layer"),
    "adaptinfer-multi": ("AdaptInfer, multi-stage (equal mean budget)", "Multi-stage", "LM layers"),
    "adaptinfer+debias-multi": ("AdaptInfer + debias, multi-stage", "Multi-stage", "LM layers"),
}
PAPER = {
    "FasterVLM": "~90% of LLaVA-1.5-7B's performance kept at 95% pruned (keep 5%) [cross.md §10c]",
    "LM text->visual": "AdaptInfer: 93.1% accuracy retained at 64/576 tokens (keep 11%), beats FastV [§17c]",
    "Debiasing": "consistent gains for 7 host methods on 10 benchmarks [§11c]",
    "Multi-stage": "AdaptInfer's 3-stage schedule (e.g. 133, 27, 3 tokens) at equal average budget [§17a]",
    "baseline": "random / norm / oracle: no paper number (our baselines)",
}


# ------------------------------------------------------------------------------------------------- model
def _trainer(cfg: PruneConfig):
  import jax.numpy as jnp
  import optax

  from experiments.common.train import Trainer
  from experiments.prune.model import PruneVLM

  def model_fn(rngs):
    return PruneVLM(cfg.model, cfg.task, rngs=rngs)

  def loss_fn(model, batch, key):
    del key
    logits, cls_logits = model(batch["image"], batch["tokens"], batch["length"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["answer"]).mean()
    cls = optax.softmax_cross_entropy_with_integer_labels(cls_logits, batch["label"]).mean()
    acc = (jnp.argmax(logits, -1) == batch["answer"]).mean()
    return ce + cfg.model.cls_weight * cls, {"accuracy": acc, "answer_loss": ce, "cls_loss": cls}

  def eval_fn(model, batch):
    logits, cls_logits = model(batch["image"], batch["tokens"], batch["length"])
    ok = batch["valid"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["answer"])
    f = lambda x: jnp.where(ok, x, 0.0).sum()
    return {"count": ok.sum().astype(jnp.float32), "loss": f(ce),
            "accuracy": f((jnp.argmax(logits, -1) == batch["answer"]).astype(jnp.float32)),
            "cls_accuracy": f((jnp.argmax(cls_logits, -1) == batch["label"]).astype(jnp.float32))}

  return Trainer(model_fn, loss_fn, eval_fn, total_steps=cfg.train.steps, settings=cfg.train)


def _fns():
  """Jitted pieces: the ViT with [CLS] scores, LM-layer text->visual scores, pruned predictions."""
  import jax.numpy as jnp
  from flax import nnx

  from experiments.prune.model import answer_logits, layer_qk, lm_forward, vit_forward
  from jaxattn import prune

  @nnx.jit
  def encode(model, images):
    vis, _, qks = vit_forward(model, images, want_qk=True)
    cls = jnp.stack([prune.cls_attention(q, k) for q, k in qks])  # [vit_layers, B, N]
    return vis, cls, prune.feature_norm(vis)

  @nnx.jit(static_argnames=("layers", "stop"))
  def lm_scores(model, vis, tokens, length, idxs, layers, stop):
    """Text->visual scores of LM layer ``stop`` over the visual tokens surviving ``plan``: {weighting: [B, n]}."""
    x, n = lm_forward(model, vis, tokens, tuple(zip(layers, idxs)), stop=stop)
    q, k = layer_qk(model.lm[stop], x)
    valid = jnp.arange(tokens.shape[1])[None] < length[:, None]
    return {w: prune.text_to_visual(q[:, n:], k[:, :n], k[:, n:], weighting=w, text_valid=valid)
            for w in prune.WEIGHTINGS}

  @nnx.jit(static_argnames=("layers",))
  def predict(model, vis, tokens, length, idxs, layers):
    h = lm_forward(model, vis, tokens, tuple(zip(layers, idxs)))
    return jnp.argmax(answer_logits(model, h, length), -1)

  return encode, lm_scores, predict


def _batches(n, size):
  return [slice(s, min(n, s + size)) for s in range(0, n, size)]


# ------------------------------------------------------------------------------------------------- stages
def _encode_all(encode, model, arrays, bs):
  vis, cls, norm = [], [], []
  for sl in _batches(len(arrays["image"]), bs):
    v, c, nm = encode(model, arrays["image"][sl])
    vis.append(np.asarray(v)), cls.append(np.asarray(c)), norm.append(np.asarray(nm))
  return np.concatenate(vis), np.concatenate(cls, axis=1), np.concatenate(norm)


def _lm_scores_all(lm_scores, model, arrays, vis, bs, plan, stop):
  """{weighting: [n, k_current]} for a plan given per record as ((layer, idx [n, k]), ...)."""
  out = {}
  layers = tuple(l for l, _ in plan)
  for sl in _batches(len(vis), bs):
    s = lm_scores(model, vis[sl], arrays["tokens"][sl], arrays["length"][sl], tuple(i[sl] for _, i in plan),
                  layers, stop)
    for w, v in s.items():
      out.setdefault(w, []).append(np.asarray(v))
  return {w: np.concatenate(v) for w, v in out.items()}


def _accuracy(predict, model, arrays, vis, bs, plan):
  layers = tuple(l for l, _ in plan)
  pred = []
  for sl in _batches(len(vis), bs):
    pred.append(np.asarray(predict(model, vis[sl], arrays["tokens"][sl], arrays["length"][sl],
                                   tuple(i[sl] for _, i in plan), layers)))
  return float((np.concatenate(pred) == arrays["answer"]).mean())


def _topk(scores, k):
  from jaxattn import prune
  return np.asarray(prune.topk_keep_order(np.asarray(scores, np.float32), k))


def _position_corr(scores, pad):
  """Pearson r between position and the mean score over non-pad entries (positions that are never pad)."""
  m = np.nanmean(np.where(pad, np.nan, scores), 0)
  ok = np.isfinite(m)
  return float(np.corrcoef(np.flatnonzero(ok), m[ok])[0, 1])


def _debias(scores, trend, pad, detrend=True, pad_suppress=True):
  from jaxattn import prune
  s = np.asarray(scores, np.float32)
  if detrend:
    s = np.asarray(prune.positional_detrend(s, trend))
  if pad_suppress:
    s = np.asarray(prune.suppress(s, pad))
  return s


def _time_prefill(predict, model, arrays, vis, cfg, plan_fn, reps):
  """Median seconds of one jitted LM prefill of ``timing_batch`` records with the plan from ``plan_fn(sl)``."""
  import jax
  sl = slice(0, min(cfg.timing_batch, len(vis)))
  plan = plan_fn(sl)
  layers = tuple(l for l, _ in plan)
  args = (model, vis[sl], arrays["tokens"][sl], arrays["length"][sl], tuple(i for _, i in plan), layers)
  jax.block_until_ready(predict(*args))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(predict(*args))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def run(cfg: PruneConfig, out, *, resume: bool = False, report: bool = False, progress: bool = True,
        explicit_out: bool = True, verbose: bool = True, interrupt_after: int | None = None) -> dict:
  """Runs (or resumes, or only reports) the experiment; returns the results payload."""
  out = pathlib.Path(out)
  fp = config_lib.fingerprint(config_lib.to_dict(cfg))
  old = report_lib.prepare_out_dir(out, fingerprint=fp, resume=resume, report=report, explicit_out=explicit_out)
  payload = old or {"config": config_lib.to_dict(cfg), "fingerprint": fp, "cells": {}}
  for k in ("table_markdown", "notes", "verdict"):
    payload.pop(k, None)
  if not report:
    _compute(cfg, out, payload, progress, interrupt_after)
  md, notes = _table(cfg, payload)
  line = verdict(cfg, payload)
  plots = _plots(cfg, payload, out)
  report_lib.write_report(out, payload, title=f"Attention-guided visual-token pruning on a toy VLM, preset "
                          f"{cfg.name}", table=md, verdict=line, notes=notes, plots=plots, verbose=verbose)
  return {**payload, "table_markdown": md, "verdict": line}


def _compute(cfg: PruneConfig, out: pathlib.Path, payload: dict, progress: bool, interrupt_after):
  from tqdm.auto import tqdm

  from experiments.common.metrics import MetricWriter
  from experiments.common.report import environment, write_json
  from experiments.common.train import fit
  from jaxattn import prune

  c0 = time.process_time()
  payload["environment"] = environment()
  write_json(out / "results.json", payload)  # from now on the folder holds a run: only --resume continues it
  N, L = cfg.task.num_tokens, cfg.model.lm_layers
  units = ["train", "calibrate"] + [f"keep {r:g}" for r in cfg.keep] + ["timing"]
  bar = tqdm(total=len(units), disable=not progress, dynamic_ncols=True,
             bar_format="{desc} |{bar}| elapsed {elapsed}, ETA {remaining}")
  done = [0]

  def step(desc):
    done[0] += 1
    bar.set_description(f"prune: run {done[0]} of {len(units)} ({desc})")

  step("train")
  trainer = _trainer(cfg)
  t = cfg.train
  test_src = PruneSource(cfg.task, cfg.task.num_test, "test")
  writer = MetricWriter(out / "metrics.jsonl")
  try:
    res = fit(trainer, lr=t.lr, seed=t.seed, train_source=PruneSource(cfg.task, cfg.task.num_train, "train"),
              eval_source=test_src, batch_size=t.batch_size, eval_batch_size=t.eval_batch_size,
              eval_every=t.eval_every, checkpoint_dir=(out / "ckpt").resolve(), checkpoint_every=t.checkpoint_every,
              writer=writer, log_every=50, interrupt_after=interrupt_after, progress=progress, desc="prune train")
  finally:
    writer.close()
  payload["train"] = dict(final=res.final, history=res.history, steps=res.steps)
  bar.update(1)
  model = trainer.model(res.state.params)
  encode, lm_scores, predict = _fns()
  bs = cfg.eval_batch
  test = test_src.arrays
  calib = make_records(cfg.task, cfg.task.num_calib, "calib")
  vis, cls, norm = _encode_all(encode, model, test, bs)
  full = _accuracy(predict, model, test, vis, bs, ())
  payload["full_accuracy"] = full
  payload["num_tokens"] = N

  step("calibrate")
  ell = cfg.lm_layer
  cvis, _, _ = _encode_all(encode, model, calib, bs)
  cs = _lm_scores_all(lm_scores, model, calib, cvis, bs, (), ell)
  trends = {w: prune.fit_position_trend(cs[w], valid=~calib["pad"]) for w in ("last", "adaptinfer")}
  # layer-to-layer shift of AdaptInfer's text->visual map over the full tokens (the inflection analysis)
  maps = np.stack([_lm_scores_all(lm_scores, model, calib, cvis, bs, (), l)["adaptinfer"] for l in range(L)])
  shift = prune.attention_shift(maps)
  pad_mass = [float(maps[l][calib["pad"]].sum() / maps[l].sum()) for l in range(L)]
  payload["calibration"] = dict(
      trend_weights={w: tr.weights().tolist() for w, tr in trends.items()},
      mean_score={w: np.nan_to_num(np.nanmean(np.where(calib["pad"], np.nan, cs[w]), 0)).tolist()
                  for w in ("last", "adaptinfer")},
      pad_fraction=float(calib["pad"].mean()), pad_mass_per_layer=pad_mass, shift=shift.tolist(),
      inflection_layers=list(prune.inflection_layers(shift, min(len(cfg.stages), len(shift)))),
      corr_position={w: _position_corr(cs[w], calib["pad"]) for w in ("last", "adaptinfer")})
  bar.update(1)

  # LM-layer scores of the test set over the full tokens (single stage), computed once
  ts = _lm_scores_all(lm_scores, model, test, vis, bs, (), ell)
  rng = np.random.default_rng(cfg.task.seed + 17)
  rand = rng.random((len(vis), N))
  oracle = test["target"] + 1e-3 * rng.random((len(vis), N))
  pad = test["pad"]
  vit_l = cfg.model.vit_layers

  def cell(name, plan):
    idx = plan[-1][1]
    acc = _accuracy(predict, model, test, vis, bs, plan)
    tgt = np.take_along_axis(test["target"], idx, axis=1).sum(1) / np.maximum(test["target"].sum(1), 1e-9)
    return dict(scorer=name, keep=None, k=int(idx.shape[1]), accuracy=acc, retained=acc / max(full, 1e-9),
                target_kept=float(tgt.mean()), pad_kept=float(np.take_along_axis(pad, idx, 1).mean()))

  for r in cfg.keep:
    key = f"{r:g}"
    step(f"keep {key}")
    cells = payload["cells"].get(key, {})
    if set(cells) >= set(SCORERS):
      bar.update(1)
      continue
    k = prune.keep_count(N, r)
    pre = {"random": rand, "norm": norm, "oracle": oracle, "cls_last": cls[vit_l - 1], "cls_penult": cls[vit_l - 2]}
    for name, s in pre.items():
      if name not in cells:
        cells[name] = cell(name, ((0, _topk(s, k)),))
    lm = {"random@lm": rand, "fastv": ts["last"], "pdrop": ts["mean"], "adaptinfer": ts["adaptinfer"],
          "fastv+debias": _debias(ts["last"], trends["last"], pad),
          "adaptinfer+detrend": _debias(ts["adaptinfer"], trends["adaptinfer"], pad, pad_suppress=False),
          "adaptinfer+pad": _debias(ts["adaptinfer"], trends["adaptinfer"], pad, detrend=False),
          "adaptinfer+debias": _debias(ts["adaptinfer"], trends["adaptinfer"], pad)}
    for name, s in lm.items():
      if name not in cells:
        cells[name] = cell(name, ((ell, _topk(s, k)),))
    # multi-stage: stage ratios factor x r (capped at 1, non-increasing); debiasing only at the first stage (PDrop)
    counts = []
    for f in cfg.stage_factors:
      c = prune.keep_count(N, min(1.0, f * r))
      counts.append(min(c, counts[-1]) if counts else c)
    for name, first in (("adaptinfer-multi", ts["adaptinfer"]), ("adaptinfer+debias-multi", lm["adaptinfer+debias"])):
      if name in cells:
        continue
      plan = ((cfg.stages[0], _topk(first, counts[0])),)
      for l, c in zip(cfg.stages[1:], counts[1:]):
        s = _lm_scores_all(lm_scores, model, test, vis, bs, plan, l)["adaptinfer"]
        local = _topk(s, c)
        plan = plan + ((l, np.asarray(prune.compose(plan[-1][1], local))),)
      cells[name] = cell(name, plan)
      cells[name]["stage_counts"] = counts
    for c in cells.values():
      c["keep"] = r
    payload["cells"][key] = cells
    payload["cpu_seconds"] = round(payload.get("cpu_seconds", 0.0) + time.process_time() - c0, 1)
    c0 = time.process_time()
    write_json(out / "results.json", payload)
    bar.update(1)

  step("timing")
  if "timing" not in payload:
    reps = cfg.timing_reps
    base = _time_prefill(predict, model, test, vis, cfg, lambda sl: (), reps)
    rows = []
    for r in cfg.keep:
      k = prune.keep_count(N, r)
      t0 = _time_prefill(predict, model, test, vis, cfg, lambda sl: ((0, _topk(cls[vit_l - 2][sl], k)),), reps)
      t1 = _time_prefill(predict, model, test, vis, cfg, lambda sl: ((ell, _topk(ts["adaptinfer"][sl], k)),), reps)
      rows.append(dict(keep=r, k=k, before_lm_s=t0, at_layer_s=t1))
    payload["timing"] = dict(full_s=base, batch=min(cfg.timing_batch, len(vis)), rows=rows,
                             note="CPU wall clock of the jitted LM prefill (vision encoder excluded), median")
  bar.update(1)
  bar.close()
  payload["cpu_seconds"] = round(payload.get("cpu_seconds", 0.0) + time.process_time() - c0, 1)
  write_json(out / "results.json", payload)


# ------------------------------------------------------------------------------------------------- report
def _get(payload, scorer, r):
  return payload.get("cells", {}).get(f"{r:g}", {}).get(scorer)


def _table(cfg: PruneConfig, payload: dict) -> tuple[str, list[str]]:
  N = cfg.task.num_tokens
  full = payload.get("full_accuracy")
  head = "| group | scorer | prunes | " + " | ".join(
      f"keep {r:.0%} (k={max(1, round(N * r))})" for r in cfg.keep) + " | paper |"
  lines = [f"Test accuracy (retained = accuracy / full-token accuracy {full if full is None else f'{full:.3f}'}), "
           f"{cfg.task.num_test} test canvases of unseen handwriting; in brackets the share of the real digit's "
           f"patches kept.", "", head, "|" + "---|" * (4 + len(cfg.keep))]
  last_group = None
  for s, (label, group, where) in SCORERS.items():
    vals = []
    for r in cfg.keep:
      c = _get(payload, s, r)
      vals.append("—" if c is None else f"{c['accuracy']:.3f} ({c['retained']:.0%}) [{c['target_kept']:.2f}]")
    where = f"LM layer {cfg.lm_layer}" if where == "LM layer" else (
        f"LM layers {cfg.stages}" if where == "LM layers" else where)
    paper = PAPER[group] if group != last_group else ""
    last_group = group
    lines.append(f"| {group} | {label} | {where} | " + " | ".join(vals) + f" | {paper} |")
  t = payload.get("timing")
  if t:
    lines += ["", f"LM prefill time, batch {t['batch']} ({t['note']}); full tokens: {1e3 * t['full_s']:.2f} ms. "
              f"Paper: AdaptInfer -61.3% CUDA latency at 64/576 tokens [§17c].", "",
              "| keep | k | pruned before LM: ms (saved) | pruned at LM layer "
              f"{cfg.lm_layer}: ms (saved) |", "|---|---|---|---|"]
    for row in t["rows"]:
      lines.append(f"| {row['keep']:.0%} | {row['k']} | {1e3 * row['before_lm_s']:.2f} "
                   f"({1 - row['before_lm_s'] / t['full_s']:.0%}) | {1e3 * row['at_layer_s']:.2f} "
                   f"({1 - row['at_layer_s'] / t['full_s']:.0%}) |")
  notes = []
  cal = payload.get("calibration")
  if cal:
    notes.append(f"calibration: corr(mean score, position) on non-pad tokens: FastV {cal['corr_position']['last']:+.2f},"
                 f" AdaptInfer {cal['corr_position']['adaptinfer']:+.2f}; padding is {cal['pad_fraction']:.0%} of "
                 f"the tokens and gets {', '.join(f'{m:.0%}' for m in cal['pad_mass_per_layer'])} of AdaptInfer's "
                 f"text->visual mass at LM layers 0..{len(cal['pad_mass_per_layer']) - 1}")
    notes.append(f"layer-to-layer shift (JS, nats) of the text->visual map: "
                 f"{', '.join(f'{x:.3f}' for x in cal['shift'])}; inflection layers {cal['inflection_layers']} "
                 f"(schedule used: {list(cfg.stages)})")
  if payload.get("train"):
    f = payload["train"]["final"]
    notes.append(f"trained {payload['train']['steps']} steps: test answer accuracy {f.get('accuracy', 0):.3f}, "
                 f"[CLS] digit accuracy {f.get('cls_accuracy', 0):.3f}")
  if _get(payload, "random@lm", min(cfg.keep)):
    rr = _get(payload, "random@lm", min(cfg.keep))["retained"]
    notes.append(f"random pruning at LM layer {cfg.lm_layer} keeps {rr:.0%} at {min(cfg.keep):.0%} kept: after "
                 f"{cfg.lm_layer} full LM layer(s) the text positions have already read the visual evidence, so "
                 f"pruning there cannot separate the text-guided scorers (FastV / PDrop / AdaptInfer, debiased or "
                 f"not, single or multi-stage) from random at this scale")
  if payload.get("timing"):
    notes.append("prefill timings are CPU wall clock on a shared machine under heavy load (other jobs): noisy, "
                 "indicative only; token counts, not FLOPs, are what the kept fraction controls")
  if "cpu_seconds" in payload:
    notes.append(f"CPU seconds (process time, all stages): {payload['cpu_seconds']}")
  notes.append("the LM reads local tokens (each an MLP of its 3 x 3 patch neighbourhood, no attention mixing; pilot §21-A: pruning globally mixed tokens makes random "
               "pruning a strong scorer); distractors are scrambled digits with the same ink (feature norm cannot "
               "tell them apart); the [CLS] token is trained to classify the real digit (CLIP's image-level "
               "objective at toy scale)")
  return "\n".join(lines), notes


def verdict(cfg: PruneConfig, payload: dict) -> str:
  """Three claims at toy tolerance: FasterVLM ([CLS] keeps >= 80% of the accuracy at the smallest kept fraction and
  beats random and norm by >= 5 points), AdaptInfer (multi-stage AdaptInfer keeps >= 85% at ~10%, is no worse
  than single-stage or FastV, and beats random pruning at the same LM layer by >= 5 points), Debiasing (AdaptInfer + debias >= AdaptInfer at most kept fractions)."""
  cells = payload.get("cells", {})
  if any(f"{r:g}" not in cells for r in cfg.keep):
    return report_lib.verdict_line("not reproduced", "run incomplete: not every kept fraction has been evaluated")
  rmin = min(cfg.keep)
  r10 = min(cfg.keep, key=lambda r: abs(r - 0.1))
  a = lambda s, r: _get(payload, s, r)["accuracy"]
  ret = lambda s, r: _get(payload, s, r)["retained"]
  best_cls = max(("cls_last", "cls_penult"), key=lambda s: a(s, rmin))
  fv = ret(best_cls, rmin) >= 0.8 and a(best_cls, rmin) >= max(a("random", rmin), a("norm", rmin)) + 0.05
  ai_rand = a("random@lm", r10)
  ai = ret("adaptinfer-multi", r10) >= 0.85 and a("adaptinfer-multi", r10) >= max(
      a("adaptinfer", r10), a("fastv", r10)) - 0.01 and a("adaptinfer-multi", r10) >= ai_rand + 0.05
  wins = sum(a("adaptinfer+debias", r) >= a("adaptinfer", r) for r in cfg.keep)
  db = wins * 2 > len(cfg.keep) and any(a("adaptinfer+debias", r) > a("adaptinfer", r) + 0.01 for r in cfg.keep)
  parts = [f"FasterVLM {'yes' if fv else 'no'} ({best_cls} keeps {ret(best_cls, rmin):.0%} at {rmin:.0%} kept vs "
           f"random {ret('random', rmin):.0%}, norm {ret('norm', rmin):.0%}; paper ~90%)",
           f"AdaptInfer {'yes' if ai else 'no'} (multi-stage {ret('adaptinfer-multi', r10):.0%} vs single "
           f"{ret('adaptinfer', r10):.0%}, FastV {ret('fastv', r10):.0%}, random at the same layer "
           f"{ret('random@lm', r10):.0%} at {r10:.0%}; paper 93.1%)",
           f"Debiasing {'yes' if db else 'no'} (better or equal at {wins} of {len(cfg.keep)} kept fractions)"]
  n = fv + ai + db
  v = "reproduced" if n == 3 else "not reproduced" if n == 0 else "partly"
  return report_lib.verdict_line(v, "; ".join(parts))


def _plots(cfg: PruneConfig, payload: dict, out: pathlib.Path) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker  # noqa: F401  (NullFormatter)
  files = []
  if payload.get("cells"):
    fig, ax = plt.subplots(figsize=(10, 4.8))
    styles = {"baseline": ":", "FasterVLM": "-", "LM text->visual": "--", "Debiasing": "-.", "Multi-stage": "-"}
    colors = plt.get_cmap("tab20").colors
    for i, (s, (label, group, where)) in enumerate(SCORERS.items()):
      pts = [(r, _get(payload, s, r)["retained"]) for r in cfg.keep if _get(payload, s, r)]
      if pts:
        x, y = zip(*sorted(pts))
        where = "before LM" if where == "before LM" else f"LM layer {cfg.lm_layer}" if where == "LM layer" \
            else f"LM layers {list(cfg.stages)}"
        ax.plot(x, y, styles[group], marker="o", ms=3, color=colors[i % len(colors)], label=f"{label} ({where})",
                lw=2.2 if group in ("Multi-stage", "FasterVLM") else 1.2)
    ax.axhline(0.9, color="grey", lw=0.6)
    ax.set_xscale("log")
    ax.set_xticks(list(cfg.keep), [f"{r:.0%}" for r in cfg.keep])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("kept fraction of visual tokens")
    ax.set_ylabel("accuracy retained (pruned / full)")
    ax.set_title(f"toy VLM, {cfg.task.num_tokens} visual tokens (grey: FasterVLM's ~90% at 5%)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_kept.png", dpi=110)
    plt.close(fig)
    files.append("accuracy_vs_kept.png")
  cal = payload.get("calibration")
  if cal:
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for w, lab in (("last", "FastV"), ("adaptinfer", "AdaptInfer")):
      m = np.asarray(cal["mean_score"][w], np.float64)
      ax.plot(m / np.nanmax(m), label=f"{lab}: mean score (non-pad)")
      ax.plot(1.0 / np.asarray(cal["trend_weights"][w]) * np.nanmin(m) / np.nanmax(m), "--",
              label=f"{lab}: fitted trend (log-space cubic)")
    ax.set_xlabel("visual token position (row-major)")
    ax.set_ylabel("relative score")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "position_trend.png", dpi=110)
    plt.close(fig)
    files.append("position_trend.png")
  return files


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m experiments prune``: see :func:`experiments.common.report.preset_main`."""
  return report_lib.preset_main("prune", __doc__, PRESETS, run, argv)
