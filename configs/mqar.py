"""Presets for ``python -m experiments mqar``: Zoology's MQAR sweep (Arora et al. 2023, arXiv:2312.04927).

A preset is one :class:`MQARConfig`: the tasks ``(N, D)``, the widths, the mixers and the learning rates to sweep
(every combination is one training run), plus the data, model and training settings shared by all runs. Every
field can be overridden from the command line by its dotted name (``--train.epochs 4``, ``--d_models 32,64``,
``--tasks 64:4,128:8``); see :mod:`experiments.common.config`.

- ``default``: the finding at CPU scale (879 CPU-seconds of user time, about 9 minutes on 2 idle cores): one
  task, (N, D) = (64, 4), at two widths d_model in {64, 128}; attention, the BaseConv + sparse-attention hybrid and
  BaseConv, lr 1e-3, up to 2500 steps of 64 fresh examples per run (early stop at 0.99), V = 128, rotary positions
  in attention. What it trades against Zoology's Figure 2 (V = 8192, learned positions, 64 epochs of 100K
  examples, four learning rates, four (N, D)): a 64x smaller vocabulary, rotary instead of learned absolute
  positions (attention left its plateau after ~900 steps with them, not within 2000 without them), one learning
  rate, one task, two widths, ~1/40 of the examples. Measured (``experiments/results/mqar/default/``): both widths
  separate (attention 0.944 / 0.991, hybrid 0.990 / 0.993, BaseConv 0.265 / 0.290): "reproduced". At d_model 32
  attention is still on its plateau (0.251) when the budget ends, so it is not in the default.
- ``pipeline``: the previous default (V = 8192, 128 steps per run): far too short for any mixer to learn MQAR; it
  shows the pipeline, not the finding (``experiments/results/mqar/``).
- ``cpu_long``: the same mixers at d_model {32, 64} with V = 256 and 3000 steps x 64 fresh examples per run (about
  80 minutes on 2 cores): long enough for attention, linear attention and the hybrid to leave the 1/D plateau at
  N = 64 (README table).
- ``smoke``: one short run per mixer at (64, 4), d_model 32 (well under 2 minutes).
- ``gpu``: Zoology's Figure 2 grid (V = 8192, 100K / 3K examples, 64 epochs, d_model 64..512, lr logspace(-4, -2, 4),
  per-N batch sizes).
- ``test``: seconds; used by the test suite.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

__all__ = ["Task", "DataConfig", "ModelConfig", "TrainConfig", "MQARConfig", "PRESETS", "MIXER_NAMES",
           "get_config"]

Mixer = Literal["attention", "sliding_window", "baseconv", "linear", "based", "hybrid"]
MIXER_NAMES: tuple[str, ...] = ("attention", "sliding_window", "baseconv", "linear", "based", "hybrid")


def _pos_int(owner: str, name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


def _nonneg_int(owner: str, name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise ValueError(f"{owner}.{name} must be a non-negative int, got {value!r}")


def _float_in(owner: str, name: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
  if not ok:
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    raise ValueError(f"{owner}.{name} must be a float in {interval}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Task:
  """One MQAR setting: sequence length ``N``, key-value pairs ``D``, and optionally its own batch size (Zoology
  uses 512 for N <= 128, 256 for N = 256, 128 for N = 512). On the command line: ``N:D`` or ``N:D:batch``."""

  seq_len: int
  num_kv_pairs: int
  batch_size: int | None = None

  def __post_init__(self):
    _pos_int("Task", "seq_len", self.seq_len)
    _pos_int("Task", "num_kv_pairs", self.num_kv_pairs)
    if self.batch_size is not None:
      _pos_int("Task", "batch_size", self.batch_size)
    if self.seq_len % 2:
      raise ValueError(f"Task.seq_len must be even, got {self.seq_len}")
    if 4 * self.num_kv_pairs > self.seq_len:
      raise ValueError(f"Task N={self.seq_len}, D={self.num_kv_pairs}: MQAR needs N >= 4 D")

  @property
  def name(self) -> str:
    return f"N{self.seq_len}-D{self.num_kv_pairs}"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """MQAR data (:func:`experiments.data.mqar.generate`).

  Attributes:
    vocab_size: ``V`` (Zoology: 8192).
    num_train, num_test: examples per task (test data uses seed ``seed + 1``).
    power_a: query-gap power law exponent.
    random_non_queries: fill non-query positions with random tokens (Zoology's Figure 2: False).
    seed: training-data seed.
    per_record_train: draw each training example from its own generator ``(seed, index)`` when it is read
      (:func:`experiments.data.mqar.example`) instead of materialising Zoology's sequential data set; with a large
      ``num_train`` every step then sees fresh examples at no start-up cost. The test set is always exactly
      Zoology's (:func:`experiments.data.mqar.generate`).
  """

  vocab_size: int = 8192
  num_train: int = 20_000
  num_test: int = 1_000
  power_a: float = 0.01
  random_non_queries: bool = False
  seed: int = 0
  per_record_train: bool = False

  def __post_init__(self):
    _pos_int("data", "vocab_size", self.vocab_size)
    _pos_int("data", "num_train", self.num_train)
    _pos_int("data", "num_test", self.num_test)
    _nonneg_int("data", "seed", self.seed)
    _float_in("data", "power_a", self.power_a, 0.0, 1e6, lo_open=True)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The 2-layer Zoology scaffold (:class:`experiments.mqar.zoology.ZooLM`); ``d_model`` comes from the sweep.

  Attributes:
    num_layers: blocks (Zoology's Figure 2: 2).
    num_heads: heads of the attention / linear-attention mixers (Zoology: 1).
    window: sliding-window length for ``sliding_window``.
    short_kernel: short-convolution length (``baseconv``, ``based``, ``hybrid``).
    feature_dim: Taylor feature dimension (``based``).
    rope: rotary position embeddings in the ``attention`` / ``sliding_window`` mixers instead of Zoology's learned
      absolute positions (the default preset: the same task learned in a fraction of the steps).
    selection_penalty: auxiliary-loss weight of the selection hybrid.
    embed_dropout: dropout on the embeddings (Zoology: 0.1).
    init_std: ``N(0, std)`` initialisation.
  """

  num_layers: int = 2
  num_heads: int = 1
  window: int = 16
  short_kernel: int = 3
  feature_dim: int = 8
  rope: bool = False
  selection_penalty: float = 1e-3
  embed_dropout: float = 0.0
  init_std: float = 0.02

  def __post_init__(self):
    for f in ("num_layers", "num_heads", "window", "short_kernel", "feature_dim"):
      _pos_int("model", f, getattr(self, f))
    _float_in("model", "selection_penalty", self.selection_penalty, 0.0, 1e6)
    _float_in("model", "embed_dropout", self.embed_dropout, 0.0, 1.0, hi_open=True)
    _float_in("model", "init_std", self.init_std, 0.0, 10.0, lo_open=True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, evaluation and checkpointing (shared by every run of the sweep).

  Attributes:
    batch_size: training batch (a task's own ``batch_size`` wins).
    epochs: passes over ``data.num_train``; steps = ``epochs * (num_train // batch_size)``.
    eval_every: evaluation interval in steps (None: once per epoch).
    early_stop: stop a run once its test accuracy exceeds this (None: never). Zoology: 0.99.
    weight_decay, b1, b2, eps: AdamW (Zoology: weight decay 0.1, PyTorch's betas and eps).
    warmup_steps: linear warmup before the cosine decay to 0.
    grad_clip: global-norm clipping (None: off, as in Zoology).
    eval_batch_size: evaluation batch.
    checkpoint_every: checkpoint interval in steps (None: at each evaluation).
    log_every: training-metric interval in steps.
    seed: initialisation, dropout and data-order seed (the same for every run).
  """

  batch_size: int = 64
  epochs: int = 4
  eval_every: int | None = None
  early_stop: float | None = 0.99
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  warmup_steps: int = 0
  grad_clip: float | None = None
  eval_batch_size: int = 250
  checkpoint_every: int | None = None
  log_every: int = 50
  seed: int = 0

  def __post_init__(self):
    for f in ("batch_size", "epochs", "eval_batch_size", "log_every"):
      _pos_int("train", f, getattr(self, f))
    for f in ("eval_every", "checkpoint_every"):
      if getattr(self, f) is not None:
        _pos_int("train", f, getattr(self, f))
    _nonneg_int("train", "warmup_steps", self.warmup_steps)
    _nonneg_int("train", "seed", self.seed)
    if self.early_stop is not None:
      _float_in("train", "early_stop", self.early_stop, 0.0, 1.0, lo_open=True)
    _float_in("train", "weight_decay", self.weight_decay, 0.0, 1e3)
    _float_in("train", "b1", self.b1, 0.0, 1.0, hi_open=True)
    _float_in("train", "b2", self.b2, 0.0, 1.0, hi_open=True)
    _float_in("train", "eps", self.eps, 0.0, 1.0, lo_open=True)
    if self.grad_clip is not None:
      _float_in("train", "grad_clip", self.grad_clip, 0.0, 1e9, lo_open=True)


@dataclasses.dataclass(frozen=True)
class MQARConfig:
  """A sweep: every (task, mixer, d_model, lr) combination is one run.

  Attributes:
    name: preset id.
    description: one line for ``--help`` and the report.
    tasks: the ``(N, D)`` settings.
    d_models: model widths.
    mixers: sequence-mixer families (:data:`experiments.mqar.zoology.MIXERS`).
    lrs: peak learning rates; the table reports the best one per cell, as Zoology does.
    data, model, train: shared settings.
    keep_checkpoints: keep each finished run's checkpoints (default: delete them once its result is recorded).
    tensorboard: also write TensorBoard events (when tensorboardX is installed).
  """

  name: str
  description: str
  tasks: tuple[Task, ...]
  d_models: tuple[int, ...]
  mixers: tuple[Mixer, ...]
  lrs: tuple[float, ...]
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  keep_checkpoints: bool = False
  tensorboard: bool = True

  def __post_init__(self):
    for f in ("tasks", "d_models", "mixers", "lrs"):
      v = getattr(self, f)
      if not isinstance(v, tuple) or not v:
        raise ValueError(f"{f} must be a non-empty tuple, got {v!r}")
      if len(set(v)) != len(v):
        raise ValueError(f"{f} has duplicates: {v!r}")
    for t in self.tasks:
      if not isinstance(t, Task):
        raise ValueError(f"tasks must hold Task objects, got {t!r}")
      if self.data.vocab_size <= t.seq_len:
        raise ValueError(f"data.vocab_size ({self.data.vocab_size}) must be larger than the task's seq_len "
                         f"({t.seq_len})")
      bs = t.batch_size or self.train.batch_size
      if bs > self.data.num_train:
        raise ValueError(f"batch size {bs} ({t.name}) is larger than data.num_train ({self.data.num_train})")
    for d in self.d_models:
      _pos_int("MQARConfig", "d_models[i]", d)
      if d % self.model.num_heads:
        raise ValueError(f"d_model {d} is not a multiple of model.num_heads ({self.model.num_heads})")
    bad = [m for m in self.mixers if m not in MIXER_NAMES]
    if bad:
      raise ValueError(f"unknown mixer(s) {bad}; choose from {MIXER_NAMES}")
    for lr in self.lrs:
      _float_in("MQARConfig", "lrs[i]", lr, 0.0, 10.0, lo_open=True)

  def batch_size(self, task: Task) -> int:
    return task.batch_size or self.train.batch_size

  def steps_per_epoch(self, task: Task) -> int:
    return self.data.num_train // self.batch_size(task)

  def total_steps(self, task: Task) -> int:
    return self.train.epochs * self.steps_per_epoch(task)


DEFAULT = MQARConfig(
    name="default",
    description="CPU, about 9 minutes on 2 idle cores: V=128, (N, D) = (64, 4), d_model in {64, 128}, attention (rotary "
                "positions) / hybrid / baseconv, lr 1e-3, up to 2500 steps x 64 fresh examples per run, early stop "
                "at 0.99; shows Zoology's separation (reference: experiments/results/mqar/default/)",
    tasks=(Task(64, 4),),
    d_models=(64, 128),
    mixers=("attention", "hybrid", "baseconv"),
    lrs=(1e-3,),
    data=DataConfig(vocab_size=128, num_train=160_000, num_test=1_000, per_record_train=True),
    model=ModelConfig(rope=True),
    train=TrainConfig(batch_size=64, epochs=1, eval_every=250, eval_batch_size=500, log_every=125),
    tensorboard=False,
)

PIPELINE = MQARConfig(
    name="pipeline",
    description="the default before issue 12 (experiments/results/mqar/): (N, D) in {(64, 4), (128, 8)}, d_model in "
                "{32, 64, 128}, attention / baseconv / linear / hybrid, lr in {1e-3, 3e-3}, V = 8192, 128 steps x 32 "
                "examples per run; far too short for any mixer to learn MQAR: the pipeline, not the finding",
    tasks=(Task(64, 4), Task(128, 8)),
    d_models=(32, 64, 128),
    mixers=("attention", "baseconv", "linear", "hybrid"),
    lrs=(1e-3, 3e-3),
    data=DataConfig(num_train=4_096, num_test=500),
    train=TrainConfig(batch_size=32, epochs=1, eval_every=64, log_every=32),
)

CPU_LONG = MQARConfig(
    name="cpu_long",
    description="CPU scale, long enough for attention to leave its plateau at N=64: V=256, (N, D) in {(64, 4), "
                "(128, 8)}, d_model in {32, 64}, attention / baseconv / linear / hybrid, lr in {1e-3, 3e-3}, 3000 "
                "steps x 64 examples per run (192K, each seen once), early stop at 0.99 (about 80 minutes on 2 "
                "cores; resumable)",
    tasks=(Task(64, 4), Task(128, 8)),
    d_models=(32, 64),
    mixers=("attention", "baseconv", "linear", "hybrid"),
    lrs=(1e-3, 3e-3),
    data=DataConfig(vocab_size=256, num_train=192_000, num_test=1_000),
    train=TrainConfig(batch_size=64, epochs=1, eval_every=250, log_every=125),
)

SMOKE = MQARConfig(
    name="smoke",
    description="one run per mixer at (N, D) = (64, 4), d_model 32, lr 3e-3: well under 2 minutes on CPU",
    tasks=(Task(64, 4),),
    d_models=(32,),
    mixers=("attention", "baseconv", "linear", "hybrid"),
    lrs=(3e-3,),
    data=DataConfig(num_train=3_000, num_test=250),
    train=TrainConfig(batch_size=64, epochs=2),
)

GPU = MQARConfig(
    name="gpu",
    description="Zoology Figure 2: V=8192, (N, D) in {(64,4), (128,8), (256,16), (512,64)}, d_model 64..512, "
                "lr logspace(-4, -2, 4), 100K/3K examples, 64 epochs with early stopping at 0.99",
    tasks=(Task(64, 4, 512), Task(128, 8, 512), Task(256, 16, 256), Task(512, 64, 128)),
    d_models=(64, 128, 256, 512),
    mixers=("attention", "baseconv", "based", "linear", "hybrid", "sliding_window"),
    lrs=tuple(float(f"{x:.3g}") for x in (1e-4, 10 ** (-4 + 2 / 3), 10 ** (-4 + 4 / 3), 1e-2)),
    data=DataConfig(num_train=100_000, num_test=3_000),
    model=ModelConfig(embed_dropout=0.1),
    train=TrainConfig(batch_size=512, epochs=64, eval_batch_size=500, log_every=100),
)

TEST = MQARConfig(
    name="test",
    description="tiny, for the test suite (seconds)",
    tasks=(Task(16, 2),),
    d_models=(16,),
    mixers=("attention",),
    lrs=(1e-2,),
    data=DataConfig(vocab_size=32, num_train=512, num_test=64),
    train=TrainConfig(batch_size=32, epochs=2, eval_every=8, eval_batch_size=32, log_every=4),
    tensorboard=False,
)

PRESETS: dict[str, MQARConfig] = {c.name: c for c in (DEFAULT, PIPELINE, CPU_LONG, SMOKE, GPU, TEST)}


def get_config(name: str = "default") -> MQARConfig:
  """The preset called ``name``.

  Raises:
    ValueError: for an unknown preset.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown MQAR preset {name!r}; choose from {sorted(PRESETS)}")
  return PRESETS[name]
