r"""What the ``pallas_gpu`` and ``pallas_tpu`` linear backends share: ``fwd`` / ``bwd`` over their kernels and the
log-decay gradient as a small XLA epilogue. :func:`jaxattn.backend.flash_vjp` joins them.

Each backend subclasses :class:`PallasLinearBackend` and supplies ``kernel_fwd`` and either ``kernel_dq`` /
``kernel_dkv`` (the TPU's forward-sweep dq and reverse-sweep dk/dv kernels) or a whole ``kernel_bwd`` (the GPU's
chunk-parallel passes), which call its raw kernels with the static launch parameters of its Config.

Log-decay gradient. With ``G_t = sum_{u <= t} g_u`` the global cumulative log decay (per batch and query head),
the output depends on ``G`` only through ``exp(G_t - G_s)`` factors, and differentiating the unrolled sums gives
the identity

.. math::
   \frac{\partial L}{\partial G_t} = q_t \cdot dq_t - k_t \cdot dk^{(h)}_t + [t = T]\,\langle S_T, dS_T\rangle

(``dq``: the full query gradient; ``dk^{(h)}``: the part of the key gradient flowing through query head ``h``;
``S_T`` the final state and ``dS_T`` its cotangent), and ``dL/dg_u = sum_{t >= u} dL/dG_t``. Taking ``q . dq`` and
``k . dk`` from the rounded gradients would lose the difference to the bf16 rounding of the matmul operands, so the
kernels form its parts from f32 values instead (TPU; the GPU's dq/dk pass emits the same sum ``rq + r`` from one
kernel, see :mod:`pallas_kernels.linear.gpu`): the dq kernel emits the state part ``rq_t = e^{a_t} q_t^T S_c dO_t``
(the state operand split into ``hi + lo`` for 16-bit inputs) and the dk/dv kernel ``r_t`` = the row minus the
column sums of the f32 chunk matrix ``scale (q_i . k_j)(do_i . v_j) e^{a_i - a_j}`` minus the state part
``e^{A - a_t} k_t^T dS_{c+1} v_t``. The epilogue is then ``dL/dG = rq + r``, a reverse cumulative sum over ``T``
and ``<S_T, dS_T>``: exact up to f32 rounding, which grows with the decay horizon since the sums cancel (tests bound
it; per-head constants weight token ``t`` by ``t + 1``). Per-head decays sum the per-token gradients over batch and
time; entries below the kernel floor (:data:`pallas_kernels.linear.KERNEL_LOG_DECAY_FLOOR`, including ``-inf``)
get 0, as ``exp`` has no slope there in f32. When the decay is not differentiated (``needs[3]`` False: a constant
decay), the kernels skip the ``rq`` / ``r`` terms and their extra products.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxattn import backend as backend_lib
from jaxattn.backend import Backend
from jaxattn.ops.linear.config import LinearCall, LinearResiduals
from pallas_kernels.linear import KERNEL_LOG_DECAY_FLOOR

__all__ = ["PallasLinearBackend", "log_decay_grad"]


class PallasLinearBackend(Backend):
  """A chunked-kernel linear backend (causal only): ``fwd`` / ``bwd`` from the three kernel calls of a subclass.

  Args of the kernel methods: ``q, k, v`` as the call's; ``log_decay`` None, f32 ``[H]`` or ``[B, T, H]``;
  ``initial_state`` None or f32 ``[B, H, D, E]``; ``do`` the output cotangent; ``d_final_state`` f32.
  """

  kernel = True
  kernel_platform = ""  # "gpu" or "tpu"

  def platform_reason(self, call: LinearCall) -> str | None:
    """Why this backend cannot serve ``call`` on the current platform / for these options (None if it can)."""
    p = backend_lib.platform()
    if p not in (self.kernel_platform, "cpu"):
      return f"{self.name} runs on {self.kernel_platform.upper()} (or in interpret mode on CPU), not on {p!r}"
    if not call.causal:
      return f"{self.name} has no kernel for causal=False (the xla path is two matmuls)"
    return None

  def interpret(self):
    return backend_lib.interpret_mode(self.kernel_platform)

  def kernel_fwd(self, call, config, q, k, v, log_decay, initial_state):
    """``-> (out [B, T, H, E], final_state [B, H, D, E] f32)``."""
    raise NotImplementedError

  def kernel_dq(self, call, config, q, k, v, log_decay, initial_state, do, log_decay_grad: bool):
    """``-> (dq [B, T, H, D], rq [B, H, T] f32 or None unless log_decay_grad)``."""
    raise NotImplementedError

  def kernel_dkv(self, call, config, q, k, v, log_decay, do, d_final_state, log_decay_grad: bool):
    """``-> (dk [B, T, G, D], dv [B, T, G, E], d_initial_state [B, H, D, E] f32, r [B, H, T] f32 or None)``."""
    raise NotImplementedError

  def kernel_bwd(self, call, config, q, k, v, log_decay, initial_state, do, d_final_state, needs,
                 log_decay_grad: bool):
    """``-> (dq, dk, dv, d_initial_state f32, dG [B, H, T] f32 or None unless log_decay_grad)``, ``dG`` the
    per-token ``dL/dG_t`` without the final-state term; gradients not in ``needs`` may be None. By default from
    :meth:`kernel_dq` and :meth:`kernel_dkv` (``dG = rq + r``); a backend with another kernel split overrides it."""
    dq = dk = dv = d_init = rq = r = None
    if needs[0] or log_decay_grad:
      dq, rq = self.kernel_dq(call, config, q, k, v, log_decay, initial_state, do, log_decay_grad)
    if needs[1] or needs[2] or needs[4] or log_decay_grad:
      dk, dv, d_init, r = self.kernel_dkv(call, config, q, k, v, log_decay, do, d_final_state, log_decay_grad)
    return dq, dk, dv, d_init, (rq + r if log_decay_grad else None)

  def fwd(self, call: LinearCall, config, args):
    q, k, v, log_decay, initial_state = args
    out, state = self.kernel_fwd(call, config, q, k, v, log_decay, initial_state)
    return (out, state), LinearResiduals(q, k, v, log_decay, initial_state, state)

  def bwd(self, call: LinearCall, config, residuals: LinearResiduals, cotangents, needs):
    q, k, v, log_decay, initial_state, state, _ = residuals
    dout, d_state = cotangents
    d_state = d_state.astype(jnp.float32)
    decay_grad = log_decay is not None and needs[3]
    dq, dk, dv, d_init, dG = self.kernel_bwd(call, config, q, k, v, log_decay, initial_state, dout, d_state, needs,
                                             decay_grad)
    dg = log_decay_grad(log_decay, dG, state, d_state) if decay_grad else None
    d_init = None if (initial_state is None or d_init is None) else d_init.astype(initial_state.dtype)
    return dq, dk, dv, dg, d_init


def log_decay_grad(log_decay, dG, state, d_state):
  """``dL/dlog_decay`` from ``dG = dL/dG_t [B, H, T]`` (without the final-state term), the final state and its
  cotangent.

  Returns:
    f32 of ``log_decay``'s shape (``[H]`` or ``[B, T, H]``).
  """
  # <S_T, dS_T>; where(): a final state made NaN by garbage after the last output must not leak through dS_T = 0
  tail = jnp.sum(jnp.where(d_state != 0, state * d_state, 0.0), axis=(-2, -1))  # [B, H]
  dg = lax.cumsum(dG, axis=2, reverse=True) + tail[..., None]  # [B, H, T]: sum_{t >= u} dL/dG_t
  keep = log_decay >= KERNEL_LOG_DECAY_FLOOR
  if log_decay.ndim == 1:
    return jnp.where(keep, dg.sum(axis=(0, 2)), 0.0)
  return jnp.where(keep, dg.transpose(0, 2, 1), 0.0)
