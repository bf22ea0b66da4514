"""``linear_attention`` and ``linear_attention_step``: validation, defaults and dispatch."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import _dispatch
from jaxattn._validation import validate_qkv
from jaxattn.ops.linear import pallas_gpu, pallas_tpu, reference, xla
from jaxattn.ops.linear.config import LinearConfig

REGISTRY = {
    "reference": reference.linear_attention_reference,
    "xla": xla.linear_attention_xla,
    "pallas_gpu": pallas_gpu.linear_attention_pallas_gpu,
    "pallas_tpu": pallas_tpu.linear_attention_pallas_tpu,
}
DEFAULTS = {"cpu": ("xla",), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")}


def register(name: str, fn) -> None:
  """Adds an implementation (used by the Pallas backends when they are importable)."""
  REGISTRY[name] = fn


def _defaults():
  """The platform chains restricted to registered implementations (the Pallas ones register themselves)."""
  return {p: tuple(i for i in chain if i in REGISTRY) for p, chain in DEFAULTS.items()}


def linear_attention(q, k, v, *, log_decay=None, causal: bool = True, scale: float | None = None,
                     initial_state=None, return_final_state: bool = False,
                     implementation: str | Sequence[str] | None = None, chunk_size: int | None = None):
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
    implementation: ``"reference"`` (the recurrence, one ``lax.scan`` step per token) or ``"xla"`` (chunkwise,
      batched over chunks, numerically safe decay matrices, ``custom_vjp`` keeping chunk-boundary states only; the
      CPU default); ``"pallas_tpu"`` / ``"pallas_gpu"`` (chunked Pallas kernels, forward and backward; interpret
      mode on CPU; they refuse ``causal=False``, which falls back to ``"xla"``, and TPU refuses float16). A
      sequence is tried in order; None picks per platform. Otherwise every implementation supports every option.
    chunk_size: chunk length for the chunkwise implementations (default 64, at most ``T``). Any ``T`` works.

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
  log_decay = _validate_log_decay(log_decay, B, T, H, causal, per_token_shape=(B, T, H))
  initial_state = _validate_state(initial_state, "initial_state", B, H, D, E)
  scale = _validate_scale(scale, D)
  if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool)
                                 or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
  cfg = LinearConfig(causal=bool(causal), scale=scale, chunk_size=None if chunk_size is None else int(chunk_size))
  out, state = _dispatch.dispatch("linear_attention", REGISTRY, implementation, _defaults(),
                                  q, k, v, log_decay, initial_state, cfg)
  return (out, state) if return_final_state else out


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
  state = _validate_state(state, "state", B, H, D, E)
  log_decay = _validate_log_decay(log_decay, B, 1, H, True, per_token_shape=(B, H))
  scale = _validate_scale(scale, D)
  R = H // k_t.shape[1]
  k_h, v_h = jnp.repeat(k_t, R, axis=1), jnp.repeat(v_t, R, axis=1)  # [B, H, D], [B, H, E]
  o, state = reference.recurrent_step(q_t, k_h, v_h, state, log_decay, scale)
  return o.astype(q_t.dtype), state


# -------------------------------------------------------------------------------------------------- validation
def _validate_qkv(q, k, v, causal) -> None:
  validate_qkv(q, k, v, same_length="causal linear attention needs equal lengths (use causal=False for "
                                    "cross-attention)" if causal else None)


def _validate_log_decay(log_decay, B, T, H, causal, *, per_token_shape):
  """Returns None or an f32 array of shape ``[H]`` or ``per_token_shape``, checked ``<= 0`` when concrete."""
  if log_decay is None:
    return None
  log_decay = jnp.asarray(log_decay)
  if not causal:
    kind = "per-head" if log_decay.ndim == 1 else "per-token"
    raise ValueError(f"a decay needs causal=True; got a {kind} log_decay of shape {log_decay.shape} with "
                     f"causal=False")
  if not jnp.issubdtype(log_decay.dtype, jnp.floating):
    raise ValueError(f"log_decay must be a float array, got {log_decay.dtype}")
  if log_decay.shape not in ((H,), tuple(per_token_shape)):
    raise ValueError(f"log_decay must have shape [H] = {(H,)} or {list(per_token_shape)} = "
                     f"{tuple(per_token_shape)}, got {log_decay.shape}")
  log_decay = log_decay.astype(jnp.float32)
  if not isinstance(log_decay, jax.core.Tracer):
    a = np.asarray(log_decay)
    if np.isnan(a).any():
      raise ValueError(f"log_decay has {int(np.isnan(a).sum())} NaN values")
    if (a > 0).any():
      raise ValueError(f"log_decay must be <= 0 (a decay lambda = exp(g) <= 1), got max {float(a.max())!r} at "
                       f"index {tuple(int(i) for i in np.unravel_index(np.argmax(a), a.shape))}")
  return log_decay


def _validate_state(state, name, B, H, D, E):
  if state is None:
    return None
  state = jnp.asarray(state)
  if not jnp.issubdtype(state.dtype, jnp.floating):
    raise ValueError(f"{name} must be a float array, got {state.dtype}")
  if state.shape != (B, H, D, E):
    raise ValueError(f"{name} must have shape [B, H, D, E] = {(B, H, D, E)}, got {state.shape}")
  return state.astype(jnp.float32)


def _validate_scale(scale, D) -> float:
  if scale is None:
    return float(D) ** -0.5
  if not isinstance(scale, (int, float, np.floating, np.integer)) or isinstance(scale, bool) or not np.isfinite(
      scale):
    raise ValueError(f"scale must be a finite Python float, got {scale!r}")
  return float(scale)
