"""Training of the tiny LM on the task mixture, cached per config.

:func:`load_or_train` trains with :func:`experiments.common.train.fit` (AdamW + cosine, Grain iterator, Orbax
checkpoints with digests: a killed training resumes where its last checkpoint was, bit-exactly) in
``runs/longctx/<fingerprint>/`` (the fingerprint hashes the data, model and training settings, not the preset
name), and returns the stored parameters at once when that run has finished, so every experiment reuses one
trained model. Loss and accuracy count answer tokens only (:mod:`experiments.longctx.tasks`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import optax

from configs.longctx import LongCtxConfig
from experiments.common import config as config_lib
from experiments.common.paths import default_out_dir
from experiments.longctx.model import TinyLM
from experiments.longctx.tasks import VOCAB_SIZE, LongCtxSource

__all__ = ["Trained", "model_dir", "build", "load_or_train", "sources"]


def model_dir(cfg: LongCtxConfig, root: str | pathlib.Path | None = None) -> pathlib.Path:
  """``<root>/<fingerprint>`` (default root ``runs/longctx``)."""
  fp = config_lib.fingerprint({"data": cfg.data, "model": cfg.model, "train": cfg.train})
  return pathlib.Path(root if root is not None else default_out_dir("longctx")) / fp


def build(cfg: LongCtxConfig, rngs=None) -> TinyLM:
  from flax import nnx
  return TinyLM(cfg.model, VOCAB_SIZE, rngs=rngs if rngs is not None else nnx.Rngs(cfg.train.seed))


def _targets(batch):
  toks = batch["tokens"]
  return toks[:, 1:], batch["answer"][:, 1:]


def loss_fn(model, batch, key):
  del key
  logits = model(batch["tokens"])[:, :-1]
  tgt, w = _targets(batch)
  w = w.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
  n = jnp.maximum(w.sum(), 1.0)
  acc = jnp.sum((jnp.argmax(logits, -1) == tgt) * w) / n
  return jnp.sum(ce * w) / n, {"accuracy": acc}


def eval_fn(model, batch):
  logits = model(batch["tokens"])[:, :-1]
  tgt, w = _targets(batch)
  w = (w & batch["valid"][:, None]).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
  return {"count": w.sum(), "accuracy": jnp.sum((jnp.argmax(logits, -1) == tgt) * w), "loss": jnp.sum(ce * w)}


def sources(cfg: LongCtxConfig) -> tuple[LongCtxSource, LongCtxSource]:
  """Training and evaluation sources at ``train_len`` with ``train_repeats`` (evaluation: seed + 1)."""
  d = cfg.data
  return (LongCtxSource(cfg.train.train_len, d.num_train, d.seed, d, repeats=d.train_repeats),
          LongCtxSource(cfg.train.train_len, d.num_eval, d.seed + 1, d, repeats=d.train_repeats))


@dataclasses.dataclass
class Trained:
  """A trained model: the NNX module, its folder, the evaluation history and training seconds (0 when cached)."""

  model: TinyLM
  directory: pathlib.Path
  history: list[dict]
  train_seconds: float
  cached: bool


def load_or_train(cfg: LongCtxConfig, *, root: str | pathlib.Path | None = None, progress: bool = True,
                  interrupt_after: int | None = None) -> Trained:
  """The trained model of ``cfg``: restored from ``model_dir(cfg, root)`` if that training finished, else trained
  (or resumed) there. ``interrupt_after`` simulates a kill after that many steps (tests)."""
  from flax import nnx

  from experiments.common.metrics import MetricWriter
  from experiments.common.train import Trainer, fit

  out = model_dir(cfg, root)
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text(json.dumps(config_lib.to_dict(cfg), indent=1) + "\n")
  t = cfg.train
  trainer = Trainer(lambda rngs: build(cfg, rngs), loss_fn, eval_fn, total_steps=t.steps, settings=t)
  train_src, eval_src = sources(cfg)
  t0 = time.time()
  writer = MetricWriter(out / "metrics.jsonl", run=f"longctx-{cfg.name}")
  try:
    res = fit(trainer, lr=t.lr, seed=t.seed, train_source=train_src, eval_source=eval_src, batch_size=t.batch_size,
              eval_batch_size=t.eval_batch_size, eval_every=t.eval_every, checkpoint_dir=out / "checkpoints",
              writer=writer, log_every=t.log_every, interrupt_after=interrupt_after, progress=progress,
              desc=f"longctx {cfg.name}")
  finally:
    writer.close()
  cached = res.resumed_from is not None and res.resumed_from >= t.steps
  model = nnx.merge(trainer.graphdef, jax.tree.map(jnp.asarray, res.state.params))
  return Trained(model, out, res.history, 0.0 if cached else time.time() - t0, cached)


def main(argv=None) -> int:
  """``python -m experiments.longctx.train [--preset cpu]``: train (or resume, or load) the preset's model."""
  from configs.longctx import PRESETS
  p = config_lib.ArgumentParser(prog="python -m experiments.longctx.train", description=main.__doc__)
  p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  p.add_argument("--root", default=None, help="cache root (default runs/longctx)")
  args = p.parse_args(argv)
  cfg = PRESETS[args.preset]
  tr = load_or_train(cfg, root=args.root)
  print(f"{'cached' if tr.cached else 'trained'} model in {tr.directory}; last evaluation {tr.history[-1] if tr.history else {}}"
        f"; {tr.train_seconds:.0f} s")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
