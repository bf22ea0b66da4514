"""``python -m experiments lxmert``: toy relational VQA, LXMERT-lite co-attention vs a single-stream transformer at
equal parameters (LXMERT, Tan & Bansal, EMNLP 2019; ``../shared/papers/cross.md`` §12).

Scenes are digit canvases (:mod:`experiments.substrates.canvas`); LXMERT-style object embeddings combine each
digit's region feature ``f_j`` and its box ``p_j``, ``v_j = (LN(W_F f_j) + LN(W_P p_j)) / 2``. As in the paper
(Faster R-CNN features pre-trained on Visual Genome, then frozen), ``f_j`` comes from a frozen pre-trained region
encoder: the hidden layer of a one-hidden-layer digit classifier fitted on noisy crops of the training digit pool
(:func:`region_encoder`; ``object_features="pixels"`` feeds the raw 8x8 crops instead, which is what made every
model collapse to the majority answer in the first version of this experiment). Questions come from
:mod:`experiments.substrates.grammar` (``exists``, ``rel_yn`` "is the 3 left of the 7?", ``rel_what`` "what digit
is above the 5?"), answered by a 13-way classifier on the pooled [CLS] vector. Models (same embeddings and head):

- ``coattention``: :class:`jaxattn.nn.LXMERTEncoder` (N_L language, N_R object, N_X cross-modality layers with one
  shared cross-attention for both directions);
- ``single_stream``: :class:`jaxattn.nn.EncoderLayer` s over ``[question; objects]`` with type embeddings, the
  layer count chosen so its parameters are closest to the co-attention model's (within 10%);
- ``question_only``: the single-stream stack on the question alone (language-prior baseline);
- ``majority``: the most frequent training answer of each question type (no training).

Outputs (``--out``, default ``runs/lxmert/<preset>/``): ``results.json``, ``table.md``, ``accuracy.png``,
``verdict.txt``; ``--resume`` continues (a training resumes from its last checkpoint under ``ckpt/``),
``--report`` rebuilds the outputs from ``results.json``.
"""

from __future__ import annotations

import functools
import pathlib
import time
import warnings
from typing import Sequence

import numpy as np

from configs.lxmert import PRESETS, LXMERTConfig
from experiments.common import config as config_lib
from experiments.common import report as report_lib
from experiments.common.data import GeneratedSource
from experiments.common.report import environment, prepare_out_dir, verdict_line, write_json, write_report

__all__ = ["main", "run", "VQASource", "region_encoder", "plan", "verdict", "table"]

PAPER = ("LXMERT: VQA test-std 72.5, GQA 60.3, NLVR2 76.2 (+22 points over the previous best); the two-stream "
         "cross-modality encoder is the paper's design (expected here: co-attention >= single-stream on relational "
         "questions at equal parameters)")
MARGIN = 0.02  # accuracy difference (absolute) below which two models count as tied


@functools.lru_cache(maxsize=8)
def region_encoder(canvas_cfg, feature_dim: int) -> tuple[np.ndarray, np.ndarray, float]:
  """The frozen region encoder ``f = relu(crop W + b)``: ``(W [64, feature_dim], b [feature_dim], accuracy)``.

  The hidden layer of a one-hidden-layer digit classifier (scikit-learn ``MLPClassifier``, Adam, fixed seed)
  fitted on four noisy copies (noise of ``canvas_cfg``) of the *training* digit pool; ``accuracy`` is its digit
  accuracy on noisy crops of the unseen test pool. Deterministic for a given configuration.
  """
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.neural_network import MLPClassifier

  from experiments.substrates import canvas
  rng = np.random.default_rng([feature_dim, 4271])
  images, labels = canvas.digit_pool("train")
  flat = images.reshape(len(images), -1)
  x = np.concatenate([flat + rng.normal(0.0, canvas_cfg.noise, flat.shape) for _ in range(4)])
  clf = MLPClassifier(hidden_layer_sizes=(feature_dim,), random_state=0, max_iter=200)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    clf.fit(x, np.tile(labels, 4))
  t_img, t_lab = canvas.digit_pool("test")
  t_flat = t_img.reshape(len(t_img), -1)
  acc = float(clf.score(t_flat + rng.normal(0.0, canvas_cfg.noise, t_flat.shape), t_lab))
  return clf.coefs_[0].astype(np.float32), clf.intercepts_[0].astype(np.float32), acc


