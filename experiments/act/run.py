"""``python -m experiments act``: hidden attention sinks and ACT calibration on a small decoder trained on
in-context classification (Yu et al., "Unveiling and Harnessing Hidden Attention Sinks", ICML 2024;
``../shared/papers/efficient.md`` §11; task in ``configs/act.py``).

Steps (each recorded in ``results.json`` as it finishes, so ``--resume`` skips it):

1. train the decoder (:func:`experiments.common.train.fit`, Orbax checkpoints under ``<out>/ckpt``);
2. sink statistics on ``stats_sequences`` test sequences (``jaxattn.analysis.capture``): per (layer, head) the
   mass on the first token (``sink_scores``), how often the head has ACT sinks other than the first
   (``act_sinks`` with the official ``tau`` and ``keep_first``: the "hidden" sinks) and which tokens they are;
3. the paper's head search (``jaxattn.analysis.search_heads``): calibrate one candidate head at a time on the
   calibration split, keep the heads whose calibration alone raises its accuracy;
4. test accuracy with ACT on the searched heads vs no ACT vs ACT on every head vs as many random candidate heads
   (``random_draws`` sets, averaged).

Outputs (``--out``, default ``runs/act/<preset>/``): ``results.json``, ``table.md``, ``verdict.txt``,
``first_token_mass.png``, ``hidden_sinks.png``, ``search_gains.png``, ``column_scores.png``, ``attention_maps.png``,
``position_profile.png``, ``metrics.jsonl``; the last line printed is the verdict.
"""

from __future__ import annotations

import contextlib
import pathlib
import time
from typing import Sequence

import numpy as np

from configs.act import PRESETS, ActConfig, TaskConfig
from experiments.common import config as config_lib
from experiments.common import report as report_lib
from experiments.common.data import GeneratedSource

__all__ = ["ICLSource", "TOKEN_TYPES", "token_types", "main", "run", "verdict", "sink_stats", "correct"]

BOS, COLON, COMMA = 0, 1, 2
TOKEN_TYPES = ("BOS", ":", ",", "label", "item")
PAPER = ("ACT on searched heads: up to +7.30% average accuracy (Llama-30B, paper abstract); sinks also appear "
         "after the first token (delimiters) and not all of them help")
MIN_GAIN = 0.01  # a test-accuracy gain counts when >= 1 point and > 2 paired standard errors


