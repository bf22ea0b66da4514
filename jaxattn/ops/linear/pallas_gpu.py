"""``implementation="pallas_gpu"``: chunked linear attention with Pallas kernels (Triton lowering) on GPUs.

Three kernels from :mod:`pallas_kernels.linear.gpu`, joined by :func:`jaxattn.backend.flash_vjp` through the shared
``fwd`` / ``bwd`` of :mod:`jaxattn.ops.linear.pallas_common`: a forward sweep over the chunks carrying the f32 state
in registers (outputs and final state), a dq kernel (forward-like sweep recomputing the state) and a dk/dv kernel
(reverse sweep carrying the state cotangent, which also yields the initial-state gradient). The log-decay gradient
is a small XLA epilogue over per-token terms the kernels emit (exact identity, see ``pallas_common``).

Supports: causal linear attention with no decay, a per-head constant ``[H]`` or a per-token gate ``[B, T, H]``
(``-inf`` = reset), initial and final states, GQA/MQA (K/V read through the index maps, never repeated; the
per-query-head dk/dv are summed after the kernel), any ``T`` (zero-padded to whole chunks), head dims up to 256
(zero-padded to powers of two), f32/bf16/f16. ``supports`` refuses (the dispatcher then falls back to ``"xla"``):
``causal=False`` (two matmuls in XLA, no kernel needed), head dims above 256, platforms other than GPU and CPU. On a
CPU backend it runs in Pallas interpret mode (slow: for tests and users without a GPU); ``implementation=None`` never
picks it there.

Config: :class:`~jaxattn.ops.linear.config.PallasGpuConfig` (chunk 64 by default, clamped to
``max(16, next_pow2(T))``; the forward and dk/dv kernels tile the value dim by 64, the dq kernel the key dim by 64;
every size a power of two >= 16, ``ValueError`` otherwise).
"""

from __future__ import annotations

from jaxattn.ops.linear.config import LinearCall, PallasGpuConfig
from jaxattn.ops.linear.pallas_common import PallasLinearBackend
from jaxattn.backend import config_error
from pallas_kernels.common import is_pow2
from pallas_kernels.linear import gpu

__all__ = ["PallasGpuBackend", "BACKEND", "block_sizes"]

_TILES = ("chunk_size", "block_e", "block_d_dq", "block_e_dkv")
_NUM_WARPS = (1, 2, 4, 8, 16)


def block_sizes(call: LinearCall, config: PallasGpuConfig) -> gpu.BlockSizes:
  """The kernels' resolved block sizes for ``call`` (every tile filled in, clamped to the problem)."""
  return gpu.BlockSizes(chunk=config.chunk_size, block_e=config.block_e, block_d_dq=config.block_d_dq,
                        block_e_dkv=config.block_e_dkv, num_warps=config.num_warps,
                        num_stages=config.num_stages).resolve(call.T, call.D, call.E)


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
    if config.num_warps not in _NUM_WARPS:
      raise config_error(owner, "num_warps", config.num_warps, f"must be one of {_NUM_WARPS}")
    if not isinstance(config.num_stages, int) or isinstance(config.num_stages, bool) or not 1 <= config.num_stages <= 8:
      raise config_error(owner, "num_stages", config.num_stages, "must be an int in [1, 8]")

  def _kw(self, call, config):
    return dict(scale=call.scale, blocks=block_sizes(call, config), interpret=self.interpret())

  def kernel_fwd(self, call, config, q, k, v, log_decay, initial_state):
    return gpu.linear_fwd(q, k, v, log_decay, initial_state, **self._kw(call, config))

  def kernel_dq(self, call, config, q, k, v, log_decay, initial_state, do, log_decay_grad):
    return gpu.linear_bwd_dq(q, k, v, log_decay, initial_state, do, log_decay_grad=log_decay_grad,
                             **self._kw(call, config))

  def kernel_dkv(self, call, config, q, k, v, log_decay, do, d_final_state, log_decay_grad):
    return gpu.linear_bwd_dkv(q, k, v, log_decay, do, d_final_state, log_decay_grad=log_decay_grad,
                              **self._kw(call, config))


BACKEND = PallasGpuBackend()
