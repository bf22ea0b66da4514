"""``implementation="pallas_tpu"``: fused landmark attention with Mosaic Pallas kernels on TPUs.

The kernels in :mod:`pallas_kernels.landmark.tpu` (tile = landmark block; forward, dq, dk/dv) composed into a
``custom_vjp``; ``delta = rowsum(dO * O) - dlse`` is computed in XLA between the forward and the backward kernels.

Supports: GQA/MQA, any ``T`` (a last block without landmark), any head dims, f32/bf16/f16, lse. Refuses
(``NotImplementedError``): block sizes that are not multiples of 8 (the TPU sublane tile), platforms other than TPU
and CPU. Block 128 fills the 128 lanes of the logits; 64 is correct but runs the logits at half width (it is checked
in interpret mode only). On a CPU backend it runs in TPU interpret mode (slow; for tests); ``implementation=None``
never picks it there. The query tile defaults to 256 tokens (at least one block), or ``cfg.block_q``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxattn import _dispatch
from jaxattn.ops.landmark.config import LandmarkConfig
from pallas_kernels.landmark import tpu

_DEFAULT_BLOCK_Q = 256


@dataclasses.dataclass(frozen=True)
class _Static:
  cfg: LandmarkConfig
  block_q: int
  interpret: Any  # False on TPU, pltpu.InterpretParams() on CPU


def landmark_attention_pallas_tpu(q, k, v, cfg: LandmarkConfig):
  """The Pallas TPU kernels (TPU interpret mode on CPU); see the module docstring for what is supported."""
  interpret = _dispatch.pallas_interpret("pallas_tpu")
  bs = cfg.block_size
  block_q = cfg.block_q or max(bs, _DEFAULT_BLOCK_Q // bs * bs)
  block_q = min(block_q, -(-cfg.T // bs) * bs)  # no more than the (block-rounded) sequence
  try:
    tpu.check_blocks(bs, block_q, cfg.T)
  except ValueError as e:
    raise NotImplementedError(f"pallas_tpu: {e}") from None
  return _attention(q, k, v, _Static(cfg, block_q, interpret))


def _common(st: _Static):
  return dict(block_size=st.cfg.block_size, block_q=st.block_q, scale=st.cfg.scale, interpret=st.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, st: _Static):
  return tpu.flash_landmark_forward(q, k, v, **_common(st))


def _attention_fwd(q, k, v, st: _Static):
  out, lse = tpu.flash_landmark_forward(q, k, v, **_common(st))
  return (out, lse), (q, k, v, out, lse)


def _attention_bwd(st: _Static, res, g):
  q, k, v, out, lse = res
  dout, dlse = g
  # delta_i = sum_e dO_ie O_ie - dlse_i: the row term of the top-level softmax Jacobian.
  delta = jnp.einsum("bthe,bthe->bht", dout.astype(jnp.float32), out.astype(jnp.float32)) - dlse
  dq = tpu.flash_landmark_backward_dq(q, k, v, dout, lse, delta, **_common(st))
  dk, dv = tpu.flash_landmark_backward_dkv(q, k, v, dout, lse, delta, **_common(st))
  return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)