class ICLSource(GeneratedSource):
  """In-context classification sequences (``configs/act.py`` describes the task).

  Token ids: 0 BOS, 1 ``:``, 2 ``,``, ``3 .. 3+C-1`` labels, then ``items_per_class`` items per class. Layout:
  ``BOS (item : label ,) x shots item :``. Records: ``tokens [L]``, ``targets [L]`` (the next token at every label
  position: the demonstration's, possibly noisy, label and, last, the true answer; -1 elsewhere), ``answer``.

  Splits are disjoint by construction: a sequence belongs to the split ``h(tokens) mod 16`` selects (0: test,
  1: calibration, else train), with ``h`` a fixed random linear hash, so no test sequence can appear in training.
  """

  PARAMS = ("task", "split")
  _BUCKET = {"test": (0,), "calib": (1,), "train": tuple(range(2, 16))}

  def __init__(self, task: TaskConfig, split: str):
    if split not in self._BUCKET:
      raise ValueError(f"split must be one of {sorted(self._BUCKET)}, got {split!r}")
    self.task, self.split = task, split

  def generate(self):
    t = self.task
    n = {"train": t.num_train, "calib": t.num_calib, "test": t.num_test}[self.split]
    rng = np.random.default_rng([t.seed, {"train": 0, "calib": 1, "test": 2}[self.split]])
    weights = np.random.default_rng(12345).integers(1, 1 << 20, size=t.seq_len)
    out, have = [], 0
    while have < n:
      batch = self._draw(rng, max(2 * (n - have), 64) * (8 if self.split == "train" else 16))
      keep = np.isin((batch["tokens"].astype(np.int64) * weights).sum(1) % 16, self._BUCKET[self.split])
      batch = {k: v[keep][: n - have] for k, v in batch.items()}
      out.append(batch)
      have += len(batch["answer"])
    return {k: np.concatenate([b[k] for b in out]) for k in out[0]}

  def _draw(self, rng, m: int):
    t = self.task
    C, K, S = t.num_classes, t.items_per_class, t.shots
    perm = np.argsort(rng.random((m, C)), axis=1)  # class -> label index, one bijection per sequence
    cls = rng.integers(0, C, size=(m, S))
    item = 3 + C + cls * K + rng.integers(0, K, size=(m, S))
    lab = np.take_along_axis(perm, cls, axis=1)
    flip = rng.random((m, S)) < t.label_noise
    other = (lab + rng.integers(1, C, size=(m, S))) % C  # a uniformly random *other* label
    lab = np.where(flip, other, lab)
    qpick = rng.integers(0, S, size=m)  # the query's class is one the demonstrations show
    qcls = cls[np.arange(m), qpick]
    qitem = 3 + C + qcls * K + rng.integers(0, K, size=m)
    answer = 3 + perm[np.arange(m), qcls]
    L = t.seq_len
    tokens = np.empty((m, L), np.int32)
    tokens[:, 0] = BOS
    tokens[:, 1:1 + 4 * S:4] = item
    tokens[:, 2:2 + 4 * S:4] = COLON
    tokens[:, 3:3 + 4 * S:4] = 3 + lab
    tokens[:, 4:4 + 4 * S:4] = COMMA
    tokens[:, L - 2], tokens[:, L - 1] = qitem, COLON
    targets = np.full((m, L), -1, np.int32)
    targets[:, 2:2 + 4 * S:4] = 3 + lab
    targets[:, L - 1] = answer
    return {"tokens": tokens, "targets": targets, "answer": answer.astype(np.int32)}


def token_types(tokens: np.ndarray, num_classes: int) -> np.ndarray:
  """Index into :data:`TOKEN_TYPES` of every token id."""
  tokens = np.asarray(tokens)
  return np.select([tokens == BOS, tokens == COLON, tokens == COMMA, tokens < 3 + num_classes], [0, 1, 2, 3], 4)


# ------------------------------------------------------------------------------------------------- model
def _trainer(cfg: ActConfig):
  import jax.numpy as jnp
  import optax

  from experiments.common.train import Trainer
  from experiments.cross_saliency.model import DecoderLM
  m, t = cfg.model, cfg.task

  def model_fn(rngs):
    return DecoderLM(t.vocab_size, t.seq_len, d_model=m.d_model, num_heads=m.num_heads, num_layers=m.num_layers,
                     mlp_ratio=m.mlp_ratio, rngs=rngs)

  def loss_fn(model, batch, key):
    del key
    logits = model(batch["tokens"])
    tg = batch["targets"]
    valid = tg >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, tg, 0))
    n = jnp.maximum(valid.sum(), 1)
    acc = (jnp.argmax(logits[:, -1], -1) == batch["answer"]).mean()
    return jnp.where(valid, ce, 0.0).sum() / n, {"query_accuracy": acc}

  def eval_fn(model, batch):
    logits = model(batch["tokens"])[:, -1]
    ok = batch["valid"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["answer"])
    return {"count": ok.sum().astype(jnp.float32),
            "accuracy": ((jnp.argmax(logits, -1) == batch["answer"]) & ok).sum().astype(jnp.float32),
            "loss": jnp.where(ok, ce, 0.0).sum()}

  return Trainer(model_fn, loss_fn, eval_fn, total_steps=cfg.train.steps, settings=cfg.train)


def _predict_fn():
  import jax.numpy as jnp
  from flax import nnx

  @nnx.jit
  def predict(model, tokens):
    return jnp.argmax(model(tokens)[:, -1], -1)
  return predict


