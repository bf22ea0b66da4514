"""Statistics of the softmax attention matrix without materialising it: column sums, row maxima, argmax, entropy.

:func:`attention_stats` computes, per (batch, query head), statistics of ``P = softmax(s)`` (the same masked,
scaled, biased and soft-capped logits as :func:`jaxattn.softmax_attention`) and :func:`attention_probs` the dense
``P`` itself (small shapes, analysis and tests).

Backends: ``"xla"`` (blockwise: the static mask's visiting lists and partial tiles of
:mod:`jaxattn.ops.softmax.xla`, memory ``O(B * H * (block_q * block_k + T + S))``, never ``T x S``; a row pass over
query blocks gives ``lse`` / ``rowmax`` / ``argmax`` / ``entropy``, a column pass over kv blocks gives ``colsum`` /
``colcount`` from the log-sum-exp, which the caller may pass from its forward, ``return_lse=True``, to skip the
row pass), ``"reference"`` (dense f32) and the Pallas statistics kernels ``"pallas_tpu"``
(:mod:`pallas_kernels.softmax.stats_tpu`, Mosaic) and ``"pallas_gpu"`` (:mod:`pallas_kernels.softmax.stats_gpu`,
Triton). The kernels walk the same static-mask visiting lists and partial tiles as the flash forward kernels
(:func:`~jaxattn.ops.softmax.mask_info.mask_info`): a row kernel over the kv lists (online ``lse`` / ``rowmax`` /
``argmax`` / ``entropy``) and a column kernel over the transposed lists that sums the normalised block
probabilities ``exp(s - lse)`` per key (``colsum`` / ``colcount``), never ``T x S``. They are statistics backends
(:class:`PallasTpuStats`, :class:`PallasGpuStats`: ``supports`` / ``Config`` / ``default_config`` / ``fwd``, in
:data:`STATS_BACKENDS`) with no ``bwd``: statistics are analysis outputs, not differentiated (``bwd`` raises). They
take static masks, segment ids, GQA and the soft cap; they refuse a bias, boolean mask arrays and per-head masks
(``ValueError`` naming the reason; use ``"xla"``). On CPU an explicit ``"pallas_tpu"`` / ``"pallas_gpu"`` runs in
Pallas interpret mode (slow, for tests). ``"cudnn"`` has no statistics mode (``NotImplementedError``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn import backend as backend_lib
from jaxattn._validation import validate_scale, validate_segment_ids, validate_soft_cap
from jaxattn.backend import Backend
from jaxattn.ops.softmax import api
from jaxattn.ops.softmax.config import (BlockSizes, PallasGpuConfig, PallasTpuConfig, SoftmaxCall,
                                        dense_only_reason)
from jaxattn.ops.softmax.mask_info import mask_info
from jaxattn.ops.softmax.reference import allowed_dense
from jaxattn.ops.softmax.xla import (BlockPlan, Tile, bias_blocks, ids_blocks, q_blocks, row_blocks, safe_max,
                                     visit_info)

__all__ = ["STATS", "STATS_BACKENDS", "PallasGpuStats", "PallasTpuStats", "attention_stats", "attention_probs"]

STATS = ("lse", "colsum", "colcount", "rowmax", "argmax", "entropy")
_ROW = ("lse", "rowmax", "argmax", "entropy")
_COL = ("colsum", "colcount")
_NO_STATS = ("cudnn",)
_HI = lax.Precision.HIGHEST


def prepare(q, k, mask, segment_ids, bias, scale, logits_soft_cap):
  """Validated ``(q, k, bias, q_ids, kv_ids, call)`` (v is not needed: a zero-size stand-in fixes E = 1)."""
  q, k = jnp.asarray(q), jnp.asarray(k)
  for name, x in (("q", q), ("k", k)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 ([B, T|S, heads, dim]), got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a float array, got {x.dtype}")
  (B, T, H, D), (Bk, S, G, Dk) = q.shape, k.shape
  if B != Bk or D != Dk or H % G:
    raise ValueError(f"q {q.shape} and k {k.shape} do not line up as [B, T, H, D] / [B, S, G, D] with H % G == 0")
  k = k.astype(q.dtype)
  q_ids, kv_ids = validate_segment_ids(segment_ids, B, T, S)
  bias = api.validate_bias(bias, B, H, T, S)
  mask, mask_arr = api.validate_mask(mask, B, H, T, S)
  if mask_arr is not None:
    bias = api.mask_to_bias(mask_arr, bias, T, S)
  v = jax.ShapeDtypeStruct((B, S, G, 1), q.dtype)
  call = api.make_call(q, k, v, mask=mask, bias=bias, segment_ids=q_ids is not None,
                       scale=validate_scale(scale, D), logits_soft_cap=validate_soft_cap(logits_soft_cap),
                       mask_array=mask_arr is not None)
  return q, k, bias, q_ids, kv_ids, call


def _dense(q, k, bias, q_ids, kv_ids, call: SoftmaxCall):
  """``(probs [B, H, T, S] f32, allowed [B|1, H|1, T, S] bool, logits [B, H, T, S], lse [B, H, T])``."""
  B, T, H, D = q.shape
  S, G = k.shape[1], k.shape[2]
  R = H // G
  s = jnp.einsum("btgrd,bsgd->bgrts", q.astype(jnp.float32).reshape(B, T, G, R, D), k.astype(jnp.float32),
                 precision=_HI) * call.scale  # [B, G, R, T, S]
  if bias is not None:
    s = s + bias.astype(jnp.float32).reshape(bias.shape[0], -1, 1 if bias.shape[1] == 1 else R, T, S)
  allowed = allowed_dense(call, q_ids, kv_ids, bias)
  if allowed is None:
    allowed = jnp.ones((1, 1, 1, T, S), bool)
  if call.logits_soft_cap is not None:
    s = call.logits_soft_cap * jnp.tanh(jnp.where(allowed, s, 0.0) / call.logits_soft_cap)
  s = jnp.where(allowed, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(allowed, jnp.exp(s - m), 0.0)
  l = p.sum(-1, keepdims=True)
  probs = p / jnp.where(l == 0, 1.0, l)
  lse = jnp.where(l[..., 0] == 0, -jnp.inf, m[..., 0] + jnp.log(jnp.where(l[..., 0] == 0, 1.0, l[..., 0])))
  allowed = jnp.broadcast_to(allowed, (allowed.shape[0], G, R, T, S)).reshape(allowed.shape[0], H, T, S)
  return (probs.reshape(B, H, T, S), allowed, s.reshape(B, H, T, S), lse.reshape(B, H, T))


def attention_probs(q, k, *, mask=None, segment_ids=None, bias=None, scale: float | None = None,
                    logits_soft_cap: float | None = None, return_lse: bool = False):
  """The dense attention probabilities ``P [B, H, T, S]`` (f32) of :func:`jaxattn.softmax_attention`'s definition.

  Holds ``B * H * T * S`` floats: for analysis at small shapes (use :func:`attention_stats` otherwise). Masked pairs
  and rows with no allowed key are 0. Arguments as in :func:`jaxattn.softmax_attention` (``k [B, S, G, D]``;
  GQA query head ``h`` reads kv head ``h // (H // G)``).

  Returns:
    ``probs [B, H, T, S]`` f32, and ``lse [B, H, T]`` when ``return_lse``.
  """
  q, k, bias, q_ids, kv_ids, call = prepare(q, k, mask, segment_ids, bias, scale, logits_soft_cap)
  probs, _, _, lse = _dense(q, k, bias, q_ids, kv_ids, call)
  return (probs, lse) if return_lse else probs


def probs_and_allowed(q, k, *, mask=None, segment_ids=None, bias=None, scale: float | None = None,
                      logits_soft_cap: float | None = None):
  """``(probs [B, H, T, S] f32, allowed [B|1, H, T, S] bool, lse [B, H, T])`` of the dense definition."""
  q, k, bias, q_ids, kv_ids, call = prepare(q, k, mask, segment_ids, bias, scale, logits_soft_cap)
  probs, allowed, _, lse = _dense(q, k, bias, q_ids, kv_ids, call)
  return probs, allowed, lse


def attention_stats(q, k, *, mask=None, segment_ids=None, bias=None, scale: float | None = None,
                    logits_soft_cap: float | None = None, lse=None, stats=("colsum", "rowmax", "argmax"),
                    implementation: str = "xla", block_sizes: BlockSizes | None = None) -> dict:
  r"""Per-head statistics of ``P = softmax(s)``, computed blockwise (never ``T x S`` with ``"xla"``).

  ``s`` and the allowed set ``A(i)`` are those of :func:`jaxattn.softmax_attention` (mask, segment ids, bias,
  scale, soft cap). Available statistics (``stats`` picks any of them):

  - ``"lse"`` ``[B, H, T]`` f32: :math:`\log \sum_{j \in A(i)} e^{s_{ij}}` (``-inf`` for rows with no key);
  - ``"colsum"`` ``[B, H, S]`` f32: :math:`\sum_i P_{ij}` (attention mass key ``j`` receives);
  - ``"colcount"`` ``[B, H, S]`` int32: the number of queries allowed to attend key ``j`` (ACT's normaliser);
  - ``"rowmax"`` ``[B, H, T]`` f32: :math:`\max_j P_{ij}` (0 for rows with no key);
  - ``"argmax"`` ``[B, H, T]`` int32: :math:`\arg\max_j P_{ij}` (the smallest ``j`` on ties within a tile;
    -1 for rows with no key);
  - ``"entropy"`` ``[B, H, T]`` f32: :math:`-\sum_j P_{ij} \log P_{ij}` in nats (0 for rows with no key).

  Args:
    q: ``[B, T, H, D]``; k: ``[B, S, G, D]`` (no values needed).
    mask, segment_ids, bias, scale, logits_soft_cap: as in :func:`jaxattn.softmax_attention`.
    lse: optional ``[B, H, T]`` log-sum-exp of the same call (``softmax_attention(..., return_lse=True)``); the
      ``"xla"`` backend then skips its row pass when only ``colsum`` / ``colcount`` are asked.
    stats: a sequence of names from ``STATS``.
    implementation: ``"xla"`` (blockwise; ``block_sizes`` its tiles), ``"reference"`` (dense f32),
      ``"pallas_tpu"`` or ``"pallas_gpu"`` (the statistics kernels; interpret mode on CPU).
    block_sizes: tiles of the ``"xla"`` pass (default: ``softmax_attention``'s xla default); for the kernels a
      :class:`BlockSizes` or the backend's Config (:class:`PallasTpuConfig` / :class:`PallasGpuConfig`), whose
      ``block_q`` / ``block_k`` tile both kernel passes (default: the flash forward's default tiles).

  Returns:
    A dict from each requested name to its array.

  Raises:
    NotImplementedError: for a softmax backend without a statistics mode (``"cudnn"``), naming it.
    ValueError: on unknown statistics or backend names, bad shapes, or inputs a kernel backend does not take (a
      bias, mask arrays, per-head masks, tiles breaking its rules), naming them.
  """
  if isinstance(stats, str):
    stats = (stats,)
  stats = tuple(stats)
  bad = [s for s in stats if s not in STATS]
  if bad or not stats:
    raise ValueError(f"stats must be a non-empty sequence of {STATS}, got {stats!r}")
  if implementation in _NO_STATS:
    raise NotImplementedError(f"softmax backend {implementation!r} has no statistics mode; use "
                              f"implementation='xla' (blockwise, never T x S), 'pallas_tpu', 'pallas_gpu' or "
                              f"'reference' (dense)")
  if implementation not in ("xla", "reference", *STATS_BACKENDS):
    raise ValueError(f"attention_stats implementation must be one of {('xla', 'reference', *STATS_BACKENDS)}, "
                     f"got {implementation!r}")
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
  q, k, bias, q_ids, kv_ids, call = prepare(q, k, mask, segment_ids, bias, scale, logits_soft_cap)
  B, T, H, _ = q.shape
  if lse is not None:
    lse = jnp.asarray(lse, jnp.float32)
    if lse.shape != (B, H, T):
      raise ValueError(f"lse must have shape [B, H, T] = {(B, H, T)}, got {lse.shape}")
  if implementation == "reference":
    return _reference_stats(q, k, bias, q_ids, kv_ids, call=call, stats=stats)
  if implementation in STATS_BACKENDS:
    backend = STATS_BACKENDS[implementation]
    reason = backend.supports(call)
    if reason is not None:
      raise ValueError(f"attention_stats(implementation={implementation!r}): {reason}")
    config = backend.config_from(call, block_sizes)
    return _kernel_stats(q, k, q_ids, kv_ids, lse, name=implementation, call=call, config=config, stats=stats)
  blocks = block_sizes or api.BACKENDS["xla"].default_config(call)
  return _xla_stats(q, k, bias, q_ids, kv_ids, lse, call=call, blocks=blocks, stats=stats)


@functools.partial(jax.jit, static_argnames=("call", "stats"))
def _reference_stats(q, k, bias, q_ids, kv_ids, *, call: SoftmaxCall, stats):
  probs, allowed, s, lse = _dense(q, k, bias, q_ids, kv_ids, call)
  any_key = allowed.any(-1)
  out = {}
  for name in stats:
    if name == "lse":
      out[name] = lse
    elif name == "colsum":
      out[name] = probs.sum(-2)
    elif name == "colcount":
      out[name] = jnp.broadcast_to(allowed.sum(-2, dtype=jnp.int32), probs.shape[:2] + probs.shape[-1:])
    elif name == "rowmax":
      out[name] = probs.max(-1)
    elif name == "argmax":
      out[name] = jnp.where(any_key, jnp.argmax(s, -1), -1).astype(jnp.int32)
    else:
      out[name] = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), -1)
  return out


@functools.partial(jax.jit, static_argnames=("call", "blocks", "stats"))
def _xla_stats(q, k, bias, q_ids, kv_ids, lse, *, call: SoftmaxCall, blocks: BlockSizes, stats):
  B, T, H, D = q.shape
  S, G = k.shape[1], k.shape[2]
  R = H // G
  bq, bk = blocks.block_q, blocks.block_k
  info = visit_info(call.mask, T, S, bq, bk)
  tile = Tile(BlockPlan(call, blocks), info, q.dtype)
  qB = q_blocks(q.reshape(B, T, G, R, D), bq)  # [nQ, B, G, R, bq, D]
  kB = q_blocks(k, bk)  # [nK, B, G, bk, D]
  biasB = None if bias is None else bias_blocks(bias, R, bq, bk)
  qidB = None if q_ids is None else ids_blocks(q_ids, bq)
  kidB = None if kv_ids is None else ids_blocks(kv_ids, bk)
  logits = lambda qi, kj, t: tile.logits(qB[qi], kB[kj], None if biasB is None else biasB[qi, kj],
                                         None if qidB is None else qidB[qi], None if kidB is None else kidB[kj],
                                         t, qi, kj)[0]  # [B, G, R, bq, bk] f32, -inf where masked
  out = {}

  def unq(x):  # [nQ, B, G, R, bq] -> [B, H, T]
    return x.transpose(1, 2, 3, 0, 4).reshape(B, H, -1)[..., :T]

  if lse is None or any(s in stats for s in ("rowmax", "argmax", "entropy")):
    kv_index, kv_count, kv_tile = (jnp.asarray(a) for a in (info.kv_index, info.kv_count, info.kv_tile))

    def one_q_block(qi):
      def body(n, carry):
        m, l, u, am = carry
        kj = kv_index[qi, n]
        s = logits(qi, kj, kv_tile[qi, n])
        bm = s.max(-1)
        ba = jnp.argmax(s, -1).astype(jnp.int32) + kj * bk
        m_new = jnp.maximum(m, bm)
        m_safe = safe_max(m_new)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[..., None])
        l = alpha * l + p.sum(-1)
        u = alpha * u + jnp.where(s == -jnp.inf, 0.0, p * s).sum(-1)  # sum_j e^{s - m} s, for the entropy
        am = jnp.where(bm > m, ba, am)  # strict: an earlier block keeps a tie
        return m_new, l, u, am

      shape = (B, G, R, bq)
      init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32),
              jnp.full(shape, -1, jnp.int32))
      m, l, u, am = lax.fori_loop(0, kv_count[qi], body, init)
      empty = l == 0
      l1 = jnp.where(empty, 1.0, l)
      lse_b = jnp.where(empty, -jnp.inf, safe_max(m) + jnp.log(l1))
      return lse_b, jnp.where(empty, 0.0, 1.0 / l1), am, jnp.where(empty, 0.0, lse_b - u / l1)

    lseB, rowmaxB, amB, entB = lax.map(one_q_block, jnp.arange(info.num_q_blocks))
    row = {"lse": unq(lseB), "rowmax": unq(rowmaxB), "argmax": unq(amB), "entropy": unq(entB)}
    if lse is None:
      lse = row["lse"]
    out.update({name: row[name] for name in stats if name in _ROW})
  elif "lse" in stats:
    out["lse"] = lse

  if any(s in stats for s in _COL):
    q_index, q_count, q_tile = (jnp.asarray(a) for a in (info.q_index, info.q_count, info.q_tile))
    lseB = safe_max(row_blocks(lse.transpose(0, 2, 1), B, T, G, R, bq))  # [nQ, B, G, R, bq]

    def one_kv_block(kj):
      def body(n, carry):
        cs, cc = carry
        qi = q_index[kj, n]
        s = logits(qi, kj, q_tile[kj, n])
        ok = s != -jnp.inf
        cs = cs + jnp.where(ok, jnp.exp(s - lseB[qi][..., None]), 0.0).sum(-2)
        cc = cc + ok.sum(-2, dtype=jnp.int32)
        return cs, cc

      init = (jnp.zeros((B, G, R, bk), jnp.float32), jnp.zeros((B, G, R, bk), jnp.int32))
      return lax.fori_loop(0, q_count[kj], body, init)

    csB, ccB = lax.map(one_kv_block, jnp.arange(info.num_k_blocks))  # [nK, B, G, R, bk]
    col = lambda x: x.transpose(1, 2, 3, 0, 4).reshape(B, H, -1)[..., :S]
    if "colsum" in stats:
      out["colsum"] = col(csB)
    if "colcount" in stats:
      out["colcount"] = col(ccB)
  return {name: out[name] for name in stats}


# =================================================================================================== kernel backends


class _KernelStats(Backend):
  """A statistics backend: ``supports`` / ``Config`` / ``default_config`` / ``validate_config`` / ``fwd``.

  ``fwd(call, config, (q, k, q_ids, kv_ids, lse), stats=...)`` returns ``(dict of statistics, None)``. There is no
  ``bwd``: the statistics are analysis outputs (argmax and counts are integers; column sums of ``P`` are not a
  loss any model trains), so they are computed outside autodiff and ``bwd`` raises ``NotImplementedError``.
  Both kernel passes use the Config's forward tile ``(block_q, block_k)``; the backward tiles are ignored.
  """

  kernel = True
  _platform = ""

  def supports(self, call: SoftmaxCall) -> str | None:
    if (reason := dense_only_reason(self.name, call)) is not None:
      return reason + " (use implementation='xla')"
    if call.bias is not None:
      return f"the {self.name} statistics kernels take no additive bias (got one of dims {call.bias}; use " \
             f"implementation='xla')"
    if backend_lib.platform() not in (self._platform, "cpu"):
      return f"{self.name} runs on {self._platform.upper()} (or in interpret mode on CPU), not on " \
             f"{backend_lib.platform()!r}"
    return None

  def config_from(self, call: SoftmaxCall, block_sizes: BlockSizes | None):
    """The validated Config: the default, ``block_sizes`` itself (a Config), or its tiles on the default knobs."""
    if block_sizes is None:
      config = self.default_config(call)
    elif isinstance(block_sizes, self.Config):
      config = block_sizes
    else:
      config = dataclasses.replace(self.default_config(call), **block_sizes.tiles())
    self.validate_config(call, config)
    return config

  def bwd(self, call, config, residuals, cotangents, needs):
    raise NotImplementedError(f"{self.name} attention statistics have no backward: they are not differentiable "
                              f"outputs (compute them outside jax.grad, or differentiate attention_probs)")


class PallasTpuStats(_KernelStats):
  """``"pallas_tpu"`` statistics: :mod:`pallas_kernels.softmax.stats_tpu` over the static mask's lists."""

  name = "pallas_tpu"
  Config = PallasTpuConfig
  _platform = "tpu"

  def default_config(self, call: SoftmaxCall) -> PallasTpuConfig:
    """The flash kernels' per-generation default (:func:`jaxattn.ops.softmax.pallas_tpu.default_config_for`)."""
    from jaxattn.ops.softmax import pallas_tpu
    from pallas_kernels.common.vmem import tpu_generation
    return pallas_tpu.default_config_for(call, tpu_generation())

  def validate_config(self, call: SoftmaxCall, config: PallasTpuConfig) -> None:
    """The forward tile against the (8, 128) rule (``block_q`` sublanes, ``block_k`` lanes) and the VMEM limit."""
    from pallas_kernels.softmax import stats_tpu
    owner = f"{self.name} statistics: {type(config).__name__}"
    stats_tpu.check_tiles(config.block_q, config.block_k, call.T, call.S, owner)
    vmem = config.vmem_limit_bytes
    if vmem is not None and (not isinstance(vmem, int) or isinstance(vmem, bool) or vmem < 1):
      raise ValueError(f"{owner}.vmem_limit_bytes={vmem!r} must be None or a positive int")

  def fwd(self, call: SoftmaxCall, config: PallasTpuConfig, args, stats=STATS):
    from pallas_kernels.softmax import stats_tpu, tpu
    q, k, q_ids, kv_ids, lse = args
    bq, bk = stats_tpu.check_tiles(config.block_q, config.block_k, call.T, call.S)
    info = mask_info(call.mask, call.T, call.S, bq, bk)
    lift = lambda a: jnp.asarray(a, jnp.int32)[None, None]
    pats = jnp.asarray(info.tiles) if info.has_partial else None
    common = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids, scale=call.scale, soft_cap=call.logits_soft_cap,
                  block_q=bq, block_k=bk, interpret=backend_lib.interpret_mode("tpu"),
                  vmem_limit_bytes=config.vmem_limit_bytes)
    out = {}
    if lse is None or any(s in _ROW for s in stats if s != "lse"):
      lists = tpu.VisitLists(lift(info.kv_index), lift(info.kv_count), lift(info.kv_tile))
      row = dict(zip(_ROW, stats_tpu.row_stats(q, k, lists, pats, **common)))
      lse = row["lse"] if lse is None else lse
      out.update(row)
    if any(s in _COL for s in stats):
      lists_t = tpu.VisitLists(lift(info.q_index), lift(info.q_count), lift(info.q_tile))
      out.update(zip(_COL, stats_tpu.col_stats(q, k, lse, lists_t, pats, **common)))
    out.setdefault("lse", lse)
    return {name: out[name] for name in stats}, None


class PallasGpuStats(_KernelStats):
  """``"pallas_gpu"`` statistics: :mod:`pallas_kernels.softmax.stats_gpu` (Triton) over the static mask's lists."""

  name = "pallas_gpu"
  Config = PallasGpuConfig
  _platform = "gpu"

  def supports(self, call: SoftmaxCall) -> str | None:
    if (reason := super().supports(call)) is not None:
      return reason
    from pallas_kernels.softmax import gpu
    if not gpu.supported_head_dim(call.D):
      return f"{self.name} supports head dims up to {gpu.MAX_HEAD_DIM}, got D={call.D}"
    return None

  def default_config(self, call: SoftmaxCall) -> PallasGpuConfig:
    """The flash kernels' default (:func:`jaxattn.ops.softmax.pallas_gpu.default_gpu_config`)."""
    from jaxattn.ops.softmax import pallas_gpu
    return pallas_gpu.default_gpu_config(call.T, call.S, call.D, jnp.dtype(call.dtype).itemsize)

  def validate_config(self, call: SoftmaxCall, config: PallasGpuConfig) -> None:
    from jaxattn.ops.softmax import pallas_gpu
    pallas_gpu.validate_gpu_config(f"{self.name} statistics", config)

  def fwd(self, call: SoftmaxCall, config: PallasGpuConfig, args, stats=STATS):
    from pallas_kernels.softmax import gpu, stats_gpu
    q, k, q_ids, kv_ids, lse = args
    bq, bk = config.fwd
    info = mask_info(call.mask, call.T, call.S, bq, bk)
    lift = lambda a: jnp.asarray(a, jnp.int32)[None, None]
    partial = info.has_partial
    pats = jnp.asarray(info.tiles.astype("int8")) if partial else None
    common = dict(block_q=bq, block_k=bk, scale=call.scale, soft_cap=call.logits_soft_cap,
                  num_warps=config.warps(call.D), interpret=backend_lib.interpret_mode("gpu"))
    out = {}
    if lse is None or any(s in _ROW for s in stats if s != "lse"):
      lists = gpu.BlockLists(lift(info.kv_index), lift(info.kv_count), lift(info.kv_tile) if partial else None)
      row = dict(zip(_ROW, stats_gpu.row_stats(q, k, q_ids, kv_ids, lists, pats, num_stages=config.num_stages,
                                               **common)))
      lse = row["lse"] if lse is None else lse
      out.update(row)
    if any(s in _COL for s in stats):
      lists_t = gpu.BlockLists(lift(info.q_index), lift(info.q_count), lift(info.q_tile) if partial else None)
      out.update(zip(_COL, stats_gpu.col_stats(q, k, lse, q_ids, kv_ids, lists_t, pats,
                                               num_stages=config.num_stages_bwd, **common)))
    out.setdefault("lse", lse)
    return {name: out[name] for name in stats}, None


STATS_BACKENDS: dict[str, _KernelStats] = {"pallas_tpu": PallasTpuStats(), "pallas_gpu": PallasGpuStats()}


@functools.partial(jax.jit, static_argnames=("name", "call", "config", "stats"))
def _kernel_stats(q, k, q_ids, kv_ids, lse, *, name: str, call: SoftmaxCall, config, stats):
  out, _ = STATS_BACKENDS[name].fwd(call, config, (q, k, q_ids, kv_ids, lse), stats=stats)
  return out