class VQASource(GeneratedSource):
  """Records: ``question`` int32 ``[1 + MAX_Q]`` (``<bos>`` as [CLS], then the words), ``question_len`` (with
  [CLS]), ``objects`` f32 ``[K, F]`` (region features: ``F = feature_dim`` from :func:`region_encoder`, or the
  ``F = 64`` raw crop pixels; 0 on padding rows), ``boxes`` f32 ``[K, 4]`` (divided by the canvas size), ``count``,
  ``answer`` int32 (index in :data:`grammar.ANSWERS`), ``qtype`` int32 (index in :data:`grammar.QTYPES`)."""

  PARAMS = ("cfg", "n", "seed", "split")

  def __init__(self, cfg: LXMERTConfig, n: int, seed: int, split: str):
    self.cfg, self.n, self.seed, self.split = cfg, n, seed, split

  def generate(self):
    from experiments.substrates import canvas, grammar
    c = self.cfg.canvas
    s = canvas.make_scenes(c, self.n, self.seed, self.split)
    q = grammar.make_questions(s, self.cfg.qtypes, c, self.seed)
    v = grammar.Vocab(c)
    question = np.concatenate([np.full((self.n, 1), v.bos, np.int32), q["question"]], axis=1)
    objects = s["objects"]  # [n, K, 64] crops of the noisy canvas
    if self.cfg.object_features == "frozen_mlp":
      w, b, _ = region_encoder(c, self.cfg.feature_dim)
      valid = np.arange(objects.shape[1])[None, :, None] < s["count"][:, None, None]
      objects = np.where(valid, np.maximum(objects @ w + b, 0.0), 0.0).astype(np.float32)
    return dict(question=question, question_len=q["question_len"] + 1, objects=objects,
                boxes=(s["boxes"] / c.size).astype(np.float32), count=s["count"], answer=q["answer_class"],
                qtype=q["qtype"])


def _model_cls():
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxattn.nn import EncoderLayer, LXMERTEncoder

  class VQAModel(nnx.Module):
    """``batch -> answer logits [B, 13]``; ``kind`` one of ``coattention``, ``single_stream``, ``question_only``."""

    def __init__(self, cfg: LXMERTConfig, kind: str, vocab_size: int, num_answers: int, single_layers: int, *,
                 rngs: nnx.Rngs):
      d = cfg.d_model
      self.kind = kind
      self.word = nnx.Embed(vocab_size, d, rngs=rngs)
      self.qpos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (32, d)))
      self.feat = nnx.Linear(cfg.feature_dim if cfg.object_features == "frozen_mlp" else 64, d, rngs=rngs)
      self.box = nnx.Linear(4, d, rngs=rngs)
      self.feat_ln = nnx.LayerNorm(d, rngs=rngs)
      self.box_ln = nnx.LayerNorm(d, rngs=rngs)
      if kind == "coattention":
        self.enc = LXMERTEncoder(d, cfg.num_heads, num_language_layers=cfg.language_layers,
                                 num_object_layers=cfg.object_layers, num_cross_layers=cfg.cross_layers, rngs=rngs)
      else:
        self.layers = nnx.List([EncoderLayer(d, cfg.num_heads, rngs=rngs) for _ in range(single_layers)])
        self.type_emb = nnx.Param(0.02 * jax.random.normal(rngs.params(), (2, d)))
        self.pooler = nnx.Linear(d, d, rngs=rngs)
      self.head = nnx.Sequential(nnx.Linear(d, 2 * d, rngs=rngs), jax.nn.gelu,
                                 nnx.Linear(2 * d, num_answers, rngs=rngs))

    def __call__(self, batch):
      q = batch["question"]
      T, K = q.shape[1], batch["objects"].shape[1]
      lang = self.word(q) + self.qpos[...][:T]
      vis = (self.feat_ln(self.feat(batch["objects"])) + self.box_ln(self.box(batch["boxes"]))) / 2
      l_mask = jnp.arange(T)[None] < batch["question_len"][:, None]
      v_mask = jnp.arange(K)[None] < batch["count"][:, None]
      if self.kind == "coattention":
        _, _, pooled = self.enc(lang, vis, lang_mask=l_mask, vis_mask=v_mask)
      else:
        x, m = lang + self.type_emb[...][0], l_mask
        if self.kind == "single_stream":
          x = jnp.concatenate([x, vis + self.type_emb[...][1]], axis=1)
          m = jnp.concatenate([l_mask, v_mask], axis=1)
        for layer in self.layers:
          x = layer(x, mask=m)
        pooled = jnp.tanh(self.pooler(x[:, 0]))
      return self.head(pooled)

  return VQAModel


