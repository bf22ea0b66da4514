r"""The ``custom_vjp`` shared by ``pallas_gpu`` and ``pallas_tpu``: forward kernel, dq and dk/dv kernels, and the
log-decay gradient as a small XLA epilogue.

Each backend supplies a frozen (hashable) :class:`Kernels` subclass whose methods call its raw kernels with the
static launch parameters; it is the ``custom_vjp``'s only non-differentiable argument.

Log-decay gradient. With ``G_t = sum_{u <= t} g_u`` the global cumulative log decay (per batch and query head),
the output depends on ``G`` only through ``exp(G_t - G_s)`` factors, and differentiating the unrolled sums gives
the identity

.. math::
   \frac{\partial L}{\partial G_t} = q_t \cdot dq_t - k_t \cdot dk^{(h)}_t + [t = T]\,\langle S_T, dS_T\rangle

(``dq``: the full query gradient; ``dk^{(h)}``: the part of the key gradient flowing through query head ``h``;
``S_T`` the final state and ``dS_T`` its cotangent), and ``dL/dg_u = sum_{t >= u} dL/dG_t``. Taking ``q . dq`` and
``k . dk`` from the rounded gradients would lose the difference to the bf16 rounding of the matmul operands, so the
kernels form its parts from f32 values instead: the dq kernel emits the state part ``rq_t = e^{a_t} q_t^T S_c dO_t``
(the state operand split into ``hi + lo`` for 16-bit inputs) and the dk/dv kernel ``r_t`` = the row minus the
column sums of the f32 chunk matrix ``scale (q_i . k_j)(do_i . v_j) e^{a_i - a_j}`` minus the state part
``e^{A - a_t} k_t^T dS_{c+1} v_t``. The epilogue is then ``dL/dG = rq + r``, a reverse cumulative sum over ``T``
and ``<S_T, dS_T>``: exact up to f32 rounding, which grows with the decay horizon since the sums cancel (tests bound
it; per-head constants weight token ``t`` by ``t + 1``). Per-head decays sum the per-token gradients over batch and
time; entries below the kernel floor (``pallas_kernels.linear.LOG_DECAY_FLOOR``, including ``-inf``) get 0, as
``exp`` has no slope there in f32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from pallas_kernels.linear import LOG_DECAY_FLOOR


@dataclasses.dataclass(frozen=True)
class Kernels:
  """Static launch parameters and the three kernel calls of one backend (subclassed per backend)."""

  scale: float

  def fwd(self, q, k, v, log_decay, initial_state):
    """``-> (out [B, T, H, E], final_state [B, H, D, E] f32)``."""
    raise NotImplementedError

  def dq(self, q, k, v, log_decay, initial_state, do, log_decay_grad: bool):
    """``-> (dq [B, T, H, D], rq [B, H, T] f32, or None unless log_decay_grad)``."""
    raise NotImplementedError

  def dkv(self, q, k, v, log_decay, do, d_final_state, log_decay_grad: bool):
    """``-> (dk [B, T, G, D], dv [B, T, G, E], d_initial_state [B, H, D, E] f32, r [B, H, T] f32 or None)``."""
    raise NotImplementedError


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def linear_attention_kernels(q, k, v, log_decay, initial_state, kernels: Kernels):
  """``(out, final_state)`` of causal (decayed) linear attention, differentiable in every array argument.

  Args:
    q, k, v: ``[B, T, H, D]``, ``[B, T, G, D]``, ``[B, T, G, E]``.
    log_decay: None, f32 ``[H]`` or ``[B, T, H]`` (``<= 0``).
    initial_state: None or f32 ``[B, H, D, E]``.
    kernels: the backend's :class:`Kernels`.
  """
  return kernels.fwd(q, k, v, log_decay, initial_state)


def _fwd(q, k, v, log_decay, initial_state, kernels: Kernels):
  # symbolic_zeros=True: array arguments arrive as CustomVJPPrimal(value, perturbed), so the log-decay work of the
  # backward (the ``rq`` / ``r`` terms and their extra products) is skipped when the decay is a constant.
  value = lambda x: None if x is None else x.value
  args = tuple(value(x) for x in (q, k, v, log_decay, initial_state))
  out, state = kernels.fwd(*args)
  want_dg = () if (log_decay is not None and log_decay.perturbed) else None  # a static marker: () or None
  return (out, state), (*args, state, want_dg)


def _bwd(kernels: Kernels, res, cts):
  q, k, v, log_decay, initial_state, state, want_dg = res
  zeros = lambda ct: jnp.zeros(ct.shape, ct.dtype) if isinstance(ct, SymbolicZero) else ct
  dout, d_state = zeros(cts[0]), zeros(cts[1]).astype(jnp.float32)
  decay_grad = want_dg is not None
  dq, rq = kernels.dq(q, k, v, log_decay, initial_state, dout, decay_grad)
  dk, dv, d_init, r = kernels.dkv(q, k, v, log_decay, dout, d_state, decay_grad)
  dg = log_decay_grad(log_decay, rq + r, state, d_state) if decay_grad else None
  return dq, dk, dv, dg, None if initial_state is None else d_init.astype(initial_state.dtype)


linear_attention_kernels.defvjp(_fwd, _bwd, symbolic_zeros=True)


def log_decay_grad(log_decay, dG, state, d_state):
  """``dL/dlog_decay`` from ``dG = dL/dG_t [B, H, T]`` (without the final-state term), the final state and its
  cotangent.

  Returns:
    f32 of ``log_decay``'s shape (``[H]`` or ``[B, T, H]``).
  """
  tail = jnp.sum(state * d_state, axis=(-2, -1))  # [B, H]: <S_T, dS_T>
  dg = lax.cumsum(dG, axis=2, reverse=True) + tail[..., None]  # [B, H, T]: sum_{t >= u} dL/dG_t
  keep = log_decay >= LOG_DECAY_FLOOR
  if log_decay.ndim == 1:
    return jnp.where(keep, dg.sum(axis=(0, 2)), 0.0)
  return jnp.where(keep, dg.transpose(0, 2, 1), 0.0)
