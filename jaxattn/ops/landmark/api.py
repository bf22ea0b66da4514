"""``landmark_attention``: validation, defaults and dispatch."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import _dispatch
from jaxattn._validation import validate_qkv
from jaxattn.ops.landmark import pallas_gpu, pallas_tpu, xla
from jaxattn.ops.landmark.config import LandmarkConfig
from jaxattn.ops.landmark.reference import landmark_attention_reference

REGISTRY = {
    "reference": landmark_attention_reference,
    "xla": xla.landmark_attention_xla,
    "pallas_gpu": pallas_gpu.landmark_attention_pallas_gpu,
    "pallas_tpu": pallas_tpu.landmark_attention_pallas_tpu,
}
DEFAULTS = {"cpu": ("xla",), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")}


def landmark_attention(q, k, v, *, block_size: int, scale: float | None = None, return_lse: bool = False,
                       implementation: str | Sequence[str] | None = None, block_q: int | None = None,
                       block_k: int | None = None):
  r"""Causal landmark attention (Mohtashami & Jaggi 2023): the grouped softmax over landmark blocks.

  Token ``j`` is a landmark iff ``(j + 1) % block_size == 0`` (insert them with
  :func:`jaxattn.ops.landmark.data.insert_landmarks`); block ``c(i) = i // block_size``. With
  ``s_ij = scale * q_i . k_j``, query ``i`` first takes a softmax over

  .. math::
     \mathrm{TOP}(i) = \{\text{regular } j \le i \text{ in block } c(i)\} \cup \{L_b : b < c(i)\}

  (landmark keys of earlier blocks; the current block's landmark is masked, also for the landmark query itself),
  then each earlier block ``b`` spreads its landmark's probability over its own regular keys:

  .. math::
     a_{ij} = \begin{cases} p_{\mathrm{top}}(j) & j \text{ regular in } c(i) \\
        p_{\mathrm{top}}(L_b)\, \mathrm{softmax}_{j' \in \mathrm{reg}(b)}(s_{ij'})_j & j \text{ regular in } b < c(i)
        \\ 0 & j \text{ a landmark} \end{cases}, \qquad o_i = \sum_j a_{ij} v_j, \qquad \sum_j a_{ij} = 1.

  Landmark values are never mixed in. A last block without a landmark (``T`` not a multiple of ``block_size``) is
  allowed. No row is ever empty (a query always sees itself or, as a landmark, its block's regular keys).

  Args:
    q: queries ``[B, T, H, D]`` (f32, bf16 or f16), RoPE already applied if used.
    k: keys ``[B, T, G, D]`` with ``H % G == 0`` (GQA/MQA: query head ``h`` uses kv head ``h // (H // G)``).
    v: values ``[B, T, G, E]``.
    block_size: landmark block length (>= 2; the landmark is the block's last token). The paper uses 64 (50 regular
      tokens + landmark in its first experiments); the Pallas kernels need a power of two >= 16 on GPU and a
      multiple of 8 on TPU.
    scale: logit scale, default ``D ** -0.5``.
    return_lse: also return the top-level log-sum-exp ``[B, H, T]`` (f32, natural log) over ``TOP(i)``.
    implementation: ``"reference"`` (dense f32 definition, autodiff), ``"xla"`` (blockwise online softmax, memory
      linear in ``T``, ``custom_vjp``; the CPU default), ``"pallas_gpu"`` (Triton-lowered Pallas kernels; tile =
      landmark block), ``"pallas_tpu"`` (Mosaic kernels); on CPU the Pallas ones run in interpret mode when asked
      for explicitly. A sequence is tried in order; None picks per platform.
    block_q: query tile of the blockwise implementations (a multiple of ``block_size``; default per backend).
    block_k: key tile of ``"xla"`` (a multiple of ``block_size``; the kernels use ``block_size``).

  Returns:
    ``out [B, T, H, E]`` in q's dtype, and ``lse [B, H, T]`` if ``return_lse``.

  Raises:
    ValueError: on bad shapes, dtypes or options, naming the offending values.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  _validate_qkv(q, k, v)
  B, T, H, D = q.shape
  if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size < 2:
    raise ValueError(f"block_size must be an int >= 2 (regular tokens + 1 landmark), got {block_size!r}")
  block_size = int(block_size)
  if scale is None:
    scale = float(D) ** -0.5
  elif not isinstance(scale, (int, float, np.floating)) or isinstance(scale, bool) or not np.isfinite(scale):
    raise ValueError(f"scale must be a finite Python float, got {scale!r}")
  for name, b in (("block_q", block_q), ("block_k", block_k)):
    if b is None:
      continue
    if not isinstance(b, (int, np.integer)) or isinstance(b, bool) or b < 1 or b % block_size:
      raise ValueError(f"{name} must be a positive multiple of block_size={block_size}, got {b!r}")
  cfg = LandmarkConfig(T=T, block_size=block_size, scale=float(scale),
                       block_q=None if block_q is None else int(block_q),
                       block_k=None if block_k is None else int(block_k))
  if implementation is not None and not isinstance(implementation, str):
    implementation = tuple(implementation)
  out, lse = _run(q, k, v, implementation=implementation, cfg=cfg)
  return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnames=("implementation", "cfg"))
def _run(q, k, v, *, implementation, cfg: LandmarkConfig):
  # jit here so eager calls compile once per (shapes, config), not on every call; inlined under an outer jit.
  return _dispatch.dispatch("landmark_attention", REGISTRY, implementation, DEFAULTS, q, k, v, cfg)


def _validate_qkv(q, k, v) -> None:
  validate_qkv(q, k, v, same_length="landmark attention is causal self-attention: q, k, v must share the length")
