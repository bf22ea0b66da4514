"""``implementation="pallas_tpu"``: fused landmark attention with Mosaic Pallas kernels on TPUs.

The kernels in :mod:`pallas_kernels.landmark.tpu` (key tile = one landmark block; forward, dq, dk/dv) joined by
:func:`jaxattn.backend.flash_vjp` through the shared ``fwd`` / ``bwd`` of :mod:`jaxattn.ops.landmark.pallas_common`.

Supports: GQA/MQA, any ``T`` (a last block without landmark), any head dims, f32/bf16/f16, lse. ``supports`` refuses
block sizes that are not multiples of 8 (the TPU sublane tile) and platforms other than TPU and CPU. Block 128 fills
the 128 lanes of the logits; 64 is correct but runs the logits at half width (it is checked in interpret mode only).
On a CPU backend it runs in TPU interpret mode (slow; for tests); ``implementation=None`` never picks it there.

Config: :class:`~jaxattn.ops.landmark.config.PallasTpuConfig` (``block_q``: a multiple of the block size; default per
TPU generation, 512 tokens on v4 and 1024 on v5e / v5p / v6e (256 in interpret mode), rounded to whole blocks, at
most the block-rounded sequence).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxattn.ops.landmark.config import LandmarkCall, PallasTpuConfig, check_tile
from jaxattn.ops.landmark.pallas_common import PallasLandmarkBackend
from pallas_kernels.common.vmem import TPU_GENERATIONS, tpu_generation
from pallas_kernels.landmark import tpu

__all__ = ["PallasTpuBackend", "BACKEND", "DEFAULT_BLOCK_Q", "DEFAULT_BLOCK_Q_BY_GENERATION", "default_block_q"]

DEFAULT_BLOCK_Q = 256  # query-tile tokens of the default config without a known TPU generation (interpret mode)
# Per TPU generation: the largest of 256, 512 and 1024 query tokens whose forward, dq and dk/dv kernels fit half the
# VMEM of one TensorCore, measured by ``python -m experiments tpu_compile --families landmark --configs
# tiles=512,tiles=1024`` (largest scoped VMEM of the three kernels; B=1, T=8192, H=16, D=128, bf16, block 128):
# v4 (16 MiB): 2.3 / 4.3 / 8.8 MiB at 256 / 512 / 1024; v5e (128 MiB): 1.6 / 3.3 / 6.8 MiB (v5p and v6e: like v5e,
# with 64 and 128 MiB). The kernels take no VMEM limit: they stay within the compiler's default scoped limit.
DEFAULT_BLOCK_Q_BY_GENERATION: dict[str, int] = {"v4": 512, "v5e": 1024, "v5p": 1024, "v6e": 1024}


def default_block_q(generation: str | None, D: int, E: int, dtype: str) -> int:
  """Query-tile tokens of the default config: :data:`DEFAULT_BLOCK_Q` without a known generation, else the
  generation's entry, halved for q / k / v rows wider than the generation's ``wide_row_bytes``
  (:class:`pallas_kernels.common.vmem.TpuGeneration`; as for the softmax kernels)."""
  if generation is None:
    return DEFAULT_BLOCK_Q
  block_q = DEFAULT_BLOCK_Q_BY_GENERATION[generation]
  if max(D, E) * np.dtype(jnp.dtype(dtype)).itemsize > TPU_GENERATIONS[generation].wide_row_bytes:
    block_q //= 2
  return block_q


class PallasTpuBackend(PallasLandmarkBackend):
  """The Mosaic landmark kernels (TPU interpret mode on CPU)."""

  name = "pallas_tpu"
  Config = PallasTpuConfig
  kernel_platform = "tpu"
  kernels = tpu

  def supports(self, call: LandmarkCall) -> str | None:
    reason = self.platform_reason()
    if reason is None:
      try:
        tpu.check_blocks(call.block_size, call.block_size, call.T)
      except ValueError as e:
        reason = str(e)
    return reason

  def default_config(self, call: LandmarkCall) -> PallasTpuConfig:
    """``block_q``: :func:`default_block_q` tokens for the TPU generation, rounded down to whole landmark blocks (at
    least one), at most the block-rounded sequence."""
    bs = call.block_size
    block_q = max(bs, default_block_q(tpu_generation(), call.D, call.E, call.dtype) // bs * bs)
    return PallasTpuConfig(block_q=min(block_q, -(-call.T // bs) * bs))  # no more than the block-rounded sequence

  def validate_config(self, call: LandmarkCall, config: PallasTpuConfig) -> None:
    check_tile(f"{self.name}: {type(config).__name__}", "block_q", config.block_q, call.block_size)


BACKEND = PallasTpuBackend()
