"""``block_sparse_attention``: softmax attention over data-dependent kv block lists (dynamic sparsity).

Each (batch, query head, query block) lists the kv blocks it visits; a static mask applies on top. This is the
index-driven form used by top-k block selection, landmark retrieval and random block masks.

The Pallas implementations run the softmax kernels of ``softmax_attention`` over per-(batch, query head) visiting
lists built on device by :func:`device_lists` (deduplicated, sorted, intersected with the static mask's non-empty
blocks, plus the transposed lists for dk/dv); the kernels' tile is the lists' ``block_q x block_k``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn import backend as backend_lib
from jaxattn._validation import sanitize_block_lists, validate_block_lists, validate_qkv, validate_scale
from jaxattn.backend import Backend, Shapes
from jaxattn.masks import Full, Mask
from jaxattn.ops.nonfinite import poison, sanitize
from jaxattn.ops.softmax import pallas_gpu, pallas_tpu
from jaxattn.ops.softmax.config import (PallasGpuConfig, PallasTpuConfig, SoftmaxResiduals, TILE_FIELDS,
                                        config_error)
from jaxattn.ops.softmax.mask_info import MaskInfo, mask_info
from jaxattn.ops.softmax.reference import dense_attention
from pallas_kernels.softmax import gpu as gpu_kernels
from pallas_kernels.softmax import tpu as tpu_kernels

OP = "block_sparse_attention"


@dataclasses.dataclass(frozen=True)
class BlockSparseCall(Shapes):
  """The semantics and static shapes of one ``block_sparse_attention`` call (a :mod:`jaxattn.backend` call).

  Arguments of every block-sparse backend: ``(q [B, T, H, D], k [B, S, G, D], v [B, S, G, E],
  kv_block_indices int32 [B, H, nQ, K] (in [0, nK): bad entries dropped), kv_block_counts int32 [B, H, nQ] (in
  [0, K]))``; output ``out [B, T, H, E]``.

  Attributes:
    B, T, S, H, G, D, E: as in :class:`~jaxattn.ops.softmax.config.SoftmaxCall`; K: list length.
    dtype: q's dtype name.
    block_q, block_k: the lists' block sizes.
    mask: static mask applied on top, or None.
    scale: logit scale.
  """

  K: int
  block_q: int
  block_k: int
  mask: Mask | None
  scale: float


def block_sparse_attention(q, k, v, kv_block_indices, kv_block_counts, *, block_q: int, block_k: int,
                           mask: Mask | None = None, scale: float | None = None,
                           implementation=None):
  """Softmax attention where query block ``qb`` of head ``h`` sees only the kv blocks it lists.

  Query ``i`` (block ``qb = i // block_q``) may attend key ``j`` iff ``j // block_k`` is among the first
  ``kv_block_counts[b, h, qb]`` entries of ``kv_block_indices[b, h, qb]`` and the static ``mask`` allows
  ``(i, j)``. Repeated indices count once. Rows with no allowed key give output 0 (no NaN). Non-finite values in
  q, k or v reach only allowed pairs (as in ``softmax_attention``): keys outside a row's listed blocks or mask never
  make that row's output or gradients non-finite.

  Args:
    q: ``[B, T, H, D]``; k: ``[B, S, G, D]``; v: ``[B, S, G, E]`` (GQA as in ``softmax_attention``).
    kv_block_indices: int ``[B, H, ceil(T / block_q), K]``; the first ``kv_block_counts[b, h, qb]`` entries of each
      list must lie in ``[0, ceil(S / block_k))``; entries past the count are ignored (any value, e.g. ``-1``).
    kv_block_counts: int ``[B, H, ceil(T / block_q)]``, values in ``[0, K]``.
    block_q, block_k: block sizes of the lists.
    mask: static mask applied on top (e.g. ``Causal()``).
    scale: a finite positive number (also in float32), default ``D ** -0.5``.
    implementation: a backend name, ``(name, Config)``, a sequence, or None (as in ``softmax_attention``):
      ``"reference"`` (dense), ``"xla"`` (gathers the listed blocks per query block; memory
      ``O(B * H * K * block_k * (D + block_q))`` per step; backward by ``jax.vjp`` of it, recomputed),
      ``"pallas_gpu"`` (block sizes powers of two >= 16; Config ``PallasGpuConfig`` whose tiles must be the lists'
      ``block_q x block_k``) or ``"pallas_tpu"`` (``block_q`` and ``block_k`` multiples of 128 unless they cover
      T / S; Config ``PallasTpuConfig``, same tiles); the Pallas kernels run in interpret mode on CPU. None picks
      per platform, falling back (with a ``FallbackWarning``) to ``"xla"`` when the block sizes do not fit the
      kernels.

  Out-of-range lists: when ``kv_block_indices`` and ``kv_block_counts`` are concrete (eager calls, or closed-over
  constants under ``jit``), a listed entry outside ``[0, ceil(S / block_k))`` or a count outside ``[0, K]`` raises
  ``ValueError`` naming it. Traced lists (arguments of a ``jit``-ed function) cannot be checked: there a listed
  out-of-range entry is *masked* (dropped, as if not listed: it never reads another block) and a count is *clamped*
  to ``[0, K]``, identically in every implementation.

  Returns:
    ``out [B, T, H, E]``; differentiable with respect to q, k and v.

  Raises:
    ValueError: on bad shapes, dtypes, block sizes, scale, or concrete out-of-range lists, naming the values.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  validate_qkv(q, k, v)
  B, T, H, D = q.shape
  S = k.shape[1]
  for name, val in (("block_q", block_q), ("block_k", block_k)):
    if not isinstance(val, int) or isinstance(val, bool) or val < 1:
      raise ValueError(f"{name} must be a positive int, got {val!r}")
  nq, nk = -(-T // block_q), -(-S // block_k)
  idx, cnt = validate_block_lists(kv_block_indices, kv_block_counts, B=B, H=H, nq=nq, nk=nk)
  if mask is not None and not isinstance(mask, Mask):
    raise ValueError(f"mask must be a jaxattn.masks.Mask or None, got {type(mask).__name__}")
  if isinstance(mask, Full):
    mask = None
  scale = validate_scale(scale, D)
  call = BlockSparseCall(B=B, T=T, S=S, H=H, G=k.shape[2], D=D, E=v.shape[-1], K=int(idx.shape[-1]),
                         dtype=jnp.dtype(q.dtype).name, block_q=block_q, block_k=block_k, mask=mask, scale=scale)
  implementation = backend_lib.static_implementation(implementation)
  return _run(q, k, v, idx, cnt, implementation=implementation, call=call, platform=backend_lib.platform())


@functools.partial(jax.jit, static_argnames=("implementation", "call", "platform"))
def _run(q, k, v, idx, cnt, *, implementation, call: BlockSparseCall, platform: str):
  del platform  # a cache key: dispatch and the kernels' interpret mode depend on it (use_platform)
  # Lists that could not be checked (traced): out-of-range entries are dropped, counts clamped to [0, K].
  idx, cnt = sanitize_block_lists(idx, cnt, -(-call.S // call.block_k))
  return backend_lib.dispatch(OP, BACKENDS, implementation, DEFAULTS, call, (q, k, v, idx, cnt))


def _block_sparse_reference(q, k, v, idx, cnt, call: BlockSparseCall):
  """Dense: scatter the lists into a ``[B, H, nQ, nK]`` layout, expand, and intersect with the static mask."""
  block_q, block_k, mask, scale = call.block_q, call.block_k, call.mask, call.scale
  B, T, H, _ = q.shape
  S, G = k.shape[1], k.shape[2]
  nq, nk = -(-T // block_q), -(-S // block_k)
  valid = jnp.arange(idx.shape[-1]) < cnt[..., None]  # [B, H, nQ, K]
  layout = jnp.zeros((B, H, nq, nk), bool)
  b, h, r, _ = jnp.indices(idx.shape)
  layout = layout.at[b, h, r, idx].max(valid)
  allowed = jnp.repeat(jnp.repeat(layout, block_q, 2), block_k, 3)[:, :, :T, :S]
  if mask is not None:
    allowed = allowed & jnp.asarray(mask.to_dense(T, S))
  return dense_attention(q, k, v, None, allowed.reshape(B, G, H // G, T, S), scale)[0]


def _block_sparse_xla(q, k, v, idx, cnt, call: BlockSparseCall):
  bq, bk, mask, scale = call.block_q, call.block_k, call.mask, call.scale
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  R = H // G
  K = idx.shape[-1]
  info = mask_info(mask, T, S, bq, bk)  # static pattern (and padding) per (q block, kv block)
  nq, nk = info.num_q_blocks, info.num_k_blocks
  tile_of = jnp.asarray(info.tile_of)  # [nQ, nK]
  tiles = jnp.asarray(info.tiles)  # [U, bq, bk]
  layout = jnp.asarray(info.layout)  # [nQ, nK]
  # Non-finite inputs (jaxattn.ops.nonfinite): zeroed operands, NaN added to the logits of a query row / key that
  # had a non-finite entry, and masked pairs selected to exact zeros (forward and autodiff backward).
  (q, bad_q), (k, bad_k), (v, bad_v) = sanitize(q), sanitize(k), sanitize(v)
  kp = jnp.pad(k, [(0, 0), (0, nk * bk - S), (0, 0), (0, 0)]).reshape(B, nk, bk, G, D)
  vp = jnp.pad(v, [(0, 0), (0, nk * bk - S), (0, 0), (0, 0)]).reshape(B, nk, bk, G, E)
  qp = jnp.pad(q, [(0, 0), (0, nq * bq - T), (0, 0), (0, 0)]).reshape(B, nq, bq, G, R, D)
  pq = jnp.pad(poison(bad_q), [(0, 0), (0, nq * bq - T), (0, 0)]).reshape(B, nq, bq, H)
  pkv = jnp.pad(poison(bad_k | bad_v), [(0, 0), (0, nk * bk - S), (0, 0)]).reshape(B, nk, bk, G)
  head_g = jnp.arange(H) // R  # kv head of each query head

  @jax.checkpoint  # recompute the gathered blocks in the backward pass instead of saving them per query block
  def one_q_block(qi, qblk):
    ids = idx[:, :, qi]  # [B, H, K]
    bsel = jnp.arange(B)[:, None, None]
    kg = kp[bsel, ids, :, head_g[None, :, None]]  # [B, H, K, bk, D]
    pg = pkv[bsel, ids, :, head_g[None, :, None]]  # [B, H, K, bk]
    vg = vp[bsel, ids, :, head_g[None, :, None]]  # [B, H, K, bk, E]
    valid = jnp.arange(K)[None, None, :] < cnt[:, :, qi, None]  # [B, H, K]
    # a block listed twice counts once: keep only its first valid occurrence
    dup = (ids[..., :, None] == ids[..., None, :]) & valid[..., None, :] & jnp.tri(K, k=-1, dtype=bool)
    valid = valid & ~dup.any(-1)
    allowed = valid[..., None, :, None] & (layout[qi][ids] != 0)[..., None, :, None]  # [B, H, 1, K, 1]
    allowed = allowed & tiles[tile_of[qi][ids]].transpose(0, 1, 3, 2, 4)  # [B, H, bq, K, bk]
    qh = qblk.reshape(B, bq, H, D)
    s = jnp.einsum("bqhd,bhkcd->bhqkc", qh, kg, preferred_element_type=jnp.float32) * scale
    s = s + pq[:, qi].transpose(0, 2, 1)[:, :, :, None, None] + pg[:, :, None]
    allowed = jnp.broadcast_to(allowed, s.shape).reshape(B, H, bq, K * bk)
    s = jnp.where(allowed, s.reshape(B, H, bq, K * bk), -jnp.inf)
    m = lax.stop_gradient(s.max(-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = p.sum(-1, keepdims=True)
    p = jnp.where(allowed, p / jnp.where(l == 0, 1.0, l), 0.0)  # not 0 / NaN in a NaN row: it would reach dv
    o = jnp.einsum("bhqx,bhxe->bqhe", p.astype(v.dtype), vg.reshape(B, H, K * bk, E),
                   preferred_element_type=jnp.float32)
    return o.astype(q.dtype)

  out = lax.map(lambda a: one_q_block(*a), (jnp.arange(nq), qp.transpose(1, 0, 2, 3, 4, 5)))  # [nQ, B, bq, H, E]
  return out.transpose(1, 0, 2, 3, 4).reshape(B, nq * bq, H, E)[:, :T]


# ------------------------------------------------------------------------------------------------------ Pallas
class DeviceLists(NamedTuple):
  """Kernel visiting lists built on device from data-dependent block lists (int32).

  - ``index [B, H, nQ, Kw]``: per query block the distinct kv blocks to visit, sorted, first ``count`` valid, the
    rest repeating the last valid entry (0 when none); ``Kw = min(K, nK)``;
  - ``count [B, H, nQ]`` and ``tile [B, H, nQ, Kw]`` (``tile_of[qb, kb]``: 0 full, ``t >= 1`` = ``tiles[t]``);
  - ``index_t / count_t / tile_t``: the transpose, per kv block the sorted query blocks visiting it
    (``[B, H, nK, nQ]`` / ``[B, H, nK]`` / ``[B, H, nK, nQ]``).
  """

  index: jax.Array
  count: jax.Array
  tile: jax.Array
  index_t: jax.Array
  count_t: jax.Array
  tile_t: jax.Array


def device_lists(idx, cnt, info: MaskInfo) -> DeviceLists:
  """Compacts ``block_sparse_attention``'s lists for the kernels (pure jnp, jit-friendly).

  Drops the entries past the count, those naming a block that is empty under the static mask
  (``info.layout == 0``) and repeats; sorts the rest to the front.

  Args:
    idx: int32 ``[B, H, nQ, K]`` kv block ids in ``[0, nK)``; cnt: int32 ``[B, H, nQ]`` in ``[0, K]``.
    info: the static mask's :class:`MaskInfo` at the lists' block sizes (``nQ x nK`` blocks).
  """
  B, H, nq, K = idx.shape
  nk = info.num_k_blocks
  layout, tile_of = jnp.asarray(info.layout), jnp.asarray(info.tile_of)
  rows = jnp.arange(nq)[:, None]
  keep = (jnp.arange(K) < cnt[..., None]) & (layout[rows, idx] != 0)
  ids = jnp.sort(jnp.where(keep, idx, nk), axis=-1)  # nk: sentinel, sorts last
  repeat = jnp.concatenate([jnp.zeros_like(keep[..., :1]), ids[..., 1:] == ids[..., :-1]], axis=-1)
  ids = jnp.sort(jnp.where(repeat, nk, ids), axis=-1)[..., :min(K, nk)]
  index, count = _compact(ids, nk)
  # The transpose from the scattered [B, H, nQ, nK] visit pattern (sentinel entries fall outside and are dropped).
  b, h, r, _ = jnp.indices(ids.shape, sparse=True)
  visit = jnp.zeros((B, H, nq, nk), bool).at[b, h, r, ids].set(True, mode="drop")
  ids_t = jnp.sort(jnp.where(visit.swapaxes(2, 3), jnp.arange(nq, dtype=jnp.int32), nq), axis=-1)
  index_t, count_t = _compact(ids_t, nq)
  return DeviceLists(index, count, tile_of[rows, index], index_t, count_t,
                     tile_of.T[jnp.arange(nk)[:, None], index_t])


def _compact(ids, sentinel: int):
  """Sorted ids with ``sentinel`` past the valid ones -> (ids padded by the last valid one or 0, count)."""
  count = jnp.sum(ids < sentinel, axis=-1, dtype=jnp.int32)
  last = jnp.take_along_axis(ids, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  last = jnp.where(count[..., None] > 0, last, 0)
  return jnp.where(ids < sentinel, ids, last).astype(jnp.int32), count


class _Recompute(Backend):
  """A backend whose ``bwd`` is ``jax.vjp`` of its forward function, recomputed from the saved inputs."""

  fn = None

  def fwd(self, call, config, args):
    return type(self).fn(*args, call), args

  def bwd(self, call, config, residuals, cotangents, needs):
    q, k, v, idx, cnt = residuals
    _, vjp = jax.vjp(lambda q, k, v: type(self).fn(q, k, v, idx, cnt, call), q, k, v)
    return (*vjp(cotangents), None, None)


class ReferenceBackend(_Recompute):
  """Dense f32 definition over the scattered layout."""

  name = "reference"
  autodiff = True
  fn = staticmethod(_block_sparse_reference)


class XlaBackend(_Recompute):
  """Per query block, gathers the listed kv blocks (``jax.checkpoint`` per block); any block size."""

  name = "xla"
  fn = staticmethod(_block_sparse_xla)


def _plans(module, lists: DeviceLists, info: MaskInfo, make_lists, always_tile_ids: bool):
  """The forward / dq / dk-dv plans of ``module`` (``pallas_gpu`` or ``pallas_tpu``) from device lists.

  ``always_tile_ids``: keep the tile ids without partial blocks (the TPU lists always carry them).
  """
  tiles = jnp.asarray(info.tiles).astype(jnp.int8) if info.has_partial else None
  tile = lambda t: None if tiles is None and not always_tile_ids else t
  fwd = module.Plan(make_lists(lists.index, lists.count, tile(lists.tile)), tiles)
  dkv = module.Plan(make_lists(lists.index_t, lists.count_t, tile(lists.tile_t)), tiles)
  return module.Plans(fwd, fwd, dkv)


def _same_tiles(name: str, config, tiles: tuple[int, int]) -> None:
  """The lists fix the kernels' tile: every tile field of ``config`` must equal it."""
  for field in TILE_FIELDS:
    want = tiles[0] if field.startswith("block_q") else tiles[1]
    value = getattr(config, field)
    if value is not None and value != want:
      raise config_error(f"{name}: {type(config).__name__}", field, value,
                         f"must equal the lists' block size {want} (block_sparse_attention tiles are the lists')")


class PallasGpuBackend(Backend):
  """The ``softmax_attention`` GPU kernels over device-built per-(batch, head) lists."""

  name = "pallas_gpu"
  Config = PallasGpuConfig
  kernel = True

  def supports(self, call: BlockSparseCall) -> str | None:
    for field in ("block_q", "block_k"):
      rule = gpu_kernels.block_rule(getattr(call, field))
      if rule:
        return f"{field}={getattr(call, field)} {rule} for the GPU kernels"
    return pallas_gpu.platform_reason(self.name, call.D, call.E)

  def default_config(self, call: BlockSparseCall) -> PallasGpuConfig:
    b = (call.block_q, call.block_k)
    return PallasGpuConfig(*b, *b, *b, num_stages=pallas_gpu.DEFAULT_TABLE[0][1].num_stages,
                           num_stages_bwd=pallas_gpu.DEFAULT_TABLE[0][1].num_stages_bwd)

  def validate_config(self, call: BlockSparseCall, config: PallasGpuConfig) -> None:
    pallas_gpu.validate_gpu_config(self.name, config)
    _same_tiles(self.name, config, (call.block_q, call.block_k))

  def fwd(self, call: BlockSparseCall, config: PallasGpuConfig, args):
    q, k, v, idx, cnt = args
    info = mask_info(call.mask, call.T, call.S, call.block_q, call.block_k)
    plans = _plans(pallas_gpu, device_lists(idx, cnt, info), info, gpu_kernels.BlockLists, False)
    out, lse = pallas_gpu.kernel_forward(q, k, v, None, None, plans.fwd, config, scale=call.scale, soft_cap=None)
    return out, SoftmaxResiduals(q, k, v, None, None, None, out, lse, plans)

  def bwd(self, call: BlockSparseCall, config: PallasGpuConfig, residuals: SoftmaxResiduals, cotangents, needs):
    dlse = jnp.zeros(residuals.lse.shape, jnp.float32)
    dq, dk, dv = pallas_gpu.kernel_backward(residuals, (cotangents, dlse), config, scale=call.scale,
                                            soft_cap=None, needs=needs)
    return dq, dk, dv, None, None


class PallasTpuBackend(Backend):
  """The ``softmax_attention`` TPU kernels over device-built per-(batch, head) lists (one tile for all three)."""

  name = "pallas_tpu"
  Config = PallasTpuConfig
  kernel = True

  def _tiles(self, call: BlockSparseCall, config: PallasTpuConfig | None = None) -> PallasTpuConfig:
    b = (call.block_q, call.block_k)
    return pallas_tpu.resolve_tiles(config or PallasTpuConfig(*b, *b, *b), call.T, call.S)

  def supports(self, call: BlockSparseCall) -> str | None:
    reason = pallas_tpu.platform_reason(self.name)
    if reason is None:
      try:
        self._tiles(call)
      except ValueError as e:
        reason = f"the lists' blocks do not fit the TPU kernels: {e}"
    return reason

  def default_config(self, call: BlockSparseCall) -> PallasTpuConfig:
    b = (call.block_q, call.block_k)
    return PallasTpuConfig(*b, *b, *b)

  def validate_config(self, call: BlockSparseCall, config: PallasTpuConfig) -> None:
    self._tiles(call, config)
    _same_tiles(self.name, config, (call.block_q, call.block_k))

  def fwd(self, call: BlockSparseCall, config: PallasTpuConfig, args):
    q, k, v, idx, cnt = args
    tiles = self._tiles(call, config)
    info = mask_info(call.mask, call.T, call.S, *tiles.fwd)  # at the kernels' (clamped) tile
    plans = _plans(pallas_tpu, device_lists(idx, cnt, info), info, tpu_kernels.VisitLists, True)
    out, lse = pallas_tpu.kernel_forward(q, k, v, None, None, plans.fwd, tiles, scale=call.scale, soft_cap=None)
    return out, SoftmaxResiduals(q, k, v, None, None, None, out, lse, plans)

  def bwd(self, call: BlockSparseCall, config: PallasTpuConfig, residuals: SoftmaxResiduals, cotangents, needs):
    dlse = jnp.zeros(residuals.lse.shape, jnp.float32)
    dq, dk, dv = pallas_tpu.kernel_backward(residuals, (cotangents, dlse), self._tiles(call, config),
                                            scale=call.scale, soft_cap=None, needs=needs)
    return dq, dk, dv, None, None


BACKENDS: dict[str, Backend] = {b.name: b for b in (ReferenceBackend(), XlaBackend(), PallasGpuBackend(),
                                                    PallasTpuBackend())}
DEFAULTS: dict[str, tuple[str, ...]] = {"cpu": ("xla",), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")}