def correct(model, predict, tokens, answer, heads, cfg: ActConfig, batch: int = 512) -> np.ndarray:
  """Per-sequence correctness (bool ``[N]``) with ACT on ``heads`` (a set of (layer, head); empty: none; None:
  every head of every layer)."""
  from jaxattn import analysis
  if heads is not None and not heads:
    ctx = contextlib.nullcontext()
  else:
    ctx = analysis.intervene(model, act=analysis.ACT(heads=None if heads is None else frozenset(heads),
                                                     beta=cfg.beta, tau=cfg.tau))
  preds = []
  with ctx:
    for i in range(0, len(tokens), batch):
      preds.append(np.asarray(predict(model, tokens[i:i + batch])))
  return np.concatenate(preds) == np.asarray(answer)


# ------------------------------------------------------------------------------------------------- stages
def sink_stats(model, tokens, cfg: ActConfig) -> dict:
  """Per (layer, head) sink statistics of ``tokens [N, L]`` and the captured probabilities ``[L, N, H, T, T]``."""
  import jax.numpy as jnp

  from jaxattn import analysis
  with analysis.capture(model, stats=("probs",)) as rec:
    model(jnp.asarray(tokens))
  probs = np.asarray(rec.stack("probs"))  # [L, N, H, T, T]
  Lyr, N, H, T, _ = probs.shape
  colcount = np.broadcast_to(T - np.arange(T), (Lyr, N, H, T))
  colsum = probs.sum(-2)
  first = np.asarray(analysis.sink_scores(probs)).mean(1)  # [L, H]
  sinks_all = np.asarray(analysis.act_sinks(colsum, colcount, tau=cfg.tau, keep_first=False))  # [L, N, H, T]
  hidden = np.asarray(analysis.act_sinks(colsum, colcount, tau=cfg.tau, keep_first=True))
  types = token_types(tokens, cfg.task.num_classes)  # [N, T]
  by_type = {name: int((hidden & (types[None, :, None, :] == k)).sum()) for k, name in enumerate(TOKEN_TYPES)}
  score = colsum / colcount
  return dict(
      first_token_mass=first.round(4).tolist(),
      hidden_sink_freq=hidden.any(-1).mean(1).round(4).tolist(),  # fraction of sequences with a hidden sink
      hidden_sinks_per_seq=hidden.sum(-1).mean(1).round(4).tolist(),
      bos_is_sink=sinks_all[..., 0].mean(1).round(4).tolist(),
      hidden_sinks_by_type=by_type,
      hidden_sinks_in_last_4_keys=round(float(hidden[..., -4:].sum() / max(hidden.sum(), 1)), 4),
      _probs=probs, _score=score, _types=types)


