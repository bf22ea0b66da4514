"""``implementation="pallas_tpu"``: fused landmark attention with Mosaic Pallas kernels on TPUs.

The kernels in :mod:`pallas_kernels.landmark.tpu` (key tile = one landmark block; forward, dq, dk/dv) joined by
:func:`jaxattn.backend.flash_vjp` through the shared ``fwd`` / ``bwd`` of :mod:`jaxattn.ops.landmark.pallas_common`.

Supports: GQA/MQA, any ``T`` (a last block without landmark), any head dims, f32/bf16/f16, lse. ``supports`` refuses
block sizes that are not multiples of 8 (the TPU sublane tile) and platforms other than TPU and CPU. Block 128 fills
the 128 lanes of the logits; 64 is correct but runs the logits at half width (it is checked in interpret mode only).
On a CPU backend it runs in TPU interpret mode (slow; for tests); ``implementation=None`` never picks it there.

Config: :class:`~jaxattn.ops.landmark.config.PallasTpuConfig` (``block_q``: a multiple of the block size; default 256
tokens rounded to whole blocks, at most the block-rounded sequence).
"""

from __future__ import annotations

from jaxattn.ops.landmark.config import LandmarkCall, PallasTpuConfig, check_tile
from jaxattn.ops.landmark.pallas_common import PallasLandmarkBackend
from pallas_kernels.landmark import tpu

__all__ = ["PallasTpuBackend", "BACKEND", "DEFAULT_BLOCK_Q"]

DEFAULT_BLOCK_Q = 256  # query-tile tokens of the default config (rounded down to whole blocks, at least one)


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
    bs = call.block_size
    block_q = max(bs, DEFAULT_BLOCK_Q // bs * bs)
    return PallasTpuConfig(block_q=min(block_q, -(-call.T // bs) * bs))  # no more than the block-rounded sequence

  def validate_config(self, call: LandmarkCall, config: PallasTpuConfig) -> None:
    check_tile(f"{self.name}: {type(config).__name__}", "block_q", config.block_q, call.block_size)


BACKEND = PallasTpuBackend()
