"""``implementation="pallas_gpu"``: chunk-parallel linear attention with Pallas kernels (Triton lowering) on GPUs.

The passes of :mod:`pallas_kernels.linear.gpu`, joined by :func:`jaxattn.backend.flash_vjp` through the shared
``fwd`` / ``bwd`` of :mod:`jaxattn.ops.linear.pallas_common`. Forward: a state pass (one program per (batch, head,
state tile) walks the chunks with one small product per chunk and stores every K-th chunk-entry state) and an output
pass with one program per (batch, head, K chunks, value tile). Backward: the state pass again (every chunk), a reverse
state pass (the state cotangent at every chunk boundary; its last value is the initial-state gradient), then a dq/dk
pass and a dv pass (fused into one for head dims up to 128), each one program per (batch, head, chunk, tile). The
log-decay gradient is a small XLA epilogue over the per-token terms the dq/dk pass emits (exact identity, see
``pallas_common``).

Supports: causal linear attention with no decay, a per-head constant ``[H]`` or a per-token gate ``[B, T, H]``
(``-inf`` = reset), initial and final states, GQA/MQA (K/V read through the index maps, never repeated; the
per-query-head dk/dv are summed after the kernels), any ``T`` (zero-padded to whole chunks), head dims up to 256
(zero-padded to powers of two), f32/bf16/f16. ``supports`` refuses (the dispatcher then falls back to ``"xla"``):
``causal=False`` (two matmuls in XLA, no kernel needed), head dims above 256, platforms other than GPU and CPU. On a
CPU backend it runs in Pallas interpret mode (slow: for tests and users without a GPU); ``implementation=None`` never
picks it there.

Config: :class:`~jaxattn.ops.linear.config.PallasGpuConfig` (chunk 64 by default, clamped to
``max(16, next_pow2(T))``; one stored forward state per 4 chunks; state tiles 64 x 64, halved to 32 while there are
fewer than 256 state programs; output value tile 64; the dv pass fused into the dq/dk pass for head dims up to 128
(bf16 / f16; 64 for f32) unless a 16-bit log-decay gradient is needed; per-pass warps; every size a power of two
>= 16, ``ValueError`` otherwise).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxattn.ops.linear.config import LinearCall, PallasGpuConfig
from jaxattn.ops.linear.pallas_common import PallasLinearBackend
from jaxattn.backend import config_error
from pallas_kernels.common import is_pow2
from pallas_kernels.linear import gpu

__all__ = ["PallasGpuBackend", "BACKEND", "block_sizes"]

_TILES = ("chunk_size", "block_e", "block_d_dq", "block_e_dkv", "block_d_state", "block_e_state")
_NUM_WARPS = (1, 2, 4, 8, 16)


def block_sizes(call: LinearCall, config: PallasGpuConfig) -> gpu.BlockSizes:
  """The kernels' resolved block sizes for ``call`` (every tile filled in, clamped to the problem)."""
  return gpu.BlockSizes(chunk=config.chunk_size, block_d_state=config.block_d_state,
                        block_e_state=config.block_e_state, block_e=config.block_e, block_d_dq=config.block_d_dq,
                        block_e_dkv=config.block_e_dkv, num_warps=config.num_warps,
                        num_stages=config.num_stages, state_interval=config.state_interval).resolve(
                            call.T, call.D, call.E, heads=call.B * call.H, itemsize=jnp.dtype(call.dtype).itemsize)


class PallasGpuBackend(PallasLinearBackend):
  """The Triton-lowered chunk kernels (interpret mode on CPU)."""

  name = "pallas_gpu"
  Config = PallasGpuConfig
  kernel_platform = "gpu"

  def supports(self, call: LinearCall) -> str | None:
    reason = self.platform_reason(call)
    if reason is None and max(call.D, call.E) > gpu.MAX_HEAD_DIM:
      reason = f"pallas_gpu supports head dims up to {gpu.MAX_HEAD_DIM}, got D={call.D}, E={call.E}"
    return reason

  def default_config(self, call: LinearCall) -> PallasGpuConfig:
    return PallasGpuConfig(chunk_size=gpu.DEFAULT_CHUNK)

  def validate_config(self, call: LinearCall, config: PallasGpuConfig) -> None:
    owner = f"{self.name}: {type(config).__name__}"
    for field in _TILES:
      value = getattr(config, field)
      if value is None and field != "chunk_size":
        continue
      if not isinstance(value, int) or isinstance(value, bool) or value < 16 or not is_pow2(value):
        raise config_error(owner, field, value, "must be a power of two >= 16 (a Triton tile)")
    k = config.state_interval
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or not is_pow2(k):
      raise config_error(owner, "state_interval", k, "must be a power of two >= 1")
    if config.num_warps is not None and config.num_warps not in _NUM_WARPS:
      raise config_error(owner, "num_warps", config.num_warps, f"must be None or one of {_NUM_WARPS}")
    if not isinstance(config.num_stages, int) or isinstance(config.num_stages, bool) or not 1 <= config.num_stages <= 8:
      raise config_error(owner, "num_stages", config.num_stages, "must be an int in [1, 8]")

  def _kw(self, call, config):
    return dict(scale=call.scale, blocks=block_sizes(call, config), interpret=self.interpret())

  def kernel_fwd(self, call, config, q, k, v, log_decay, initial_state):
    return gpu.linear_fwd(q, k, v, log_decay, initial_state, **self._kw(call, config))

  def kernel_bwd(self, call, config, q, k, v, log_decay, initial_state, do, d_final_state, needs, log_decay_grad):
    return gpu.linear_bwd(q, k, v, log_decay, initial_state, do, d_final_state, log_decay_grad=log_decay_grad,
                          need_dv=needs[2], **self._kw(call, config))


BACKEND = PallasGpuBackend()
