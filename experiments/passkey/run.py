"""``python -m experiments passkey``: train a small landmark-attention LM on passkey retrieval, evaluate beyond the
training length with top-k block retrieval against a window baseline.

Training: prompts of ``train_length`` tokens (landmarks included, :mod:`experiments.passkey.data`), next-token loss
on every regular token with the 5 answer digits weighted ``answer_weight``, grouped-softmax attention
(:func:`jaxattn.landmark_attention`) over the whole sequence.

Evaluation (the same ``eval_samples`` prompts for every method, per length):

- ``landmark top-k=k``: the prompt (answer included, teacher forcing) is fed in chunks of ``chunk_size`` tokens
  through the per-layer :class:`~jaxattn.ops.landmark.retrieval.LandmarkCache`; each chunk attends to its local
  frame and to the ``k`` cached blocks each (token, head) retrieves, with stingy positions;
- ``window``: the same model without retrieval on the last ``train_length`` tokens only (the window truncated to
  the training length, the longest context it was trained on);

accuracy = fraction of prompts whose 5 answer digits are all predicted (argmax) correctly, i.e. greedy exact match.

Outputs in ``--out`` (default ``runs/passkey``): ``passkey.json`` (config, training curve, results,
timings), ``passkey.md`` (the table) and ``passkey.png`` (accuracy against length). ``--checkpoint-dir`` saves the
trained parameters with Orbax (and ``--eval-only`` restores them instead of training).

Example::

  python -m experiments passkey --preset cpu
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from configs.passkey import PRESETS, PasskeyConfig
from experiments.common import config as config_lib
from experiments.passkey import data
from experiments.passkey.model import PasskeyLM
from jaxattn.ops.landmark import data as lm_data

DEFAULT_OUT = pathlib.Path("runs/passkey")  # git-ignored; the committed reference is experiments/results/passkey/


# ------------------------------------------------------------------------------------------------------ training
def _loss(model, inputs, targets, weights, answer):
  logits = model(inputs)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  right = (jnp.argmax(logits, -1) == targets) | ~answer
  return jnp.sum(ce * weights) / jnp.sum(weights), jnp.mean(jnp.all(right, axis=-1))


@nnx.jit
def _train_step(model, opt, inputs, targets, weights, answer):
  (loss, solved), grads = nnx.value_and_grad(_loss, has_aux=True)(model, inputs, targets, weights, answer)
  opt.update(model, grads)
  return loss, solved


def _batch(rng, cfg: PasskeyConfig, batch_size: int, length: int):
  """``(inputs, targets, weights, answer)`` ``[B, L]``; ``answer`` marks the positions predicting answer digits."""
  toks, _, _ = data.make_batch(rng, batch_size, length, cfg.block_size)
  w = np.ones(toks.shape, np.float32)
  w[:, -data.ANSWER_LEN:] = cfg.answer_weight
  inputs, targets, weights = lm_data.next_token_targets(toks, cfg.block_size, data.LANDMARK, weights=w)
  flag = np.zeros(toks.shape, np.float32)
  flag[:, -data.ANSWER_LEN:] = 1.0
  _, _, answer = lm_data.next_token_targets(toks, cfg.block_size, data.LANDMARK, weights=flag)
  return inputs, targets, weights, answer > 0


def build(cfg: PasskeyConfig) -> PasskeyLM:
  return PasskeyLM(cfg, len(data.VOCAB), rngs=nnx.Rngs(cfg.seed))


def train(cfg: PasskeyConfig, model: PasskeyLM, progress: bool = True) -> list[dict]:
  """AdamW (warmup + cosine) on fresh random prompts; returns the logged curve."""
  warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 1))
  sched = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(cfg.steps, warmup + 1),
                                             cfg.learning_rate * 0.05)
  opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0),
                                         optax.adamw(sched, weight_decay=cfg.weight_decay)), wrt=nnx.Param)
  rng = np.random.default_rng(cfg.seed + 1)
  curve, t0, acc = [], time.time(), []
  bar = tqdm(range(1, cfg.steps + 1), desc="train", disable=not progress, mininterval=2.0)
  for step in bar:
    loss, solved = _train_step(model, opt, *map(jnp.asarray, _batch(rng, cfg, cfg.batch_size, cfg.train_length)))
    acc.append((float(loss), float(solved)))
    if step % cfg.log_every == 0 or step == cfg.steps:
      loss, solved = np.mean(acc, axis=0)
      row = dict(step=step, loss=float(loss), train_solved=float(solved), seconds=round(time.time() - t0, 1))
      curve.append(row)
      acc = []
      bar.set_postfix(loss=f"{loss:.3f}", solved=f"{solved:.2f}")
      if progress:
        tqdm.write(f"  step {step:5d}  loss {loss:.3f}  train solved {solved:.2f}  {row['seconds']:.0f} s")
  return curve


# ---------------------------------------------------------------------------------------------------- evaluation
def _solved(logits, tokens, block_size: int):
  """bool ``[B]``: the 5 answer digits are all the argmax of the logits at the positions that predict them."""
  n = tokens.shape[1]
  reg = lm_data.remove_landmarks(logits, block_size, n)  # [B, N, V]
  pred = jnp.argmax(reg[:, n - data.ANSWER_LEN - 1:n - 1], axis=-1)
  return np.asarray(jnp.all(pred == tokens[:, n - data.ANSWER_LEN:], axis=-1))


@nnx.jit
def _forward(model, inputs):
  return model(inputs)


@functools.partial(nnx.jit, static_argnames="top_k")
def _decode_chunk(model, chunk, top_k):
  return model(chunk, decode=True, top_k=top_k)


def eval_window(cfg: PasskeyConfig, model, tokens) -> np.ndarray:
  """The model on the last ``train_length`` tokens (window truncated to the training length), no retrieval."""
  keep = data.regular_length(cfg.train_length, cfg.block_size)
  tail = tokens[:, -keep:]
  logits = _forward(model, jnp.asarray(lm_data.insert_landmarks(tail, cfg.block_size, data.LANDMARK)))
  return _solved(logits, jnp.asarray(tail), cfg.block_size)


def eval_retrieval(cfg: PasskeyConfig, model, tokens, top_k: int) -> np.ndarray:
  """The whole prompt in ``chunk_size`` chunks through the retrieval cache with ``top_k`` blocks per query."""
  inputs = jnp.asarray(lm_data.insert_landmarks(tokens, cfg.block_size, data.LANDMARK))
  model.init_cache(tokens.shape[0], cfg.mem_blocks)
  logits = [_decode_chunk(model, inputs[:, a:a + cfg.chunk_size], top_k)
            for a in range(0, inputs.shape[1], cfg.chunk_size)]
  return _solved(jnp.concatenate(logits, axis=1), jnp.asarray(tokens), cfg.block_size)


def evaluate(cfg: PasskeyConfig, model, progress: bool = True) -> list[dict]:
  """Accuracy per (length, method) over the same prompts; rows with counts and seconds."""
  methods = [("window", None)] + [(f"landmark top-k={k}", k) for k in cfg.top_ks]
  rows = []
  for length in cfg.eval_lengths:
    rng = np.random.default_rng(10_000 + length)
    batches = [data.make_batch(rng, cfg.eval_batch, length, cfg.block_size)
               for _ in range(cfg.eval_samples // cfg.eval_batch)]
    for name, k in methods:
      t0 = time.time()
      solved = []
      for toks, _, _ in tqdm(batches, desc=f"eval {length} {name}", disable=not progress, leave=False):
        solved.append(eval_window(cfg, model, toks) if k is None else eval_retrieval(cfg, model, toks, k))
      solved = np.concatenate(solved)
      rows.append(dict(length=length, method=name, top_k=k, accuracy=float(solved.mean()), solved=int(solved.sum()),
                       samples=int(solved.size), seconds=round(time.time() - t0, 1)))
      if progress:
        tqdm.write(f"  length {length:5d}  {name:18s} accuracy {rows[-1]['accuracy']:.3f} "
                   f"({rows[-1]['solved']}/{rows[-1]['samples']})")
  return rows


# ------------------------------------------------------------------------------------------------------- report
def table(rows: list[dict], cfg: PasskeyConfig) -> str:
  methods = list(dict.fromkeys(r["method"] for r in rows))
  lengths = list(dict.fromkeys(r["length"] for r in rows))
  acc = {(r["length"], r["method"]): r for r in rows}
  lines = ["| method | " + " | ".join(f"{L} tokens" for L in lengths) + " |",
           "|---|" + "---|" * len(lengths)]
  for m in methods:
    cells = [f"{acc[L, m]['accuracy']:.2f} ({acc[L, m]['solved']}/{acc[L, m]['samples']})" for L in lengths]
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  lines.append("")
  lines.append(f"Passkey exact match (5 digits, greedy) of one {cfg.num_layers}-layer d={cfg.d_model} model trained "
               f"at {cfg.train_length} tokens (block {cfg.block_size}, {cfg.steps} steps x {cfg.batch_size}); "
               f"window = the same model on the last {cfg.train_length} tokens; landmark = chunks of "
               f"{cfg.chunk_size} + top-k retrieval ({cfg.retrieval_mode}, stingy positions).")
  return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for m in dict.fromkeys(r["method"] for r in rows):
    pts = [(r["length"], r["accuracy"]) for r in rows if r["method"] == m]
    ax.plot(*zip(*pts), marker="o", label=m, linestyle="--" if m == "window" else "-")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("prompt length (tokens, landmarks included)")
  ax.set_ylabel("passkey accuracy (exact match)")
  ax.set_ylim(-0.05, 1.05)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _checkpointer():
  import orbax.checkpoint as ocp

  return ocp.StandardCheckpointer()


def main(argv: Sequence[str] | None = None) -> int:
  p = config_lib.ArgumentParser(prog="python -m experiments passkey", description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  p.add_argument("--steps", type=config_lib.positive_int, help="override the preset's training steps")
  p.add_argument("--eval-samples", type=config_lib.positive_int, help="override the preset's prompts per length")
  p.add_argument("--retrieval-mode", choices=("per_token_and_head", "max_over_heads", "max_over_tokens"),
                 help="override the preset's block selection (with --eval-only: evaluate a trained model this way)")
  p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  p.add_argument("--checkpoint-dir", type=pathlib.Path, help="save trained parameters here (Orbax)")
  p.add_argument("--eval-only", action="store_true", help="restore parameters from --checkpoint-dir, skip training")
  p.add_argument("--quiet", action="store_true")
  args = p.parse_args(argv)
  cfg = PRESETS[args.preset]
  if args.steps is not None:
    cfg = dataclasses.replace(cfg, steps=args.steps)
  if args.eval_samples is not None:
    cfg = dataclasses.replace(cfg, eval_samples=args.eval_samples, eval_batch=min(cfg.eval_batch, args.eval_samples))
  if args.retrieval_mode is not None:
    cfg = dataclasses.replace(cfg, retrieval_mode=args.retrieval_mode)
  if args.eval_only and args.checkpoint_dir is None:
    p.error("--eval-only needs --checkpoint-dir")
  progress = not args.quiet
  model = build(cfg)
  t0 = time.time()
  curve: list[dict] = []
  if args.eval_only:
    ckpt = args.checkpoint_dir.resolve() / "params"
    state = _checkpointer().restore(ckpt, nnx.state(model, nnx.Param))
    nnx.update(model, state)
  else:
    curve = train(cfg, model, progress)
    if args.checkpoint_dir is not None:
      ckptr = _checkpointer()
      ckptr.save(args.checkpoint_dir.resolve() / "params", nnx.state(model, nnx.Param), force=True)
      ckptr.wait_until_finished()
  train_s = time.time() - t0
  t1 = time.time()
  rows = evaluate(cfg, model, progress)
  eval_s = time.time() - t1

  args.out.mkdir(parents=True, exist_ok=True)
  md = table(rows, cfg)
  result = dict(config=dataclasses.asdict(cfg), preset=args.preset, train_curve=curve, results=rows,
                train_seconds=round(train_s, 1), eval_seconds=round(eval_s, 1),
                device=jax.devices()[0].device_kind, jax_version=jax.__version__)
  (args.out / "passkey.json").write_text(json.dumps(result, indent=1))
  (args.out / "passkey.md").write_text(md + "\n")
  plot(rows, args.out / "passkey.png")
  print(md)
  print(f"\ntrain {train_s:.0f} s, eval {eval_s:.0f} s; wrote {args.out}/passkey.{{json,md,png}}")
  return 0
