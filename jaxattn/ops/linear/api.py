"""``linear_attention`` and ``linear_attention_step``: validation, the :class:`LinearCall`, and dispatch over the
linear backends (:mod:`jaxattn.backend` protocol).

The family's backends take ``(q, k, v, log_decay, initial_state)`` and return ``(out, final_state)``; their
residuals are a :class:`~jaxattn.ops.linear.config.LinearResiduals`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import backend as backend_lib
from jaxattn._validation import (validate_chunk_size, validate_log_decay, validate_qkv, validate_scale,
                                 validate_state)
from jaxattn.ops.linear import pallas_gpu, pallas_tpu, reference, xla
from jaxattn.ops.linear.config import LinearCall

OP = "linear_attention"
BACKENDS: dict[str, backend_lib.Backend] = {
    b.name: b for b in (reference.BACKEND, xla.BACKEND, pallas_gpu.BACKEND, pallas_tpu.BACKEND)}
DEFAULTS: dict[str, tuple[str, ...]] = {"cpu": ("xla",), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")}


def make_call(q, k, v, *, log_decay=None, initial_state=None, causal: bool = True,
              scale: float | None = None) -> LinearCall:
  """The :class:`LinearCall` of already validated arguments (arrays or ``jax.ShapeDtypeStruct``)."""
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  decay = None if log_decay is None else ("head" if len(log_decay.shape) == 1 else "token")
  return LinearCall(B=B, T=T, S=S, H=H, G=G, D=D, E=E, dtype=jnp.dtype(q.dtype).name,
                    scale=float(D) ** -0.5 if scale is None else float(scale), causal=bool(causal), decay=decay,
                    initial_state=initial_state is not None)


def resolve_backend(call: LinearCall, implementation=None) -> tuple[backend_lib.Backend, Any]:
  """The linear backend and config that serve ``call`` (no trial compile; see :func:`jaxattn.backend.resolve`)."""
  return backend_lib.resolve(OP, BACKENDS, backend_lib.static_implementation(implementation), DEFAULTS, call)


def linear_attention(q, k, v, *, log_decay=None, causal: bool = True, scale: float | None = None,
                     initial_state=None, return_final_state: bool = False,
                     implementation=None, chunk_size: int | None = None):
  r"""Linear attention with an optional decay (TransNormerLLM / Lightning / RetNet / GLA-style gates).

  The recurrent definition, with an f32 state ``S_t [B, H, D, E]`` per query head:

  .. math::
     S_0 = \text{initial\_state (or 0)}, \qquad S_t = e^{g_t} S_{t-1} + k_t v_t^\top, \qquad
     o_t = \mathrm{scale}\; q_t^\top S_t

  i.e. ``o_t = scale * (sum_{s<=t} exp(g_{s+1} + ... + g_t) (q_t . k_s) v_s + exp(g_1 + ... + g_t) q_t^T S_0)``.
  No softmax and no normaliser (feature maps and normalisation belong to the caller, see
  :class:`jaxattn.nn.LinearAttention`). Query head ``h`` reads kv head ``h // (H // G)`` (GQA/MQA).

  ``causal=False``: ``o_t = scale * q_t^T S`` with ``S = S_0 + sum_s k_s v_s^T`` for every ``t`` (then ``S`` is also
  the final state, the key length may differ from ``T``, and ``log_decay`` must be None).

  Non-finite values: a NaN / inf in token ``s`` (or in ``S_0``) reaches ``o_t`` only for ``s <= t`` with no reset in
  between, a reset being a decay factor that is exactly 0 in f32 (``g = -inf``; ``0 * S`` is then 0 even when ``S``
  is NaN); later tokens, chunk padding and tokens after a reset stay finite and exact, in outputs and gradients.

  Args:
    q: queries ``[B, T, H, D]`` (f32, bf16 or f16).
    k: keys ``[B, T, G, D]`` (``[B, S, G, D]`` when ``causal=False``), ``H % G == 0``.
    v: values ``[B, T, G, E]`` (``[B, S, G, E]``).
    log_decay: ``g = log(lambda) <= 0``: None (no decay), ``[H]`` a constant per query head (TransNormerLLM,
      Lightning, RetNet) or ``[B, T, H]`` a per-token gate (GLA / Mamba-2 style). ``-inf`` is allowed (a full
      reset). Values are checked when concrete; under ``jit`` positive values are the caller's responsibility.
    causal: the causal recurrence (default) or the non-causal form above.
    scale: output scale, default ``D ** -0.5`` (TransNormerLLM uses ``1.0``).
    initial_state: ``S_0 [B, H, D, E]`` (any float dtype; used in f32), e.g. the state of a previous segment.
    return_final_state: also return ``S_T [B, H, D, E]`` f32 (for decoding with :func:`linear_attention_step` or
      the next segment).
    implementation: a backend name, ``(name, Config)``, a sequence of those tried in order, or None (per
      platform: CPU ``xla``; GPU ``pallas_gpu``, ``xla``; TPU ``pallas_tpu``, ``xla``; a backend that refuses the
      call or whose kernels do not fit is skipped with a :class:`jaxattn.backend.FallbackWarning`). Backends:
      ``"reference"`` (the recurrence, one ``lax.scan`` step per token; gradient by autodiff of it), ``"xla"``
      (chunkwise, batched over chunks, numerically safe decay matrices, a backward keeping chunk-boundary states
      only; the CPU default; Config :class:`~jaxattn.ops.linear.config.XlaConfig`), ``"pallas_gpu"`` /
      ``"pallas_tpu"`` (chunked Pallas kernels, forward and backward; interpret mode on CPU when named; they refuse
      ``causal=False``, which falls back to ``"xla"``, and TPU refuses float16; Configs
      :class:`~jaxattn.ops.linear.config.PallasGpuConfig` / :class:`~jaxattn.ops.linear.config.PallasTpuConfig`).
      Otherwise every backend supports every option. A named backend that cannot serve the call raises
      ``NotImplementedError``; an invalid Config raises ``ValueError``.
    chunk_size: shorthand for the ``chunk_size`` field of whichever chunked backend runs (``xla``: any positive
      int, default ``min(64, T)``; ``pallas_gpu``: a power of two >= 16, default 64; ``pallas_tpu``: a multiple of
      8 / 16 (f32 / bf16) or ``>= T``, default 128): its default config with this chunk, checked by the backend.
      Any ``T`` works. Not combinable with an explicit ``(name, Config)``.

  Returns:
    ``out [B, T, H, E]`` in q's dtype, and the final state ``[B, H, D, E]`` f32 if ``return_final_state``.

  Raises:
    ValueError: on bad shapes, dtypes or options, a positive or NaN ``log_decay``, or a decay with
      ``causal=False``, naming the offending values.
  """
  if not isinstance(causal, (bool, np.bool_)):
    raise ValueError(f"causal must be a bool, got {causal!r}")
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  _validate_qkv(q, k, v, causal)
  B, T, H, D = q.shape
  E = v.shape[-1]
  log_decay = validate_log_decay(log_decay, B, T, H, causal, per_token_shape=(B, T, H))
  initial_state = validate_state(initial_state, "initial_state", B, H, D, E)
  scale = validate_scale(scale, D)
  chunk_size = validate_chunk_size(chunk_size)
  call = make_call(q, k, v, log_decay=log_decay, initial_state=initial_state, causal=causal, scale=scale)
  implementation = backend_lib.static_implementation(implementation)
  if chunk_size is not None:
    implementation = backend_lib.with_config_fields(OP, BACKENDS, DEFAULTS, implementation, call, chunk_size=chunk_size)
  out, state = _run(q, k, v, log_decay, initial_state, implementation=implementation, call=call,
                    platform=backend_lib.platform())
  return (out, state) if return_final_state else out


@functools.partial(jax.jit, static_argnames=("implementation", "call", "platform"))
def _run(q, k, v, log_decay, initial_state, *, implementation, call: LinearCall, platform: str):
  del platform  # a cache key: dispatch and the kernels' interpret mode depend on it (use_platform)
  # jit here so eager calls compile once per (shapes, call, implementation), not on every call; inlined under an
  # outer jit.
  return backend_lib.dispatch(OP, BACKENDS, implementation, DEFAULTS, call, (q, k, v, log_decay, initial_state))


def linear_attention_step(q_t, k_t, v_t, state, *, log_decay=None, scale: float | None = None):
  r"""One decoding step of :func:`linear_attention` (constant work per token).

  .. math:: S' = e^{g} S + k_t v_t^\top, \qquad o_t = \mathrm{scale}\; q_t^\top S'

  Stepping through a sequence from ``state = initial_state`` (or zeros) gives the outputs and final state of
  ``linear_attention(q, k, v, log_decay=..., initial_state=..., return_final_state=True)``, so a prompt can be
  prefilled with :func:`linear_attention` and continued token by token.

  Args:
    q_t: ``[B, H, D]``.
    k_t: ``[B, G, D]`` with ``H % G == 0``.
    v_t: ``[B, G, E]``.
    state: ``[B, H, D, E]`` (used in f32).
    log_decay: None, ``[H]`` (per-head constant) or ``[B, H]`` (this token's gate), ``<= 0``.
    scale: output scale, default ``D ** -0.5``.

  Returns:
    ``(o_t [B, H, E] in q_t's dtype, new state [B, H, D, E] f32)``.

  Raises:
    ValueError: on bad shapes, dtypes or a positive / NaN ``log_decay``, naming the offending values.
  """
  q_t, k_t, v_t = jnp.asarray(q_t), jnp.asarray(k_t), jnp.asarray(v_t)
  for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
    if x.ndim != 3:
      raise ValueError(f"{name} must have rank 3 ([B, heads, dim]), got shape {x.shape}")
  _validate_qkv(q_t[:, None], k_t[:, None], v_t[:, None], True)
  B, H, D = q_t.shape
  E = v_t.shape[-1]
  if state is None:
    raise ValueError(f"state must be an array [B, H, D, E] = {[B, H, D, E]} (zeros to start), got None")
  state = validate_state(state, "state", B, H, D, E)
  log_decay = validate_log_decay(log_decay, B, 1, H, True, per_token_shape=(B, H))
  return _step(q_t, k_t, v_t, state, log_decay, scale=validate_scale(scale, D))


@functools.partial(jax.jit, static_argnames=("scale",))
def _step(q_t, k_t, v_t, state, log_decay, *, scale: float):
  R = q_t.shape[1] // k_t.shape[1]
  k_h, v_h = jnp.repeat(k_t, R, axis=1), jnp.repeat(v_t, R, axis=1)  # [B, H, D], [B, H, E]
  o, state = reference.recurrent_step(q_t, k_h, v_h, state, log_decay, scale)
  return o.astype(q_t.dtype), state


# -------------------------------------------------------------------------------------------------- validation
def _validate_qkv(q, k, v, causal) -> None:
  validate_qkv(q, k, v, same_length="causal linear attention needs equal lengths (use causal=False for "
                                    "cross-attention)" if causal else None)
