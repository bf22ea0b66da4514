"""``context_parallel_attention``: validation, layouts (zigzag) and the ``shard_map`` around the strategies."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxattn._validation import validate_qkv, validate_scale, validate_segment_ids
from jaxattn.masks import Full, Mask
from jaxattn.ops.softmax import api as softmax_api
from jaxattn.parallel import _compat
from jaxattn.parallel.all_gather import all_gather_attention_local
from jaxattn.parallel.plan import gather_plan, ring_plan
from jaxattn.parallel.ring import ring_attention_local
from jaxattn.parallel.ulysses import ulysses_attention_local
from jaxattn.parallel.usp import usp_attention_local
from jaxattn.parallel.zigzag import zigzag_permute_local, zigzag_unpermute_local

__all__ = ["STRATEGIES", "context_parallel_attention"]

STRATEGIES = ("ring", "all_gather", "ulysses", "usp")


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call (hashable: a ``jit`` static argument)."""

  strategy: str
  axes: tuple[str, ...]  # (seq,) or, for usp, (ulysses, ring)
  mask: Mask | None
  zigzag: bool  # compute in zigzag layout at the balancing level (ring / all-gather queries / usp ring)
  zigzag_inputs: bool  # the caller's data already is in zigzag order
  scale: float
  implementation: str | tuple | None
  mesh: object = None
  batch_axis: str | tuple | None = None
  head_axis: str | tuple | None = None


