"""``implementation="mosaic_gpu"``: block-sparse flash attention for Hopper (sm_90) with Pallas Mosaic GPU.

The kernels (:mod:`pallas_kernels.softmax.mosaic_gpu`) are warp specialised: a producer warpgroup streams K/V (or
Q/dO/lse/delta for dk/dv) through ``num_stages`` shared-memory slots with TMA, and one or two compute warpgroups of
64 rows each run the matmuls as ``wgmma``; the forward ping-pongs two compute warpgroups FlashAttention-3 style. They
visit the same static-mask visiting lists as the Triton backend (:mod:`jaxattn.ops.softmax.pallas_gpu`,
:func:`~jaxattn.ops.softmax.mask_info.mask_info`), built here at the CTA tiles:

- ``fwd``: out + lse over the forward lists; the forward, dq and (transposed) dk/dv lists go into
  ``SoftmaxResiduals.extra``;
- ``bwd``: ``delta = rowsum(dO * O) - dlse`` in XLA, then the dq kernel and the dk/dv kernel (one CTA per kv block
  and (batch, kv head), summing the query heads of its group in-kernel).

**Explicit only.** ``implementation=None`` never picks this backend (it is not in the GPU chain of
:data:`jaxattn.ops.softmax.api.DEFAULTS`) until it has been timed on Hopper hardware against cuDNN and the Triton
kernels (``experiments/device/gpu_check.sh``). What is verified: forward and gradients against the dense f32
reference in the Mosaic GPU interpreter on CPU (``tests/kernels/softmax/test_mosaic_gpu.py``; the interpreter of
jax 0.10 runs the matmuls as ``dot_general``, not through the ``wgmma`` operand path), and deviceless lowering for
sm_90 at B=2, T=8192, H=16, D=64/128 bf16 (``python -m experiments gpu_compile``).

Supports: every static mask, segment ids, GQA/MQA, soft cap, lse, T and S of any length (padded to whole tiles),
bf16 / f16, head dims up to 128 (non multiples of 64 are zero-padded). Refuses (``supports``, with the reason):
float32 (``wgmma`` would run it as TF32), additive bias (the kernels have no bias operand yet), head dims above 128
(not verified), boolean mask arrays, per-head masks, dropout, GPUs other than Hopper (compute capability 9.x) and
platforms other than GPU and CPU. On a CPU backend it runs in the Mosaic GPU interpreter (slow; for tests); inside
``jaxattn.backend.use_platform("gpu")`` on a machine without a GPU it builds the real kernels (for ahead-of-time
compilation). Config: :class:`MosaicGpuConfig`.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxattn import backend as backend_lib
from jaxattn.backend import Backend
from jaxattn.masks import PerHead
from jaxattn.ops.softmax.config import BlockSizes, SoftmaxCall, SoftmaxResiduals, config_error, dense_only_reason
from jaxattn.ops.softmax.mask_info import mask_info
from jaxattn.ops.softmax.pallas_gpu import Plans, clamp_tiles, static_plans
from jaxattn.ops.softmax.xla import softmax_delta
from pallas_kernels.softmax import mosaic_gpu as mg

__all__ = ["MosaicGpuConfig", "MosaicGpuBackend", "BACKEND", "DEFAULT_TABLE", "MAX_HEAD_DIM", "static_plans",
           "kernel_forward", "kernel_backward", "hopper_reason"]

MAX_HEAD_DIM = 128  # verified head dims (D and E); the kernels take up to 256
CTA_ROWS = (64, 128)  # the owned side of a CTA: one or two compute warpgroups of 64 rows
STREAM_TILES = (64, 128)  # the streamed side (multiples of 64; larger ones are unverified)


@dataclasses.dataclass(frozen=True)
class MosaicGpuConfig(BlockSizes):
  """The ``"mosaic_gpu"`` backend's Config: CTA tiles, pipeline depth and the forward's ping-pong.

  Tiles: the side a CTA owns is 64 rows per compute warpgroup, so ``block_q`` (forward), ``block_q_dq`` (dq) and
  ``block_k_dkv`` (dk/dv) are 64 (one compute warpgroup) or 128 (two); the streamed side (``block_k``,
  ``block_k_dq``, ``block_q_dkv``) is 64 or 128. The warp count follows: ``rows / 64`` compute warpgroups plus one
  producer warpgroup (4 warps each).

  Attributes:
    num_stages: forward shared-memory slots of the TMA pipeline (copies in flight), 1 to 4.
    num_stages_bwd: the dq and dk/dv kernels' slots, 1 to 4.
    schedule_barrier: with two forward compute warpgroups, alternate their matmuls and softmax (FlashAttention-3).
  """

  num_stages: int = 2
  num_stages_bwd: int = 2
  schedule_barrier: bool = True

  @property
  def compute_warpgroups(self) -> tuple[int, int, int]:
    """Compute warpgroups of the forward, dq and dk/dv kernels."""
    return (self.block_q // mg.ROWS_PER_WG, self.dq[0] // mg.ROWS_PER_WG, self.dkv[1] // mg.ROWS_PER_WG)


def _interpret():
  """False on a GPU (or under ``use_platform("gpu")``), the Mosaic GPU interpreter's params on CPU."""
  return False if backend_lib.platform() == "gpu" else mg.interpret_params()


