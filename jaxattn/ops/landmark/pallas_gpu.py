"""``implementation="pallas_gpu"``: fused landmark attention with Pallas (Triton lowering) on GPUs.

The kernels in :mod:`pallas_kernels.landmark.gpu` (key tile = one landmark block; forward, dq, dk/dv) joined by
:func:`jaxattn.backend.flash_vjp` through the shared ``fwd`` / ``bwd`` of :mod:`jaxattn.ops.landmark.pallas_common`.

Supports: GQA/MQA, any ``T`` (a last block without landmark), head dims up to 256 (non powers of two are zero-padded),
f32/bf16/f16, lse. ``supports`` refuses block sizes that are not powers of two >= 16, larger head dims, platforms
other than GPU and CPU, and on GPU the calls whose kernels exceed its shared memory even at one block and one stage
(the static budget of :mod:`pallas_kernels.landmark.budget`, e.g. D=256 bf16 block 128, D=128 f32 block 128). On a
CPU backend it runs in Pallas interpret mode (slow; for tests); ``implementation=None`` never picks it there.

Config: :class:`~jaxattn.ops.landmark.config.PallasGpuConfig` (``block_q``: a power-of-two multiple of the block size;
``num_warps`` / ``num_stages`` / ``bwd_num_stages``). :meth:`PallasGpuBackend.default_config` is the one place the
query tile and the stages are chosen (from the shared-memory budget).
"""

from __future__ import annotations

import dataclasses

from jaxattn import backend as backend_lib
from jaxattn.ops.landmark.config import LandmarkCall, PallasGpuConfig
from jaxattn.ops.landmark.pallas_common import PallasLandmarkBackend
from jaxattn.backend import config_error
from pallas_kernels.common.smem import HOPPER_SMEM_BYTES, smem_limit
from pallas_kernels.landmark import budget, gpu

__all__ = ["PallasGpuBackend", "BACKEND", "DEFAULT_BLOCK_Q"]

DEFAULT_BLOCK_Q = 128  # query-tile tokens of the default config (at least one block)
_NUM_WARPS = (1, 2, 4, 8, 16)


class PallasGpuBackend(PallasLandmarkBackend):
  """The Triton-lowered landmark kernels (interpret mode on CPU)."""

  name = "pallas_gpu"
  Config = PallasGpuConfig
  kernel_platform = "gpu"
  kernels = gpu

  def supports(self, call: LandmarkCall) -> str | None:
    reason = self.platform_reason()
    if reason is None and max(call.D, call.E) > gpu.MAX_HEAD_DIM:
      reason = f"pallas_gpu supports head dims up to {gpu.MAX_HEAD_DIM}, got D={call.D}, E={call.E}"
    if reason is None:
      try:
        gpu.check_blocks(call.block_size, call.block_size)
      except ValueError as e:
        reason = str(e)
    if reason is None and backend_lib.platform() == "gpu":  # shared memory: the static budget of the three kernels
      reason = budget.refusal(D=call.D, E=call.E, dtype=call.dtype, block_size=call.block_size, limit=smem_limit())
    return reason

  def default_config(self, call: LandmarkCall) -> PallasGpuConfig:
    # The one place the GPU query tile is chosen: the largest tile (128 tokens, at least one block, halved while it
    # still covers T) whose three kernels fit this GPU's shared memory (static budget, pallas_kernels.landmark.budget),
    # then the most stages for the forward and the backward kernels; f32: one stage, 8 warps, smaller tiles (compile
    # time).
    limit = smem_limit() if backend_lib.platform() == "gpu" else HOPPER_SMEM_BYTES
    tiles = budget.choose_tiles(D=call.D, E=call.E, dtype=call.dtype, block_size=call.block_size, T=call.T,
                                limit=limit, max_block_q=DEFAULT_BLOCK_Q)
    if tiles is None:  # supports() refuses this call on GPU; interpret mode (CPU) runs the smallest tiles
      return PallasGpuConfig(block_q=call.block_size, num_stages=1, bwd_num_stages=1)
    return PallasGpuConfig(block_q=tiles.block_q, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                           bwd_num_stages=tiles.bwd_num_stages)

  def validate_config(self, call: LandmarkCall, config: PallasGpuConfig) -> None:
    owner = f"{self.name}: {type(config).__name__}"
    try:
      gpu.check_blocks(call.block_size, config.block_q)
    except (ValueError, TypeError):
      raise config_error(owner, "block_q", config.block_q,
                         f"must be a power-of-two multiple of block_size={call.block_size}") from None
    if config.num_warps is not None and config.num_warps not in _NUM_WARPS:
      raise config_error(owner, "num_warps", config.num_warps, f"must be None or one of {_NUM_WARPS}")
    if not isinstance(config.num_stages, int) or isinstance(config.num_stages, bool) or not 1 <= config.num_stages <= 8:
      raise config_error(owner, "num_stages", config.num_stages, "must be an int in [1, 8]")
    bwd = config.bwd_num_stages
    if bwd is not None and (not isinstance(bwd, int) or isinstance(bwd, bool) or not 1 <= bwd <= 8):
      raise config_error(owner, "bwd_num_stages", bwd, "must be None or an int in [1, 8]")

  def kernel_kwargs(self, call: LandmarkCall, config: PallasGpuConfig) -> dict:
    return dict(super().kernel_kwargs(call, config), num_warps=config.num_warps, num_stages=config.num_stages)

  def bwd(self, call: LandmarkCall, config: PallasGpuConfig, residuals, cotangents, needs):
    # the backward kernels run with their own stage count (the dk/dv kernel pipelines q / dO tiles: more bytes)
    if config.bwd_num_stages is not None:
      config = dataclasses.replace(config, num_stages=config.bwd_num_stages)
    return super().bwd(call, config, residuals, cotangents, needs)


BACKEND = PallasGpuBackend()
