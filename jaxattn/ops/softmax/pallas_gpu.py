"""``implementation="pallas_gpu"``: block-sparse flash attention with Pallas (Triton lowering) on GPUs.

The static mask is compiled at trace time (:func:`~jaxattn.ops.softmax.mask_info.mask_info`) into per-query-block
lists of the non-empty kv blocks, a full/partial flag per visited block and the deduplicated partial-block
patterns; the kernels in :mod:`pallas_kernels.softmax.gpu` visit only those blocks, forward and backward:

- ``fwd``: out + lse (FlashAttention-2 online softmax, one program per query block and (batch, head)); the
  forward, dq and dk/dv visiting lists go into ``SoftmaxResiduals.extra``;
- ``bwd``: ``delta = rowsum(dO * O) - dlse`` in XLA, then a dq kernel over the query blocks' lists and a dk/dv
  kernel over the transposed lists (one program per kv block and (batch, kv head), summing the query heads of its
  group in-kernel).

Supports: every static mask, segment ids, GQA/MQA (K/V never repeated), soft cap, lse, T and S of any length,
head dims up to 256 (non powers of two are zero-padded), f32/bf16/f16, an additive bias ``[1|B, 1|H, T, S]``
(broadcast dims are never materialised; its gradient, when asked for, comes from the dq kernel writing
``dS`` per visited tile into a ``[B, H, T, S]`` buffer that XLA sums over the broadcast dims; see
:mod:`pallas_kernels.softmax.bias`). Refuses (``supports``): boolean mask arrays, per-head masks, dropout,
platforms other than GPU and CPU. Config: :class:`~jaxattn.ops.softmax.config.PallasGpuConfig` (tiles powers of two
>= 16, ``num_warps`` / ``num_stages`` forward and backward; the default from a table per head dim, see
:meth:`PallasGpuBackend.default_config`). On a CPU backend it runs in Pallas interpret mode (slow; for tests and
users without a GPU); ``implementation=None`` never picks it there.

``block_sparse_attention`` reuses :func:`kernel_forward` / :func:`kernel_backward` with data-dependent
per-(batch, query head) lists built on device.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxattn import backend as backend_lib
from jaxattn.backend import Backend
from jaxattn.ops.softmax.config import (BlockSizes, PallasGpuConfig, SoftmaxCall, SoftmaxResiduals, TILE_FIELDS,
                                        config_error, dense_only_reason)
from jaxattn.ops.softmax.mask_info import MaskInfo, mask_info
from jaxattn.ops.softmax.xla import softmax_delta
from pallas_kernels.common import next_pow2, padded_head_dim
from pallas_kernels.softmax import gpu
from pallas_kernels.softmax.bias import dbias_dtype, reduce_to


class Plan(NamedTuple):
  """One kernel's visiting lists and tiles (int arrays or None)."""

  lists: gpu.BlockLists
  tiles: jax.Array | None


class Plans(NamedTuple):
  """The forward, dq and (transposed) dk/dv plans: ``SoftmaxResiduals.extra`` of this backend and of
  :mod:`jaxattn.ops.softmax.mosaic_gpu`."""

  fwd: Plan
  dq: Plan
  dkv: Plan


def _lists(info: MaskInfo, transposed: bool = False) -> Plan:
  """Static visiting lists as ``[1, 1, rows, K]`` kernel inputs, plus the int8 tiles (None without partials)."""
  if transposed:
    index, count, tile = info.q_index, info.q_count, info.q_tile
  else:
    index, count, tile = info.kv_index, info.kv_count, info.kv_tile
  lift = lambda a: jnp.asarray(a, jnp.int32)[None, None]
  if not info.has_partial:
    return Plan(gpu.BlockLists(lift(index), lift(count)), None)
  return Plan(gpu.BlockLists(lift(index), lift(count), lift(tile)), jnp.asarray(info.tiles.astype("int8")))


def static_plans(call: SoftmaxCall, config: PallasGpuConfig) -> Plans:
  """The static mask's forward, dq and (transposed) dk/dv lists, each at its kernel's tile."""
  info = lambda blocks: mask_info(call.mask, call.T, call.S, *blocks)
  return Plans(_lists(info(config.fwd)), _lists(info(config.dq)), _lists(info(config.dkv), transposed=True))


