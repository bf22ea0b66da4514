"""Presets for ``python -m experiments gpu_compile``: which GPU kernel builds to compile without a GPU.

Every build is one public op (``implementation="pallas_gpu"``, its default config) at ``[B, T, H, D]`` traced for
the GPU and compiled ahead of time for a target card (deviceless XLA compilation; the CUDA plugin must be
installed). ``default`` is the fast subset (bf16 at D=128, seconds per build, with the ``mosaic_gpu`` Hopper kernels);
``mosaic`` only those (D 64 and 128); ``ci`` the one build CI compiles;
``full`` covers every family,
D in {64, 128, 256}, bf16 and f32, forward and forward+backward, for Hopper and Ampere limits (f32 backward builds
take up to minutes each on 2 CPU cores).
"""

from __future__ import annotations

import dataclasses

FAMILIES = ("softmax", "linear", "landmark")
# Explicit-only backends, compiled by the presets that name them: "softmax_mosaic" is softmax_attention with
# implementation="mosaic_gpu" (the Hopper kernels; h100 targets only).
EXTRA_FAMILIES = ("softmax_mosaic",)
MODES = ("fwd", "fwd_bwd")
DTYPES = ("bfloat16", "float32")
TARGETS = ("h100", "a100")  # sm_90 (232448 bytes of shared memory per block), sm_80 (166912)


@dataclasses.dataclass(frozen=True)
class GpuCompilePreset:
  """One sweep of builds.

  Attributes:
    name: preset id (``--preset``).
    families: op families from :data:`FAMILIES`.
    head_dims: ``D`` (= ``E``) values.
    dtypes: input dtypes from :data:`DTYPES`.
    modes: ``"fwd"`` (forward kernels) and / or ``"fwd_bwd"`` (forward and backward kernels).
    block_sizes: landmark block sizes (the landmark kernels' key tile).
    targets: target cards from :data:`TARGETS`.
    B, T, H, G: batch, sequence length, query heads, kv heads of every build.
    description: one line for ``--help``.
  """

  name: str
  families: tuple[str, ...] = FAMILIES
  head_dims: tuple[int, ...] = (64, 128, 256)
  dtypes: tuple[str, ...] = DTYPES
  modes: tuple[str, ...] = MODES
  block_sizes: tuple[int, ...] = (64, 128)
  targets: tuple[str, ...] = ("h100",)
  B: int = 2
  T: int = 8192
  H: int = 16
  G: int = 16
  description: str = ""

  def __post_init__(self):
    for field, allowed in (("families", FAMILIES + EXTRA_FAMILIES), ("modes", MODES), ("dtypes", DTYPES),
                           ("targets", TARGETS)):
      values = getattr(self, field)
      if not values:
        raise ValueError(f"GpuCompilePreset.{field} must be non-empty")
      for v in values:
        if v not in allowed:
          raise ValueError(f"GpuCompilePreset.{field}: unknown {v!r}; choose from {allowed}")
    for d in self.head_dims:
      if not isinstance(d, int) or not 1 <= d <= 256:
        raise ValueError(f"GpuCompilePreset.head_dims: {d!r} is not an int in [1, 256]")
    for bs in self.block_sizes:
      if not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
        raise ValueError(f"GpuCompilePreset.block_sizes: {bs!r} is not a power of two >= 16")
    for f in ("B", "T", "H", "G"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"GpuCompilePreset.{f} must be a positive int, got {v!r}")
    if self.H % self.G:
      raise ValueError(f"H={self.H} is not a multiple of G={self.G}")


DEFAULT = GpuCompilePreset(
    "default", families=FAMILIES + EXTRA_FAMILIES, head_dims=(128,), dtypes=("bfloat16",),
    description="fast subset: every family and the mosaic_gpu softmax kernels, D=128, bf16, fwd and fwd+bwd, "
                "landmark blocks 64 and 128, H100 (sm_90)")
FULL = GpuCompilePreset(
    "full", targets=TARGETS,
    description="every family, D in {64, 128, 256}, bf16 and f32, fwd and fwd+bwd, H100 (sm_90) and A100 (sm_80)")
CI = GpuCompilePreset(
    "ci", families=("landmark",), head_dims=(128,), dtypes=("bfloat16",), modes=("fwd_bwd",), block_sizes=(64,),
    T=1024, H=4, G=4, description="the CI check: landmark fwd+bwd, D=128, bf16, block 64 (the H200 failure)")

MOSAIC = GpuCompilePreset(
    "mosaic", families=EXTRA_FAMILIES, head_dims=(64, 128), dtypes=("bfloat16",),
    description="the mosaic_gpu (Hopper) softmax kernels: causal, D in {64, 128}, bf16, fwd and fwd+bwd, H100")

PRESETS: dict[str, GpuCompilePreset] = {p.name: p for p in (DEFAULT, FULL, CI, MOSAIC)}
