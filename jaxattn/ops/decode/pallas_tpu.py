"""``implementation="pallas_tpu"``: Mosaic TPU decode attention over scalar-prefetched block lists, forward only.

The kernel (:mod:`pallas_kernels.decode.tpu`) walks, per (sequence, kv head), a list of key blocks whose ids are
scalar-prefetched into SMEM and drive the K / V BlockSpec index maps (paged-attention style: only listed blocks are
DMA'd). Dense decode lists the blocks below each sequence's length; gathered decode the distinct blocks holding an
attended index entry, masked to the listed keys inside them (built on device by
:func:`jaxattn.ops.decode.common.kernel_lists`). Statistics come from a second chunked XLA pass over the keys
(:func:`jaxattn.ops.decode.common.stats_pass`).

No backward: ``jax.grad`` through it raises ``NotImplementedError`` naming the backend (use ``"xla"``). Refuses
float16. On a CPU backend it runs in Pallas TPU interpret mode (slow; for tests).
"""

from __future__ import annotations

from jaxattn import backend as backend_lib
from jaxattn.backend import Backend, config_error
from jaxattn.ops.decode.common import kernel_lists, no_grad
from jaxattn.ops.decode.config import DecodeCall, PallasTpuConfig
from jaxattn.ops.decode.xla import with_stats
from pallas_kernels.decode import tpu as kernels

STATS_CHUNK = 1024


def default_block_k(L: int) -> int:
  """All of ``L`` up to 512; else the largest of 512, 256, 128 dividing ``L`` (no padding copy), else 512."""
  if L <= 512:
    return L
  for b in (512, 256, 128):
    if L % b == 0:
      return b
  return 512


class PallasTpuBackend(Backend):
  """The Mosaic decode kernel (forward only)."""

  name = "pallas_tpu"
  Config = PallasTpuConfig
  kernel = True

  def supports(self, call: DecodeCall) -> str | None:
    if backend_lib.platform() not in ("tpu", "cpu"):
      return f"{self.name} runs on TPU (or in interpret mode on CPU), not on {backend_lib.platform()!r}"
    if call.dtype == "float16":
      return f"{self.name} does not support float16 (use bfloat16 or float32)"
    return None

  def default_config(self, call: DecodeCall) -> PallasTpuConfig:
    return PallasTpuConfig(default_block_k(call.S))

  def validate_config(self, call: DecodeCall, config: PallasTpuConfig) -> None:
    owner = f"{self.name}: {type(config).__name__}"
    if config.block_k is not None and (rule := kernels.block_rule(config.block_k, call.S)):
      raise config_error(owner, "block_k", config.block_k, rule)
    vmem = config.vmem_limit_bytes
    if vmem is not None and (not isinstance(vmem, int) or isinstance(vmem, bool) or vmem < 1):
      raise config_error(owner, "vmem_limit_bytes", vmem, "must be None or a positive int")

  def fwd(self, call: DecodeCall, config: PallasTpuConfig, args):
    bk = min(config.block_k or default_block_k(call.S), call.S)

    def run(*args):
      q, k, v, lengths = args[:4]
      blocks, counts, key_mask = kernel_lists(args, call.S, call.G, bk)
      out, lse = kernels.decode_attention(q, k, v, blocks, counts, lengths, key_mask, block_k=bk, scale=call.scale,
                                          interpret=backend_lib.interpret_mode("tpu"),
                                          vmem_limit_bytes=config.vmem_limit_bytes)
      return with_stats(call, STATS_CHUNK, args, out, lse)

    return no_grad(run, op="decode_attention", implementation=self.name)(*args), None

  def bwd(self, call, config, residuals, cotangents, needs):
    raise NotImplementedError("decode_attention: implementation 'pallas_tpu' is forward only")


BACKEND = PallasTpuBackend()
