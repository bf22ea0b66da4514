"""Training helpers for the byte-level text LM: the next-byte loss in nats/byte, a :class:`Trainer` for any NNX LM
``tokens [B, T] -> logits [B, T, 256]``, one :func:`fit` call per (model, seed), and parameter counts.
"""

from __future__ import annotations

import time
from typing import Callable

from configs.common import AdamWConfig
from configs.textlm import CorpusConfig
from experiments.textlm.corpus import ByteWindows

__all__ = ["next_byte_loss", "lm_trainer", "train_lm", "param_count"]


def next_byte_loss(model, tokens):
  """Mean next-byte cross-entropy in nats/byte and its per-position values: ``tokens int [B, L + 1]`` ->
  ``(loss, ce [B, L])``."""
  import optax
  logits = model(tokens[:, :-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype("float32"), tokens[:, 1:])
  return ce.mean(), ce


def lm_trainer(model_fn: Callable, train: AdamWConfig):
  """A :class:`experiments.common.train.Trainer` for ``model_fn(rngs) -> LM``; evaluation reports ``loss`` in
  nats/byte over every target byte of the test windows."""
  import jax.numpy as jnp

  from experiments.common.train import Trainer

  def loss_fn(model, batch, key):
    del key
    loss, _ = next_byte_loss(model, batch["tokens"])
    return loss, {}

  def eval_fn(model, batch):
    _, ce = next_byte_loss(model, batch["tokens"])
    ok = batch["valid"].astype(jnp.float32)[:, None]
    return {"count": (ok * jnp.ones_like(ce)).sum(), "loss": (ce * ok).sum()}

  return Trainer(model_fn, loss_fn, eval_fn, total_steps=train.steps, settings=train)


def train_lm(trainer, corpus: CorpusConfig, train: AdamWConfig, *, seed: int, checkpoint_dir=None, writer=None,
             progress: bool = True, desc: str = "", interrupt_after: int | None = None) -> dict:
  """Trains one LM on the corpus (resuming from ``checkpoint_dir``); returns ``{"final", "history", "steps",
  "wall_s", "cpu_s", "state"}`` (``cpu_s``: process CPU seconds of this call; ``state``: the final TrainState)."""
  from experiments.common.train import fit
  c0, t0 = time.process_time(), time.time()
  res = fit(trainer, lr=train.lr, seed=seed, train_source=ByteWindows(corpus, "train"),
            eval_source=ByteWindows(corpus, "test"), batch_size=train.batch_size,
            eval_batch_size=train.eval_batch_size, eval_every=train.eval_every, checkpoint_dir=checkpoint_dir,
            checkpoint_every=train.checkpoint_every, writer=writer, log_every=50, interrupt_after=interrupt_after,
            progress=progress, desc=desc)
  return {"final": res.final, "history": res.history, "steps": res.steps, "wall_s": time.time() - t0,
          "cpu_s": time.process_time() - c0, "state": res.state}


def param_count(model_fn: Callable) -> int:
  """Number of parameters of ``model_fn(rngs)`` (abstract: nothing is allocated)."""
  import jax
  from flax import nnx
  model = nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def unigram_loss(corpus: CorpusConfig) -> float:
  """The trivial baseline: test cross-entropy (nats/byte) of the training split's byte frequencies (add-one
  smoothed), over the same target bytes the LMs are scored on."""
  import numpy as np
  train = ByteWindows(corpus, "train").arrays["tokens"]
  test = ByteWindows(corpus, "test").arrays["tokens"][:, 1:]
  counts = np.bincount(train.reshape(-1), minlength=256).astype(np.float64) + 1.0
  logp = np.log(counts / counts.sum())
  return float(-logp[test.reshape(-1)].mean())


def train_grid(cells, trainers: dict, corpus: CorpusConfig, train: AdamWConfig, *, payload: dict, out, save,
               progress: bool = True, interrupt_after: int | None = None, name: str = "") -> dict:
  """Trains every ``(key, arch, seed)`` of ``cells`` (``trainers[arch]`` built by :func:`lm_trainer`), skipping the
  cells already in ``payload["runs"]``; checkpoints in ``out/ckpt/<key>``, metrics in ``out/metrics.jsonl``.
  Calls ``save()`` after every finished cell. Returns ``{key: final TrainState}`` of the cells trained (or
  restored from their finished checkpoints) in this call.
  """
  import pathlib

  from tqdm.auto import tqdm

  from experiments.common.metrics import MetricWriter
  out = pathlib.Path(out)
  runs = payload.setdefault("runs", {})
  states = {}
  bar = tqdm(total=len(cells), disable=not progress, dynamic_ncols=True,
             bar_format="{desc} |{bar}| elapsed {elapsed}, ETA {remaining}")
  try:
    for k, (key, arch, seed) in enumerate(cells):
      bar.set_description(f"{name}: run {k + 1} of {len(cells)} ({key})")
      writer = MetricWriter(out / "metrics.jsonl", run=key)
      try:
        res = train_lm(trainers[arch], corpus, train, seed=seed, checkpoint_dir=(out / "ckpt" / key).resolve(),
                       writer=writer, progress=progress, desc=key, interrupt_after=interrupt_after)
      finally:
        writer.close()
      states[key] = res.pop("state")
      if key not in runs:
        runs[key] = dict(arch=arch, seed=seed, final=res["final"], steps=res["steps"], cpu_s=round(res["cpu_s"], 2),
                         history=[{"step": h["step"], "loss": h["loss"]} for h in res["history"]])
        save()
      bar.update(1)
  finally:
    bar.close()
  return states
