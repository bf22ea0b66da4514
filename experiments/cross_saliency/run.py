"""``python -m experiments cross_saliency``: how well does cross-attention agree with gradient saliency?
(Papi et al., "Cross-Attention is Half Explanation in Speech-to-Text Models", 2025; ``../shared/papers/cross.md``
§2, pilot §21-C; presets in ``configs/cross_saliency.py``.)

For each variant an encoder-decoder (:class:`experiments.cross_saliency.model.Seq2Seq`) is trained
(:func:`experiments.common.train.fit`), then on ``num_test`` held-out sequences, teacher-forced on the model's own
greedy outputs ``y_hat``:

- cross-attention maps ``CA [I, T]`` per decoder layer and head (``jaxattn.analysis.capture``) and their
  aggregations: single heads, per-layer mean / max, all layers and heads (mean / max), and "rollout" (the all-head
  mean composed with the encoder's self-attention rollout, ``jaxattn.analysis.rollout``, so it points at input
  tokens rather than encoder states);
- saliency maps ``[I, T]``: row ``i`` is the saliency of ``log p(y_hat_i)`` with respect to the source embeddings
  ``e`` (``SM_X``) or the encoder output ``H`` (``SM_H``), as gradient x input and integrated gradients
  (``jaxattn.analysis.grad_x_input`` / ``integrated_gradients``, L2 over features);
- the score: Pearson r per sequence between the row-normalised maps, averaged over sequences (the paper's
  measure), beside a random-attention baseline (Dirichlet rows) and the gold alignment (oracle).

Outputs (``--out``, default ``runs/cross_saliency/<preset>/``): ``results.json``, ``table.md``, ``verdict.txt``,
``maps_<variant>.png``, ``rollout_<variant>.png``, ``r_hist.png``, ``position_profile.png``; the verdict is the last
line printed. ``--resume`` continues (finished variants are kept, training resumes from its Orbax checkpoint under
``<out>/ckpt``), ``--report`` rebuilds the outputs from ``results.json``.
"""

from __future__ import annotations

import pathlib
import time
from typing import Sequence

import numpy as np

from configs.cross_saliency import PRESETS, CrossSaliencyConfig, Variant
from experiments.common import config as config_lib
from experiments.common import report as report_lib
from experiments.common.data import GeneratedSource

__all__ = ["Seq2SeqSource", "gold_alignment", "analyse", "main", "run", "verdict", "SALIENCY"]

SALIENCY = ("SM_X gxi", "SM_X IG", "SM_H gxi", "SM_H IG")
PAPER_X, PAPER_H = 0.5, (0.52, 0.75)
PAPER = ("CA vs input saliency r ~ 0.5 ('half explanation'); vs encoder-output saliency 0.52-0.75; head/layer "
         "averages beat single heads (paper abstract, speech-to-text models)")
MAGNITUDE_TOL = 0.15  # |r(all heads, SM_X) - 0.5| within this counts as the paper's magnitude


class Seq2SeqSource(GeneratedSource):
  """Toy seq2seq pairs: ``src [T]`` uniform over ids ``1..V``, ``tgt [T]`` by the task, ``tgt_in = [0, tgt[:-1]]``.

  Splits are disjoint by construction: a sequence is a test sequence iff ``h(src) mod 8 == 0`` for a fixed random
  linear hash ``h``; training sequences are the others.
  """

  PARAMS = ("task", "length", "vocab", "n", "seed", "split")

  def __init__(self, task: str, length: int, vocab: int, n: int, seed: int, split: str):
    if split not in ("train", "test"):
      raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    self.task, self.length, self.vocab, self.n, self.seed, self.split = task, length, vocab, n, seed, split

  def generate(self):
    rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1])
    w = np.random.default_rng(777).integers(1, 1 << 20, size=self.length)
    chunks, have = [], 0
    while have < self.n:
      x = rng.integers(1, self.vocab + 1, size=(max(4 * (self.n - have), 64) * (1 if self.split == "train" else 8),
                                                self.length)).astype(np.int32)
      test = (x.astype(np.int64) * w).sum(1) % 8 == 0
      x = x[test if self.split == "test" else ~test][: self.n - have]
      chunks.append(x)
      have += len(x)
    src = np.concatenate(chunks)
    rev = src[:, ::-1]
    if self.task == "reverse":
      tgt = rev
    else:  # y_i = (x_{T-1-i} + x_{T-2-i}) mod V (index wrapping at the start)
      tgt = ((rev - 1) + (np.roll(rev, -1, axis=1) - 1)) % self.vocab + 1
    tgt = np.ascontiguousarray(tgt).astype(np.int32)
    tgt_in = np.concatenate([np.zeros((len(src), 1), np.int32), tgt[:, :-1]], axis=1)
    return {"src": src, "tgt": tgt, "tgt_in": tgt_in}


