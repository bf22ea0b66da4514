"""The needle-copy task and the tiny decoder of ``python -m experiments retrieval_heads``.

Task (:func:`needle_prompts`): ``bos, haystack..., mark, needle..., mark, haystack..., query`` (``P`` tokens) and
the answer ``needle`` (``K`` tokens). Needle tokens are distinct and occur nowhere else in the prompt, so there is
exactly one place to copy each answer token from (with decoys in the haystack the model did not learn to copy).

Model (:class:`Decoder`): token embedding, pre-norm blocks of causal :class:`jaxattn.nn.MultiHeadAttention` (RoPE,
biases on the q/k/v/o projections) and a GELU MLP, final LayerNorm, linear head. Training sequences are the prompt
followed by the answer; the loss covers only the answer tokens.

Generation (:func:`generate`) is the official detection loop's: prefill ``prompt[:-1]`` into the KV cache, then
feed ``prompt[-1]`` and greedily decode ``K`` tokens one at a time. Head masks (the paper's interventions) are
applied to the decode steps only, never to the prefill, as the official masking code does; the per-step attention
argmax of every (layer, head) is captured with :func:`jaxattn.analysis.capture` in absolute cache positions.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.retrieval_heads import RESERVED, ModelConfig, TaskConfig
from experiments.common.data import GeneratedSource
from jaxattn import analysis, masks
from jaxattn.nn import MultiHeadAttention

__all__ = ["BOS", "MARK", "QUERY", "needle_prompts", "NeedleSource", "Decoder", "loss_fn", "eval_fn", "generate",
           "attention_probs"]

BOS, MARK, QUERY = 0, 1, 2


def needle_prompts(n: int, task: TaskConfig, seed: int, exclude: frozenset = frozenset()) -> analysis.NeedleBatch:
  """``n`` prompts whose needles are unique in the prompt (numpy, deterministic by ``seed``).

  Args:
    n: number of prompts.
    task: lengths and vocabulary.
    seed: numpy seed.
    exclude: needles (tuples of ints) that must not be drawn (the training needles, for held-out sets).

  Returns:
    :class:`jaxattn.analysis.NeedleBatch`: ``tokens [n, P]``, ``answer [n, K]``, the needle span
    ``[needle_start, needle_end)`` and the depth.
  """
  P, K = task.length, task.needle_len
  rng = np.random.default_rng(seed)
  ordinary = np.arange(RESERVED, task.vocab)
  tokens = np.empty((n, P), np.int32)
  answer = np.empty((n, K), np.int32)
  depth = rng.uniform(0.0, 1.0, n)
  start = 1 + np.round(depth * (P - K - 4)).astype(np.int32)  # the opening mark
  for i in range(n):
    needle = rng.choice(ordinary, size=K, replace=False)
    while tuple(int(t) for t in needle) in exclude:
      needle = rng.choice(ordinary, size=K, replace=False)
    rest = np.setdiff1d(ordinary, needle, assume_unique=True)
    row = rng.choice(rest, size=P)
    s = start[i]
    row[0], row[-1] = BOS, QUERY
    row[s] = row[s + K + 1] = MARK
    row[s + 1:s + 1 + K] = needle
    tokens[i], answer[i] = row, needle
  return analysis.NeedleBatch(tokens=tokens, answer=answer, needle_start=(start + 1).astype(np.int32),
                              needle_end=(start + 1 + K).astype(np.int32), depth=depth)


class NeedleSource(GeneratedSource):
  """Grain source of ``tokens [P + K]`` (prompt then answer) records; ``split`` picks the seed stream."""

  PARAMS = ("length", "needle_len", "vocab", "size", "seed", "split")
  SPLITS = ("train", "detect", "test")

  def __init__(self, task: TaskConfig, split: str):
    if split not in self.SPLITS:
      raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
    self.task, self.split = task, split
    self.length, self.needle_len, self.vocab, self.seed = task.length, task.needle_len, task.vocab, task.seed
    self.size = {"train": task.train_size, "detect": task.detect_size, "test": task.test_size}[split]

  def batch(self) -> analysis.NeedleBatch:
    cache = self.__dict__.get("_batch")
    if cache is None:
      exclude = frozenset()
      if self.split != "train":  # held out by construction: no detection / test needle is a training needle
        train = NeedleSource(self.task, "train").batch()
        exclude = frozenset(tuple(int(t) for t in a) for a in train.answer)
      stream = self.SPLITS.index(self.split)
      cache = needle_prompts(self.size, self.task, seed=1000 * self.seed + stream, exclude=exclude)
      self.__dict__["_batch"] = cache
    return cache

  def generate(self):
    b = self.batch()
    return {"tokens": np.concatenate([b.tokens, b.answer], axis=1)}

  def __getstate__(self):
    state = super().__getstate__()
    state.pop("_batch", None)
    return state


class Block(nnx.Module):
  """Pre-norm residual block: causal RoPE attention, then a GELU MLP. ``x [B, T, d] -> [B, T, d]``."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.norm1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = MultiHeadAttention(cfg.num_heads, d, use_rope=True, mask=masks.Causal(), use_bias=cfg.use_bias,
                                   rngs=rngs)
    self.norm2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, cfg.mlp_ratio * d, rngs=rngs)
    self.down = nnx.Linear(cfg.mlp_ratio * d, d, rngs=rngs)

  def __call__(self, x, decode: bool = False):
    x = x + self.attn(self.norm1(x), decode=decode)
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class Decoder(nnx.Module):
  """Tiny causal LM: ``tokens [B, T] int -> logits [B, T, vocab]``."""

  def __init__(self, cfg: ModelConfig, vocab: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, cfg.d_model, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.head = nnx.Linear(cfg.d_model, vocab, rngs=rngs)

  def __call__(self, tokens, decode: bool = False):
    x = self.embed(tokens)
    for blk in self.blocks:
      x = blk(x, decode=decode)
    return self.head(self.norm(x))

  def init_cache(self, batch_size: int, max_length: int) -> None:
    """Empty KV caches of ``max_length`` positions in every attention layer."""
    for blk in self.blocks:
      blk.attn.init_cache(batch_size, max_length)


def _answer_logits(model, tokens, prompt_len: int):
  """Teacher-forced logits of the answer tokens: ``tokens [B, P + K] -> ([B, K, V], targets [B, K])``."""
  logits = model(tokens[:, :-1])  # position t predicts token t + 1
  return logits[:, prompt_len - 1:], tokens[:, prompt_len:]


def loss_fn(prompt_len: int):
  """``(model, batch, key) -> (loss, metrics)``: cross entropy on the answer tokens."""
  def fn(model, batch, key):
    del key
    logits, tgt = _answer_logits(model, batch["tokens"], prompt_len)
    ce = jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), tgt[..., None], -1))
    return ce, {"token_acc": jnp.mean(logits.argmax(-1) == tgt)}
  return fn


