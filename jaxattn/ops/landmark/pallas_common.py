"""What the ``pallas_gpu`` and ``pallas_tpu`` landmark backends share: ``fwd`` / ``bwd`` over three kernels (forward,
dq, dk/dv), joined by :func:`jaxattn.backend.flash_vjp`.

The backward kernels read the saved top-level ``lse`` and ``delta_i = sum_e dO_ie O_ie - dlse_i`` (the row term of
the top-level softmax Jacobian), computed here in XLA between the forward and the backward kernels. The dq kernel
runs only when ``dq`` is needed, the dk/dv kernel only when ``dk`` or ``dv`` is.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxattn import backend as backend_lib
from jaxattn.backend import Backend
from jaxattn.ops.landmark.config import LandmarkCall, LandmarkResiduals

__all__ = ["PallasLandmarkBackend"]


class PallasLandmarkBackend(Backend):
  """A fused-kernel landmark backend: subclasses set ``kernels`` (a module of :mod:`pallas_kernels.landmark` with
  ``flash_landmark_forward`` / ``_backward_dq`` / ``_backward_dkv``), ``kernel_platform`` and ``kernel_kwargs``."""

  kernel = True
  kernel_platform = ""  # "gpu" or "tpu"
  kernels = None

  def platform_reason(self) -> str | None:
    """Why the kernels cannot run on the current platform (None if they can, natively or in interpret mode)."""
    p = backend_lib.platform()
    if p not in (self.kernel_platform, "cpu"):
      return f"{self.name} runs on {self.kernel_platform.upper()} (or in interpret mode on CPU), not on {p!r}"
    return None

  def kernel_kwargs(self, call: LandmarkCall, config) -> dict:
    """The static keyword arguments of the three kernel calls (tiles, launch parameters, interpret mode)."""
    return dict(block_size=call.block_size, block_q=config.block_q, scale=call.scale,
                interpret=backend_lib.interpret_mode(self.kernel_platform))

  def fwd(self, call: LandmarkCall, config, args):
    q, k, v = args
    out, lse = self.kernels.flash_landmark_forward(q, k, v, **self.kernel_kwargs(call, config))
    return (out, lse), LandmarkResiduals(q, k, v, out, lse)

  def bwd(self, call: LandmarkCall, config, residuals: LandmarkResiduals, cotangents, needs):
    q, k, v, out, lse = residuals
    dout, dlse = cotangents
    delta = jnp.einsum("bthe,bthe->bht", dout.astype(jnp.float32), out.astype(jnp.float32)) - dlse
    kw = self.kernel_kwargs(call, config)
    dq = dk = dv = None
    if needs[0]:
      dq = self.kernels.flash_landmark_backward_dq(q, k, v, dout, lse, delta, **kw)
    if needs[1] or needs[2]:
      dk, dv = self.kernels.flash_landmark_backward_dkv(q, k, v, dout, lse, delta, **kw)
    return dq, dk, dv
