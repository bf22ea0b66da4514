"""Presets of the tiny long-context LM (:mod:`experiments.longctx`): its synthetic task mixture, the decoder and
its training. The experiments that reuse the trained model (``sparse_frontier``, ``recycled``) name one of these.

- ``cpu``: a 4-layer d=128 decoder (4 heads of 32, RoPE, MLP ratio 2) trained at ``train_len = 512`` tokens
  (800 steps x 8) on the mixture of needle-in-a-haystack (single and multi-key), MQAR, variable tracking and
  chain-of-key; the experiments evaluate it at N = 256 and 2N = 512 (inside the training length: RoPE does not
  extrapolate). The issue asks for N = 1-2K on CPU: one training step at 1024 x 8 took 5.8 CPU-seconds (~10 s wall
  on the shared 2-core machine), so 1K-token training does not fit ~15 minutes; N = 256 / 2N = 512 is the CPU
  trade (measured: 1.9 CPU-seconds per step at 512 x 8).
- ``gpu``: the same decoder trained at 4096 (N = 2048, 2N = 4096), longer.
- ``smoke``: seconds; a 1-layer d=32 model at 128 tokens (tests).
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["TASKS", "DataConfig", "ModelConfig", "TrainConfig", "LongCtxConfig", "PRESETS", "get_config"]

TASKS: tuple[str, ...] = ("niah_single", "niah_multi", "mqar", "vt", "cok")


def _pos_int(owner: str, name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


def _float_in(owner: str, name: str, value, lo: float, hi: float) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if not (ok and lo <= value <= hi):
    raise ValueError(f"{owner}.{name} must be a float in [{lo:g}, {hi:g}], got {value!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The task mixture (:mod:`experiments.longctx.tasks`).

  Attributes:
    tasks: task names (a subset of :data:`TASKS`), drawn uniformly per record.
    query_len: tokens of the query segment at the end of every sequence (the part decoded in the experiments).
    niah_needles: key-value needles of the multi-key haystack (one is asked).
    mqar_pairs, mqar_queries: key-value pairs in the context / asked in the query segment.
    vt_hops, vt_chains: variable-tracking chain length (answers) and chains (one asked, the rest distractors).
    cok_keys, cok_hops: keys of the chain-of-key permutation and successors asked.
    train_repeats: statements repeated later in each training (and training-length evaluation) sequence, their
      second ``b`` an answer: dense signal for the one retrieval hop every task needs (a 4-layer model trained only
      on the query answers was still at chance after 125 steps x 8 at 512 tokens). The sparse_frontier / recycled
      evaluation sequences have no repeats.
    repeat_as_query: write the repeats as questions ``Q a b`` (the query segment's form) rather than as statements
      ``S a b``. Measured on the ``cpu`` preset (800 steps): with ``S a b`` repeats the model answered the repeats
      (0.17 accuracy on training-length evaluation) but not the query segment (0.04 dense accuracy at N = 256).
    num_train, num_eval: records (training records are drawn once; an epoch never repeats within the presets).
    seed: data seed (evaluation data uses ``seed + 1``).
  """

  tasks: tuple[str, ...] = TASKS
  query_len: int = 16
  niah_needles: int = 8
  mqar_pairs: int = 16
  mqar_queries: int = 5
  vt_hops: int = 4
  vt_chains: int = 3
  cok_keys: int = 96
  cok_hops: int = 8
  train_repeats: int = 32
  repeat_as_query: bool = True
  num_train: int = 8192
  num_eval: int = 128
  seed: int = 0

  def __post_init__(self):
    if not isinstance(self.tasks, tuple) or not self.tasks or any(t not in TASKS for t in self.tasks):
      raise ValueError(f"data.tasks must be a non-empty tuple of {TASKS}, got {self.tasks!r}")
    if not isinstance(self.train_repeats, int) or self.train_repeats < 0:
      raise ValueError(f"data.train_repeats must be a non-negative int, got {self.train_repeats!r}")
    for f in ("query_len", "niah_needles", "mqar_pairs", "mqar_queries", "vt_hops", "vt_chains", "cok_keys",
              "cok_hops", "num_train", "num_eval"):
      _pos_int("data", f, getattr(self, f))
    if 3 * self.mqar_queries > self.query_len or self.vt_hops + 2 > self.query_len \
        or self.cok_hops + 2 > self.query_len:
      raise ValueError(f"data.query_len={self.query_len} cannot hold the query segments (3 * mqar_queries, "
                       f"vt_hops + 2, cok_hops + 2)")
    if self.mqar_queries > self.mqar_pairs:
      raise ValueError(f"data.mqar_queries={self.mqar_queries} exceeds mqar_pairs={self.mqar_pairs}")
    if self.cok_keys < self.cok_hops + 1:
      raise ValueError(f"data.cok_keys={self.cok_keys} must exceed cok_hops={self.cok_hops}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Pre-norm decoder: embedding, ``num_layers`` x (RMSNorm, :class:`jaxattn.nn.MultiHeadAttention` with RoPE,
  RMSNorm, GELU MLP), RMSNorm, output projection."""

  num_layers: int = 4
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int = 4
  mlp_ratio: int = 4

  def __post_init__(self):
    for f in ("num_layers", "d_model", "num_heads", "num_kv_heads", "mlp_ratio"):
      _pos_int("model", f, getattr(self, f))
    if self.d_model % self.num_heads or self.num_heads % self.num_kv_heads:
      raise ValueError(f"model: d_model={self.d_model} must be a multiple of num_heads={self.num_heads}, and "
                       f"num_heads a multiple of num_kv_heads={self.num_kv_heads}")
    if (self.d_model // self.num_heads) % 2:
      raise ValueError(f"model: head_dim {self.d_model // self.num_heads} must be even (RoPE)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """AdamW (warmup + cosine, :func:`experiments.common.train.adamw_cosine`), loss on answer tokens only.

  Attributes:
    train_len: training sequence length.
    batch_size, steps, lr: batch, optimizer steps, peak learning rate.
    eval_every, log_every: evaluation / logging intervals (steps); checkpoints at each evaluation.
    weight_decay, b1, b2, eps, warmup_steps, grad_clip: optimizer settings.
    seed: parameter and data-order seed.
  """

  train_len: int = 1024
  batch_size: int = 8
  steps: int = 600
  lr: float = 2e-3
  eval_every: int = 100
  log_every: int = 25
  eval_batch_size: int = 32
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-8
  warmup_steps: int = 50
  grad_clip: float | None = 1.0
  seed: int = 0

  def __post_init__(self):
    for f in ("train_len", "batch_size", "steps", "eval_every", "log_every", "eval_batch_size"):
      _pos_int("train", f, getattr(self, f))
    _float_in("train", "lr", self.lr, 1e-7, 1.0)
    if self.train_len % 16:
      raise ValueError(f"train.train_len={self.train_len} must be a multiple of 16 (Quest pages, prefill blocks)")


@dataclasses.dataclass(frozen=True)
class LongCtxConfig:
  """One trained model: data, architecture, training. ``fingerprint`` of it names its cache folder."""

  name: str
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()

  def __post_init__(self):
    if self.train.train_len < 8 * self.data.query_len:
      raise ValueError(f"train.train_len={self.train.train_len} is too short for query_len={self.data.query_len} "
                       f"(need >= 8x)")


PRESETS: dict[str, LongCtxConfig] = {
    "cpu": LongCtxConfig("cpu", data=DataConfig(cok_keys=48, num_train=4096, num_eval=64),
                         model=ModelConfig(mlp_ratio=2),
                         train=TrainConfig(train_len=512, batch_size=8, steps=800, lr=2e-3, eval_every=100)),
    "gpu": LongCtxConfig("gpu", data=DataConfig(num_train=65536, cok_keys=128),
                         train=TrainConfig(train_len=4096, batch_size=16, steps=4000, lr=1e-3, eval_every=500)),
    "smoke": LongCtxConfig("smoke", data=DataConfig(niah_needles=2, mqar_pairs=4, mqar_queries=2, vt_hops=2,
                                                    vt_chains=2, cok_keys=8, cok_hops=3, train_repeats=2, num_train=64, num_eval=8,
                                                    query_len=8),
                           model=ModelConfig(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, mlp_ratio=2),
                           train=TrainConfig(train_len=128, batch_size=4, steps=4, eval_every=2, log_every=2,
                                             eval_batch_size=8, warmup_steps=1)),
}


def get_config(name: str) -> LongCtxConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown longctx preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
  return PRESETS[name]