def _table(cfg: ActConfig, payload: dict) -> tuple[str, list[str]]:
  st, se, te, tr = (payload.get(k) for k in ("stats", "search", "test", "train"))
  lines = []
  if tr:
    lines.append(f"Model: {cfg.model.num_layers} layers x {cfg.model.num_heads} heads, d={cfg.model.d_model}, "
                 f"{cfg.train.steps} steps; final test accuracy {tr['final'].get('accuracy', float('nan')):.3f} "
                 f"(chance {1 / cfg.task.num_classes:.2f}; label noise {cfg.task.label_noise} in demonstrations).\n")
  if st:
    first = np.asarray(st["first_token_mass"])
    freq = np.asarray(st["hidden_sink_freq"])
    lines.append("**Sink statistics per head** (test sequences; first-token mass / fraction of sequences with a "
                 "hidden ACT sink, i.e. column score > tau other than the first sink)\n")
    lines.append("| layer | " + " | ".join(f"head {h}" for h in range(first.shape[1])) + " |")
    lines.append("|---|" + "---:|" * first.shape[1])
    for l in range(first.shape[0]):
      lines.append(f"| {l} | " + " | ".join(f"{first[l, h]:.2f} / {freq[l, h]:.2f}" for h in range(first.shape[1]))
                   + " |")
    tot = sum(st["hidden_sinks_by_type"].values()) or 1
    lines.append("\nHidden sinks by token: " + ", ".join(
        f"{k} {v / tot:.0%}" for k, v in st["hidden_sinks_by_type"].items())
                 + f"; {st.get('hidden_sinks_in_last_4_keys', float('nan')):.0%} of them among the last 4 keys (few "
                 f"queries see those, so their column score n_j-average is noisy: an artefact of the official "
                 f"definition on short prompts).\n")
  if se:
    kept = se["kept"]
    lines.append(f"**Head search** on {cfg.task.num_calib} calibration sequences: baseline accuracy "
                 f"{se['baseline']:.3f}; {len(se['ranked'])} candidate heads; kept {len(kept)} "
                 f"({', '.join(f'L{l}H{h}' for l, h in kept) or 'none'}); best single-head gain "
                 f"{se['ranked'][0][1]:+.3f}, worst {se['ranked'][-1][1]:+.3f}.\n")
  if te:
    n = te["n"]
    lines.append(f"**Test accuracy** ({n} sequences; ACT beta={cfg.beta}, tau={cfg.tau})\n")
    lines.append("| ACT on | heads | accuracy | vs none | paper (Llama-30B) |")
    lines.append("|---|---:|---:|---:|---|")
    base = te["none"]
    rows = [("none (baseline)", 0, base), ("searched heads", te["searched_k"], te["searched"]),
            ("best single searched head", 1 if te.get("top1") is not None else 0, te.get("top1")),
            (f"random candidate heads (mean of {len(te['random'])})", te["searched_k_random"],
             float(np.mean(te["random"])) if te["random"] else None),
            ("all heads, all layers", te["num_heads_total"], te["all"])]
    for name, k, acc in rows:
      if acc is None:
        lines.append(f"| {name} | {k} | — | — | |")
        continue
      paper = "+7.30 points avg" if name == "searched heads" else ""
      lines.append(f"| {name} | {k} | {acc:.4f} | {100 * (acc - base):+.2f} pts | {paper} |")
  lines.append(f"\nPaper: {PAPER}.")
  return "\n".join(lines), []


def verdict(cfg: ActConfig, payload: dict) -> str:
  """reproduced: hidden sinks exist AND ACT on the searched heads raises test accuracy (>= 1 point, > 2 paired
  standard errors, above the random heads); partly: one of the two; not reproduced: neither."""
  from experiments.common.report import verdict_line
  st, te = payload.get("stats"), payload.get("test")
  if not st or not te:
    return verdict_line("not reproduced", "the run is incomplete; rerun with --resume")
  freq = np.asarray(st["hidden_sink_freq"])
  n_heads = freq.size
  with_hidden = int((freq > 0.5).sum())
  gain = te["searched"] - te["none"]
  se = te["paired_se"]
  rnd = float(np.mean(te["random"])) if te["random"] else te["none"]
  improves = te["searched_k"] > 0 and gain >= MIN_GAIN and gain > 2 * se and te["searched"] > rnd
  sinks = with_hidden > 0
  what_s = f"{with_hidden} of {n_heads} heads have hidden (non-first) sinks in most sequences"
  what_a = (f"ACT on the {te['searched_k']} searched heads changes test accuracy by {100 * gain:+.2f} points "
            f"(paired s.e. {100 * se:.2f}; random heads {100 * (rnd - te['none']):+.2f}, all heads "
            f"{100 * (te['all'] - te['none']):+.2f}) vs the paper's up to +7.30 on Llama-30B")
  if sinks and improves:
    return verdict_line("reproduced", f"{what_s}; {what_a}")
  if sinks or improves:
    return verdict_line("partly", f"{what_s}; {what_a}" + ("" if improves else
                                                           " — a null result at toy scale, reported as such"))
  return verdict_line("not reproduced", f"{what_s}; {what_a}")


