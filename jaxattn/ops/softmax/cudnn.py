"""``implementation="cudnn"``: ``jax.nn.dot_product_attention`` on GPU, for the calls cuDNN supports.

Forward: cuDNN flash attention. Backward: ``jax.vjp`` of the same call, recomputed from the saved inputs (cuDNN's
own backward kernel). ``jax.nn.dot_product_attention`` does not return the log-sum-exp, so calls that need it
(``return_lse=True``, context parallelism) are refused; the ``lse`` output is a NaN placeholder the public op drops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn import backend as backend_lib
from jaxattn.backend import Backend
from jaxattn.masks import Causal, Local
from jaxattn.ops.softmax.config import SoftmaxCall, SoftmaxResiduals, dense_only_reason


def _mask_args(call: SoftmaxCall):
  """``(is_causal, local_window_size)`` for ``call.mask``, or None when cuDNN cannot express it."""
  mask = call.mask
  if mask is None:
    return False, None
  if isinstance(mask, Causal) and mask.offset == 0:
    return True, None
  if isinstance(mask, Local) and mask.offset == 0:
    return mask.right == 0, (mask.left, mask.right)
  return None


class CudnnBackend(Backend):
  """cuDNN flash attention through ``jax.nn.dot_product_attention`` (GPU, bf16/f16)."""

  name = "cudnn"

  def supports(self, call: SoftmaxCall) -> str | None:
    if (reason := dense_only_reason(self.name, call)) is not None:
      return reason
    if backend_lib.platform() != "gpu":
      return "cudnn needs a GPU backend"
    if call.dtype not in ("bfloat16", "float16"):
      return f"cudnn supports bf16/f16 only, got {call.dtype}"
    if call.segment_ids:
      return "cudnn path does not take segment ids"
    if call.return_lse:
      return "jax.nn.dot_product_attention does not return the log-sum-exp"
    if call.logits_soft_cap is not None:
      return "cudnn path does not support logits_soft_cap"
    if _mask_args(call) is None:
      return f"cudnn path supports full, Causal(0) and Local(offset=0) masks, not {call.mask!r}"
    if call.D != call.E:
      return "cudnn path needs equal qk and v head dims"
    return None

  def _attend(self, call, q, k, v, bias):
    is_causal, window = _mask_args(call)
    return jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype),
                                        scale=call.scale, is_causal=is_causal, local_window_size=window,
                                        implementation="cudnn")

  def fwd(self, call: SoftmaxCall, config, args):
    q, k, v, bias, q_ids, kv_ids = args
    out = self._attend(call, q, k, v, bias)
    lse = jnp.full((call.B, call.H, call.T), jnp.nan, jnp.float32)  # not computed: refused when needed
    return (out, lse), SoftmaxResiduals(q, k, v, bias, q_ids, kv_ids, out, lse)

  def bwd(self, call: SoftmaxCall, config, residuals: SoftmaxResiduals, cotangents, needs):
    q, k, v, bias = residuals[:4]
    _, vjp = jax.vjp(lambda q, k, v, bias: self._attend(call, q, k, v, bias), q, k, v, bias)
    return (*vjp(cotangents[0]), None, None)


BACKEND = CudnnBackend()
