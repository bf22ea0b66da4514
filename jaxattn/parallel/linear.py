r"""Context parallelism for (decayed) linear attention: state passing between sequence shards (LASP-style).

With the recurrence ``S_t = e^{g_t} S_{t-1} + k_t v_t^T``, ``o_t = scale q_t^T S_t`` (see
:func:`jaxattn.linear_attention`) and the sequence cut into ``P`` contiguous shards, device ``r``:

1. runs :func:`jaxattn.linear_attention` on its shard from a zero state, giving the local output ``o^loc``, the
   local state ``U_r = sum_{s in r} e^{b_s} k_s v_s^T`` (``b_s`` = log decay after ``s`` to the shard end) and the
   shard's log decay product ``log A_r = sum_{s in r} g_s``;
2. all-gathers the small ``(U_p, log A_p)`` of every shard (``P`` states of ``[B, H, D, E]``: independent of ``T``)
   and forms its incoming state

   .. math:: S^{in}_r = \sum_{p < r} \exp\Big(\sum_{p < q < r} \log A_q\Big) U_p
                        + \exp\Big(\sum_{q < r} \log A_q\Big) S_0 ;

3. adds the correction ``scale * exp(a_t) q_t^T S^in_r`` with ``a_t`` the cumulative log decay from the shard
   start to ``t``.

The weights are exponentials of direct sums of log decays (suffix sums over shards, prefix sums inside a shard), never
differences of two large cumulative sums, so no overflow and no cancellation. Backward is autodiff of these steps:
the local op's ``custom_vjp`` (including the gradient through its final state) and the transpose of the all-gather.
Per-head (``[H]``) and per-token (``[B, T, H]``) decays, GQA, ``initial_state`` and ``return_final_state`` are
supported; ``causal=False`` reduces to a ``psum`` of the shard states.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxattn._validation import (validate_chunk_size, validate_log_decay, validate_qkv, validate_scale,
                                 validate_state)
from jaxattn.ops.linear import api as linear_api
from jaxattn.ops.linear.config import FINITE_LOG_DECAY_FLOOR
from jaxattn.parallel import _compat

__all__ = ["context_parallel_linear_attention"]

_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _Config:
  axis: str
  causal: bool
  scale: float
  implementation: str | tuple | None
  chunk_size: int | None
  decay: str | None  # None, "head" or "token"
  mesh: object = None
  batch_axis: object = None
  head_axis: object = None


def context_parallel_linear_attention(q, k, v, *, mesh=None, seq_axis: str | None = None, axis_name: str | None = None,
                                      log_decay=None, causal: bool = True, scale: float | None = None,
                                      initial_state=None, return_final_state: bool = False, batch_axis=None,
                                      head_axis=None, implementation: str | Sequence[str] | None = None,
                                      chunk_size: int | None = None):
  """:func:`jaxattn.linear_attention` over a sequence sharded across devices (exact; see the module docstring).

  Args:
    q: ``[B, T, H, D]``; k: ``[B, T, G, D]``; v: ``[B, T, G, E]`` (``H % G == 0``), sharded along ``T``.
    mesh: a ``jax.sharding.Mesh`` (``Mesh(...)`` or ``jax.make_mesh``; the call runs ``shard_map`` over it, with
      Explicit axes used as Auto inside as in :func:`jaxattn.parallel.context_parallel_attention`), or None inside
      your own ``shard_map`` with ``axis_name`` set (then all arrays are this device's shards).
    seq_axis: the mesh axis of the sequence shards (mesh mode).
    axis_name: the bound axis name (inside your ``shard_map``; ``check_vma=True`` works).
    log_decay: None, ``[H]`` per-head constant or ``[B, T, H]`` per-token gate (``<= 0``), as in
      :func:`jaxattn.linear_attention`.
    causal: the causal recurrence (default) or the non-causal form (``log_decay`` must be None).
    scale: output scale, a finite positive number (also in float32), default ``D ** -0.5``.
    initial_state: ``S_0 [B, H, D, E]`` entering the first shard (replicated over the sequence axis).
    return_final_state: also return the global final state ``[B, H, D, E]`` f32 (the same on every device).
    batch_axis, head_axis: mesh axes sharding ``B`` and the heads (mesh mode).
    implementation, chunk_size: for the local :func:`jaxattn.linear_attention`.

  Returns:
    ``out [B, T, H, E]`` in q's dtype, and the final state if ``return_final_state``.

  Raises:
    ValueError: on bad shapes, axes or options, naming the offending values.
  """
  if (mesh is None) == (axis_name is None):
    raise ValueError("pass either mesh= and seq_axis= or axis_name= (inside your own shard_map), got "
                     f"mesh={'set' if mesh is not None else None}, axis_name={axis_name!r}")
  if not isinstance(causal, (bool, np.bool_)):
    raise ValueError(f"causal must be a bool, got {causal!r}")
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  validate_qkv(q, k, v, same_length="causal linear attention needs equal lengths (use causal=False for "
                                    "cross-attention)" if causal else None)
  B, T, H, D = q.shape
  G, E = k.shape[2], v.shape[3]
  log_decay = validate_log_decay(log_decay, B, T, H, bool(causal), per_token_shape=(B, T, H))
  initial_state = validate_state(initial_state, "initial_state", B, H, D, E)
  scale = validate_scale(scale, D)
  chunk_size = validate_chunk_size(chunk_size)
  if implementation is not None and not isinstance(implementation, str):
    implementation = tuple(implementation)
  decay = None if log_decay is None else ("head" if log_decay.ndim == 1 else "token")
  axis = seq_axis if mesh is not None else axis_name
  if not isinstance(axis, str):
    raise ValueError(f"{'seq_axis' if mesh is not None else 'axis_name'} must be one mesh axis name, got {axis!r}")
  cfg = _Config(axis, bool(causal), scale, implementation, chunk_size, decay)
  if mesh is None:
    out, state = _local(cfg, q, k, v, log_decay, initial_state)
  else:
    shape, _ = _compat.check_mesh_axes(mesh, (axis,), batch_axis, head_axis, B=B, H=H, G=G)
    mesh = _compat.call_mesh(mesh, q, k, v)
    if T % shape[axis]:
      raise ValueError(f"sequence length T={T} is not a multiple of the {axis!r} axis size {shape[axis]}")
    cfg = dataclasses.replace(cfg, mesh=mesh, batch_axis=batch_axis, head_axis=head_axis)
    out, state = _run_mesh(q, k, v, log_decay, initial_state, cfg=cfg)
  return (out, state) if return_final_state else out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _run_mesh(q, k, v, log_decay, initial_state, *, cfg: _Config):
  b, s, h = cfg.batch_axis, cfg.axis, cfg.head_axis
  x_spec, state_spec = P(b, s, h, None), P(b, h, None, None)
  g_spec = {None: None, "head": P(h), "token": P(b, s, h)}[cfg.decay]
  extra, extra_specs = [], []
  if log_decay is not None:
    extra.append(_compat.constrain(log_decay, cfg.mesh, g_spec))
    extra_specs.append(g_spec)
  if initial_state is not None:
    extra.append(_compat.constrain(initial_state, cfg.mesh, state_spec))
    extra_specs.append(state_spec)
  has_g, has_s0 = log_decay is not None, initial_state is not None

  def local(q, k, v, *rest):
    rest = list(rest)
    g = rest.pop(0) if has_g else None
    s0 = rest.pop(0) if has_s0 else None
    return _local(cfg, q, k, v, g, s0)

  fn = _compat.shard_map(local, mesh=cfg.mesh, in_specs=(x_spec,) * 3 + tuple(extra_specs),
                         out_specs=(x_spec, state_spec), check=False)
  args = [_compat.constrain(x, cfg.mesh, x_spec) for x in (q, k, v)]
  return fn(*args, *extra)


def _reverse_cumsum(x, axis=0):
  """``out[p] = sum_{q >= p} x[q]`` along ``axis`` (a direct sum of terms, no subtraction)."""
  return jnp.flip(jnp.cumsum(jnp.flip(x, axis), axis), axis)


def _local(cfg: _Config, q, k, v, g, s0):
  """This device's shard (inside shard_map): -> (out [B, Tl, H, E], global final state [B, H, D, E] f32)."""
  axis = cfg.axis
  B, Tl, H, D = q.shape
  qf = q.astype(jnp.float32)
  o_loc, U = linear_api.linear_attention(q, k, v, log_decay=g, causal=cfg.causal, scale=cfg.scale,
                                         return_final_state=True, implementation=cfg.implementation,
                                         chunk_size=cfg.chunk_size)  # U: [B, H, D, E] f32, from a zero state
  if not cfg.causal:
    total = lax.psum(U, axis)
    if s0 is not None:
      total = total + s0
    corr = cfg.scale * jnp.einsum("bthd,bhde->bthe", qf, total - U, precision=_HI)
    return (o_loc.astype(jnp.float32) + corr).astype(q.dtype), total

  # log decay inside the shard: a_t (cumulative to t, inclusive) and the shard total log A.
  if g is None:
    a, log_a = None, jnp.zeros((B, H), jnp.float32)
  elif g.ndim == 1:  # per head [H]
    gc = jnp.maximum(g, FINITE_LOG_DECAY_FLOOR)
    a = (jnp.arange(1, Tl + 1, dtype=jnp.float32)[:, None] * gc)[None]  # [1, Tl, H]
    log_a = jnp.broadcast_to(Tl * gc, (B, H))
  else:  # per token [B, Tl, H]
    gc = jnp.maximum(g, FINITE_LOG_DECAY_FLOOR)
    a = jnp.cumsum(gc, axis=1)
    log_a = jnp.sum(gc, axis=1)
  U_all = lax.all_gather(U, axis)  # [P, B, H, D, E]
  A_all = lax.all_gather(log_a, axis)  # [P, B, H]
  nP = A_all.shape[0]
  r = lax.axis_index(axis)
  idx = jnp.arange(nP)[:, None, None]
  # incoming state: shards p < r, each decayed by the shards strictly between p and r.
  m = jnp.where(idx < r, A_all, 0.0)
  rc = _reverse_cumsum(m)  # rc[p] = sum_{p <= q < r} log A_q
  after = jnp.concatenate([rc[1:], jnp.zeros_like(rc[:1])], 0)  # sum_{p < q < r} log A_q
  w = jnp.where(idx < r, jnp.exp(after), 0.0)
  s_in = jnp.einsum("pbh,pbhde->bhde", w, U_all, precision=_HI)
  if s0 is not None:
    s_in = s_in + jnp.exp(rc[0])[..., None, None] * s0
  corr = jnp.einsum("bthd,bhde->bthe", qf, s_in, precision=_HI) * cfg.scale
  if a is not None:
    corr = corr * jnp.exp(a)[..., None]
  out = (o_loc.astype(jnp.float32) + corr).astype(q.dtype)
  # global final state (identical on every device): all shards, each decayed by the shards after it.
  rc_all = _reverse_cumsum(A_all)
  after_all = jnp.concatenate([rc_all[1:], jnp.zeros_like(rc_all[:1])], 0)
  final = jnp.einsum("pbh,pbhde->bhde", jnp.exp(after_all), U_all, precision=_HI)
  if s0 is not None:
    final = final + jnp.exp(rc_all[0])[..., None, None] * s0
  return out, final
