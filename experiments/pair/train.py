"""A pure-function training loop for the pair experiments, with exact resume.

The pair recipes (contrastive fine-tuning, DSE distillation, causal LM pre-training) draw each batch as a pure
function of ``(seed, step)`` (``batch_fn``), so a run needs no data-iterator state: a checkpoint is the step, the
parameters and the optimizer state, written as one ``.npz`` (through a temporary file and an atomic rename) every
``ckpt_every`` steps and at the end. Restarting with the same arguments continues from the newest checkpoint and
ends with the same parameters, bit for bit, as an uninterrupted run (tests check it); a finished run returns at
once. The optimizer is AdamW on a warmup-cosine schedule (``configs.common.AdamWConfig``'s fields).

- :func:`train` — the loop (``loss_fn(model, batch, key) -> (loss, metrics)``).
- :func:`save_params` / :func:`load_params` — a trained model's parameters as ``.npz`` (reused across stages).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from experiments.common.errors import NonFiniteError
from experiments.common.train import Interrupted

__all__ = ["LoopResult", "train", "save_params", "load_params", "optimizer", "Interrupted"]


def optimizer(settings, total_steps: int) -> optax.GradientTransformation:
  """``clip -> adamw(peak lr * warmup-cosine)`` from an ``AdamWConfig``-like ``settings``."""
  sched = optax.warmup_cosine_decay_schedule(0.0, settings.lr, min(settings.warmup_steps, total_steps - 1),
                                             max(total_steps, settings.warmup_steps + 1))
  tx = optax.adamw(sched, b1=settings.b1, b2=settings.b2, eps=settings.eps, weight_decay=settings.weight_decay)
  return optax.chain(optax.clip_by_global_norm(settings.grad_clip), tx) if settings.grad_clip else tx


@dataclasses.dataclass
class LoopResult:
  """``model`` (trained), ``history`` (logged rows), ``steps`` done, ``resumed_from`` (None: from scratch)."""

  model: nnx.Module
  history: list
  steps: int
  resumed_from: int | None


def _save(path: pathlib.Path, step: int, tree, history) -> None:
  leaves = jax.tree.leaves(tree)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez(tmp, __step__=np.asarray(step), __history__=np.asarray(repr(history)),
           **{f"l{i}": np.asarray(x) for i, x in enumerate(leaves)})
  os.replace(tmp, path)


def _load(path: pathlib.Path, template):
  with np.load(path) as z:
    leaves, treedef = jax.tree.flatten(template)
    got = [z[f"l{i}"] for i in range(len(leaves))]
    for i, (a, b) in enumerate(zip(leaves, got)):
      if np.shape(a) != b.shape:
        raise ValueError(f"checkpoint {path} does not match the model (leaf {i}: {b.shape} != {np.shape(a)}); "
                         f"delete it or choose another --out")
    import ast
    return int(z["__step__"]), jax.tree.unflatten(treedef, [jnp.asarray(x) for x in got]), \
        ast.literal_eval(str(z["__history__"]))


def save_params(path, model: nnx.Module) -> None:
  """Writes the model's ``nnx.Param`` leaves to ``path`` (``.npz``, atomic)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  _save(path, 0, nnx.state(model, nnx.Param), [])


def load_params(path, model: nnx.Module) -> nnx.Module:
  """Loads :func:`save_params`' file into ``model`` (same architecture) and returns it."""
  _, params, _ = _load(pathlib.Path(path), nnx.state(model, nnx.Param))
  nnx.update(model, params)
  return model


def train(model_fn: Callable[[nnx.Rngs], nnx.Module], loss_fn, batch_fn: Callable[[int], Mapping[str, np.ndarray]],
          *, steps: int, settings, seed: int = 0, ckpt_path=None, ckpt_every: int | None = None, log_every: int = 50,
          writer=None, progress: bool = True, desc: str = "", interrupt_after: int | None = None,
          init_model: nnx.Module | None = None) -> LoopResult:
  """Trains ``model_fn(nnx.Rngs(seed))`` (or ``init_model``) for ``steps`` steps of ``batch_fn(step)``.

  Args:
    model_fn: builds the model; loss_fn: ``(model, batch, key) -> (loss, metrics dict)``.
    batch_fn: ``step -> batch`` (deterministic: resume replays exactly).
    steps, settings, seed: length, optimizer settings (``AdamWConfig``), init / dropout seed.
    ckpt_path: ``.npz`` checkpoint (None: none); ckpt_every: its interval (None: a quarter of ``steps``, at
      most 200, so a kill loses at most that much of a short run too).
    log_every, writer: training rows every ``log_every`` steps to ``writer`` (a ``MetricWriter``) and history.
    interrupt_after: raise :class:`Interrupted` after this many steps of this call (tests simulate a kill).
    init_model: start from this model instead of a fresh one (e.g. a pre-trained backbone inside a new head).

  Raises:
    NonFiniteError: a non-finite loss (the step is named; nothing after it is saved).
  """
  model = init_model if init_model is not None else model_fn(nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optimizer(settings, steps)
  opt_state = tx.init(params)
  start, history, resumed = 0, [], None
  path = None if ckpt_path is None else pathlib.Path(ckpt_path)
  if path is not None and path.exists():
    start, (params, opt_state), history = _load(path, (params, opt_state))
    resumed = start
    if start < steps:
      print(f"{desc + ': ' if desc else ''}resumed from step {start} of {steps}", flush=True)
  ckpt_every = ckpt_every or max(1, min(200, steps // 4))
  base_key = jax.random.key(seed + 1)

  @jax.jit
  def step_fn(params, opt_state, batch, step):
    def lf(p):
      return loss_fn(nnx.merge(graphdef, p, rest), batch, jax.random.fold_in(base_key, step))
    (loss, metrics), grads = jax.value_and_grad(lf, has_aux=True)(params)
    upd, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, dict(metrics, loss=loss)

  bar = tqdm(total=steps, initial=start, desc=desc, disable=not progress or start >= steps, leave=False,
             dynamic_ncols=True)
  n = 0
  for step in range(start, steps):
    params, opt_state, metrics = step_fn(params, opt_state, batch_fn(step), step)
    n += 1
    bar.update(1)
    done = step + 1
    if done % log_every == 0 or done == steps:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(m["loss"]):
        raise NonFiniteError(f"{desc}: non-finite loss at step {done} of {steps}", step=done, loss=m["loss"])
      history.append({"step": done, **m})
      bar.set_postfix(loss=f"{m['loss']:.3f}")
      if writer is not None:
        writer.write(done, {f"{desc}/{k}": v for k, v in m.items()})
    if path is not None and (done % ckpt_every == 0 or done == steps):
      _save(path, done, (params, opt_state), history)
    if interrupt_after is not None and n >= interrupt_after and done < steps:
      bar.close()
      raise Interrupted(done)
  bar.close()
  return LoopResult(nnx.merge(graphdef, params, rest), history, steps, resumed)
