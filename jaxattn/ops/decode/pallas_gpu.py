"""``implementation="pallas_gpu"``: split-K flash-decoding with Pallas (Triton lowering) on GPUs, forward only.

The kernel (:mod:`pallas_kernels.decode.gpu`) holds each kv head's group of query heads as one tile and splits the
key blocks of a (sequence, kv head) over ``num_splits`` programs; XLA merges their partial softmax states. Dense
decode visits the blocks below each sequence's length; gathered decode the distinct blocks holding an attended
index entry, masked to the listed keys inside them (built on device by
:func:`jaxattn.ops.decode.common.kernel_lists`). Statistics come from a second chunked XLA pass over the keys
(:func:`jaxattn.ops.decode.common.stats_pass`).

No backward: ``jax.grad`` through it raises ``NotImplementedError`` naming the backend (use ``"xla"``). Supports
head dims up to 256 and every float dtype; on a CPU backend it runs in Pallas interpret mode (slow; for tests).
"""

from __future__ import annotations

import dataclasses

from jaxattn import backend as backend_lib
from jaxattn.backend import Backend, config_error
from jaxattn.ops.decode.common import kernel_lists, no_grad
from jaxattn.ops.decode.config import DecodeCall, PallasGpuConfig, check_positive_int
from jaxattn.ops.decode.xla import with_stats
from pallas_kernels.common import next_pow2
from pallas_kernels.decode import gpu as kernels

NUM_WARPS = (1, 2, 4, 8, 16)
TARGET_PROGRAMS = 256  # default num_splits: about this many programs in all (2 per SM on an H100 / H200)
STATS_CHUNK = 1024


def default_block_k(L: int) -> int:
  """The largest of 128, 64, 32, 16 dividing ``L`` (no padding copy of the cache), else 64 (at most the key axis
  rounded up to a power of two)."""
  for b in (128, 64, 32, 16):
    if L % b == 0:
      return b
  return min(64, max(16, next_pow2(L)))


def resolve(call: DecodeCall, config: PallasGpuConfig) -> PallasGpuConfig:
  """``config`` with ``block_k`` and ``num_splits`` filled in for ``call``."""
  bk = config.block_k or default_block_k(call.S)
  nk = -(-call.S // bk)
  nb = min(call.K, nk) if call.gathered else nk
  splits = config.num_splits or -(-TARGET_PROGRAMS // (call.B * call.G))
  return dataclasses.replace(config, block_k=bk, num_splits=max(1, min(splits, nb)))


class PallasGpuBackend(Backend):
  """The split-K Triton decode kernel and its XLA combine (forward only)."""

  name = "pallas_gpu"
  Config = PallasGpuConfig
  kernel = True

  def supports(self, call: DecodeCall) -> str | None:
    if backend_lib.platform() not in ("gpu", "cpu"):
      return f"{self.name} runs on GPU (or in interpret mode on CPU), not on {backend_lib.platform()!r}"
    if max(call.D, call.E) > kernels.MAX_HEAD_DIM:
      return f"{self.name} supports head dims up to {kernels.MAX_HEAD_DIM}, got D={call.D}, E={call.E}"
    return None

  def default_config(self, call: DecodeCall) -> PallasGpuConfig:
    return resolve(call, PallasGpuConfig())

  def validate_config(self, call: DecodeCall, config: PallasGpuConfig) -> None:
    owner = f"{self.name}: {type(config).__name__}"
    if config.block_k is not None and (rule := kernels.block_rule(config.block_k)):
      raise config_error(owner, "block_k", config.block_k, rule)
    check_positive_int(owner, "num_splits", config.num_splits, allow_none=True)
    if config.num_warps not in NUM_WARPS or isinstance(config.num_warps, bool):
      raise config_error(owner, "num_warps", config.num_warps, f"must be one of {', '.join(map(str, NUM_WARPS))}")
    if not isinstance(config.num_stages, int) or isinstance(config.num_stages, bool) or not 1 <= config.num_stages <= 8:
      raise config_error(owner, "num_stages", config.num_stages, "must be an int in [1, 8]")

  def fwd(self, call: DecodeCall, config: PallasGpuConfig, args):
    cfg = resolve(call, config)

    def run(*args):
      q, k, v, lengths = args[:4]
      blocks, counts, key_mask = kernel_lists(args, call.S, call.G, cfg.block_k)
      out, lse = kernels.decode_attention(q, k, v, blocks, counts, lengths, key_mask, block_k=cfg.block_k,
                                          scale=call.scale, num_splits=cfg.num_splits, num_warps=cfg.num_warps,
                                          num_stages=cfg.num_stages, interpret=backend_lib.interpret_mode("gpu"))
      return with_stats(call, STATS_CHUNK, args, out, lse)

    return no_grad(run, op="decode_attention", implementation=self.name)(*args), None

  def bwd(self, call, config, residuals, cotangents, needs):
    raise NotImplementedError("decode_attention: implementation 'pallas_gpu' is forward only")


BACKEND = PallasGpuBackend()