def kernel_forward(q, k, v, q_ids, kv_ids, plan: Plan, config: PallasGpuConfig, *, scale: float,
                   soft_cap: float | None, bias=None):
  """``(out, lse)`` of the forward kernel over ``plan`` at ``config``'s forward tile (``bias``: None or
  ``[1|B, 1|H, T, S]``)."""
  return gpu.flash_forward(q, k, v, q_ids, kv_ids, plan.lists, plan.tiles, block_q=config.block_q,
                           block_k=config.block_k, scale=scale, soft_cap=soft_cap, bias=bias,
                           num_warps=config.warps(max(q.shape[-1], v.shape[-1])), num_stages=config.num_stages,
                           interpret=backend_lib.interpret_mode("gpu"))


def kernel_backward(res: SoftmaxResiduals, cotangents, config: PallasGpuConfig, *, scale: float,
                    soft_cap: float | None, needs=(True,) * 6):
  """``(dq, dk, dv)`` from the residuals (``res.extra``: :class:`Plans`) and ``(dout, dlse)``."""
  return kernel_backward_bias(res, cotangents, config, scale=scale, soft_cap=soft_cap, needs=needs)[:3]


def kernel_backward_bias(res: SoftmaxResiduals, cotangents, config: PallasGpuConfig, *, scale: float,
                         soft_cap: float | None, needs=(True,) * 6):
  """``(dq, dk, dv, dbias)``; ``dbias`` (the bias's shape and dtype) only when ``res.bias`` is given and
  ``needs[3]``, else None. Unneeded gradients are None and their kernels do not run: without ``needs[3]`` there is
  no dbias work at all; with ``needs[3]`` but not ``needs[0]`` the dq kernel writes ``dS`` only."""
  q, k, v, bias, q_ids, kv_ids, out, lse, plans = res
  dout, dlse = cotangents
  delta = softmax_delta(dout, out, dlse)
  dout = dout.astype(q.dtype)
  common = dict(scale=scale, soft_cap=soft_cap, num_warps=config.warps(max(q.shape[-1], v.shape[-1]), True),
                num_stages=config.num_stages_bwd, interpret=backend_lib.interpret_mode("gpu"))
  dq = dk = dv = dbias = None
  want_dbias = bias is not None and len(needs) > 3 and needs[3]
  if want_dbias:
    (bq, bk), plan = config.dq, plans.dq
    B, _, H, _ = q.shape
    dq, ds = gpu.flash_backward_dq_dbias(q, k, v, q_ids, kv_ids, dout, lse, delta, *plan, bias, block_q=bq,
                                         block_k=bk, with_dq=bool(needs[0]),
                                         dbias_dtype=dbias_dtype(bias.shape, B, H, bias.dtype), **common)
    dbias = reduce_to(ds, bias.shape, bias.dtype)
  elif needs[0]:
    (bq, bk), plan = config.dq, plans.dq
    dq = gpu.flash_backward_dq(q, k, v, q_ids, kv_ids, dout, lse, delta, *plan, block_q=bq, block_k=bk,
                               bias=bias, **common)
  if needs[1] or needs[2]:
    (bq, bk), plan = config.dkv, plans.dkv
    dk, dv = gpu.flash_backward_dkv(q, k, v, q_ids, kv_ids, dout, lse, delta, *plan, block_q=bq, block_k=bk,
                                    bias=bias, **common)
  return dq, dk, dv, dbias


def platform_reason(name: str, D: int, E: int) -> str | None:
  """Why the GPU kernels cannot run here / these head dims (None if they can)."""
  if backend_lib.platform() not in ("gpu", "cpu"):
    return f"{name} runs on GPU (or in interpret mode on CPU), not on {backend_lib.platform()!r}"
  if not (gpu.supported_head_dim(D) and gpu.supported_head_dim(E)):
    return f"{name} supports head dims up to {gpu.MAX_HEAD_DIM}, got D={D}, E={E}"
  return None