def eval_fn(prompt_len: int):
  """``(model, batch) -> sums``: loss, token accuracy and exact match of the teacher-forced answers (with every
  answer token right under teacher forcing, greedy decoding reproduces the needle exactly, and conversely)."""
  def fn(model, batch):
    logits, tgt = _answer_logits(model, batch["tokens"], prompt_len)
    valid = batch["valid"].astype(jnp.float32)  # [B]
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), tgt[..., None], -1)[..., 0]
    right = logits.argmax(-1) == tgt  # [B, K]
    return {"loss": jnp.sum(ce.mean(-1) * valid), "token_acc": jnp.sum(right.mean(-1) * valid),
            "exact": jnp.sum(right.all(-1) * valid), "count": jnp.sum(valid)}
  return fn


@nnx.jit
def _prefill(model, tokens):
  model(tokens, decode=True)


def _step(model, tok):
  """One decode step: ``tok [B] -> next token [B]`` (greedy)."""
  return model(tok[:, None], decode=True)[:, -1].argmax(-1).astype(jnp.int32)


_step_jit = nnx.jit(_step)


def generate(model: Decoder, prompt, steps: int, *, head_mask: analysis.HeadMask | None = None,
             capture_argmax: bool = False):
  """Greedy decoding after the prompt, the official loop's way (module docstring).

  Args:
    model: the decoder.
    prompt: ``[N, P]`` int prompts.
    steps: tokens to generate.
    head_mask: heads masked during the decode steps (the prefill is never masked).
    capture_argmax: also return every step's attention argmax.

  Returns:
    ``generated [N, steps]`` int32 and, with ``capture_argmax``, ``argmax [N, steps, L, H]`` (absolute positions:
    the key each (layer, head) attends most from the query that produces ``generated[:, t]``), else None.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  N, P = prompt.shape
  model.init_cache(N, P + steps)
  _prefill(model, prompt[:, :-1])
  tok = prompt[:, -1]
  out, records = [], []
  with contextlib.ExitStack() as stack:
    if head_mask is not None and head_mask.heads:
      stack.enter_context(analysis.intervene(model, head_mask=head_mask))
    step = _step_jit
    if capture_argmax:
      rec = stack.enter_context(analysis.capture(model, stats=("argmax",)))
      step = nnx.jit(rec.wrap(_step))
    for _ in range(steps):
      res = step(model, tok)
      if capture_argmax:
        res, r = res
        records.append(r)
      tok = res
      out.append(np.asarray(tok))
  generated = np.stack(out, 1)
  if not capture_argmax:
    return generated, None
  # one Records per step, each with one call per layer: [N, steps, L, H]
  am = np.stack([np.stack([np.asarray(r.calls(p)[0]["argmax"])[:, :, -1] for p in r.paths], 1) for r in records],
                1)
  return generated, am


def attention_probs(model: Decoder, tokens, layer: int) -> np.ndarray:
  """Attention probabilities of one layer on full sequences: ``tokens [B, T] -> [B, H, T, T]`` (numpy)."""
  with analysis.capture(model, stats=("probs",), layers=[layer]) as rec:
    model(jnp.asarray(tokens, jnp.int32))
  return np.asarray(rec[layer]["probs"])
