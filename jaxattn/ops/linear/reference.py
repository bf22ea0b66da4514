"""Two independent f32 definitions of (decayed) linear attention: the oracles the other implementations are tested
against.

- :func:`linear_attention_reference` (``implementation="reference"``): the recurrence itself, one ``lax.scan`` step
  per token with an f32 state ``S [B, H, D, E]``.
- :func:`linear_attention_parallel`: the quadratic masked "parallel" form with the decay matrix
  ``M[t, s] = exp(G_t - G_s)`` (``s <= t``, ``G`` the cumulative log decay), for tests only: it forms ``[T, S]``
  matrices and subtracts cumulative sums, so it is neither memory-lean nor accurate for very long sequences.

Both take the arguments ``linear_attention`` validated and canonicalised: ``log_decay`` None, f32 ``[H]`` or f32
``[B, T, H]``; ``initial_state`` None or f32 ``[B, H, D, E]``; and the call
(:class:`~jaxattn.ops.linear.config.LinearCall`: its ``causal`` and ``scale``). Both return
``(out [B, T, H, E] in q's dtype, final_state [B, H, D, E] f32)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn._vma import match_vma
from jaxattn.backend import Backend
from jaxattn.ops.linear.config import FINITE_LOG_DECAY_FLOOR, LinearCall, LinearResiduals

_HI = lax.Precision.HIGHEST


def _heads(x, H):
  """``[B, T, G, *] -> [B, T, H, *]``: query head ``h`` reads kv head ``h // (H // G)``."""
  return jnp.repeat(x, H // x.shape[2], axis=2)


def _zero_state(q, v):
  return jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)


def recurrent_step(q_t, k_t, v_t, state, log_decay_t, scale: float):
  r"""One step of the recurrence, all heads already expanded to ``H``.

  .. math:: S_t = e^{g_t} S_{t-1} + k_t v_t^\top, \qquad o_t = \mathrm{scale}\; q_t^\top S_t

  Args:
    q_t, k_t: ``[B, H, D]``; v_t: ``[B, H, E]``; state: f32 ``[B, H, D, E]``.
    log_decay_t: None, or f32 broadcastable to ``[B, H]``.
    scale: output scale.

  Returns:
    ``(o_t [B, H, E] f32, new state [B, H, D, E] f32)``.
  """
  kv = jnp.einsum("bhd,bhe->bhde", k_t.astype(jnp.float32), v_t.astype(jnp.float32), precision=_HI)
  if log_decay_t is not None:
    decay = jnp.exp(jnp.maximum(log_decay_t, FINITE_LOG_DECAY_FLOOR))[..., None, None]
    # A decay of exactly 0 (a reset, g = -inf) clears the state even when it holds NaN / inf (0 * NaN = NaN).
    state = jnp.where(decay == 0, 0.0, decay * state)
  state = state + kv
  o = jnp.einsum("bhd,bhde->bhe", q_t.astype(jnp.float32), state, precision=_HI) * scale
  return o, state


def linear_attention_reference(q, k, v, log_decay, initial_state, cfg: LinearCall):
  """The recurrent definition: a ``lax.scan`` over time with an f32 state (see :func:`recurrent_step`).

  Args:
    q: ``[B, T, H, D]``; k: ``[B, S, G, D]``; v: ``[B, S, G, E]`` (``S == T`` when causal).
    log_decay: None, f32 ``[H]`` or f32 ``[B, T, H]`` (causal only).
    initial_state: None or f32 ``[B, H, D, E]``.
    cfg: the call (its ``causal`` and ``scale``).

  Returns:
    ``out [B, T, H, E]`` in q's dtype and the final state ``[B, H, D, E]`` f32.
  """
  H = q.shape[2]
  k, v = _heads(k, H), _heads(v, H)  # [B, S, H, D], [B, S, H, E]
  state0 = _zero_state(q, v) if initial_state is None else initial_state
  state0 = match_vma(state0, q, k, v, log_decay)
  if log_decay is None:
    g = None
  elif log_decay.ndim == 1:
    g = jnp.broadcast_to(log_decay, (q.shape[1], 1, H))  # [T, 1, H]
  else:
    g = log_decay.transpose(1, 0, 2)  # [T, B, H]

  if not cfg.causal:
    # o_t = scale * q_t^T S_final: run the (decay-free) recurrence over the keys, then read every query from it.
    def kv_step(state, kv_t):
      k_t, v_t = kv_t
      return recurrent_step(k_t, k_t, v_t, state, None, 1.0)[1], None

    state, _ = lax.scan(kv_step, state0, (k.transpose(1, 0, 2, 3), v.transpose(1, 0, 2, 3)))
    out = jnp.einsum("bthd,bhde->bthe", q.astype(jnp.float32), state, precision=_HI) * cfg.scale
    return out.astype(q.dtype), state

  def step(state, xs):
    q_t, k_t, v_t, g_t = xs
    o_t, state = recurrent_step(q_t, k_t, v_t, state, g_t, cfg.scale)
    return state, o_t

  xs = (q.transpose(1, 0, 2, 3), k.transpose(1, 0, 2, 3), v.transpose(1, 0, 2, 3), g)
  state, out = lax.scan(step, state0, xs)  # out [T, B, H, E]
  return out.transpose(1, 0, 2, 3).astype(q.dtype), state


