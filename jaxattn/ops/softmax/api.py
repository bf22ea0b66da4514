"""``softmax_attention``: validation, defaults and dispatch."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import _dispatch
from jaxattn._validation import validate_qkv
from jaxattn.masks import Full, Mask
from jaxattn.ops.softmax import cudnn, pallas_gpu, pallas_tpu, xla
from jaxattn.ops.softmax.config import AttentionConfig, BlockSizes
from jaxattn.ops.softmax.reference import softmax_attention_reference

REGISTRY = {
    "reference": softmax_attention_reference,
    "xla": xla.softmax_attention_xla,
    "cudnn": cudnn.softmax_attention_cudnn,
    "pallas_gpu": pallas_gpu.softmax_attention_pallas_gpu,
    "pallas_tpu": pallas_tpu.softmax_attention_pallas_tpu,
}
DEFAULTS = {"cpu": ("xla",), "gpu": ("cudnn", "pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")}


def register(name: str, fn) -> None:
  """Adds an implementation (used by the Pallas backends when they are importable)."""
  REGISTRY[name] = fn


def softmax_attention(q, k, v, *, mask: Mask | None = None, segment_ids=None, bias=None, scale: float | None = None,
                      logits_soft_cap: float | None = None, return_lse: bool = False,
                      implementation: str | Sequence[str] | None = None, block_sizes: BlockSizes | None = None):
  r"""Masked multi-head softmax attention.

  .. math::
     s_{ij} = \mathrm{cap}\cdot\tanh\big((\mathrm{scale}\; q_i \cdot k_j + \mathrm{bias}_{ij})/\mathrm{cap}\big),
     \qquad o_i = \sum_{j \in A(i)} \frac{e^{s_{ij}}}{\sum_{j' \in A(i)} e^{s_{ij'}}} v_j

  where ``A(i)`` is the set of keys allowed by ``mask`` and ``segment_ids``. A query with no allowed key gets
  output 0 and log-sum-exp ``-inf`` (never NaN), and zero gradients.

  Args:
    q: queries ``[B, T, H, D]`` (f32, bf16 or f16).
    k: keys ``[B, S, G, D]`` with ``H % G == 0`` (GQA/MQA: query head ``h`` uses kv head ``h // (H // G)``).
    v: values ``[B, S, G, E]``.
    mask: a static :mod:`jaxattn.masks` mask (``Causal()``, ``Local(...)``, ``Slices(...)``, ...). For causal
      cross-attention aligned at the bottom right use ``Causal(offset=S - T)``.
    segment_ids: ``(q_ids [B, T], kv_ids [B, S])`` integer arrays, or one ``[B, T]`` array when ``T == S``:
      query ``i`` attends key ``j`` only if their ids are equal.
    bias: additive logit bias, shape ``[T, S]``, ``[H|1, T, S]`` or ``[B|1, H|1, T, S]``; differentiable.
    scale: logit scale, default ``D ** -0.5``.
    logits_soft_cap: if set, logits become ``cap * tanh(logits / cap)`` (after scale and bias).
    return_lse: also return the log-sum-exp ``[B, H, T]`` (natural log, f32).
    implementation: ``"reference"`` (dense f32 definition), ``"xla"`` (blockwise online softmax, memory
      ``O(T * block)``, skips empty blocks; the CPU default), ``"cudnn"`` (``jax.nn.dot_product_attention`` on
      GPU: no segment ids, soft cap, lse or masks other than full / causal / local), ``"pallas_tpu"``,
      ``"pallas_gpu"`` (when installed); a sequence is tried in order; None picks per platform.
    block_sizes: :class:`BlockSizes` for the blockwise implementations (default: per backend).

  Returns:
    ``out [B, T, H, E]`` in q's dtype, and ``lse [B, H, T]`` if ``return_lse``.

  Raises:
    ValueError: on bad shapes, dtypes or options, naming the offending values.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  validate_qkv(q, k, v)
  B, T, H, D = q.shape
  S = k.shape[1]
  q_ids, kv_ids = _validate_segment_ids(segment_ids, B, T, S)
  bias = _validate_bias(bias, B, H, T, S)
  if mask is not None and not isinstance(mask, Mask):
    raise ValueError(f"mask must be a jaxattn.masks.Mask or None, got {type(mask).__name__}")
  if isinstance(mask, Full):
    mask = None
  if scale is None:
    scale = float(D) ** -0.5
  elif not isinstance(scale, (int, float, np.floating)) or not np.isfinite(scale):
    raise ValueError(f"scale must be a finite Python float, got {scale!r}")
  if logits_soft_cap is not None:
    if not isinstance(logits_soft_cap, (int, float, np.floating)) or not logits_soft_cap > 0:
      raise ValueError(f"logits_soft_cap must be a positive float or None, got {logits_soft_cap!r}")
    logits_soft_cap = float(logits_soft_cap)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
  cfg = AttentionConfig(T=T, S=S, scale=float(scale), logits_soft_cap=logits_soft_cap, mask=mask,
                        block_sizes=block_sizes, return_lse=bool(return_lse))
  if implementation is not None and not isinstance(implementation, str):
    implementation = tuple(implementation)
  out, lse = _run(q, k, v, bias, q_ids, kv_ids, implementation=implementation, cfg=cfg)
  return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnames=("implementation", "cfg"))
def _run(q, k, v, bias, q_ids, kv_ids, *, implementation, cfg: AttentionConfig):
  # jit here so eager calls compile once per (shapes, config), not on every call; inlined under an outer jit.
  return _dispatch.dispatch("softmax_attention", REGISTRY, implementation, DEFAULTS, q, k, v, bias, q_ids, kv_ids,
                            cfg)


def _validate_segment_ids(segment_ids, B, T, S):
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError(f"segment_ids must be (q_ids, kv_ids), got a sequence of length {len(segment_ids)}")
    q_ids, kv_ids = (jnp.asarray(x) for x in segment_ids)
  else:
    q_ids = kv_ids = jnp.asarray(segment_ids)
    if T != S:
      raise ValueError(f"a single segment_ids array needs T == S, got T={T}, S={S}; pass (q_ids, kv_ids)")
  for name, x, n in (("q segment ids", q_ids, T), ("kv segment ids", kv_ids, S)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be integers, got {x.dtype}")
    if x.shape != (B, n):
      raise ValueError(f"{name} must have shape {(B, n)}, got {x.shape}")
  return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def _validate_bias(bias, B, H, T, S):
  if bias is None:
    return None
  bias = jnp.asarray(bias)
  if not jnp.issubdtype(bias.dtype, jnp.floating):
    raise ValueError(f"bias must be a float array, got {bias.dtype}")
  if not 2 <= bias.ndim <= 4:
    raise ValueError(f"bias must have rank 2-4 ([B|1, H|1, T, S]), got shape {bias.shape}")
  full = (1,) * (4 - bias.ndim) + tuple(bias.shape)
  if full[2:] != (T, S) or full[0] not in (1, B) or full[1] not in (1, H):
    raise ValueError(f"bias shape {bias.shape} does not broadcast as [B|1, H|1, T, S] with B={B}, H={H}, "
                     f"T={T}, S={S}")
  return bias.reshape(full)

