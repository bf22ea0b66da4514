"""Presets for ``python -m experiments recycled``: Recycled Attention / RefreshKV (Xu, Goyal, Choi, arXiv
2411.05787; ``../shared/papers/efficient.md`` §2) on the tiny long-context LM of :mod:`experiments.longctx`.

Every cell decodes the last ``decode_len`` tokens of each evaluation sequence one token at a time (teacher forced)
after a dense prefill of the rest, with one cache policy at the budget K = N / ``budget_div`` (the paper's K = L/8):
vanilla (dense), StreamingLLM (4 sinks + K - 4 recent), H2O (K/2 heavy hitters + K/2 recent, evicting), SnapKV
(top-K of the last prompt token, pooled, kept for the whole decode), recycled with a fixed stride S and recycled
with the query-similarity schedule (RefreshKV's scheduler, without eviction).

- ``cpu`` (default): the ``cpu`` longctx model (4 layers, d=128, trained at 512 tokens), N = 256 and 2N = 512,
  8 sequences per task (40 per cell), the last 64 tokens decoded (the 16-token query segment and 48 tokens before
  it), K = 32 / 64.
- ``gpu``: the ``gpu`` model at N = 2048 and 2N = 4096, 100 sequences per task, 256 tokens decoded (the paper's
  "PPL of the last 256 tokens").
- ``smoke``: the ``smoke`` model at N = 64 / 128, 2 sequences per task, three policies (tests).
"""

from __future__ import annotations

import dataclasses

__all__ = ["RecycledConfig", "PRESETS", "POLICIES"]

# name -> what it is; "recycled_s<S>" names a fixed stride S (parsed), "recycled_qs" the query-similarity schedule.
POLICIES = ("vanilla", "streaming", "h2o", "snapkv", "recycled_s5", "recycled_s10", "recycled_qs")


def stride_of(policy: str) -> int | None:
  """The fixed stride of ``recycled_s<S>`` (None for every other policy)."""
  if policy.startswith("recycled_s") and policy[len("recycled_s"):].isdigit():
    return int(policy[len("recycled_s"):])
  return None


@dataclasses.dataclass(frozen=True)
class RecycledConfig:
  """One sweep.

  Attributes:
    name: preset id.
    model: the :mod:`configs.longctx` preset whose trained model is evaluated (trained and cached on first use).
    lengths: sequence lengths ``(N, 2N)`` (each at most the model's training length).
    policies: cache policies (a subset of :data:`POLICIES`; ``recycled_s<S>`` for any positive S).
    budget_div: K = N // budget_div keys per kv head (the paper's 8).
    decode_len: tokens decoded one at a time at the end of each sequence (at least the query segment + 1).
    samples_per_task: sequences per task and length (one batch per length).
    sinks: StreamingLLM's sink tokens (the paper's 4).
    pool: max-pool kernel of the recycled / SnapKV selection (the paper's 7).
    qc_stride, threshold: query-similarity schedule: every ``qc_stride`` steps a full step iff the cosine
      similarity of the head-mean query to the last full step's is below ``threshold`` (paper: QC 5, s = 0.85 for
      Llama-3.1-8B).
    recovery_steps: the recovery curve runs over s = 0..recovery_steps steps after a full step.
    seed: evaluation data seed (disjoint from training, 1000 like sparse_frontier's).
  """

  name: str
  model: str = "cpu"
  lengths: tuple[int, ...] = (256, 512)
  policies: tuple[str, ...] = POLICIES
  budget_div: int = 8
  decode_len: int = 64
  samples_per_task: int = 8
  sinks: int = 4
  pool: int = 7
  qc_stride: int = 5
  threshold: float = 0.85
  recovery_steps: int = 10
  seed: int = 2000

  def __post_init__(self):
    for p in self.policies:
      if p not in POLICIES and not (stride_of(p) or 0) >= 1:
        raise ValueError(f"policies must be from {POLICIES} or recycled_s<S>, got {p!r}")
    if not self.policies or self.policies[0] != "vanilla":
      raise ValueError(f"policies must start with 'vanilla' (the dense reference), got {self.policies!r}")
    for f in ("budget_div", "decode_len", "samples_per_task", "pool", "qc_stride", "recovery_steps"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{f} must be a positive int, got {v!r}")
    if self.pool % 2 == 0:
      raise ValueError(f"pool must be odd, got {self.pool}")
    if not isinstance(self.sinks, int) or self.sinks < 0:
      raise ValueError(f"sinks must be a non-negative int, got {self.sinks!r}")
    for n in self.lengths:
      if not isinstance(n, int) or n // self.budget_div < self.sinks + 2 or n <= self.decode_len + n // self.budget_div:
        raise ValueError(f"length {n!r} too short for K = N/{self.budget_div} >= sinks + 2 and a prefill longer "
                         f"than K + decode_len={self.decode_len}")
    if self.recovery_steps + 1 >= self.decode_len:
      raise ValueError(f"recovery_steps={self.recovery_steps} needs decode_len > recovery_steps + 1")
    if not -1.0 <= self.threshold <= 1.0:
      raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {self.threshold!r}")

  def budget(self, n: int) -> int:
    """K for length ``n``."""
    return n // self.budget_div


PRESETS: dict[str, RecycledConfig] = {
    "cpu": RecycledConfig("cpu"),
    "gpu": RecycledConfig("gpu", model="gpu", lengths=(2048, 4096), decode_len=256, samples_per_task=100),
    "smoke": RecycledConfig("smoke", model="smoke", lengths=(64, 128), decode_len=24, samples_per_task=2,
                            policies=("vanilla", "streaming", "recycled_s5"), recovery_steps=5),
}