def linear_attention_parallel(q, k, v, log_decay, initial_state, cfg: LinearCall):
  r"""The quadratic masked form with the decay matrix (a second, independent reference; tests only).

  .. math::
     o_t = \mathrm{scale}\Big(\sum_{s \le t} e^{G_t - G_s} (q_t \cdot k_s)\, v_s + e^{G_t} q_t^\top S_0\Big),
     \qquad S_T = e^{G_T} S_0 + \sum_s e^{G_T - G_s} k_s v_s^\top

  with ``G_t = sum_{u <= t} g_u`` (for a per-head constant ``g``, ``G_t - G_s = (t - s) g`` exactly).
  Non-causal: ``o_t = scale * q_t^T (S_0 + sum_s k_s v_s^T)``.

  Same arguments and results as :func:`linear_attention_reference`.
  """
  B, T, H, D = q.shape
  S = k.shape[1]
  qf = q.astype(jnp.float32)
  kf, vf = _heads(k, H).astype(jnp.float32), _heads(v, H).astype(jnp.float32)  # [B, S, H, D|E]
  state0 = _zero_state(q, v) if initial_state is None else initial_state
  scores = jnp.einsum("bthd,bshd->bhts", qf, kf, precision=_HI)  # [B, H, T, S]
  if not cfg.causal:
    state = state0 + jnp.einsum("bshd,bshe->bhde", kf, vf, precision=_HI)
    out = jnp.einsum("bhts,bshe->bthe", scores, vf, precision=_HI)
    out = out + jnp.einsum("bthd,bhde->bthe", qf, state0, precision=_HI)
    return (out * cfg.scale).astype(q.dtype), state

  t = jnp.arange(T)
  causal = t[:, None] >= t[None, :]  # [T, S]
  if log_decay is None:
    log_m = jnp.zeros((1, 1, T, T), jnp.float32)
    G = jnp.zeros((1, T, 1), jnp.float32)  # [B|1, T, H|1]
  elif log_decay.ndim == 1:
    a = jnp.maximum(log_decay, FINITE_LOG_DECAY_FLOOR)  # [H]
    log_m = a[None, :, None, None] * (t[:, None] - t[None, :]).astype(jnp.float32)  # [1, H, T, S]
    G = a[None, None, :] * (t + 1).astype(jnp.float32)[None, :, None]  # [1, T, H]
  else:
    G = jnp.cumsum(jnp.maximum(log_decay, FINITE_LOG_DECAY_FLOOR), axis=1)  # [B, T, H]
    log_m = (G[:, :, None, :] - G[:, None, :, :]).transpose(0, 3, 1, 2)  # [B, H, T, S]
  m = jnp.exp(jnp.where(causal, log_m, -jnp.inf))  # [B|1, H|1, T, S], never exp of a positive number
  w = scores * m
  out = jnp.einsum("bhts,bshe->bthe", w, vf, precision=_HI)
  out = out + jnp.exp(G)[..., None] * jnp.einsum("bthd,bhde->bthe", qf, state0, precision=_HI)
  # S_T: the last row of the decay matrix gives exp(G_T - G_s).
  last = m[:, :, -1, :]  # [B|1, H|1, S]
  state = jnp.exp(G[:, -1, :])[..., None, None] * state0 + jnp.einsum(
      "bhs,bshd,bshe->bhde", jnp.broadcast_to(last, (B, H, S)), kf, vf, precision=_HI)
  return (out * cfg.scale).astype(q.dtype), state


class ReferenceBackend(Backend):
  """The recurrence (:func:`linear_attention_reference`); its gradient is ``jax.vjp`` of the recurrence."""

  name = "reference"
  autodiff = True

  def fwd(self, call: LinearCall, config, args):
    out, state = linear_attention_reference(*args, call)
    return (out, state), LinearResiduals(*args, state)

  def bwd(self, call: LinearCall, config, residuals: LinearResiduals, cotangents, needs):
    q, k, v, log_decay, initial_state = residuals[:5]
    present = tuple(i for i, x in enumerate((q, k, v, log_decay, initial_state)) if x is not None)

    def f(*xs):
      full = [q, k, v, log_decay, initial_state]
      for i, x in zip(present, xs):
        full[i] = x
      return linear_attention_reference(*full, call)

    _, vjp = jax.vjp(f, *(residuals[i] for i in present))
    grads = [None] * 5
    for i, g in zip(present, vjp(tuple(cotangents))):
      grads[i] = g
    return tuple(grads)


BACKEND = ReferenceBackend()
