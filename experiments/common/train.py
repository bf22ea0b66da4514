r"""Training loop for Flax NNX models: jitted train/eval steps, AdamW with a cosine schedule, Orbax checkpoints
that make a killed run resume bit-exactly, JSONL/TensorBoard metrics and a tqdm bar.

Pieces:

- :func:`adamw_cosine`: ``optax.adamw`` on a unit warmup-cosine schedule, followed by a scale held in the optimizer
  state (the peak learning rate), so one compiled step serves every learning rate of a sweep:
  :math:`\Delta\theta_t = -\eta\, c(t)\,(\hat m_t / (\sqrt{\hat v_t} + \epsilon) + \lambda \theta_t)`, with ``c`` a
  cosine from 1 to 0 over the run (after an optional linear warmup).
- :class:`Trainer`: built once per model architecture; ``init_state(seed, lr)``, ``train_step`` and ``evaluate``.
  The model lives as ``(graphdef, params)``: parameters are a plain nested dict (``nnx.to_pure_dict``) so they
  checkpoint as an ordinary pytree.
- :func:`fit`: the loop. Dropout keys are ``fold_in(run key, step)`` and batches come from a Grain iterator whose
  position is checkpointed with the parameters and optimizer state, so after a kill the restarted command replays
  exactly the steps that were lost and ends with the same parameters, bit for bit, as an uninterrupted run.

What :func:`fit` guarantees about what it records:

- it resumes only from a checkpoint that reads back, matches its stored digest and holds finite values; a damaged
  newest step is reported (:class:`~experiments.common.errors.CheckpointWarning`) and the previous one is used; with
  none usable it trains from scratch, with a warning. Resuming prints ``resumed from step N of M``;
- a non-finite loss or non-finite parameters stop training with
  :class:`~experiments.common.errors.NonFiniteError` naming the step: nothing computed after it is evaluated or
  checkpointed, so the run is never recorded as finished. The check costs no extra device sync per step: each
  step returns a finiteness flag that is read at the next log, evaluation or checkpoint (at least every
  :data:`FINITE_CHECK_EVERY` steps).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from experiments.common import data as data_lib
from experiments.common.checkpoint import Checkpointer
from experiments.common.errors import CheckpointWarning, NonFiniteError
from experiments.common.metrics import MetricWriter

__all__ = ["TrainSettings", "TrainState", "adamw_cosine", "set_peak_lr", "Trainer", "FitResult", "Interrupted",
           "NonFiniteError", "fit", "all_finite", "nonfinite_leaves"]

FINITE_CHECK_EVERY = 64  # fit reads the per-step finiteness flags at least this often (one device sync)


def all_finite(tree) -> jax.Array:
  """Traceable: a bool scalar, True when every floating-point leaf of ``tree`` is finite."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def nonfinite_leaves(tree) -> list[str]:
  """Host-side: the key paths of the floating-point leaves of ``tree`` holding a NaN or an infinity."""
  bad = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.asarray(jax.device_get(x))
    if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
      bad.append(jax.tree_util.keystr(path))
  return bad


class TrainSettings(Protocol):
  """The optimizer fields :class:`Trainer` reads (a frozen dataclass in ``configs/`` provides them)."""

  weight_decay: float
  b1: float
  b2: float
  eps: float
  warmup_steps: int
  grad_clip: float | None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything a step reads and writes: ``step`` (int32), ``params`` (pure dict), ``opt_state``, ``rng``
  (raw uint32[2] key; dropout uses ``fold_in(rng, step)``)."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


class PeakLRState(NamedTuple):
  lr: jax.Array  # f32 scalar


def _scale_by_peak_lr() -> optax.GradientTransformation:
  """Multiplies updates by the ``lr`` stored in its state (set with :func:`set_peak_lr`)."""

  def init(params):
    del params
    return PeakLRState(jnp.ones((), jnp.float32))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: u * state.lr.astype(u.dtype), updates), state

  return optax.GradientTransformation(init, update)


def unit_schedule(total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """Linear warmup from 0 to 1 over ``warmup_steps``, then a cosine from 1 to 0 at ``total_steps``."""
  if warmup_steps:
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps, max(total_steps, warmup_steps + 1))
  return optax.cosine_decay_schedule(1.0, max(total_steps, 1))