def _plots(cfg: ActConfig, payload: dict, extra: dict | None, out: pathlib.Path) -> list[str]:
  from experiments.common import attention_plots as ap
  files = []
  st, se = payload.get("stats"), payload.get("search")
  if st:
    ap.head_grid(st["first_token_mass"], out / "first_token_mass.png", label="mass on token 0",
                 title="attention mass on the first token (sink score)")
    ap.head_grid(st["hidden_sink_freq"], out / "hidden_sinks.png", label="fraction of sequences",
                 title=f"heads with hidden ACT sinks (column score > {cfg.tau}, not the first)")
    files += ["first_token_mass.png", "hidden_sinks.png"]
  if se:
    L, H = cfg.model.num_layers, cfg.model.num_heads
    grid = np.full((L, H), np.nan)
    for (l, h), g in se["ranked"]:
      grid[l, h] = g
    ap.head_grid(grid, out / "search_gains.png", label="calibration accuracy gain", center=0.0, fmt="{:+.3f}",
                 title="ACT head search: gain of calibrating one head (blank: not a candidate)")
    files.append("search_gains.png")
  if extra is not None:  # pictures that need the captured probabilities (not rebuilt by --report)
    score, types, probs = extra["_score"], extra["_types"], extra["_probs"]
    kind = np.broadcast_to(types[None, :, None, :], score.shape)
    vals = {name: score[kind == k] for k, name in enumerate(TOKEN_TYPES)}
    ap.histogram({k: v for k, v in vals.items() if v.size}, out / "column_scores.png", bins=30, threshold=cfg.tau,
                 xlabel="ACT column score (mean attention received)", log_y=True,
                 title="column scores of every (layer, head, key), by token type")
    freq = np.asarray(st["hidden_sink_freq"])
    order = np.dstack(np.unravel_index(np.argsort(-freq, axis=None), freq.shape))[0][:4]
    tok = [TOKEN_TYPES[t] if t < 4 else "x" for t in types[0]]
    maps = {f"L{l}H{h} (hidden sinks {freq[l, h]:.2f})": probs[l, 0, h] for l, h in order}
    l, h = order[0]
    from jaxattn import analysis
    cal = np.asarray(analysis.act_calibrate(probs[l, 0], beta=cfg.beta, tau=cfg.tau, heads=[int(h)]))[h]
    maps[f"L{l}H{h} after ACT"] = cal
    ap.heatmaps(maps, out / "attention_maps.png", xticks=tok, yticks=tok, cols=3, vmax=1.0,
                title="attention of the heads with the most hidden sinks (test sequence 0)")
    prof = {}
    for layer in range(score.shape[0]):
      p, _ = analysis.position_profile(score[layer].mean(1), n_bins=min(10, score.shape[-1]))
      prof[f"layer {layer}"] = (np.arange(p.shape[1]) / p.shape[1], p[0])
    ap.profiles(prof, out / "position_profile.png", xlabel="relative key position (bin start)",
                ylabel="share of column score", title="where attention mass lands, by layer (head mean)")
    files += ["column_scores.png", "attention_maps.png", "position_profile.png"]
  return files


# ---------------------------------------------------------------------------------------------------- run
def run(cfg: ActConfig, out, *, resume: bool = False, report: bool = False, progress: bool = True,
        verbose: bool = True, interrupt_after: int | None = None, explicit_out: bool = True) -> dict:
  """Runs (or resumes, or only reports) the experiment; returns the ``results.json`` content."""
  from experiments.common.report import prepare_out_dir, write_report
  out = pathlib.Path(out)
  fp = config_lib.fingerprint(cfg)
  old = prepare_out_dir(out, fingerprint=fp, resume=resume, report=report, explicit_out=explicit_out)
  payload = dict(old) if old else dict(preset=cfg.name, fingerprint=fp, config=config_lib.to_dict(cfg))
  for k in ("table_markdown", "notes", "verdict"):
    payload.pop(k, None)
  extra = None
  if not report:
    extra = _compute(cfg, out, payload, progress, verbose, interrupt_after)
  md, notes = _table(cfg, payload)
  line = verdict(cfg, payload)
  plots = _plots(cfg, payload, extra, out)
  write_report(out, payload, title=f"ACT: hidden attention sinks and calibration at toy scale, preset {cfg.name}",
               table=md, verdict=line, notes=notes, plots=plots, verbose=verbose)
  return {**payload, "table_markdown": md, "verdict": line}