def num_params(cfg: LXMERTConfig, kind: str, single_layers: int = 1) -> int:
  import jax
  from flax import nnx

  from experiments.substrates import grammar
  cls = _model_cls()
  m = nnx.eval_shape(lambda: cls(cfg, kind, len(grammar.Vocab(cfg.canvas)), len(grammar.ANSWERS), single_layers,
                                 rngs=nnx.Rngs(0)))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(m, nnx.Param))))


def match_layers(cfg: LXMERTConfig) -> tuple[int, dict[str, int]]:
  """The single-stream depth whose parameter count is closest to co-attention's, and the counts."""
  target = num_params(cfg, "coattention")
  best = min(range(1, 13), key=lambda n: abs(num_params(cfg, "single_stream", n) - target))
  counts = {"coattention": target, "single_stream": num_params(cfg, "single_stream", best),
            "question_only": num_params(cfg, "question_only", best)}
  return best, counts


def plan(cfg: LXMERTConfig) -> list[tuple[str, int]]:
  return [(m, s) for s in cfg.seeds for m in cfg.models]


def _train_eval(cfg, kind, seed, layers, ckpt_dir, progress, interrupt_after):
  import jax.numpy as jnp
  import optax

  from experiments.common.train import Trainer, fit
  from experiments.substrates import grammar
  cls = _model_cls()
  V, A = len(grammar.Vocab(cfg.canvas)), len(grammar.ANSWERS)
  t = cfg.train

  def loss_fn(model, batch, key):
    del key
    logits = model(batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["answer"]).mean()
    return ce, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["answer"])}

  def eval_fn(model, batch):
    hit = (jnp.argmax(model(batch), -1) == batch["answer"]) & batch["valid"]
    out = {"count": batch["valid"].sum(), "accuracy": hit.sum()}
    for i, q in enumerate(grammar.QTYPES):
      if q in cfg.qtypes:
        sel = batch["valid"] & (batch["qtype"] == i)
        out[f"n_{q}"] = sel.sum()
        out[f"hit_{q}"] = (hit & sel).sum()
    return out

  trainer = Trainer(lambda rngs: cls(cfg, kind, V, A, layers, rngs=rngs), loss_fn, eval_fn, total_steps=t.steps,
                    settings=t)
  res = fit(trainer, lr=t.lr, seed=seed, train_source=VQASource(cfg, t.num_train, seed, "train"),
            eval_source=VQASource(cfg, t.num_eval, 1000 + seed, "test"), batch_size=t.batch_size,
            eval_batch_size=t.eval_batch_size, eval_every=t.eval_every, checkpoint_dir=ckpt_dir,
            log_every=t.log_every, interrupt_after=interrupt_after, progress=progress,
            desc=f"lxmert {kind} seed {seed}")
  f = res.final
  per = {q: f[f"hit_{q}"] / f[f"n_{q}"] for q in cfg.qtypes if f.get(f"n_{q}")}
  return dict(accuracy=f["accuracy"], per_type=per, history=[{"step": h["step"], "accuracy": h["accuracy"]}
                                                              for h in res.history])


def majority(cfg: LXMERTConfig, seed: int) -> dict:
  """The most frequent training answer per question type, scored on the test questions."""
  from experiments.substrates import grammar
  tr = VQASource(cfg, cfg.train.num_train, seed, "train").arrays
  te = VQASource(cfg, cfg.train.num_eval, 1000 + seed, "test").arrays
  hits = np.zeros(len(te["answer"]), bool)
  per = {}
  for i, q in enumerate(grammar.QTYPES):
    if q not in cfg.qtypes:
      continue
    top = np.bincount(tr["answer"][tr["qtype"] == i], minlength=len(grammar.ANSWERS)).argmax()
    sel = te["qtype"] == i
    hits[sel] = te["answer"][sel] == top
    per[q] = float(hits[sel].mean()) if sel.any() else float("nan")
  return dict(accuracy=float(hits.mean()), per_type=per)