def gold_alignment(task: str, T: int) -> np.ndarray:
  """The known alignment ``[T, T]`` (row i: the source positions output i depends on, rows sum to 1)."""
  a = np.zeros((T, T))
  for i in range(T):
    a[i, T - 1 - i] += 1.0
    if task == "mix2":
      a[i, (T - 2 - i) % T] += 1.0
  return a / a.sum(1, keepdims=True)


def _trainer(cfg: CrossSaliencyConfig, v: Variant):
  import jax.numpy as jnp
  import optax

  from experiments.common.train import Trainer
  from experiments.cross_saliency.model import Seq2Seq
  m = cfg.model

  def model_fn(rngs):
    return Seq2Seq(cfg.vocab + 1, cfg.length, cfg.length, d_model=m.d_model, num_heads=m.num_heads,
                   enc_layers=v.enc_layers, dec_layers=m.dec_layers, mlp_ratio=m.mlp_ratio, rngs=rngs)

  def loss_fn(model, batch, key):
    del key
    logits = model(batch["src"], batch["tgt_in"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tgt"]).mean()
    return ce, {"token_accuracy": (jnp.argmax(logits, -1) == batch["tgt"]).mean()}

  def eval_fn(model, batch):
    logits = model(batch["src"], batch["tgt_in"])
    ok = batch["valid"][:, None] & jnp.ones(batch["tgt"].shape, bool)
    return {"count": ok.sum().astype(jnp.float32),
            "accuracy": ((jnp.argmax(logits, -1) == batch["tgt"]) & ok).sum().astype(jnp.float32)}

  return Trainer(model_fn, loss_fn, eval_fn, total_steps=cfg.train.steps, settings=cfg.train)


def _rownorm(a):
  a = np.abs(np.asarray(a, np.float64))
  s = a.sum(-1, keepdims=True)
  return np.where(s > 0, a / np.where(s > 0, s, 1.0), 0.0)


def _r(a, b) -> np.ndarray:
  """Per-sequence Pearson r of row-normalised maps ``[N, I, T]``."""
  from jaxattn import analysis
  a, b = _rownorm(a), _rownorm(b)
  return np.asarray(analysis.pearson(a.reshape(len(a), -1), b.reshape(len(b), -1), axis=-1), np.float64)


def analyse(model, data: dict, cfg: CrossSaliencyConfig, task: str) -> dict:
  """Attention, saliency and agreement on ``data`` (``src``, ``tgt_in`` ``[N, T]``); see the module docstring."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxattn import analysis
  src, tgt_in = jnp.asarray(data["src"]), jnp.asarray(data["tgt_in"])
  N, T = src.shape
  with analysis.capture(model, stats=("probs",)) as rec:
    logits = model(src, tgt_in)
  yhat = jnp.argmax(logits, -1)
  token_acc = float((np.asarray(yhat) == data["tgt"]).mean())
  cross = [p for p in rec.paths if p.endswith("cross")]
  enc = [p for p in rec.paths if p.startswith("encoder")]
  CA = np.stack([np.asarray(rec[p]["probs"]) for p in cross])  # [Ld, N, H, I, T]
  ENC = np.stack([np.asarray(rec[p]["probs"]) for p in enc])  # [Le, N, H, T, T]
  graphdef, state = nnx.split(model)

  @jax.jit
  def saliency(state, src, tgt_in, yhat):
    m = nnx.merge(graphdef, state)
    e = m.embed_source(src)
    h = m.encode(e)

    def logp(i, logits):
      lp = jax.nn.log_softmax(logits, -1)
      return jnp.take_along_axis(lp, yhat[..., None], -1)[:, :, 0][:, i]  # [N]

    fx = lambda i: (lambda e_: logp(i, m.decode(tgt_in, m.encode(e_))))
    fh = lambda i: (lambda h_: logp(i, m.decode(tgt_in, h_)))
    steps = cfg.ig_steps
    per_i = lambda i: (analysis.grad_x_input(fx(i), e, reduce="l2"),
                       analysis.integrated_gradients(fx(i), e, steps=steps, reduce="l2"),
                       analysis.grad_x_input(fh(i), h, reduce="l2"),
                       analysis.integrated_gradients(fh(i), h, steps=steps, reduce="l2"))
    outs = jax.lax.map(per_i, jnp.arange(tgt_in.shape[1]))  # each [I, N, T]
    return tuple(jnp.swapaxes(o, 0, 1) for o in outs)

  sal = dict(zip(SALIENCY, (np.asarray(x) for x in saliency(state, src, tgt_in, yhat))))
  gold = np.broadcast_to(gold_alignment(task, T), (N, T, T))
  sal["gold"] = gold
  Ld, _, H = CA.shape[:3]
  roll = np.asarray(analysis.rollout(ENC))  # [N, T, T]: input token j -> encoder state position
  all_mean = CA.mean((0, 2))
  maps = {f"layer {l} mean": CA[l].mean(1) for l in range(Ld)}
  maps.update({f"layer {l} max": CA[l].max(1) for l in range(Ld)})
  maps["all layers+heads mean"] = all_mean
  maps["all layers+heads max"] = CA.max((0, 2))
  maps["rollout (CA mean x encoder rollout)"] = np.einsum("nit,ntj->nij", all_mean, roll)
  rng = np.random.default_rng(cfg.seed + 5)
  maps["random attention (baseline)"] = rng.dirichlet(np.ones(T), size=(N, T))
  maps["gold alignment (oracle)"] = gold
  rows = {}
  for name, a in maps.items():
    rows[name] = {s: float(_r(a, sal[s]).mean()) for s in (*SALIENCY, "gold")}
  heads = {f"L{l}H{h}": {s: float(_r(CA[l, :, h], sal[s]).mean()) for s in (*SALIENCY, "gold")}
           for l in range(Ld) for h in range(H)}
  rows["single heads (mean)"] = {s: float(np.mean([r[s] for r in heads.values()])) for s in (*SALIENCY, "gold")}
  rows["single heads (best)"] = {s: float(np.max([r[s] for r in heads.values()])) for s in (*SALIENCY, "gold")}
  # argmax alignment accuracy: the row's argmax is a gold source position
  amax = {k: float((np.take_along_axis(gold, np.asarray(a).argmax(-1)[..., None], -1)[..., 0] > 0).mean())
          for k, a in (("CA all mean", all_mean), ("SM_X gxi", sal["SM_X gxi"]), ("SM_X IG", sal["SM_X IG"]),
                       ("SM_H gxi", sal["SM_H gxi"]))}
  hist = {"CA all mean vs SM_X gxi": _r(all_mean, sal["SM_X gxi"]).round(4).tolist(),
          "CA all mean vs SM_H gxi": _r(all_mean, sal["SM_H gxi"]).round(4).tolist(),
          "random vs SM_X gxi": _r(maps["random attention (baseline)"], sal["SM_X gxi"]).round(4).tolist()}
  # mass by offset from the aligned source position T-1-i (PosIR-style position profile)
  off = np.arange(T)[None, :] - (T - 1 - np.arange(T))[:, None]  # [I, T]
  prof = {}
  for k, a in (("CA all mean", all_mean), ("SM_X gxi", sal["SM_X gxi"]), ("SM_H gxi", sal["SM_H gxi"])):
    a = _rownorm(a).mean(0)
    prof[k] = [float(a[off == d].sum() / T) for d in range(-(T - 1), T)]
  example = {k: np.asarray(v)[0].round(4).tolist() for k, v in
             [(f"CA layer {l} mean", CA[l, 0].mean(0)[None]) for l in range(Ld)]
             + [("CA all mean", all_mean[:1]), ("rollout", maps["rollout (CA mean x encoder rollout)"][:1]),
                *((s, sal[s][:1]) for s in SALIENCY), ("gold", gold[:1])]}
  enc_roll = np.asarray(analysis.rollout(ENC[:, :1], return_all=True))[:, 0].round(4).tolist()  # [Le, T, T]
  return dict(token_accuracy=token_acc, rows=rows, heads=heads, argmax=amax, hist=hist, offsets=list(range(-(T - 1), T)),
              profile=prof, example=example, encoder_rollout=enc_roll)


# ------------------------------------------------------------------------------------------------- report
ROW_ORDER_HEAD = ("single heads (mean)", "single heads (best)")
ROW_ORDER_TAIL = ("all layers+heads mean", "all layers+heads max", "rollout (CA mean x encoder rollout)",
                  "random attention (baseline)", "gold alignment (oracle)")


def _table(cfg: CrossSaliencyConfig, payload: dict) -> str:
  lines = []
  for v in cfg.variants:
    res = payload.get("variants", {}).get(v.name)
    if res is None:
      lines.append(f"**{v.name}**: not finished\n")
      continue
    lines.append(f"**{v.name}** ({v.enc_layers} encoder + {cfg.model.dec_layers} decoder layers, "
                 f"{cfg.model.num_heads} heads; token accuracy {res['token_accuracy']:.3f}; {cfg.num_test} test "
                 f"sequences) — mean per-sequence Pearson r\n")
    lines.append("| cross-attention map | " + " | ".join(SALIENCY) + " | gold alignment | paper |")
    lines.append("|---|" + "---:|" * (len(SALIENCY) + 1) + "---|")
    layer_rows = [k for k in res["rows"] if k.startswith("layer ")]
    for name in (*ROW_ORDER_HEAD, *layer_rows, *ROW_ORDER_TAIL):
      r = res["rows"][name]
      paper = (f"~{PAPER_X} vs SM_X, {PAPER_H[0]}-{PAPER_H[1]} vs SM_H" if name == "all layers+heads mean"
               else "single heads poor" if name == "single heads (mean)" else "")
      lines.append(f"| {name} | " + " | ".join(f"{r[s]:.3f}" for s in SALIENCY) + f" | {r['gold']:.3f} | {paper} |")
    lines.append("\nArgmax on a gold source position: " + ", ".join(f"{k} {a:.2f}" for k, a in res["argmax"].items())
                 + ".\n")
  lines.append(f"Paper: {PAPER}. SM_X: saliency w.r.t. the source embeddings; SM_H: w.r.t. the encoder output "
               f"(what cross-attention reads); gxi: gradient x input; IG: integrated gradients ({cfg.ig_steps} steps).")
  return "\n".join(lines)


def verdict(cfg: CrossSaliencyConfig, payload: dict) -> str:
  """Claims: (1) the all-head average agrees better with SM_X than the mean single head; (2) CA agrees better with
  SM_H than with SM_X; (3) with encoder context mixing (``mix2``) that gap widens; (4) the magnitude vs SM_X is the
  paper's ~0.5 (within 0.15). All four: reproduced; (1)-(3) or most claims: partly; else not reproduced."""
  from experiments.common.report import verdict_line
  vs = payload.get("variants", {})
  done = [v for v in cfg.variants if v.name in vs]
  if not done:
    return verdict_line("not reproduced", "the run is incomplete; rerun with --resume")
  missing = [v.name for v in cfg.variants if v.name not in vs]
  checks, facts = [], []
  gaps = {}
  for v in done:
    r = vs[v.name]["rows"]
    allx, allh, single = (r["all layers+heads mean"]["SM_X gxi"], r["all layers+heads mean"]["SM_H gxi"],
                          r["single heads (mean)"]["SM_X gxi"])
    checks += [allx > single, allh > allx]
    gaps[v.task] = allh - allx
    facts.append(f"{v.name}: all-head CA r={allx:.2f} vs SM_X, {allh:.2f} vs SM_H, single heads {single:.2f}, "
                 f"random {r['random attention (baseline)']['SM_X gxi']:.2f}")
  if "reverse" in gaps and "mix2" in gaps:
    checks.append(gaps["mix2"] > gaps["reverse"])
    facts.append(f"SM_H-SM_X gap {gaps['reverse']:.2f} -> {gaps['mix2']:.2f} with context mixing")
  mag = [abs(vs[v.name]["rows"]["all layers+heads mean"]["SM_X gxi"] - PAPER_X) <= MAGNITUDE_TOL for v in done]
  qual = sum(checks) / len(checks)
  why = "; ".join(facts) + f"; paper ~{PAPER_X} vs input saliency"
  if missing:  # judged on the finished variants only, and said so
    why += f" (INCOMPLETE: {', '.join(missing)} not finished; --resume completes it)"
    if qual == 1.0 and all(mag):
      return verdict_line("partly", why)
  if qual == 1.0 and all(mag):
    return verdict_line("reproduced", why)
  if qual >= 0.5:
    return verdict_line("partly", f"{sum(checks)} of {len(checks)} qualitative claims hold"
                        + ("" if all(mag) else ", but r vs input saliency is far from 0.5 in this clean toy") + f"; {why}")
  return verdict_line("not reproduced", f"{sum(checks)} of {len(checks)} qualitative claims hold; {why}")


def _plots(cfg: CrossSaliencyConfig, payload: dict, out: pathlib.Path) -> list[str]:
  from experiments.common import attention_plots as ap
  files = []
  vs = payload.get("variants", {})
  hist, panels = {}, {}
  for v in cfg.variants:
    res = vs.get(v.name)
    if res is None:
      continue
    ex = {k: np.asarray(a) for k, a in res["example"].items()}
    ap.heatmaps(ex, out / f"maps_{v.name}.png", xlabel="source position", ylabel="output step", cols=4, vmin=None,
                title=f"{v.name}, test sequence 0: cross-attention vs saliency (raw maps)")
    layers = {f"encoder rollout up to layer {l}": np.asarray(a) for l, a in enumerate(res["encoder_rollout"])}
    ap.heatmaps(layers, out / f"rollout_{v.name}.png", xlabel="input token", ylabel="encoder position",
                cols=len(layers), title=f"{v.name}: attention rollout of the encoder (test sequence 0)")
    files += [f"maps_{v.name}.png", f"rollout_{v.name}.png"]
    for k, vals in res["hist"].items():
      hist[f"{v.name}: {k}"] = vals
    panels[v.name] = {k: (res["offsets"], p) for k, p in res["profile"].items()}
  if hist:
    ap.histogram(hist, out / "r_hist.png", bins=30, xlabel="per-sequence Pearson r", range_=(-0.5, 1.0),
                 threshold=PAPER_X, title="agreement of cross-attention with saliency (dashed: the paper's ~0.5)")
    ap.profiles({}, out / "position_profile.png", panels=panels, xlabel="source offset from the reversed position",
                ylabel="mean share of the row", title="where attention and saliency mass sits")
    files += ["r_hist.png", "position_profile.png"]
  return files


# ---------------------------------------------------------------------------------------------------- run
def run(cfg: CrossSaliencyConfig, out, *, resume: bool = False, report: bool = False, progress: bool = True,
        verbose: bool = True, interrupt_after: int | None = None, explicit_out: bool = True) -> dict:
  """Runs (or resumes, or only reports) the experiment; returns the ``results.json`` content."""
  from experiments.common.report import environment, prepare_out_dir, write_json, write_report
  out = pathlib.Path(out)
  fp = config_lib.fingerprint(cfg)
  old = prepare_out_dir(out, fingerprint=fp, resume=resume, report=report, explicit_out=explicit_out)
  payload = dict(old) if old else dict(preset=cfg.name, fingerprint=fp, config=config_lib.to_dict(cfg), variants={})
  for k in ("table_markdown", "notes", "verdict"):
    payload.pop(k, None)
  if not report:
    from tqdm.auto import tqdm

    from experiments.common.metrics import MetricWriter
    from experiments.common.train import fit
    c0 = time.process_time()
    payload["environment"] = environment()
    write_json(out / "results.json", payload)
    todo = [v for v in cfg.variants if v.name not in payload["variants"]]
    if verbose and len(todo) < len(cfg.variants):
      print(f"resumed: {len(cfg.variants) - len(todo)} of {len(cfg.variants)} variants already finished", flush=True)
    bar = tqdm(total=len(todo), disable=not progress or not todo, dynamic_ncols=True,
               bar_format="{desc} |{bar}| elapsed {elapsed}, ETA {remaining}")
    for k, v in enumerate(todo):
      bar.set_description(f"cross_saliency: run {k + 1} of {len(todo)} ({v.name})")
      trainer = _trainer(cfg, v)
      train_src = Seq2SeqSource(v.task, cfg.length, cfg.vocab, cfg.num_train, cfg.seed, "train")
      test_src = Seq2SeqSource(v.task, cfg.length, cfg.vocab, cfg.num_test, cfg.seed, "test")
      writer = MetricWriter(out / "metrics.jsonl", run=v.name)
      res = fit(trainer, lr=cfg.train.lr, seed=cfg.train.seed, train_source=train_src, eval_source=test_src,
                batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
                eval_every=cfg.train.eval_every, checkpoint_dir=(out / "ckpt" / v.name).resolve(),
                checkpoint_every=cfg.train.checkpoint_every, writer=writer, log_every=100,
                interrupt_after=interrupt_after, progress=progress, desc=v.name)
      writer.close()
      t1 = time.time()
      a = analyse(trainer.model(res.state.params), test_src.arrays, cfg, v.task)
      payload["variants"][v.name] = dict(a, steps=res.steps, final=res.final, analysis_seconds=round(time.time() - t1, 1))
      write_json(out / "results.json", payload)
      bar.update(1)
    bar.close()
    payload["cpu_seconds"] = round(payload.get("cpu_seconds", 0.0) + time.process_time() - c0, 1)
  md = _table(cfg, payload)
  line = verdict(cfg, payload)
  plots = _plots(cfg, payload, out)
  write_report(out, payload, title=f"Cross-attention vs saliency on a toy seq2seq task, preset {cfg.name}", table=md,
               verdict=line, plots=plots, verbose=verbose)
  return {**payload, "table_markdown": md, "verdict": line}


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m experiments cross_saliency``: see :func:`experiments.common.report.preset_main`."""
  return report_lib.preset_main("cross_saliency", __doc__, PRESETS, run, argv)