def validate_gpu_config(name: str, config: PallasGpuConfig) -> None:
  """``ValueError`` (``"<backend>: <Config>.<field>=<value> <rule>"``) for tiles / launch values the kernels lack."""
  owner = f"{name}: {type(config).__name__}"
  for field in TILE_FIELDS:
    value = getattr(config, field)
    rule = None if value is None else gpu.block_rule(value)
    if rule:
      raise config_error(owner, field, value, rule)
  for field, check in (("num_warps", gpu.num_warps_rule), ("num_warps_bwd", gpu.num_warps_rule),
                       ("num_stages", gpu.num_stages_rule), ("num_stages_bwd", gpu.num_stages_rule)):
    rule = check(getattr(config, field))
    if rule:
      raise config_error(owner, field, getattr(config, field), rule)


# Default tiles by the bf16-equivalent padded head width (max(D, E) * itemsize / 2): up to 128 the first row,
# up to 256 the second, beyond the third; each block is then shrunk to the (power-of-two rounded) sequence length.
# ``num_warps=None`` resolves to 4 for head dims <= 64, else 8.
DEFAULT_TABLE = (
    (128, PallasGpuConfig(128, 64, 64, 64, 64, 64, num_stages=3, num_stages_bwd=2)),
    (256, PallasGpuConfig(64, 64, 32, 32, 32, 32, num_stages=2, num_stages_bwd=2)),
    (None, PallasGpuConfig(32, 32, 32, 32, 32, 32, num_stages=2, num_stages_bwd=1)),
)


def default_gpu_config(T: int, S: int, head_dim: int, itemsize: int) -> PallasGpuConfig:
  """The :data:`DEFAULT_TABLE` row for ``head_dim`` (``max(D, E)``) and ``itemsize``, clamped to T / S."""
  width = padded_head_dim(head_dim) * itemsize // 2
  d = next(c for limit, c in DEFAULT_TABLE if limit is None or width <= limit)
  return clamp_tiles(d, lambda b: min(b, max(16, next_pow2(T))), lambda b: min(b, max(16, next_pow2(S))))


def clamp_tiles(config: BlockSizes, fq, fk) -> BlockSizes:
  """``config`` with every query tile (forward, dq, dk/dv) mapped through ``fq`` and every kv tile through ``fk``."""
  return dataclasses.replace(config, block_q=fq(config.block_q), block_k=fk(config.block_k),
                             block_q_dq=fq(config.block_q_dq), block_k_dq=fk(config.block_k_dq),
                             block_q_dkv=fq(config.block_q_dkv), block_k_dkv=fk(config.block_k_dkv))


class PallasGpuBackend(Backend):
  """The Pallas (Triton) kernels over the static mask's visiting lists."""

  name = "pallas_gpu"
  Config = PallasGpuConfig
  kernel = True

  def supports(self, call: SoftmaxCall) -> str | None:
    if (reason := dense_only_reason(self.name, call)) is not None:
      return reason
    return platform_reason(self.name, call.D, call.E)

  def default_config(self, call: SoftmaxCall) -> PallasGpuConfig:
    return default_gpu_config(call.T, call.S, max(call.D, call.E), jnp.dtype(call.dtype).itemsize)

  def validate_config(self, call: SoftmaxCall, config: PallasGpuConfig) -> None:
    validate_gpu_config(self.name, config)

  def fwd(self, call: SoftmaxCall, config: PallasGpuConfig, args):
    q, k, v, bias, q_ids, kv_ids = args
    plans = static_plans(call, config)
    out, lse = kernel_forward(q, k, v, q_ids, kv_ids, plans.fwd, config, scale=call.scale,
                              soft_cap=call.logits_soft_cap, bias=bias)
    return (out, lse), SoftmaxResiduals(q, k, v, bias, q_ids, kv_ids, out, lse, plans)

  def residual_extra(self, call: SoftmaxCall, config: PallasGpuConfig) -> Plans:
    return static_plans(call, config)

  def bwd(self, call: SoftmaxCall, config: PallasGpuConfig, residuals: SoftmaxResiduals, cotangents, needs):
    dq, dk, dv, dbias = kernel_backward_bias(residuals, cotangents, config, scale=call.scale,
                                             soft_cap=call.logits_soft_cap, needs=needs)
    return dq, dk, dv, dbias, None, None


BACKEND = PallasGpuBackend()
