"""TPU generations: VMEM per TensorCore, peak bf16 FLOP/s and HBM bandwidth, and which generation kernels are tiled for.

A Mosaic kernel whose scoped VMEM (double-buffered blocks, scratch, spills) exceeds the compiler's limit does not
compile (``RESOURCE_EXHAUSTED: ... Ran out of memory in memory space vmem. Used 16.66M of 16.00M vmem``). The
kernel families pick their default tiles per generation (the largest measured by ``python -m experiments
tpu_compile --preset tiles`` whose kernels fit half the VMEM) and pass ``vmem_limit_bytes`` so the compiler's
default scoped limit (below the physical VMEM on v5e / v5p / v6e) does not reject them.

Table (per chip; VMEM per TensorCore): v4: 275 TFLOP/s bf16, 1200 GB/s HBM, 16 MiB VMEM; v5e: 197 TFLOP/s,
819 GB/s, 128 MiB; v5p: 459 TFLOP/s, 2765 GB/s, 64 MiB; v6e (Trillium): 918 TFLOP/s, 1638 GB/s, 128 MiB. FLOP/s
and bandwidth are Google Cloud's published per-chip TPU specifications; VMEM sizes are the ones jax's Pallas TPU
hardware table lists, and v4's 16 MiB is what XLA reports when a kernel overflows it
(``experiments/tpu_compile``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

__all__ = ["TpuGeneration", "TPU_GENERATIONS", "generation_of", "use_tpu_generation", "tpu_generation"]

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  """One TPU generation.

  Attributes:
    name: ``"v4"``, ``"v5e"``, ``"v5p"`` or ``"v6e"``.
    peak_bf16_flops: dense bf16 matmul FLOP/s per chip.
    hbm_bytes_per_s: HBM bandwidth per chip.
    vmem_bytes: VMEM per TensorCore (the most a kernel's scoped VMEM may use).
    device_kinds: ``jax.Device.device_kind`` strings of this generation.
    wide_row_bytes: attention kernels halve their default tiles for q / k / v rows wider than this (``max(D, E)``
      times the itemsize): measured with ``python -m experiments tpu_compile``, v4's softmax kernels need 9.3 MiB
      at 512 with f32 (512-byte rows; half its VMEM is 8 MiB); v5p's need 44.6 MiB at 1024 with f32 and D=256 (1 KiB
      rows; half its VMEM is 32 MiB) but 26.0 MiB with f32 and D=128.
  """

  name: str
  peak_bf16_flops: float
  hbm_bytes_per_s: float
  vmem_bytes: int
  device_kinds: tuple[str, ...]
  wide_row_bytes: int = 512

  @property
  def vmem_limit(self) -> int:
    """The ``vmem_limit_bytes`` kernels pass to Mosaic: three quarters of the VMEM, at least 16 MiB (v4's whole
    VMEM, which is also the compiler's own limit there); the compiler's defaults on the other generations are far
    below their VMEM."""
    return min(self.vmem_bytes, max(16 * MIB, self.vmem_bytes * 3 // 4))

  @property
  def vmem_budget(self) -> int:
    """Half the VMEM: what default tiles may use (the rest stays for XLA's own fusions around the kernels)."""
    return self.vmem_bytes // 2


TPU_GENERATIONS: dict[str, TpuGeneration] = {
    "v4": TpuGeneration("v4", 275e12, 1200e9, 16 * MIB, ("TPU v4",), wide_row_bytes=256),
    "v5e": TpuGeneration("v5e", 197e12, 819e9, 128 * MIB, ("TPU v5 lite", "TPU v5e")),
    "v5p": TpuGeneration("v5p", 459e12, 2765e9, 64 * MIB, ("TPU v5", "TPU v5p")),
    "v6e": TpuGeneration("v6e", 918e12, 1638e9, 128 * MIB, ("TPU v6 lite", "TPU v6e")),
}


def generation_of(device_kind: str) -> str | None:
  """The generation name of a ``device_kind`` (``"TPU v5 lite"`` -> ``"v5e"``), or None if unknown."""
  for g in TPU_GENERATIONS.values():
    if device_kind in g.device_kinds:
      return g.name
  return None


_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxattn_tpu_generation", default=None)


@contextlib.contextmanager
def use_tpu_generation(name: str):
  """Choose tiles and VMEM limits for TPU generation ``name`` (ahead-of-time compiles for a chip that is not here)."""
  if name not in TPU_GENERATIONS:
    raise ValueError(f"TPU generation must be one of {tuple(TPU_GENERATIONS)}, got {name!r}")
  token = _OVERRIDE.set(name)
  try:
    yield
  finally:
    _OVERRIDE.reset(token)


def tpu_generation() -> str | None:
  """The generation set by :func:`use_tpu_generation`, else the local TPU's, else None (no TPU, or an unknown one:
  the kernels then keep their generation-independent defaults)."""
  if _OVERRIDE.get() is not None:
    return _OVERRIDE.get()
  import jax  # lazy: this module stays importable without initialising jax's backends

  if jax.default_backend() != "tpu":
    return None
  return generation_of(jax.devices()[0].device_kind)