# ------------------------------------------------------------------------------------------------------ report
def _mean(rows, model, key="accuracy", qtype=None):
  vals = [(r["per_type"].get(qtype) if qtype else r[key]) for r in rows if r["model"] == model]
  vals = [v for v in vals if v is not None]
  return (float(np.mean(vals)), float(np.std(vals)), len(vals)) if vals else None


def table(rows: list[dict], cfg: LXMERTConfig, params: dict) -> str:
  cols = ["all", *cfg.qtypes]
  lines = ["| model | params | " + " | ".join(f"acc {c}" for c in cols) + " |",
           "|---|---:|" + "---:|" * len(cols)]
  for m in ("majority", *cfg.models):
    vals = []
    for c in cols:
      r = _mean(rows, m) if c == "all" else _mean(rows, m, qtype=c)
      vals.append("—" if r is None else f"{r[0]:.3f} ± {r[1]:.3f}")
    lines.append(f"| {m} | {params.get(m, 0):,} | " + " | ".join(vals) + " |")
  lines.append("| paper (LXMERT, real VQA/GQA/NLVR2) | 228M total | VQA 72.5 / GQA 60.3 / NLVR2 76.2 | " +
               " | ".join("—" for _ in cfg.qtypes) + " |")
  lines.append("")
  lines.append(f"Mean ± std over seeds {list(cfg.seeds)}; test questions on unseen digit images. majority = most "
               f"frequent training answer per question type; question_only = the single-stream stack without the "
               f"objects. Paper: {PAPER}.")
  return "\n".join(lines)


def verdict(rows: list[dict], cfg: LXMERTConfig) -> str:
  co, ss = _mean(rows, "coattention"), _mean(rows, "single_stream")
  qo, mj = _mean(rows, "question_only"), _mean(rows, "majority")
  if co is None or ss is None:
    return verdict_line("not reproduced", "the sweep is incomplete (co-attention or single-stream missing); rerun "
                                          "with --resume")
  floor = max(x[0] for x in (qo, mj) if x is not None) if (qo or mj) else 0.0
  rel = [q for q in ("rel_yn", "rel_what") if q in cfg.qtypes]
  rel_co = [(_mean(rows, "coattention", qtype=q) or (0,))[0] for q in rel]
  rel_ss = [(_mean(rows, "single_stream", qtype=q) or (0,))[0] for q in rel]
  rdiff = float(np.mean(rel_co) - np.mean(rel_ss)) if rel else 0.0
  txt = (f"co-attention {co[0]:.3f} vs single-stream {ss[0]:.3f} overall (relational: {rdiff:+.3f}) at equal "
         f"parameters, baselines <= {floor:.3f}")
  if co[0] <= floor + MARGIN:
    return verdict_line("not reproduced", f"{txt}: co-attention does not beat the language-prior baselines, so the "
                                          f"toy cannot compare the architectures")
  rel_mj = [(_mean(rows, "majority", qtype=q) or (0,))[0] for q in rel]
  if rel and max(np.mean(rel_co), np.mean(rel_ss)) <= np.mean(rel_mj) + MARGIN:
    return verdict_line("not reproduced", f"{txt}: neither model beats the majority answer on the relational "
                                          f"questions ({np.mean(rel_mj):.3f}), so the toy cannot test the paper's "
                                          f"claim about them")
  if co[0] >= ss[0] - MARGIN and rdiff >= -MARGIN:
    how = "ahead" if co[0] > ss[0] + MARGIN else "tied within 2 points"
    return verdict_line("reproduced" if how == "ahead" else "partly",
                        f"{txt}: co-attention is {how}; both use the visual input (beat question-only)")
  return verdict_line("not reproduced", f"{txt}: the single-stream model is better at equal parameters")


def _plot(rows, cfg, out):
  from experiments.common.plots import line_panels
  series = {}
  for m in cfg.models:
    rs = [r for r in rows if r["model"] == m and r.get("history")]
    if rs:
      steps = [h["step"] for h in rs[0]["history"]]
      series[m] = (steps, [float(np.mean([r["history"][i]["accuracy"] for r in rs if len(r["history"]) > i]))
                           for i in range(len(steps))])
  mj = _mean(rows, "majority")
  if mj and series:
    xs = next(iter(series.values()))[0]
    series["majority"] = (xs, [mj[0]] * len(xs))
  line_panels({"test accuracy": series}, out / "accuracy.png", xlabel="training step", ylabel="accuracy",
              ylim=(0, 1.02), title=f"lxmert ({cfg.name}): toy relational VQA")