def kernel_forward(q, k, v, q_ids, kv_ids, plan, config: MosaicGpuConfig, *, scale: float, soft_cap: float | None):
  """``(out, lse)`` of the forward kernel over ``plan = (lists, tiles)`` at ``config``'s forward tile."""
  lists, tiles = plan
  return mg.flash_forward(q, k, v, q_ids, kv_ids, lists, tiles, block_q=config.block_q, block_k=config.block_k,
                          scale=scale, soft_cap=soft_cap, num_stages=config.num_stages,
                          schedule_barrier=config.schedule_barrier, interpret=_interpret())


def kernel_backward(res: SoftmaxResiduals, cotangents, config: MosaicGpuConfig, *, scale: float,
                    soft_cap: float | None, needs=(True,) * 6):
  """``(dq, dk, dv)`` from the residuals (``res.extra``: :class:`Plans`) and ``(dout, dlse)``; unneeded ones are
  None and their kernels do not run."""
  q, k, v, _, q_ids, kv_ids, out, lse, plans = res
  dout, dlse = cotangents
  delta = softmax_delta(dout, out, dlse)
  dout = dout.astype(q.dtype)
  common = dict(scale=scale, soft_cap=soft_cap, num_stages=config.num_stages_bwd, interpret=_interpret())
  dq = dk = dv = None
  if needs[0]:
    (bq, bk), (lists, tiles) = config.dq, plans.dq
    dq = mg.flash_backward_dq(q, k, v, q_ids, kv_ids, dout, lse, delta, lists, tiles, block_q=bq, block_k=bk,
                              **common)
  if needs[1] or needs[2]:
    (bq, bk), (lists, tiles) = config.dkv, plans.dkv
    dk, dv = mg.flash_backward_dkv(q, k, v, q_ids, kv_ids, dout, lse, delta, lists, tiles, block_q=bq,
                                   block_k=bk, **common)
  return dq, dk, dv


def hopper_reason(name: str) -> str | None:
  """Why the kernels cannot run on this platform / device (None on Hopper, on CPU, and when compiling for the
  GPU without one)."""
  p = backend_lib.platform()
  if p not in ("gpu", "cpu"):
    return f"{name} runs on Hopper GPUs (or in the Mosaic GPU interpreter on CPU), not on {p!r}"
  if p == "gpu" and jax.default_backend() in ("gpu", "cuda", "rocm"):
    cc = str(getattr(jax.devices()[0], "compute_capability", ""))
    if not cc.startswith("9."):
      return (f"{name} needs a Hopper GPU (compute capability 9.x: wgmma, TMA), got {jax.devices()[0].device_kind!r} "
              f"(compute capability {cc or 'unknown'})")
  return None


# Default tiles by padded head dim (max(D, E) rounded up to 64): (limit, forward tile without / with partial
# blocks, config). The forward takes block_k=128 when the mask has no partial blocks (no pattern slots): at D=128
# bf16 that is 167000 bytes of shared memory, and 232552 (over the 232448 limit) with the pattern slots, so masks
# with partial blocks use block_k=64. Lowered for sm_90 at B=2, T=8192, H=16 bf16 by experiments/gpu_compile.
DEFAULT_TABLE = (
    (64, (128, 128), MosaicGpuConfig(128, 128, 128, 64, 64, 128, num_stages=2, num_stages_bwd=2)),
    (128, (128, 64), MosaicGpuConfig(128, 128, 128, 64, 64, 128, num_stages=2, num_stages_bwd=2)),
)


