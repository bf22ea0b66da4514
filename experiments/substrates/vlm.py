"""The toy vision-language model: ViT-tiny tokens -> linear projector -> a causal LM over ``[visual; text]``.

Text is ``<bos> question answer <eos>`` (:mod:`experiments.substrates.grammar`); the loss is next-token cross
entropy on the answer tokens only (instruction tuning). :func:`load_or_train` trains one :class:`VLMConfig` with
:func:`experiments.common.train.fit` (Orbax checkpoints, bit-exact resume) and caches it under
``runs/substrates/<fingerprint>/`` so later experiments reuse it; it can start from another model's parameters
(``init``), e.g. a pretrained base VLM, with the ViT frozen or tuned.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs.substrates import VLMConfig
from experiments.common import config as config_lib
from experiments.common.data import GeneratedSource
from experiments.common.paths import default_out_dir
from experiments.substrates import grammar
from experiments.substrates.canvas import make_scenes
from experiments.substrates.vit import Block, ViTTiny
from jaxattn import masks

__all__ = ["VLMSource", "ToyVLM", "build", "loss_fn", "eval_fn", "generate_answers", "substrate_dir", "Trained",
           "load_or_train", "MAX_QUESTION", "MAX_ANSWER"]

MAX_QUESTION = 12
MAX_ANSWER = 4


class VLMSource(GeneratedSource):
  """Grain source of ``(canvas, <bos> question answer <eos>)`` records.

  Fields: ``image`` f32 ``[S, S]``, ``tokens`` int32 ``[max_text]``, ``weights`` f32 ``[max_text]`` (1 on answer
  tokens), ``answer_start`` int32 (index of the first answer token), ``answer_len`` int32, ``qtype`` int32, and
  the scene's ``labels`` / ``boxes`` (:mod:`experiments.substrates.canvas`).
  """

  PARAMS = ("cfg", "qtypes", "n", "seed", "split")

  def __init__(self, cfg: VLMConfig, qtypes, n: int, seed: int, split: str = "train"):
    self.cfg, self.qtypes, self.n, self.seed, self.split = cfg, tuple(qtypes), n, seed, split

  def generate(self):
    c = self.cfg
    scenes = make_scenes(c.canvas, self.n, self.seed, self.split)
    q = grammar.make_questions(scenes, self.qtypes, c.canvas, self.seed, MAX_QUESTION, MAX_ANSWER)
    v = grammar.Vocab(c.canvas)
    L = c.lm.max_text
    tokens = np.full((self.n, L), v.pad, np.int32)
    weights = np.zeros((self.n, L), np.float32)
    for i in range(self.n):
      ql, al = int(q["question_len"][i]), int(q["answer_len"][i])
      seq = [v.bos, *q["question"][i, :ql], *q["answer"][i, :al], v.eos]
      if len(seq) > L:
        raise ValueError(f"a text of {len(seq)} tokens does not fit lm.max_text={L}")
      tokens[i, :len(seq)] = seq
      weights[i, 1 + ql:1 + ql + al] = 1.0
    return dict(image=scenes["image"], tokens=tokens, weights=weights, answer_start=1 + q["question_len"],
                answer_len=q["answer_len"], qtype=q["qtype"], labels=scenes["labels"], boxes=scenes["boxes"])


class ToyVLM(nnx.Module):
  """``(images [B, S, S], tokens [B, L]) -> logits [B, L, V]`` (the text positions of the joint sequence).

  ``[W_p ViT(image) ; E(tokens)] + positions`` -> ``lm.num_layers`` causal :class:`Block` s -> LayerNorm -> head.
  ``freeze_vision`` stops gradients at the ViT output; ``blind`` replaces the canvas by zeros (no-image baseline).
  """

  def __init__(self, cfg: VLMConfig, vocab_size: int, *, rngs: nnx.Rngs):
    self.freeze_vision, self.blind = cfg.freeze_vision, cfg.blind
    self.vit = ViTTiny(cfg.vit, cfg.canvas.size, rngs=rngs)
    d = cfg.lm.d_model
    self.proj = nnx.Linear(cfg.vit.d_model, d, rngs=rngs)
    self.embed = nnx.Embed(vocab_size, d, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (self.vit.num_patches + cfg.lm.max_text, d)))
    self.blocks = nnx.List([Block(d, cfg.lm.num_heads, cfg.lm.mlp_ratio, mask=masks.Causal(), rngs=rngs)
                            for _ in range(cfg.lm.num_layers)])
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, vocab_size, rngs=rngs)

  def __call__(self, images, tokens):
    images = jnp.asarray(images, jnp.float32)
    if self.blind:
      images = jnp.zeros_like(images)
    vis = self.vit(images)
    if self.freeze_vision:
      vis = jax.lax.stop_gradient(vis)
    x = jnp.concatenate([self.proj(vis), self.embed(tokens)], axis=1)
    x = x + self.pos[...][:x.shape[1]]
    for blk in self.blocks:
      x = blk(x)
    return self.head(self.ln(x[:, vis.shape[1]:]))


def build(cfg: VLMConfig, rngs: nnx.Rngs | None = None) -> ToyVLM:
  return ToyVLM(cfg, len(grammar.Vocab(cfg.canvas)), rngs=rngs if rngs is not None else nnx.Rngs(cfg.seed))


def _ce(model, batch):
  logits = model(batch["image"], batch["tokens"])[:, :-1]
  tgt, w = batch["tokens"][:, 1:], batch["weights"][:, 1:]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
  hit = (jnp.argmax(logits, -1) == tgt).astype(jnp.float32) * w
  return ce, hit, w


def loss_fn(model, batch, key):
  del key
  ce, hit, w = _ce(model, batch)
  n = jnp.maximum(w.sum(), 1.0)
  return jnp.sum(ce * w) / n, {"token_accuracy": hit.sum() / n}


def eval_fn(model, batch):
  """Teacher-forced sums per record: ``exact`` (every answer token right), ``loss`` (mean over answer tokens)."""
  ce, hit, w = _ce(model, batch)
  valid = batch["valid"].astype(jnp.float32)
  exact = (hit.sum(1) == w.sum(1)).astype(jnp.float32)
  loss = (ce * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
  return {"count": valid.sum(), "exact": jnp.sum(exact * valid), "loss": jnp.sum(loss * valid)}


@nnx.jit
def _greedy(model, images, tokens, answer_start):
  B = tokens.shape[0]
  rows = jnp.arange(B)
  for j in range(MAX_ANSWER):
    logits = model(images, tokens)
    pred = jnp.argmax(logits[rows, answer_start + j - 1], -1).astype(tokens.dtype)
    tokens = tokens.at[rows, jnp.minimum(answer_start + j, tokens.shape[1] - 1)].set(pred)
  return tokens


def generate_answers(model: ToyVLM, source, batch_size: int = 256) -> np.ndarray:
  """Greedy answers ``[n, MAX_ANSWER]`` (int32; padding past each record's ``answer_len``) for every record of a
  :class:`VLMSource`. The answer length is fixed by the question type (1 token, or 4 for a box), so decoding
  runs exactly that many steps; the reference answer is blanked out of the input first."""
  a = source.arrays
  n = len(source)
  out = np.zeros((n, MAX_ANSWER), np.int32)
  pad = grammar.Vocab(source.cfg.canvas).pad
  pos = np.arange(a["tokens"].shape[1])
  for s in range(0, n, batch_size):
    sl = slice(s, min(n, s + batch_size))
    toks = np.where(pos[None] >= a["answer_start"][sl, None], pad, a["tokens"][sl])
    m = toks.shape[0]
    if m < batch_size:  # one compiled shape
      toks = np.concatenate([toks, np.full((batch_size - m, toks.shape[1]), pad, np.int32)])
    imgs = a["image"][sl]
    imgs = np.concatenate([imgs, np.zeros((batch_size - m,) + imgs.shape[1:], np.float32)]) if m < batch_size \
        else imgs
    st = np.concatenate([a["answer_start"][sl], np.ones(batch_size - m, np.int32)])
    res = np.asarray(_greedy(model, jnp.asarray(imgs), jnp.asarray(toks), jnp.asarray(st)))[:m]
    idx = a["answer_start"][sl, None] + np.arange(MAX_ANSWER)[None]
    got = np.take_along_axis(res, np.minimum(idx, res.shape[1] - 1), axis=1)
    out[sl] = np.where(np.arange(MAX_ANSWER)[None] < a["answer_len"][sl, None], got, pad)
  return out


def substrate_dir(cfg: VLMConfig, root=None, init_fingerprint: str | None = None) -> pathlib.Path:
  """``<root>/<fingerprint>`` (default root ``runs/substrates``); the name is not hashed, the init model is."""
  key = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "name"}
  fp = config_lib.fingerprint({"kind": "toy_vlm", **key, "init": init_fingerprint})
  return pathlib.Path(root if root is not None else default_out_dir("substrates")) / fp


@dataclasses.dataclass
class Trained:
  """A trained toy VLM: module, parameters (pure dict), folder, evaluation history, seconds (0 when cached)."""

  model: ToyVLM
  params: dict
  directory: pathlib.Path
  history: list[dict]
  train_seconds: float
  cached: bool


def load_or_train(cfg: VLMConfig, *, directory=None, root=None, init: Trained | None = None, progress: bool = True,
                  interrupt_after: int | None = None, desc: str | None = None) -> Trained:
  """The trained model of ``cfg`` (restored when its training in the folder finished, else trained or resumed).

  Args:
    cfg: data, model and training settings.
    directory: the folder (default :func:`substrate_dir` under ``root``).
    root: cache root (default ``runs/substrates``).
    init: start from these parameters instead of a fresh initialisation (same architecture).
    progress, desc: the step bar.
    interrupt_after: simulate a kill after that many steps (tests).
  """
  from experiments.common.metrics import MetricWriter
  from experiments.common.train import Trainer, fit

  init_fp = None if init is None else init.directory.name
  out = pathlib.Path(directory) if directory is not None else substrate_dir(cfg, root, init_fp)
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text(json.dumps({"config": config_lib.to_dict(cfg), "init": init_fp}, indent=1) + "\n")
  t = cfg.train
  init_params = None if init is None else init.params

  def model_fn(rngs):
    m = build(cfg, rngs)
    if init_params is not None:
      state = nnx.state(m)
      nnx.replace_by_pure_dict(state, init_params)
      nnx.update(m, state)
    return m

  trainer = Trainer(model_fn, loss_fn, eval_fn, total_steps=t.steps, settings=t)
  train_src = VLMSource(cfg, cfg.qtypes, t.num_train, cfg.seed, "train")
  eval_src = VLMSource(cfg, cfg.qtypes, t.num_eval, cfg.seed + 1, "test")
  t0 = time.time()
  writer = MetricWriter(out / "metrics.jsonl", run=f"toy_vlm-{cfg.name}")
  try:
    res = fit(trainer, lr=t.lr, seed=cfg.seed, train_source=train_src, eval_source=eval_src,
              batch_size=t.batch_size, eval_batch_size=t.eval_batch_size, eval_every=t.eval_every,
              checkpoint_dir=out / "checkpoints", writer=writer, log_every=t.log_every,
              pad_values={"tokens": 0}, interrupt_after=interrupt_after, progress=progress,
              desc=desc or f"toy_vlm {cfg.name}")
  finally:
    writer.close()
  cached = res.resumed_from is not None and res.resumed_from >= t.steps
  params = jax.tree.map(jnp.asarray, res.state.params)
  return Trained(nnx.merge(trainer.graphdef, params), params, out, res.history,
                 0.0 if cached else time.time() - t0, cached)
