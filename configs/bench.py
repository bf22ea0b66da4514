"""Benchmark presets for ``python -m experiments bench``: shapes, dtypes and masks as frozen dataclasses.

A preset is a tuple of :class:`BenchShape`; each shape lists the :class:`MaskSpec` it is timed with, so one
(shape, mask) pair is one benchmark case. Masks are described by a spec rather than built here because
block-sparse layouts depend on the sequence lengths; ``MaskSpec.build(T, S)`` makes the static
:mod:`jaxattn.masks` object.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxattn import masks as masks_lib

MaskKind = Literal["full", "causal", "sliding_window", "block_sparse"]


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """A mask family with its parameters.

  Attributes:
    kind: ``"full"``, ``"causal"`` (``Causal(0)``), ``"sliding_window"`` (causal window of ``window`` keys,
      the query's own position included: ``Local(window - 1, 0)``) or ``"block_sparse"`` (random layout of
      ``density`` per query-block row with square blocks of ``block``, from ``masks.random_block_sparse``).
    window: window length for ``"sliding_window"``.
    density: kept fraction of kv blocks per query-block row for ``"block_sparse"``.
    block: block edge for ``"block_sparse"``.
    seed: layout seed for ``"block_sparse"``.
  """

  kind: MaskKind
  window: int | None = None
  density: float | None = None
  block: int = 128
  seed: int = 0

  def __post_init__(self):
    if self.kind not in ("full", "causal", "sliding_window", "block_sparse"):
      raise ValueError(f"unknown mask kind {self.kind!r}")
    if self.kind == "sliding_window" and not (isinstance(self.window, int) and self.window >= 1):
      raise ValueError(f"sliding_window needs a positive int window, got {self.window!r}")
    if self.kind == "block_sparse" and not (self.density is not None and 0.0 < self.density <= 1.0):
      raise ValueError(f"block_sparse needs a density in (0, 1], got {self.density!r}")

  @property
  def name(self) -> str:
    """Short name used in case names and tables (``causal``, ``swa1024``, ``bs0.1``)."""
    if self.kind == "sliding_window":
      return f"swa{self.window}"
    if self.kind == "block_sparse":
      return f"bs{self.density:g}"
    return self.kind

  def build(self, T: int, S: int) -> masks_lib.Mask:
    """The static mask for a ``T x S`` problem."""
    if self.kind == "full":
      return masks_lib.Full()
    if self.kind == "causal":
      return masks_lib.Causal(0)
    if self.kind == "sliding_window":
      return masks_lib.sliding_window(self.window, causal=True)
    return masks_lib.random_block_sparse(-(-T // self.block), -(-S // self.block), self.density, self.block,
                                         self.block, seed=self.seed)


FULL = MaskSpec("full")
CAUSAL = MaskSpec("causal")


@dataclasses.dataclass(frozen=True)
class BenchShape:
  """One problem shape (layouts ``q [B, T, H, D]``, ``k/v [B, S, G, D]``) and the masks it is timed with."""

  name: str
  B: int
  T: int
  S: int
  H: int
  G: int
  D: int
  dtype: str
  masks: tuple[MaskSpec, ...] = (FULL, CAUSAL)

  def __post_init__(self):
    for f in ("B", "T", "S", "H", "G", "D"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"BenchShape.{f} must be a positive int, got {v!r}")
    if self.H % self.G:
      raise ValueError(f"BenchShape {self.name}: H={self.H} is not a multiple of G={self.G}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"BenchShape {self.name}: dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


@dataclasses.dataclass(frozen=True)
class BenchPreset:
  """A named set of shapes plus run defaults.

  Attributes:
    name: preset id (``--preset``).
    shapes: the shapes to time, each with its masks.
    repeats: default number of timed samples per measurement (``--repeats`` overrides).
    warmup: untimed calls after the compiling one (``--warmup`` overrides).
    description: one line for ``--help`` and the report.
  """

  name: str
  shapes: tuple[BenchShape, ...]
  repeats: int = 10
  warmup: int = 1
  description: str = ""


def _shape(B: int, T: int, H: int, D: int, dtype: str, masks: tuple[MaskSpec, ...], G: int | None = None,
           S: int | None = None) -> BenchShape:
  S = T if S is None else S
  G = H if G is None else G
  return BenchShape(f"b{B}_t{T}" + (f"_s{S}" if S != T else "") + (f"_g{G}" if G != H else ""), B, T, S, H, G, D,
                    dtype, masks)


_GPU_MASKS = (FULL, CAUSAL, MaskSpec("sliding_window", window=1024),
              MaskSpec("block_sparse", density=0.1), MaskSpec("block_sparse", density=0.2),
              MaskSpec("block_sparse", density=0.5))

CPU = BenchPreset(
    # warmup=0: on CPU the compiling call already runs the function once (no autotuning, nothing lazy left), and
    # each T=4096 fwd+bwd call of the dense anchor takes about a second on 2 cores.
    "cpu", tuple(_shape(1, T, 4, 64, "float32", (FULL, CAUSAL)) for T in (1024, 4096)), repeats=3, warmup=0,
    description="f32, B=1, H=4, D=64, T in {1024, 4096}, full and causal: under a minute on 2 CPU cores")
GPU = BenchPreset(
    "gpu", tuple(_shape(B, T, 16, 128, "bfloat16", _GPU_MASKS) for B, T in ((8, 2048), (2, 8192), (1, 32768))),
    repeats=20, warmup=2,
    description="bf16, H=16, D=128, B x T in {8x2048, 2x8192, 1x32768}; full, causal, causal sliding window 1024, "
                "random block-sparse (density 0.1/0.2/0.5, block 128)")
SMOKE = BenchPreset(
    "smoke", (_shape(1, 64, 2, 16, "float32", (FULL, CAUSAL)),
              _shape(1, 64, 4, 16, "float32", (MaskSpec("sliding_window", window=16),
                                                 MaskSpec("block_sparse", density=0.5, block=16)), G=2)),
    repeats=2, description="tiny shapes for tests (seconds on CPU)")

PRESETS: dict[str, BenchPreset] = {p.name: p for p in (CPU, GPU, SMOKE)}


# ------------------------------------------------------------------------------------------ linear attention
DecayKind = Literal["none", "head", "token"]


@dataclasses.dataclass(frozen=True)
class LinearBenchShape:
  """One causal linear-attention problem (``q [B, T, H, D]``, ``k [B, T, G, D]``, ``v [B, T, G, E]``) and the decay
  kinds it is timed with: ``"none"``, ``"head"`` (a per-head constant ``[H]``, the TransNormerLLM slopes
  ``g_h = -2^(-8 (h + 1) / H)``) or ``"token"`` (a per-token gate ``[B, T, H]``, ``logsigmoid(x) / 16`` with
  ``x ~ N(0, 1)``, flash-linear-attention's test distribution)."""

  name: str
  B: int
  T: int
  H: int
  G: int
  D: int
  E: int
  dtype: str
  decays: tuple[DecayKind, ...] = ("head", "token")

  def __post_init__(self):
    for f in ("B", "T", "H", "G", "D", "E"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"LinearBenchShape.{f} must be a positive int, got {v!r}")
    if self.H % self.G:
      raise ValueError(f"LinearBenchShape {self.name}: H={self.H} is not a multiple of G={self.G}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"LinearBenchShape {self.name}: dtype must be float32, bfloat16 or float16, got "
                       f"{self.dtype!r}")
    bad = [d for d in self.decays if d not in ("none", "head", "token")]
    if bad or not self.decays:
      raise ValueError(f"LinearBenchShape {self.name}: decays must be a non-empty subset of none, head, token, got "
                       f"{self.decays!r}")


@dataclasses.dataclass(frozen=True)
class LinearBenchPreset:
  """A named set of linear-attention shapes plus run defaults (fields as :class:`BenchPreset`)."""

  name: str
  shapes: tuple[LinearBenchShape, ...]
  repeats: int = 10
  warmup: int = 1
  description: str = ""


def _linear_shape(B: int, T: int, H: int, D: int, dtype: str, decays: tuple[DecayKind, ...] = ("head", "token"),
                  G: int | None = None, E: int | None = None) -> LinearBenchShape:
  G = H if G is None else G
  E = D if E is None else E
  return LinearBenchShape(f"b{B}_t{T}" + (f"_g{G}" if G != H else ""), B, T, H, G, D, E, dtype, decays)


LINEAR_GPU = LinearBenchPreset(
    "linear_gpu", tuple(_linear_shape(B, T, 16, 128, "bfloat16")
                        for B, T in ((8, 2048), (2, 8192), (1, 32768), (1, 131072))),
    repeats=20, warmup=2,
    description="linear attention, bf16, H=16, D=E=128, B x T in {8x2048, 2x8192, 1x32768, 1x131072}, per-head "
                "decay and per-token gate (issue 4)")
LINEAR_CPU = LinearBenchPreset(
    "linear_cpu", tuple(_linear_shape(1, T, 4, 64, "float32") for T in (1024, 4096)), repeats=3, warmup=0,
    description="linear attention, f32, B=1, H=4, D=64, T in {1024, 4096}, per-head and per-token decay")
LINEAR_SMOKE = LinearBenchPreset(
    "linear_smoke", (_linear_shape(1, 64, 4, 16, "float32", ("none", "token"), G=2),), repeats=2,
    description="linear attention, tiny shapes for tests (seconds on CPU)")

LINEAR_PRESETS: dict[str, LinearBenchPreset] = {p.name: p for p in (LINEAR_GPU, LINEAR_CPU, LINEAR_SMOKE)}