def default_mosaic_config(call: SoftmaxCall) -> MosaicGpuConfig:
  """The :data:`DEFAULT_TABLE` row for ``max(D, E)``, the forward's ``block_k`` chosen by whether the mask has
  partial blocks (per-head masks, which ``supports`` refuses, count as partial), every tile clamped to 64 for short
  T / S."""
  width = mg.padded_dim(max(call.D, call.E))
  _, partial_fwd, d = next(row for row in DEFAULT_TABLE if width <= row[0])
  if isinstance(call.mask, PerHead) or mask_info(call.mask, call.T, call.S, *d.fwd).has_partial:
    d = dataclasses.replace(d, block_q=partial_fwd[0], block_k=partial_fwd[1])
  return clamp_tiles(d, lambda b: b if call.T > 64 else 64, lambda b: b if call.S > 64 else 64)


class MosaicGpuBackend(Backend):
  """The Pallas Mosaic GPU (Hopper) kernels over the static mask's visiting lists; explicit only."""

  name = "mosaic_gpu"
  Config = MosaicGpuConfig
  kernel = True

  def supports(self, call: SoftmaxCall) -> str | None:
    if (reason := dense_only_reason(self.name, call)) is not None:
      return reason
    if call.dtype not in ("bfloat16", "float16"):
      return f"{self.name} supports bfloat16 / float16 only (wgmma would run float32 as TF32), got {call.dtype}"
    if call.bias is not None:
      return f"{self.name} does not take an additive bias (the kernels have no bias operand; use pallas_gpu)"
    if max(call.D, call.E) > MAX_HEAD_DIM:
      return f"{self.name} is verified for head dims up to {MAX_HEAD_DIM}, got D={call.D}, E={call.E}"
    return hopper_reason(self.name)

  def default_config(self, call: SoftmaxCall) -> MosaicGpuConfig:
    return default_mosaic_config(call)

  def validate_config(self, call: SoftmaxCall, config: MosaicGpuConfig) -> None:
    owner = f"{self.name}: {type(config).__name__}"
    for field in ("block_q", "block_q_dq", "block_k_dkv"):
      value = getattr(config, field)
      if value is not None and value not in CTA_ROWS:
        raise config_error(owner, field, value, f"must be one of {CTA_ROWS} (64 rows per compute warpgroup)")
    for field in ("block_k", "block_k_dq", "block_q_dkv"):
      value = getattr(config, field)
      if value is not None and value not in STREAM_TILES:
        raise config_error(owner, field, value, f"must be one of {STREAM_TILES}")
    for field in ("num_stages", "num_stages_bwd"):
      value = getattr(config, field)
      if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4:
        raise config_error(owner, field, value, "must be an int in [1, 4]")
    if not isinstance(config.schedule_barrier, bool):
      raise config_error(owner, "schedule_barrier", config.schedule_barrier, "must be a bool")

  def fwd(self, call: SoftmaxCall, config: MosaicGpuConfig, args):
    q, k, v, bias, q_ids, kv_ids = args
    plans = static_plans(call, config)
    out, lse = kernel_forward(q, k, v, q_ids, kv_ids, plans.fwd, config, scale=call.scale,
                              soft_cap=call.logits_soft_cap)
    return (out, lse), SoftmaxResiduals(q, k, v, bias, q_ids, kv_ids, out, lse, plans)

  def residual_extra(self, call: SoftmaxCall, config: MosaicGpuConfig) -> Plans:
    return static_plans(call, config)

  def bwd(self, call: SoftmaxCall, config: MosaicGpuConfig, residuals: SoftmaxResiduals, cotangents, needs):
    dq, dk, dv = kernel_backward(residuals, cotangents, config, scale=call.scale, soft_cap=call.logits_soft_cap,
                                 needs=needs)
    return dq, dk, dv, None, None, None


BACKEND = MosaicGpuBackend()