def context_parallel_attention(q, k, v, *, mesh=None, seq_axis=None, strategy: str = "ring", mask: Mask | None = None,
                               segment_ids=None, load_balance: str | None = "zigzag", zigzag_inputs: bool = False,
                               axis_name=None, batch_axis=None, head_axis=None, scale: float | None = None,
                               return_lse: bool = False, implementation: str | Sequence[str] | None = None):
  r"""Exact softmax self-attention over a sequence sharded across devices (context parallelism).

  Equal, up to float rounding, to ``jaxattn.softmax_attention(q, k, v, mask=mask, segment_ids=segment_ids)`` on one
  device. Strategies (``P`` devices on the sequence axis, ``T`` tokens, ``G`` kv heads):

  - ``"ring"``: K/V shards rotate with ``ppermute`` and each step is merged by the online-softmax rule; the next
    transfer is issued before the block's compute; fully masked blocks and steps no device needs are skipped at
    trace time; a ``custom_vjp`` sends dK/dV around the ring back to their owner. Sends ``(steps - 1) |KV_local|``
    per device, overlapped with compute; holds at most two remote K/V shards (memory ``O(T / P)``).
  - ``"all_gather"``: all-gathers K/V and attends locally to the visible part (one exposed collective of
    ``(P - 1) |KV_local|``; K/V memory ``O(T)``); backward by autodiff (a reduce-scatter of dK/dV).
  - ``"ulysses"``: all-to-all from sequence shards to head shards, full-sequence attention on ``H / P`` heads,
    all-to-all back. Needs ``H % P == 0``; kv heads are repeated to ``lcm(G, P)`` when ``G % P != 0``. Balanced by
    construction.
  - ``"usp"``: Ulysses over ``seq_axis[0]`` inside, ring over ``seq_axis[1]`` across.

  Load balancing: with ``load_balance="zigzag"`` (default) and a mask (any mask but ``Full``), the ring and the
  all-gather queries use the zigzag layout (:mod:`jaxattn.parallel.zigzag`: ``2P`` chunks, device ``r`` holds chunks
  ``r`` and ``2P - 1 - r``), so every device attends the same causal area. Inputs and outputs stay in natural order:
  the reshuffle is two half-shard ``ppermute``\ s in and out (never an all-gather). Callers that keep their data in
  zigzag order pass ``zigzag_inputs=True`` to skip it (the data must then be ``zigzag_permute(x, P_ring)`` of the
  natural sequence, ``P_ring`` the size of the ring axis for ``usp`` and of ``seq_axis`` otherwise; outputs come back
  in the same order). Ulysses is balanced by construction and never permutes. For sliding windows consider
  ``load_balance=None``: contiguous shards are already balanced and the ring then stops after the steps the window
  reaches.

  Args:
    q: queries ``[B, T, H, D]``, sharded (or to be sharded) along ``T`` over ``seq_axis``.
    k: keys ``[B, T, G, D]`` (``H % G == 0``: GQA/MQA).
    v: values ``[B, T, G, E]``.
    mesh: a ``jax.sharding.Mesh`` (``Mesh(...)`` or ``jax.make_mesh``); the call runs ``shard_map`` over it. Explicit
      mesh axes are used as Auto axes inside the call (outputs get ordinary shardings, so eager calls and
      ``jax.grad`` work outside ``jax.set_mesh``), unless the caller is under ``jax.set_mesh`` or passes arrays
      sharded over Explicit axes. Leave None inside your own ``shard_map``
      and pass ``axis_name`` instead.
    seq_axis: mesh axis name of the sequence shards; for ``"usp"`` the pair ``(ulysses_axis, ring_axis)`` (the
      sequence is then sharded over ``(ring_axis, ulysses_axis)``, ring major).
    strategy: ``"ring"``, ``"all_gather"``, ``"ulysses"`` or ``"usp"``.
    mask: static :mod:`jaxattn.masks` mask over global positions (``Causal()``, ``Local(...)``, ``Slices``, ...).
    segment_ids: ``(q_ids [B, T], kv_ids [B, T])`` or one ``[B, T]`` array (documents): attend within equal ids.
      Under the ring they travel with K/V; blocks are computed (their emptiness is data-dependent).
    load_balance: ``"zigzag"`` or None (contiguous shards).
    zigzag_inputs: the inputs (and so the outputs) are already in zigzag order (see above).
    axis_name: inside a ``shard_map``: the bound axis name (or ``(ulysses_axis, ring_axis)`` for usp); then q, k, v and
      segment ids are this device's shards and the result is this device's shard. Your ``shard_map`` may keep
      ``check_vma=True`` (loop carries and cotangents are vma-typed).
    batch_axis: mesh axis (or axes) sharding ``B`` (data parallelism), mesh mode only.
    head_axis: mesh axis (or axes) sharding the heads ``H`` and ``G`` (tensor parallelism), mesh mode only.
    scale: logit scale, a finite positive number (also in float32), default ``D ** -0.5``.
    return_lse: also return the log-sum-exp ``[B, H, T]`` (f32, natural log; sharded like the output).
    implementation: the single-device implementation for the local blocks (see :func:`jaxattn.softmax_attention`;
      a name, ``(name, Config)``, a sequence or None). Every strategy runs that backend in the backward too (the
      ring calls its ``fwd`` / ``bwd`` per step; the others differentiate through its ``custom_vjp``).

  Returns:
    ``out [B, T, H, E]`` in q's dtype (sharded like q), and ``lse [B, H, T]`` if ``return_lse``.

  Raises:
    ValueError: on bad shapes, axes or options, naming the offending values (e.g. ulysses with ``H`` not a
      multiple of the axis size, or ``T`` not a multiple of ``2P`` under zigzag).
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if load_balance not in ("zigzag", None, "none"):
    raise ValueError(f"load_balance must be 'zigzag' or None, got {load_balance!r}")
  if (mesh is None) == (axis_name is None):
    raise ValueError("pass either mesh= and seq_axis= (the call shard_maps itself) or axis_name= (inside your own "
                     f"shard_map), got mesh={'set' if mesh is not None else None}, axis_name={axis_name!r}")
  if mesh is None and (batch_axis is not None or head_axis is not None):
    raise ValueError("batch_axis / head_axis only apply with mesh=; inside shard_map the shards are already local")
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  validate_qkv(q, k, v)
  B, T, H, D = q.shape
  G = k.shape[2]
  if k.shape[1] != T:
    raise ValueError(f"context-parallel self-attention needs equal q and k/v lengths, got {T} and {k.shape[1]}")
  if mask is not None and not isinstance(mask, Mask):
    raise ValueError(f"mask must be a jaxattn.masks.Mask or None, got {type(mask).__name__}")
  if isinstance(mask, Full):
    mask = None
  # inside the caller's shard_map the ids are local shards: a per-shard renumbering would not agree across devices
  q_ids, kv_ids = validate_segment_ids(segment_ids, B, T, T, renumber_traced=mesh is not None)
  scale = validate_scale(scale, D)
  if implementation is not None and not isinstance(implementation, str):
    implementation = tuple(implementation)
  axes = _axes(strategy, seq_axis if mesh is not None else axis_name, "seq_axis" if mesh is not None else "axis_name")
  if zigzag_inputs not in (True, False):
    raise ValueError(f"zigzag_inputs must be a bool, got {zigzag_inputs!r}")
  zigzag = bool(zigzag_inputs) or (load_balance == "zigzag" and mask is not None and strategy != "ulysses")
  cfg = _Config(strategy, axes, mask, zigzag, bool(zigzag_inputs), float(scale), implementation)

  if mesh is None:  # inside the caller's shard_map: local shards
    sizes = {a: _compat.axis_size(a) for a in axes}
    _check_sizes(cfg, sizes, T_local=T, H=H, G=G)
    out, lse = _local(cfg, q, k, v, q_ids, kv_ids)
    return (out, lse) if return_lse else out

  shape, ph = _compat.check_mesh_axes(mesh, axes, batch_axis, head_axis, B=B, H=H, G=G)
  mesh = _compat.call_mesh(mesh, q, k, v)
  seq_size = int(np.prod([shape[a] for a in axes]))
  if T % seq_size:
    raise ValueError(f"sequence length T={T} is not a multiple of the {seq_size} sequence shards over {axes}")
  _check_sizes(cfg, {a: shape[a] for a in axes}, T_local=T // seq_size, H=H // ph, G=G // ph)
  cfg = dataclasses.replace(cfg, mesh=mesh, batch_axis=batch_axis, head_axis=head_axis)
  out, lse = _run_mesh(q, k, v, q_ids, kv_ids, cfg=cfg)
  return (out, lse) if return_lse else out


def _axes(strategy, axis, what) -> tuple[str, ...]:
  if strategy == "usp":
    if not (isinstance(axis, (tuple, list)) and len(axis) == 2 and all(isinstance(a, str) for a in axis)):
      raise ValueError(f"usp needs {what}=(ulysses_axis, ring_axis), got {axis!r}")
    if axis[0] == axis[1]:
      raise ValueError(f"usp needs two different axes in {what}=(ulysses_axis, ring_axis), got {axis[0]!r} twice")
    return tuple(axis)
  if not isinstance(axis, str):
    raise ValueError(f"{strategy} needs {what} to be one mesh axis name (a str), got {axis!r}")
  return (axis,)


def _check_sizes(cfg: _Config, sizes: dict, *, T_local: int, H: int, G: int) -> None:
  """Divisibility rules, in terms of the local shard length and the (per tensor-parallel shard) head counts."""
  if cfg.strategy in ("ulysses", "usp"):
    pu = sizes[cfg.axes[0]]
    if H % pu:
      raise ValueError(f"ulysses needs the query heads to split evenly over the {cfg.axes[0]!r} axis: H={H} heads "
                       f"(per head shard) is not a multiple of its size {pu}")
  if cfg.zigzag:
    ring_axis = cfg.axes[-1]
    if cfg.strategy == "usp":  # the ring shard (Pu local shards after the all-to-all) is cut into two chunks
      if (T_local * sizes[cfg.axes[0]]) % 2:
        raise ValueError(f"zigzag needs T to be a multiple of 2 * {sizes[ring_axis]} (the ring size), got a ring "
                         f"shard of {T_local * sizes[cfg.axes[0]]} tokens")
    elif T_local % 2:
      P_ = sizes[ring_axis]
      raise ValueError(f"zigzag needs the sequence length to be a multiple of 2 * P = {2 * P_}, got T={T_local * P_} "
                       f"(pass load_balance=None for contiguous shards)")


@functools.partial(jax.jit, static_argnames=("cfg",))
def _run_mesh(q, k, v, q_ids, kv_ids, *, cfg: _Config):
  seq = cfg.axes[0] if cfg.strategy != "usp" else (cfg.axes[1], cfg.axes[0])  # usp: ring major
  x_spec = P(cfg.batch_axis, seq, cfg.head_axis, None)
  id_spec = P(cfg.batch_axis, seq)
  lse_spec = P(cfg.batch_axis, cfg.head_axis, seq)
  ids = () if q_ids is None else (q_ids, kv_ids)

  def local(q, k, v, *ids):
    return _local(cfg, q, k, v, *(ids or (None, None)))

  fn = _compat.shard_map(local, mesh=cfg.mesh, in_specs=(x_spec,) * 3 + (id_spec,) * len(ids),
                         out_specs=(x_spec, lse_spec), check=False)
  args = [_compat.constrain(x, cfg.mesh, x_spec) for x in (q, k, v)]
  args += [_compat.constrain(x, cfg.mesh, id_spec) for x in ids]
  return fn(*args)


# ------------------------------------------------------------------------------------- per-device strategies
def _local(cfg: _Config, q, k, v, q_ids, kv_ids):
  """This device's attention for ``cfg.strategy`` (inside shard_map); -> (out, lse) in the input layout."""
  if cfg.strategy == "ring":
    return _ring_level(cfg, q, k, v, q_ids, kv_ids, cfg.axes[0])
  if cfg.strategy == "all_gather":
    return _all_gather(cfg, q, k, v, q_ids, kv_ids)
  if cfg.strategy == "ulysses":
    return ulysses_attention_local(q, k, v, q_ids, kv_ids, axis_name=cfg.axes[0],
                                   inner=functools.partial(_single_device, cfg), zigzag_inputs=cfg.zigzag_inputs)
  return usp_attention_local(q, k, v, q_ids, kv_ids, ulysses_axis=cfg.axes[0], ring_axis=cfg.axes[1],
                             ring_fn=functools.partial(_ring_level, cfg))


