"""Presets for ``python -m experiments sparse_frontier``: accuracy and attention recall of the tiny long-context LM
(:mod:`experiments.longctx`, preset ``model``) against sparsity, for sparse prefill (vertical-slash, FlexPrefill,
block top-k) and sparse decode (Quest, oracle top-k), at N and 2N (The Sparse Frontier, arXiv 2504.17768).

- ``cpu`` (default): the ``cpu`` model, N = 256 and 2N = 512, 16 sequences per task and length (80 per cell; one cell costs
  about 9-15 CPU-seconds, mostly compilation, so the 60 cells take ~10-15 CPU-minutes).
  Forced entries are scaled down with the context (the paper forces 4 sink columns and 64 local diagonals at
  16K-128K tokens; here 1 and 2, the rest chosen by score), block top-k uses 8-token blocks (the paper's 16 at
  16K+), Quest 8-token pages (the paper's 16).
- ``gpu``: the ``gpu`` model at N = 2048 and 2N = 4096, 100 sequences per task, the paper's block and page size 16.
- ``smoke``: the ``smoke`` model at 64 / 128 tokens, 2 sequences per task, three sparsities (tests).
"""

from __future__ import annotations

import dataclasses

__all__ = ["SparseFrontierConfig", "PRESETS", "PREFILL_PATTERNS", "DECODE_PATTERNS"]

# "sink_window" is the trivial baseline of each phase: the same budget spent on the first keys and a local window,
# chosen without looking at the inputs (a static vertical-slash / StreamingLLM's sinks + window); "topk" is the
# decode oracle (the exact top keys of each decode query's own probabilities).
PREFILL_PATTERNS = ("vertical_slash", "flexprefill", "block_topk", "sink_window")
DECODE_PATTERNS = ("quest", "topk", "sink_window")


@dataclasses.dataclass(frozen=True)
class SparseFrontierConfig:
  """One sweep.

  Attributes:
    name: preset id.
    model: the :mod:`configs.longctx` preset whose trained model is evaluated (trained and cached on first use).
    lengths: sequence lengths ``(N, 2N)`` (each at most the model's training length).
    sparsities: target sparsities ``s`` (0 = dense, shared by every pattern).
    prefill_patterns, decode_patterns: the patterns of each phase.
    samples_per_task: sequences per task and length (one batch each).
    last_q, force_first, force_local: vertical-slash / FlexPrefill estimation queries and forced entries.
    flex_alpha: FlexPrefill cumulative-mass target.
    block: block top-k tile (queries and keys).
    page_size: Quest page (also the decode budget granularity of top-k).
    seed: evaluation data seed (disjoint from training and the model's evaluation data).
  """

  name: str
  model: str = "cpu"
  lengths: tuple[int, ...] = (256, 512)
  sparsities: tuple[float, ...] = (0.0, 0.5, 0.8, 0.9, 0.95)
  prefill_patterns: tuple[str, ...] = PREFILL_PATTERNS
  decode_patterns: tuple[str, ...] = DECODE_PATTERNS
  samples_per_task: int = 16
  last_q: int = 64
  force_first: int = 1
  force_local: int = 2
  flex_alpha: float = 0.9
  block: int = 8
  page_size: int = 8
  seed: int = 1000

  def __post_init__(self):
    if not self.lengths or any(not isinstance(n, int) or n < 32 or n % self.page_size for n in self.lengths):
      raise ValueError(f"lengths must be ints >= 32 and multiples of page_size={self.page_size}, got "
                       f"{self.lengths!r}")
    if not self.sparsities or self.sparsities[0] != 0.0 or any(not 0.0 <= s < 1.0 for s in self.sparsities):
      raise ValueError(f"sparsities must start with 0.0 (the dense reference) and lie in [0, 1), got "
                       f"{self.sparsities!r}")
    for f, allowed in (("prefill_patterns", PREFILL_PATTERNS), ("decode_patterns", DECODE_PATTERNS)):
      v = getattr(self, f)
      if any(p not in allowed for p in v):
        raise ValueError(f"{f} must be a subset of {allowed}, got {v!r}")
    for f in ("samples_per_task", "last_q", "block", "page_size"):
      if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
        raise ValueError(f"{f} must be a positive int, got {getattr(self, f)!r}")
    if not 0.0 < self.flex_alpha <= 1.0:
      raise ValueError(f"flex_alpha must lie in (0, 1], got {self.flex_alpha!r}")


PRESETS: dict[str, SparseFrontierConfig] = {
    "cpu": SparseFrontierConfig("cpu"),
    "gpu": SparseFrontierConfig("gpu", model="gpu", lengths=(2048, 4096), samples_per_task=100, last_q=256,
                                force_first=4, force_local=16, block=16, page_size=16),
    "smoke": SparseFrontierConfig("smoke", model="smoke", lengths=(64, 128), sparsities=(0.0, 0.5, 0.9),
                                  samples_per_task=2, last_q=16),
}
