"""The MQAR training task: model construction from the config, loss and accuracy.

Only labelled positions enter the loss and the metric (Zoology's cross-entropy with ``ignore_index=-100`` and
``accuracy = mean(pred == label)`` over labelled tokens). Every MQAR example has exactly ``D`` labels, so the
hidden states are gathered at those ``D`` positions before the tied head: the ``[B, N, V]`` logits are never formed
(``N / D`` times less head work), which changes nothing in the loss or the accuracy.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import optax
from flax import nnx

from configs.mqar import ModelConfig, Task
from experiments.data.mqar import IGNORE_INDEX
from experiments.mqar.zoology import ZooLM

__all__ = ["build_model", "labelled", "loss_fn", "eval_fn"]


def build_model(m: ModelConfig, vocab_size: int, task: Task, mixer: str, d_model: int, rngs: nnx.Rngs) -> ZooLM:
  """The scaffold for one run."""
  return ZooLM(vocab_size, d_model, task.seq_len, mixer, num_layers=m.num_layers,
               embed_dropout=m.embed_dropout, init_std=m.init_std, num_heads=m.num_heads, window=m.window,
               short_kernel=m.short_kernel, feature_dim=m.feature_dim, selection_penalty=m.selection_penalty,
               use_rope=m.rope, rngs=rngs)


def labelled(model: ZooLM, batch, num_labels: int, *, train: bool, key=None):
  """Logits and targets at the first ``num_labels`` labelled positions of each example.

  Returns:
    ``(logits [B, K, V] f32, targets [B, K], valid [B, K] bool, aux_loss)``.
  """
  h, aux = model.hidden(batch["inputs"], train=train, dropout_key=key)  # [B, N, D]
  labels = batch["labels"]  # [B, N]
  pos = jnp.argsort(labels == IGNORE_INDEX, axis=1, stable=True)[:, :num_labels]  # labelled positions first
  targets = jnp.take_along_axis(labels, pos, axis=1)  # [B, K]
  valid = targets != IGNORE_INDEX
  logits = model.logits(jnp.take_along_axis(h, pos[..., None], axis=1)).astype(jnp.float32)  # [B, K, V]
  return logits, jnp.where(valid, targets, 0), valid, aux


def loss_fn(model: ZooLM, batch, key, *, num_labels: int):
  """Mean cross-entropy over labelled positions plus the mixers' auxiliary losses (training mode)."""
  logits, targets, valid, aux = labelled(model, batch, num_labels, train=True, key=key)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, K]
  n = jnp.maximum(jnp.sum(valid), 1)
  ce_mean = jnp.sum(jnp.where(valid, ce, 0.0)) / n
  acc = jnp.sum((jnp.argmax(logits, -1) == targets) & valid) / n
  return ce_mean + aux, {"ce": ce_mean, "aux": aux, "accuracy": acc}


def eval_fn(model: ZooLM, batch, *, num_labels: int):
  """Sums over the batch (evaluation mode): labelled tokens, correct predictions, cross-entropy."""
  logits, targets, valid, _ = labelled(model, batch, num_labels, train=False)
  valid = valid & batch["valid"][:, None]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets) & valid
  return {"count": jnp.sum(valid).astype(jnp.float32), "accuracy": jnp.sum(correct).astype(jnp.float32),
          "loss": jnp.sum(jnp.where(valid, ce, 0.0))}


def task_fns(task: Task):
  """``(loss_fn, eval_fn)`` bound to the task's label count."""
  return (functools.partial(loss_fn, num_labels=task.num_kv_pairs),
          functools.partial(eval_fn, num_labels=task.num_kv_pairs))
