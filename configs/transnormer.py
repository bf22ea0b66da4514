"""Presets for ``python -m experiments transnormer``: TransNormerLLM's quality claim (decayed linear attention is on
par with softmax attention; ``../shared/papers/efficient.md`` §1) on a tiny byte-level LM over stdlib text
(``configs/textlm.py``), and its speed claim as a table of our linear kernel vs our softmax kernel.

The two LMs have equal parameters and see the same bytes in the same order: :class:`jaxattn.nn.TransNormerLM` (GLA
token mixer with LRPE-d in layer 0, SGLU with ``glu`` hidden units, SRMSNorm, no gains) vs a softmax pre-norm
transformer (:class:`jaxattn.nn.AttnResLM` with ``mode="none"``: causal RoPE attention, GELU MLP, RMSNorm). The
TNL block holds ``5 D^2 + 3 D glu`` weights and the softmax block ``4 D^2 + 2 D m``, so the softmax MLP width is
``m = (D + 3 glu) / 2`` (296 at D = 64, glu = 176); the only difference left is the softmax model's RMSNorm gains.

Verdict rule (fixed before any run): ``delta = test loss(TNL) - test loss(softmax)`` in nats/byte, paired by seed.
Quality is "on par" when the mean delta <= ``PAR_MARGIN`` = 0.02 nats/byte (TNL may also be better). Speed holds
when our linear attention's fwd+bwd is faster than our softmax's at the longest length where both were measured.
``reproduced``: both; ``partly``: one of the two; ``not reproduced``: neither.

- ``cpu`` (default): D = 64, 4 layers, 4 heads, 64-byte windows, batch 16, 600 steps, 2 seeds (4 runs); speed table
  on CPU (xla paths, f32, B = 1, H = 4, d = 64) at 256 .. 32K, skipping cells predicted to take over 20 s.
- ``gpu``: D = 512, 12 layers, 8 heads, 512-byte windows, 20000 steps, 3 seeds; speed at 8K .. 128K, bf16,
  H = 8, d = 128, platform default kernels.
- ``smoke``: D = 16, 2 layers, 6 steps, 1 seed, speed at 64 and 128 (tests).
"""

from __future__ import annotations

import dataclasses

from configs.common import AdamWConfig
from configs.textlm import CorpusConfig

__all__ = ["ModelConfig", "SpeedConfig", "TransNormerConfig", "PRESETS", "PAR_MARGIN"]

PAR_MARGIN = 0.02  # nats/byte: TNL within this of softmax (or better) counts as "on par"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Both LMs: width ``features``, layers, heads; ``glu`` is TNL's SGLU hidden size (None: ``~8 D / 3``)."""

  features: int = 64
  num_layers: int = 4
  num_heads: int = 4
  glu: int | None = None

  def __post_init__(self):
    for f in ("features", "num_layers", "num_heads"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"model.{f} must be a positive int, got {v!r}")
    if self.features % self.num_heads:
      raise ValueError(f"model.features ({self.features}) must be a multiple of model.num_heads ({self.num_heads})")

  @property
  def glu_features(self) -> int:
    return self.glu or -(-(8 * self.features // 3) // 8) * 8  # TransNormerBlock's default

  @property
  def softmax_mlp(self) -> int:
    """The softmax MLP width that equalises the block parameters: ``(D + 3 glu) / 2`` rounded."""
    return round((self.features + 3 * self.glu_features) / 2)


@dataclasses.dataclass(frozen=True)
class SpeedConfig:
  """Long-sequence timing of ``jaxattn.linear_attention`` (per-head decay) vs causal ``jaxattn.softmax_attention``.

  Attributes:
    lengths: sequence lengths.
    batch, heads, head_dim, dtype: the shape ``[batch, N, heads, head_dim]``.
    linear_impl, softmax_impl: implementations (None: the platform default).
    repeats: timed samples per cell (median).
    max_cell_s: skip a cell whose predicted cost (calls x predicted time per call, from the previous length with
      linear / quadratic scaling) exceeds this many seconds.
  """

  lengths: tuple[int, ...] = (256, 1024, 4096, 8192, 16384, 32768)
  batch: int = 1
  heads: int = 4
  head_dim: int = 64
  dtype: str = "float32"
  linear_impl: str | None = "xla"
  softmax_impl: str | None = "xla"
  repeats: int = 3
  max_cell_s: float = 20.0


@dataclasses.dataclass(frozen=True)
class TransNormerConfig:
  """One experiment: corpus, model, optimisation, seeds, speed table."""

  name: str
  corpus: CorpusConfig = CorpusConfig(seq_len=64, max_test_bytes=32_768)
  model: ModelConfig = ModelConfig()
  train: AdamWConfig = AdamWConfig(steps=600, batch_size=16, lr=3e-3, warmup_steps=50, eval_every=150,
                                   eval_batch_size=128)
  seeds: tuple[int, ...] = (0, 1)
  speed: SpeedConfig = SpeedConfig()

  def __post_init__(self):
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds!r}")


PRESETS: dict[str, TransNormerConfig] = {
    "cpu": TransNormerConfig("cpu"),
    "gpu": TransNormerConfig(
        "gpu", corpus=CorpusConfig(seq_len=512, max_train_bytes=50_000_000, max_test_bytes=1_000_000),
        model=ModelConfig(features=512, num_layers=12, num_heads=8),
        train=AdamWConfig(steps=20000, batch_size=64, lr=1e-3, warmup_steps=1000, eval_every=2000,
                          eval_batch_size=64),
        seeds=(0, 1, 2),
        speed=SpeedConfig(lengths=(8192, 16384, 32768, 65536, 131072), heads=8, head_dim=128, dtype="bfloat16",
                          linear_impl=None, softmax_impl=None, repeats=10, max_cell_s=60.0)),
    "smoke": TransNormerConfig(
        "smoke", corpus=CorpusConfig(seq_len=16, max_train_bytes=20_000, max_test_bytes=1_000),
        model=ModelConfig(features=16, num_layers=2, num_heads=2),
        train=AdamWConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=3, eval_batch_size=64),
        seeds=(0,), speed=SpeedConfig(lengths=(64, 128), heads=2, head_dim=8, repeats=1, max_cell_s=5.0)),
}