def _compute(cfg, out, payload, progress, verbose, interrupt_after):
  from tqdm.auto import tqdm

  from experiments.common.metrics import MetricWriter
  from experiments.common.report import environment, write_json
  from experiments.common.train import fit
  from jaxattn import analysis

  c0 = time.process_time()
  payload["environment"] = environment()
  write_json(out / "results.json", payload)  # from now on the folder holds a run: only --resume continues it
  L, H = cfg.model.num_layers, cfg.model.num_heads
  cands = [(l, h) for l in range(cfg.skip_first, L - cfg.skip_last) for h in range(H)]
  units = ["train", "stats"] + [f"search {c}" for c in [None] + cands] + ["test"]
  bar = tqdm(total=len(units), disable=not progress, dynamic_ncols=True,
             bar_format="{desc} |{bar}| elapsed {elapsed}, ETA {remaining}")
  k = [0]

  def step(desc):
    k[0] += 1
    bar.set_description(f"act: run {k[0]} of {len(units)} ({desc})")

  step("train")
  trainer = _trainer(cfg)
  train_src, test_src = ICLSource(cfg.task, "train"), ICLSource(cfg.task, "test")
  writer = MetricWriter(out / "metrics.jsonl")
  res = fit(trainer, lr=cfg.train.lr, seed=cfg.train.seed, train_source=train_src, eval_source=test_src,
            batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
            eval_every=cfg.train.eval_every, checkpoint_dir=(out / "ckpt").resolve(),
            checkpoint_every=cfg.train.checkpoint_every, writer=writer, log_every=50,
            interrupt_after=interrupt_after, progress=progress, desc="act train")
  writer.close()
  bar.update(1)
  payload["train"] = dict(final=res.final, history=res.history, steps=res.steps)
  model = trainer.model(res.state.params)
  predict = _predict_fn()
  test = test_src.arrays
  calib = ICLSource(cfg.task, "calib").arrays

  step("sink statistics")
  extra = sink_stats(model, test["tokens"][:cfg.stats_sequences], cfg)
  payload["stats"] = {k: v for k, v in extra.items() if not k.startswith("_")}
  bar.update(1)

  if "search" not in payload:
    def eval_fn(heads):
      step(f"search {sorted(heads) or 'baseline'}")
      acc = float(correct(model, predict, calib["tokens"], calib["answer"], heads, cfg).mean())
      bar.update(1)
      return acc
    s = analysis.search_heads(eval_fn, cands)
    payload["search"] = dict(baseline=s.baseline, ranked=[[list(c), g] for c, g in s.ranked],
                             kept=sorted([list(c) for c in s.kept]))
    write_json(out / "results.json", payload)
  else:
    bar.update(1 + len(cands))

  if "test" not in payload:
    step("test")
    se = payload["search"]
    kept = [tuple(c) for c in se["kept"]]
    tk, ta = test["tokens"], test["answer"]
    none = correct(model, predict, tk, ta, set(), cfg)
    srch = correct(model, predict, tk, ta, set(kept), cfg) if kept else none
    top1 = correct(model, predict, tk, ta, {tuple(se["ranked"][0][0])}, cfg)
    allh = correct(model, predict, tk, ta, None, cfg)
    k_r = max(len(kept), 1)
    rnd = []
    for d in range(cfg.random_draws):
      pick = np.random.default_rng(1000 + d).choice(len(cands), size=min(k_r, len(cands)), replace=False)
      rnd.append(float(correct(model, predict, tk, ta, {cands[i] for i in pick}, cfg).mean()))
    diff = srch.astype(np.float64) - none.astype(np.float64)
    payload["test"] = dict(n=int(len(ta)), none=float(none.mean()), searched=float(srch.mean()),
                           searched_k=len(kept), top1=float(top1.mean()), all=float(allh.mean()),
                           num_heads_total=L * H, random=rnd, searched_k_random=k_r,
                           paired_se=float(diff.std() / np.sqrt(len(diff))))
  bar.update(1)
  bar.close()
  payload["cpu_seconds"] = round(payload.get("cpu_seconds", 0.0) + time.process_time() - c0, 1)
  write_json(out / "results.json", payload)
  return extra


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m experiments act``: see :func:`experiments.common.report.preset_main`."""
  return report_lib.preset_main("act", __doc__, PRESETS, run, argv)
