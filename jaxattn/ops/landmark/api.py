"""``landmark_attention``: validation, the :class:`LandmarkCall`, and dispatch over the landmark backends
(:mod:`jaxattn.backend` protocol).

The family's backends take ``(q, k, v)`` and return ``(out, lse)``; their residuals are a
:class:`~jaxattn.ops.landmark.config.LandmarkResiduals`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import backend as backend_lib
from jaxattn._validation import validate_qkv, validate_scale
from jaxattn.ops.landmark import pallas_gpu, pallas_tpu, xla
from jaxattn.ops.landmark.config import LandmarkCall, LandmarkResiduals
from jaxattn.ops.landmark.reference import landmark_attention_reference


class ReferenceBackend(backend_lib.Backend):
  """The dense f32 definition (:func:`~jaxattn.ops.landmark.reference.landmark_attention_reference`); its gradient
  is ``jax.vjp`` of the definition."""

  name = "reference"
  autodiff = True

  def fwd(self, call: LandmarkCall, config, args):
    out, lse = landmark_attention_reference(*args, call)
    return (out, lse), LandmarkResiduals(*args, out, lse)

  def bwd(self, call: LandmarkCall, config, residuals: LandmarkResiduals, cotangents, needs):
    _, vjp = jax.vjp(lambda q, k, v: landmark_attention_reference(q, k, v, call), *residuals[:3])
    return vjp(tuple(cotangents))


OP = "landmark_attention"
BACKENDS: dict[str, backend_lib.Backend] = {
    b.name: b for b in (ReferenceBackend(), xla.BACKEND, pallas_gpu.BACKEND, pallas_tpu.BACKEND)}
DEFAULTS: dict[str, tuple[str, ...]] = {"cpu": ("xla",), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")}


def make_call(q, k, v, *, block_size: int, scale: float | None = None) -> LandmarkCall:
  """The :class:`LandmarkCall` of already validated arguments (arrays or ``jax.ShapeDtypeStruct``)."""
  B, T, H, D = q.shape
  _, _, G, E = v.shape
  return LandmarkCall(B=B, T=T, H=H, G=G, D=D, E=E, dtype=jnp.dtype(q.dtype).name, block_size=int(block_size),
                      scale=float(D) ** -0.5 if scale is None else float(scale))


def resolve_backend(call: LandmarkCall, implementation=None) -> tuple[backend_lib.Backend, Any]:
  """The landmark backend and config that serve ``call`` (no trial compile; see :func:`jaxattn.backend.resolve`)."""
  return backend_lib.resolve(OP, BACKENDS, backend_lib.static_implementation(implementation), DEFAULTS, call)


def landmark_attention(q, k, v, *, block_size: int, scale: float | None = None, return_lse: bool = False,
                       implementation=None, block_q: int | None = None, block_k: int | None = None):
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
  Non-finite values in k or v of positions a query does not use (later positions; landmark values) never reach it.

  Args:
    q: queries ``[B, T, H, D]`` (f32, bf16 or f16), RoPE already applied if used.
    k: keys ``[B, T, G, D]`` with ``H % G == 0`` (GQA/MQA: query head ``h`` uses kv head ``h // (H // G)``).
    v: values ``[B, T, G, E]``.
    block_size: landmark block length (>= 2; the landmark is the block's last token). The paper uses 64 (50 regular
      tokens + landmark in its first experiments); the Pallas kernels need a power of two >= 16 on GPU and a
      multiple of 8 on TPU.
    scale: logit scale, a finite positive number (also in float32), default ``D ** -0.5``.
    return_lse: also return the top-level log-sum-exp ``[B, H, T]`` (f32, natural log) over ``TOP(i)``.
    implementation: a backend name, ``(name, Config)``, a sequence of those tried in order, or None (per
      platform: CPU ``xla``; GPU ``pallas_gpu``, ``xla``; TPU ``pallas_tpu``, ``xla``; a backend that refuses the
      call or whose kernels do not fit is skipped with a :class:`jaxattn.backend.FallbackWarning`). Backends:
      ``"reference"`` (dense f32 definition; gradient by autodiff of it), ``"xla"`` (blockwise online softmax,
      memory linear in ``T``; the CPU default; Config :class:`~jaxattn.ops.landmark.config.XlaConfig`),
      ``"pallas_gpu"`` (Triton-lowered Pallas kernels, key tile = landmark block; block sizes powers of two >= 16;
      Config :class:`~jaxattn.ops.landmark.config.PallasGpuConfig`), ``"pallas_tpu"`` (Mosaic kernels; block sizes
      multiples of 8; Config :class:`~jaxattn.ops.landmark.config.PallasTpuConfig`); on CPU the Pallas ones run in
      interpret mode when named. A named backend that cannot serve the call raises ``NotImplementedError``; an
      invalid Config raises ``ValueError``.
    block_q: shorthand for the query tile (``block_q`` field) of whichever blockwise backend runs (a multiple of
      ``block_size``; a power-of-two multiple on GPU; default per backend). Not combinable with ``(name, Config)``.
    block_k: shorthand for the key tile of ``"xla"`` (a multiple of ``block_size``); the kernels' key tile is
      always one landmark block, so they ignore it.

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
  scale = validate_scale(scale, D)
  for name, b in (("block_q", block_q), ("block_k", block_k)):
    if b is None:
      continue
    if not isinstance(b, (int, np.integer)) or isinstance(b, bool) or b < 1 or b % block_size:
      raise ValueError(f"{name} must be a positive multiple of block_size={block_size}, got {b!r}")
  call = make_call(q, k, v, block_size=block_size, scale=scale)
  implementation = backend_lib.static_implementation(implementation)
  tiles = {name: int(b) for name, b in (("block_q", block_q), ("block_k", block_k)) if b is not None}
  if tiles:
    implementation = backend_lib.with_config_fields(OP, BACKENDS, DEFAULTS, implementation, call, **tiles)
  out, lse = _run(q, k, v, implementation=implementation, call=call, platform=backend_lib.platform())
  return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnames=("implementation", "call", "platform"))
def _run(q, k, v, *, implementation, call: LandmarkCall, platform: str):
  del platform  # a cache key: dispatch and the kernels' interpret mode depend on it (use_platform)
  # jit here so eager calls compile once per (shapes, call, implementation), not on every call; inlined under an
  # outer jit.
  return backend_lib.dispatch(OP, BACKENDS, implementation, DEFAULTS, call, (q, k, v))


def _validate_qkv(q, k, v) -> None:
  validate_qkv(q, k, v, same_length="landmark attention is causal self-attention: q, k, v must share the length")