def run(cfg: LXMERTConfig, out, *, resume: bool = False, report: bool = False, progress: bool = True,
        verbose: bool = True, explicit_out: bool = True, interrupt_after: int | None = None) -> dict:
  """Runs (or resumes, or only reports) the sweep; returns the ``results.json`` content."""
  out = pathlib.Path(out)
  fp = config_lib.fingerprint(cfg)
  old = prepare_out_dir(out, fingerprint=fp, resume=resume, report=report, explicit_out=explicit_out)
  rows = list(old["rows"]) if old else []
  payload = dict(preset=cfg.name, fingerprint=fp, config=config_lib.to_dict(cfg), environment=environment(),
                 rows=rows, params=old.get("params", {}) if old else {},
                 cpu_seconds=old.get("cpu_seconds", 0.0) if old else 0.0)
  for key in ("region_encoder_accuracy", "single_stream_layers"):  # kept for --report
    if old and key in old:
      payload[key] = old[key]
  if not report:
    from tqdm.auto import tqdm
    c0 = time.process_time()
    if cfg.object_features == "frozen_mlp":
      payload["region_encoder_accuracy"] = round(region_encoder(cfg.canvas, cfg.feature_dim)[2], 4)
    layers, params = match_layers(cfg)
    params["majority"] = 0
    payload["params"], payload["single_stream_layers"] = params, layers
    done = {(r["model"], r["seed"]) for r in rows}
    todo = [c for c in plan(cfg) if c not in done]
    if done and verbose:
      print(f"resumed: {len(done)} of {len(plan(cfg))} runs already finished in {out}/", flush=True)
    for s in cfg.seeds:
      if ("majority", s) not in done:
        rows.append(dict(model="majority", seed=s, **majority(cfg, s)))
    bar = tqdm(total=len(todo), unit="run", disable=not progress or not todo, dynamic_ncols=True)
    for k, (m, s) in enumerate(todo):
      bar.set_description(f"lxmert: run {k + 1} of {len(todo)} ({m}, seed {s})")
      t1 = time.time()
      r = _train_eval(cfg, m, s, layers, out / "ckpt" / f"{m}-s{s}", progress, interrupt_after)
      rows.append(dict(model=m, seed=s, **r, seconds=round(time.time() - t1, 1)))
      payload["cpu_seconds"] = round(payload["cpu_seconds"] + time.process_time() - c0, 1)
      c0 = time.process_time()
      write_json(out / "results.json", payload)
      bar.update(1)
    bar.close()
    payload["cpu_seconds"] = round(payload["cpu_seconds"] + time.process_time() - c0, 1)
  if payload["params"]:
    p = payload["params"]
    ratio = p["single_stream"] / p["coattention"]
    payload["param_ratio"] = round(ratio, 3)
  md = table(rows, cfg, payload["params"])
  line = verdict(rows, cfg)
  notes = [f"single-stream depth {payload.get('single_stream_layers')} layers: parameters "
           f"{payload.get('param_ratio')} x co-attention's",
           f"CPU seconds (process time, this and earlier calls): {payload['cpu_seconds']}"]
  mj = _mean(rows, "majority")
  for m in cfg.models:
    r = _mean(rows, m)
    if mj and r and r[0] < mj[0] - MARGIN:
      notes.append(f"{m} ends below the majority baseline ({r[0]:.3f} < {mj[0]:.3f}): its training failed (e.g. "
                   f"collapsed to one answer for every question), which says nothing about the architecture")
  if cfg.object_features == "frozen_mlp":
    notes.insert(0, f"object features: frozen region encoder (one-hidden-layer digit classifier, {cfg.feature_dim} "
                    f"features) pre-trained on the training digit pool; digit accuracy on unseen test digits "
                    f"{payload.get('region_encoder_accuracy')}")
  else:
    notes.insert(0, "object features: raw 8x8 crop pixels (no pre-trained region encoder)")
  _plot(rows, cfg, out)
  write_report(out, payload, title=f"LXMERT toy relational VQA, preset {cfg.name}", table=md, verdict=line,
               notes=notes, plots=["accuracy.png"], verbose=verbose)
  return {**payload, "verdict": line, "table_markdown": md}


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m experiments lxmert``: see :func:`experiments.common.report.preset_main`."""
  return report_lib.preset_main("lxmert", __doc__, PRESETS, run, argv)