def adamw_cosine(total_steps: int, settings: TrainSettings) -> optax.GradientTransformation:
  """AdamW with a cosine schedule whose peak learning rate lives in the state (:func:`set_peak_lr`).

  ``[clip_by_global_norm(grad_clip)] -> adamw(unit cosine, b1, b2, eps, weight_decay) -> scale by peak lr``; this
  equals ``optax.adamw(peak * cosine)`` exactly (the weight-decay term is inside the scaled update in both).
  """
  tx = optax.adamw(unit_schedule(total_steps, settings.warmup_steps), b1=settings.b1, b2=settings.b2,
                   eps=settings.eps, weight_decay=settings.weight_decay)
  parts = [tx, _scale_by_peak_lr()]
  if settings.grad_clip is not None:
    parts.insert(0, optax.clip_by_global_norm(settings.grad_clip))
  return optax.chain(*parts)


def set_peak_lr(opt_state, lr: float):
  """``opt_state`` of :func:`adamw_cosine` with the peak learning rate set to ``lr``."""
  return tuple(opt_state[:-1]) + (PeakLRState(jnp.asarray(lr, jnp.float32)),)


LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]
EvalFn = Callable[[nnx.Module, Mapping[str, jax.Array]], dict]


class Trainer:
  """Jitted steps for one model architecture, reused across runs (learning rates, seeds) without recompiling.

  Args:
    model_fn: ``rngs -> nnx.Module``; the architecture must not depend on the rngs.
    loss_fn: ``(model, batch, dropout_key) -> (loss, metrics)`` in training mode; ``metrics`` a dict of scalars.
    eval_fn: ``(model, batch) -> sums``: a dict of scalar sums over the batch plus ``"count"``; :meth:`evaluate`
      returns every sum divided by the total count.
    total_steps: length of the schedule.
    settings: optimizer fields (:class:`TrainSettings`).

  ``train_step(state, batch) -> (state, metrics)`` returns ``loss_fn``'s metrics plus ``loss``, ``lr``,
  ``grad_norm`` and ``finite`` (bool: the loss and every updated parameter are finite; :func:`fit` reads it).
  """

  def __init__(self, model_fn: Callable[[nnx.Rngs], nnx.Module], loss_fn: LossFn, eval_fn: EvalFn, *,
               total_steps: int, settings: TrainSettings):
    if not isinstance(total_steps, int) or total_steps < 1:
      raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    self.model_fn = model_fn
    self.total_steps = total_steps
    self.tx = adamw_cosine(total_steps, settings)
    self.schedule = unit_schedule(total_steps, settings.warmup_steps)
    self.graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))))
    graphdef, tx, schedule = self.graphdef, self.tx, self.schedule

    def loss(params, batch, key):
      return loss_fn(nnx.merge(graphdef, params), batch, key)

    def train_step(state: TrainState, batch):
      key = jax.random.fold_in(state.rng, state.step)
      (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, batch, key)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics = dict(metrics, loss=value, lr=opt_state[-1].lr * schedule(state.step),
                     grad_norm=optax.tree.norm(grads), finite=jnp.isfinite(value) & all_finite(params))
      return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    def eval_step(params, batch):
      return eval_fn(nnx.merge(graphdef, params), batch)

    def init_params(key):
      return nnx.to_pure_dict(nnx.state(model_fn(nnx.Rngs(params=key))))

    self.train_step = jax.jit(train_step)
    self.eval_step = jax.jit(eval_step)
    self._init_params = jax.jit(init_params)  # one trace per architecture; eager NNX init is slow op by op

  def init_state(self, seed: int, lr: float) -> TrainState:
    """Fresh parameters from ``seed`` and an optimizer state with peak learning rate ``lr``."""
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
      raise ValueError(f"learning rate must be a positive finite float, got {lr!r}")
    key = jax.random.PRNGKey(seed)
    params = self._init_params(jax.random.fold_in(key, 0))
    opt_state = set_peak_lr(self.tx.init(params), lr)
    return TrainState(jnp.zeros((), jnp.int32), params, opt_state, jax.random.fold_in(key, 1))

  def model(self, params) -> nnx.Module:
    """The NNX module holding ``params``."""
    return nnx.merge(self.graphdef, params)

  def evaluate(self, params, source, batch_size: int, pad_values: Mapping[str, int] | None = None) -> dict:
    """Runs ``eval_fn`` over the whole source; every returned sum divided by the summed ``count``."""
    totals = None
    for batch in data_lib.eval_batches(source, batch_size, pad_values):
      sums = self.eval_step(params, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    count = totals.pop("count")
    return {k: v / max(count, 1.0) for k, v in totals.items()}


class Interrupted(RuntimeError):
  """Raised by :func:`fit` after ``interrupt_after`` steps (a simulated kill: nothing is saved at that point)."""

  def __init__(self, step: int):
    super().__init__(f"interrupted after step {step}")
    self.step = step


@dataclasses.dataclass
class FitResult:
  """What :func:`fit` returns.

  Attributes:
    state: the final train state.
    history: one dict per evaluation (``step`` plus the eval metrics), across restarts.
    final: the last evaluation.
    stopped_early: the early-stopping criterion fired.
    steps: optimizer steps done in total.
    wall_s: seconds spent in this call (compilation included).
    resumed_from: the checkpoint step this call started from (None: from scratch).
  """

  state: TrainState
  history: list[dict]
  final: dict
  stopped_early: bool
  steps: int
  wall_s: float
  resumed_from: int | None


def fit(trainer: Trainer, *, lr: float, seed: int, train_source, eval_source, batch_size: int,
        eval_batch_size: int, eval_every: int, checkpoint_dir=None, checkpoint_every: int | None = None,
        early_stop: tuple[str, float] | None = None, writer: MetricWriter | None = None, log_every: int = 50,
        pad_values: Mapping[str, int] | None = None, interrupt_after: int | None = None, progress: bool = True,
        desc: str = "", announce: bool = True) -> FitResult:
  """Trains for ``trainer.total_steps`` steps (or until early stopping), resuming from ``checkpoint_dir``.

  Every ``eval_every`` steps (and at the end) the model is evaluated on ``eval_source``; every
  ``checkpoint_every`` steps (default: at each evaluation), at early stopping and at the end, the state, the data
  iterator and the evaluation history are checkpointed. Calling ``fit`` again with the same arguments after a
  kill resumes from the newest usable checkpoint (printing ``resumed from step N of M``); calling it after the run
  finished returns the stored result at once. A corrupt or truncated newest checkpoint is moved aside with a
  :class:`~experiments.common.errors.CheckpointWarning` and the previous one is used (none usable: a warning, then
  training from scratch).

  Args:
    trainer: the compiled steps.
    lr, seed: peak learning rate; seed of the initial parameters, dropout and data order.
    train_source, eval_source: Grain random-access sources.
    batch_size, eval_batch_size: batch sizes.
    eval_every: evaluation interval in steps.
    checkpoint_dir: Orbax directory, or None for no checkpoints.
    checkpoint_every: checkpoint interval (default ``eval_every``).
    early_stop: ``(metric, threshold)``: stop once an evaluation has ``metric > threshold``.
    writer: metric writer (train rows every ``log_every`` steps, one row per evaluation).
    log_every: training-metric interval (0: never).
    pad_values: padding values for the last evaluation batch (e.g. ``{"labels": -100}``).
    interrupt_after: raise :class:`Interrupted` after this many steps of this call (tests use it to simulate a
      kill; nothing is saved at that point, so progress since the last checkpoint is lost, as in a real kill).
    progress: show a tqdm bar.
    desc: the bar's label (also prefixes the resume message).
    announce: print ``resumed from step N of M`` when resuming.

  Raises:
    NonFiniteError: a step produced a non-finite loss or non-finite parameters (the message names the step). No
      evaluation or checkpoint of that step or later is written, so the run is not recorded as finished; the
      checkpoints before it stay.
  """
  for name, v in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("eval_every", eval_every)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  checkpoint_every = checkpoint_every or eval_every
  t_start = time.time()
  total = trainer.total_steps
  data_iter = data_lib.train_iterator(train_source, batch_size=batch_size, seed=seed)
  state = trainer.init_state(seed, lr)
  history: list[dict] = []
  done = False
  resumed_from = None
  label = f"{desc}: " if desc else ""
  ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir is not None else None
  pending: list[tuple[int, jax.Array, jax.Array]] = []  # (step, finite flag, loss) not yet read back

  def check_finite():
    """Raises NonFiniteError for the first pending step whose loss or parameters are not finite."""
    if not pending:
      return
    flags, losses = jax.device_get(([f for _, f, _ in pending], [loss for _, _, loss in pending]))
    for (s, _, _), ok, loss in zip(pending, flags, losses):
      if not bool(ok):
        what = "loss" if not math.isfinite(float(loss)) else "parameters (the loss was finite)"
        last = ckpt.latest_step() if ckpt is not None else None
        kept = (f"checkpoints up to step {last} in {ckpt.directory} are kept" if last is not None
                else "no checkpoint was written")
        raise NonFiniteError(f"{label}non-finite {what} at step {s} of {total} (loss {float(loss)}, peak lr {lr:g}); "
                             f"training stopped and the run is not recorded as finished; {kept}",
                             step=s, loss=float(loss))
    pending.clear()

  def restored_is_finite(st) -> str | None:
    bad = nonfinite_leaves(st)
    return f"it holds non-finite values ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})" if bad else None

  try:
    if ckpt is not None and ckpt.all_steps():
      restored = ckpt.restore_latest(state, data_iter, validate=restored_is_finite)
      if restored is None:
        warnings.warn(f"{label}no usable checkpoint in {ckpt.directory}: training from scratch", CheckpointWarning,
                      stacklevel=2)
      else:
        resumed_from, state = restored.step, restored.state
        history = list(restored.meta.get("history", []))
        done = bool(restored.meta.get("done", False))
        if announce:
          print(f"{label}resumed from step {restored.step} of {total}", flush=True)
    step = int(state.step)
    stopped_early = bool(history and early_stop and history[-1].get(early_stop[0], -math.inf) > early_stop[1])
    done = done or step >= total or stopped_early
    bar = tqdm(total=total, initial=step, desc=desc, disable=not progress or done, leave=False, dynamic_ncols=True)
    n_this_call = 0
    while not done:
      batch = next(data_iter)
      state, metrics = trainer.train_step(state, batch)
      step += 1
      n_this_call += 1
      pending.append((step, metrics.pop("finite"), metrics["loss"]))
      bar.update(1)
      is_eval = step % eval_every == 0 or step == total
      is_log = bool(log_every) and step % log_every == 0
      if is_eval or is_log or len(pending) >= FINITE_CHECK_EVERY or step % checkpoint_every == 0:
        check_finite()  # before anything of this step is logged, evaluated or saved
      if is_log:
        metrics = jax.device_get(metrics)
        bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
        if writer is not None:
          writer.write(step, {f"train/{k}": v for k, v in metrics.items()})
      if is_eval:
        ev = trainer.evaluate(state.params, eval_source, eval_batch_size, pad_values)
        history.append({"step": step, **ev})
        if writer is not None:
          writer.write(step, {f"eval/{k}": v for k, v in ev.items()})
        if early_stop is not None and ev.get(early_stop[0], -math.inf) > early_stop[1]:
          stopped_early = True
        done = stopped_early or step >= total
      if ckpt is not None and (step % checkpoint_every == 0 or done):
        check_finite()
        ckpt.save(step, state, data_iter, meta={"history": history, "done": done})
      if interrupt_after is not None and n_this_call >= interrupt_after and not done:
        raise Interrupted(step)
    check_finite()
    bar.close()
  finally:
    if ckpt is not None:
      ckpt.close()
  final = dict(history[-1]) if history else {}
  return FitResult(state, history, final, stopped_early, int(state.step), time.time() - t_start, resumed_from)


def tree_equal(a, b) -> bool:
  """Bitwise equality of two pytrees of arrays (same structure, shapes, dtypes and bytes)."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  if ta != tb:
    return False
  return all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(la, lb))
