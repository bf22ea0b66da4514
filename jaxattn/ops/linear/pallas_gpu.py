"""``implementation="pallas_gpu"``: chunked linear attention with Pallas kernels (Triton lowering) on GPUs.

Three kernels from :mod:`pallas_kernels.linear.gpu`, joined by a ``custom_vjp``
(:mod:`jaxattn.ops.linear._pallas_vjp`): a forward sweep over the chunks carrying the f32 state in registers
(outputs and final state), a dq kernel (forward-like sweep recomputing the state) and a dk/dv kernel (reverse sweep
carrying the state cotangent, which also yields the initial-state gradient). The log-decay gradient is a small
XLA epilogue over per-token terms the kernels emit (exact identity, see ``_pallas_vjp``).

Supports: causal linear attention with no decay, a per-head constant ``[H]`` or a per-token gate ``[B, T, H]``
(``-inf`` = reset), initial and final states, GQA/MQA (K/V read through the index maps, never repeated; the
per-query-head dk/dv are summed after the kernel), any ``T`` (zero-padded to whole chunks), head dims up to 256
(zero-padded to powers of two), f32/bf16/f16. Refuses with ``NotImplementedError`` (the dispatcher then falls back
to ``"xla"``): ``causal=False`` (two matmuls in XLA, no kernel needed), a ``chunk_size`` that is not a power of two
>= 16, head dims above 256, platforms other than GPU and CPU. On a CPU backend it runs in Pallas interpret mode
(slow: for tests and users without a GPU); ``implementation=None`` never picks it there.

Chunk: ``chunk_size`` (default 64, clamped to ``max(16, next_pow2(T))``). Tiles: the forward and dk/dv kernels tile
the value dim by 64 (state tile ``[Dp, 64]``, more programs per head), the dq kernel the key dim by 64.
"""

from __future__ import annotations

import dataclasses

from jaxattn import _dispatch
from jaxattn.ops.linear._pallas_vjp import Kernels, linear_attention_kernels
from jaxattn.ops.linear.config import LinearConfig
from pallas_kernels.linear import gpu

__all__ = ["linear_attention_pallas_gpu", "block_sizes"]


@dataclasses.dataclass(frozen=True)
class GpuKernels(Kernels):
  """The Triton kernels with their resolved block sizes."""

  blocks: gpu.BlockSizes = gpu.BlockSizes()
  interpret: bool = False

  def fwd(self, q, k, v, log_decay, initial_state):
    return gpu.linear_fwd(q, k, v, log_decay, initial_state, scale=self.scale, blocks=self.blocks,
                          interpret=self.interpret)

  def dq(self, q, k, v, log_decay, initial_state, do, log_decay_grad):
    return gpu.linear_bwd_dq(q, k, v, log_decay, initial_state, do, scale=self.scale, blocks=self.blocks,
                             interpret=self.interpret, log_decay_grad=log_decay_grad)

  def dkv(self, q, k, v, log_decay, do, d_final_state, log_decay_grad):
    return gpu.linear_bwd_dkv(q, k, v, log_decay, do, d_final_state, scale=self.scale, blocks=self.blocks,
                              interpret=self.interpret, log_decay_grad=log_decay_grad)


def block_sizes(T: int, D: int, E: int, chunk_size: int | None = None) -> gpu.BlockSizes:
  """The resolved kernel block sizes for a call (``NotImplementedError`` for a chunk the kernels cannot run)."""
  try:
    return gpu.BlockSizes(chunk=chunk_size or gpu.DEFAULT_CHUNK).resolve(T, D, E)
  except ValueError as e:
    raise NotImplementedError(f"pallas_gpu cannot use chunk_size={chunk_size}: {e}") from None


def linear_attention_pallas_gpu(q, k, v, log_decay, initial_state, cfg: LinearConfig):
  """Pallas GPU kernels (interpret mode on CPU). Same arguments and results as the reference.

  Raises:
    NotImplementedError: see the module docstring.
  """
  if not cfg.causal:
    raise NotImplementedError("pallas_gpu has no kernel for causal=False (the xla path is two matmuls)")
  interpret = _dispatch.pallas_interpret("pallas_gpu")
  D, E = q.shape[-1], v.shape[-1]
  if max(D, E) > gpu.MAX_HEAD_DIM:
    raise NotImplementedError(f"pallas_gpu supports head dims up to {gpu.MAX_HEAD_DIM}, got D={D}, E={E}")
  kernels = GpuKernels(scale=cfg.scale, blocks=block_sizes(q.shape[1], D, E, cfg.chunk_size),
                       interpret=interpret)
  return linear_attention_kernels(q, k, v, log_decay, initial_state, kernels)