def _single_device(cfg: _Config, q, k, v, q_ids, kv_ids):
  seg = None if q_ids is None else (q_ids, kv_ids)
  return softmax_api.softmax_attention(q, k, v, mask=cfg.mask, segment_ids=seg, scale=cfg.scale, return_lse=True,
                                       implementation=cfg.implementation)


def _permute(xs, axis_name, axis=1):
  return [None if x is None else zigzag_permute_local(x, axis_name, axis) for x in xs]


def _ring_level(cfg: _Config, q, k, v, q_ids, kv_ids, axis_name):
  P_ = _compat.axis_size(axis_name)
  T = q.shape[1] * P_
  reshuffle = cfg.zigzag and not cfg.zigzag_inputs
  if reshuffle:
    q, k, v, q_ids, kv_ids = _permute((q, k, v, q_ids, kv_ids), axis_name)
  plan = ring_plan(cfg.mask, T, P_, "zigzag" if cfg.zigzag else "contiguous")
  out, lse = ring_attention_local(q, k, v, q_ids, kv_ids, axis_name=axis_name, plan=plan, scale=cfg.scale,
                                  implementation=cfg.implementation)
  if reshuffle:
    out, lse = zigzag_unpermute_local(out, axis_name, 1), zigzag_unpermute_local(lse, axis_name, 2)
  return out, lse


def _all_gather(cfg: _Config, q, k, v, q_ids, kv_ids):
  axis_name = cfg.axes[0]
  P_ = _compat.axis_size(axis_name)
  T = q.shape[1] * P_
  reshuffle = cfg.zigzag and not cfg.zigzag_inputs  # only the queries move: K/V are gathered anyway
  if reshuffle:
    q, q_ids = _permute((q, q_ids), axis_name)
  plan = gather_plan(cfg.mask, T, P_, "zigzag" if cfg.zigzag else "contiguous",
                     "zigzag" if cfg.zigzag_inputs else "contiguous")
  out, lse = all_gather_attention_local(q, k, v, q_ids, kv_ids, axis_name=axis_name, plan=plan, scale=cfg.scale,
                                        implementation=cfg.implementation)
  if reshuffle:
    out, lse = zigzag_unpermute_local(out, axis_name, 1), zigzag_unpermute_local(lse, axis_name, 2)
  return out, lse

