"""``implementation="pallas_gpu"``: fused landmark attention with Pallas (Triton lowering) on GPUs.

The kernels in :mod:`pallas_kernels.landmark.gpu` (tile = landmark block; forward, dq, dk/dv) composed into a
``custom_vjp``; ``delta = rowsum(dO * O) - dlse`` is computed in XLA between the forward and the backward kernels.

Supports: GQA/MQA, any ``T`` (a last block without landmark), head dims up to 256 (non powers of two are zero-padded),
f32/bf16/f16, lse. Refuses (``NotImplementedError``): block sizes that are not powers of two >= 16, platforms other
than GPU and CPU. On a CPU backend it runs in Pallas interpret mode (slow; for tests); ``implementation=None`` never
picks it there. The query tile defaults to 128 tokens (at least one block; halved while it still covers T),
or ``cfg.block_q``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxattn import _dispatch
from jaxattn.ops.landmark.config import LandmarkConfig
from pallas_kernels.landmark import gpu

_DEFAULT_BLOCK_Q = 128


@dataclasses.dataclass(frozen=True)
class _Static:
  cfg: LandmarkConfig
  block_q: int
  interpret: bool


def landmark_attention_pallas_gpu(q, k, v, cfg: LandmarkConfig):
  """The Pallas GPU kernels (interpret mode on CPU); see the module docstring for what is supported."""
  interpret = _dispatch.pallas_interpret("pallas_gpu")
  D, E = q.shape[-1], v.shape[-1]
  if max(D, E) > gpu.MAX_HEAD_DIM:
    raise NotImplementedError(f"pallas_gpu supports head dims up to {gpu.MAX_HEAD_DIM}, got D={D}, E={E}")
  block_q = cfg.block_q or max(cfg.block_size, _DEFAULT_BLOCK_Q)
  if cfg.block_q is None:
    while block_q // 2 >= max(cfg.block_size, cfg.T):  # short sequences: do not pad to a long tile
      block_q //= 2
  try:
    gpu.check_blocks(cfg.block_size, block_q)
  except ValueError as e:
    raise NotImplementedError(f"pallas_gpu: {e}") from None
  return _attention(q, k, v, _Static(cfg, block_q, interpret=interpret))


def _common(st: _Static):
  return dict(block_size=st.cfg.block_size, block_q=st.block_q, scale=st.cfg.scale, interpret=st.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, st: _Static):
  return gpu.flash_landmark_forward(q, k, v, **_common(st))


def _attention_fwd(q, k, v, st: _Static):
  out, lse = gpu.flash_landmark_forward(q, k, v, **_common(st))
  return (out, lse), (q, k, v, out, lse)


def _attention_bwd(st: _Static, res, g):
  q, k, v, out, lse = res
  dout, dlse = g
  # delta_i = sum_e dO_ie O_ie - dlse_i: the row term of the top-level softmax Jacobian.
  delta = jnp.einsum("bthe,bthe->bht", dout.astype(jnp.float32), out.astype(jnp.float32)) - dlse
  dq = gpu.flash_landmark_backward_dq(q, k, v, dout, lse, delta, **_common(st))
  dk, dv = gpu.flash_landmark_backward_dkv(q, k, v, dout, lse, delta, **_common(st))
  return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)
