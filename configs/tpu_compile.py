"""Presets for ``python -m experiments tpu_compile``: which TPU kernel builds to compile without a TPU.

Every kernel build is one public op (``implementation="pallas_tpu"``) at ``[B, T, H, D]`` (``G`` kv heads) traced
for the TPU and compiled ahead of time for one chip of a deviceless TPU topology (libtpu must be installed). Every
context-parallel build is one strategy over the ``cp_chips`` chips of the topology at sequence length ``cp_T``,
compiled forward and forward+backward. ``default`` covers every family and generation at the default configs
(minutes); ``full`` adds the user tiles, GQA, every mask kind and every strategy on every generation (long);
``ci`` is the one kernel build and the one strategy CI compiles (seconds).
"""

from __future__ import annotations

import dataclasses

FAMILIES = ("softmax", "linear", "landmark")
MODES = ("fwd", "fwd_bwd")
DTYPES = ("bfloat16", "float32")
# generation -> deviceless topology name (get_topology_desc(topology_name=..., platform="tpu")); 4 chips each
GENERATIONS: dict[str, str] = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
# softmax masks: causal, none (full), sliding window, causal documents (segment ids)
MASKS = ("causal", "full", "local", "documents")
# "default": the backend's default_config for the generation; "tiles=N": a user config with N x N softmax tiles
# (landmark: block_q = N; linear: chunk_size = N)
CONFIG_PREFIX = "tiles="
STRATEGIES = ("ring", "all_gather", "ulysses", "usp", "linear")


def parse_config(name: str) -> int | None:
  """``"default"`` -> None; ``"tiles=N"`` -> N. ``ValueError`` for anything else."""
  if name == "default":
    return None
  if name.startswith(CONFIG_PREFIX):
    try:
      n = int(name[len(CONFIG_PREFIX):])
    except ValueError:
      n = 0
    if n >= 8 and n % 8 == 0:
      return n
  raise ValueError(f"config {name!r} is neither 'default' nor 'tiles=N' with N a positive multiple of 8")


@dataclasses.dataclass(frozen=True)
class TpuCompilePreset:
  """One sweep of builds.

  Attributes:
    name: preset id (``--preset``).
    generations: TPU generations from :data:`GENERATIONS`.
    families: kernel families from :data:`FAMILIES` (empty: no kernel builds).
    modes: ``"fwd"`` and / or ``"fwd_bwd"``.
    configs: ``"default"`` and / or ``"tiles=N"`` (see :func:`parse_config`).
    masks: softmax masks from :data:`MASKS` (the other families are causal by definition).
    kv_heads: ``G`` values (GQA when ``G < H``).
    dtypes: input dtypes from :data:`DTYPES`.
    block_size: landmark block size.
    strategies: context-parallel strategies from :data:`STRATEGIES` (empty: none).
    cp_generations: generations the strategies compile for (default: the first of ``generations``).
    B, T, H, D: batch, sequence length, query heads, head dim of the kernel builds.
    cp_T, cp_chips: global sequence length and chips of the context-parallel builds.
    description: one line for ``--help``.
  """

  name: str
  generations: tuple[str, ...] = tuple(GENERATIONS)
  families: tuple[str, ...] = FAMILIES
  modes: tuple[str, ...] = MODES
  configs: tuple[str, ...] = ("default",)
  masks: tuple[str, ...] = ("causal",)
  kv_heads: tuple[int, ...] = (16,)
  dtypes: tuple[str, ...] = ("bfloat16",)
  block_size: int = 128
  strategies: tuple[str, ...] = STRATEGIES
  cp_generations: tuple[str, ...] | None = None
  B: int = 1
  T: int = 8192
  H: int = 16
  D: int = 128
  cp_T: int = 32768
  cp_chips: int = 4
  description: str = ""

  def __post_init__(self):
    for field, allowed, may_be_empty in (("generations", GENERATIONS, False), ("families", FAMILIES, True),
                                         ("modes", MODES, False), ("masks", MASKS, False), ("dtypes", DTYPES, False),
                                         ("strategies", STRATEGIES, True)):
      values = getattr(self, field)
      if not values and not may_be_empty:
        raise ValueError(f"TpuCompilePreset.{field} must be non-empty")
      for v in values:
        if v not in allowed:
          raise ValueError(f"TpuCompilePreset.{field}: unknown {v!r}; choose from {tuple(allowed)}")
    for g in self.cp_generations or ():
      if g not in GENERATIONS:
        raise ValueError(f"TpuCompilePreset.cp_generations: unknown {g!r}; choose from {tuple(GENERATIONS)}")
    if not self.configs:
      raise ValueError("TpuCompilePreset.configs must be non-empty")
    for c in self.configs:
      try:
        parse_config(c)
      except ValueError as e:
        raise ValueError(f"TpuCompilePreset.configs: {e}") from None
    for f in ("B", "T", "H", "D", "block_size", "cp_T", "cp_chips"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"TpuCompilePreset.{f} must be a positive int, got {v!r}")
    for g in self.kv_heads:
      if not isinstance(g, int) or g < 1 or self.H % g:
        raise ValueError(f"TpuCompilePreset.kv_heads: {g!r} does not divide H={self.H}")
    if self.block_size % 8:
      raise ValueError(f"TpuCompilePreset.block_size={self.block_size} is not a multiple of 8 (the TPU sublane tile)")
    if self.cp_chips > 4:
      raise ValueError(f"TpuCompilePreset.cp_chips={self.cp_chips}: the topologies have 4 chips")
    if self.cp_T % (2 * self.cp_chips):
      raise ValueError(f"TpuCompilePreset.cp_T={self.cp_T} is not a multiple of 2 * cp_chips (zigzag)")

  @property
  def strategy_generations(self) -> tuple[str, ...]:
    return self.cp_generations or self.generations[:1]


DEFAULT = TpuCompilePreset(
    "default", cp_generations=("v5e",),
    description="every family and generation (v4, v5e, v5p, v6e), fwd and fwd+bwd, default configs, causal, bf16, "
                "B=1 T=8192 H=16 D=128; every context-parallel strategy on 4 v5e chips at T=32768")
FULL = TpuCompilePreset(
    "full", configs=("default", "tiles=256", "tiles=1024"), masks=MASKS, kv_heads=(16, 4),
    cp_generations=tuple(GENERATIONS),
    description="default plus user tiles 256 / 1024, GQA (G=4), every mask kind; strategies on every generation")
TILES = TpuCompilePreset(
    "tiles", families=("softmax",), modes=("fwd_bwd",), configs=("tiles=512", "tiles=1024", "tiles=2048"),
    strategies=(), description="the softmax tile sweep behind the per-generation default tiles (scoped VMEM per "
                               "kernel at 512 .. 2048 tiles, every generation)")
CI = TpuCompilePreset(
    "ci", generations=("v5e",), families=("softmax",), modes=("fwd_bwd",), strategies=("all_gather",),
    B=1, T=1024, H=16, D=128, cp_T=2048, kv_heads=(16,),
    description="the CI check: softmax causal fwd+bwd (T=1024, H=16, D=128, bf16) and the all-gather strategy "
                "(T=2048 over 4 chips) on v5e")

PRESETS: dict[str, TpuCompilePreset] = {p.name: p for p in (DEFAULT, FULL, TILES, CI)}
