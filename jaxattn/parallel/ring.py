r"""Ring attention: K/V shards travel around the ring with ``ppermute``; each step is merged into ``(out, lse)``.

Inside ``shard_map`` over a ring of ``P`` devices, device ``r`` keeps its queries and, at step ``s``, holds the K/V
shard of device ``(r - s) mod P``. It starts sending that shard to ``r + 1`` *before* computing on it (so the
transfer overlaps the block's attention), computes the block with the chosen softmax backend's ``fwd``
(:mod:`jaxattn.backend`: ``xla``, ``pallas_gpu``, ``pallas_tpu``, ...; resolved once per distinct local mask by
:func:`jaxattn.ops.softmax.api.resolve_backend`) and merges it into the running result with the online-softmax rule

.. math::
   \ell = \log(e^{\ell_a} + e^{\ell_b}), \qquad o = e^{\ell_a - \ell} o_a + e^{\ell_b - \ell} o_b .

A device holds at most two remote K/V shards at once (the one it computes on and the one arriving), so memory per
device is ``O(T / P)``. Which local mask each (device, step) uses is decided at trace time
(:mod:`jaxattn.parallel.plan`): fully masked blocks are skipped (``lax.switch`` to a no-op branch) and steps that no
device needs are not run at all (no transfer either). Segment ids travel with K/V and are applied inside the block.

Backward (``custom_vjp``, the ring-flash-attention scheme): with the saved global ``out`` and ``lse``, every block's
contribution to ``dq``, ``dk``, ``dv`` is exact on its own (``p_ij = exp(s_ij - lse_i)``,
``delta_i = dO_i . O_i - dlse_i``), computed by the *same* backend's ``bwd`` on the block's
:class:`~jaxattn.ops.softmax.config.SoftmaxResiduals` with the global ``out``, ``lse`` and ``dlse`` (its ``extra``,
the static visiting lists, rebuilt by ``backend.residual_extra``, not by rerunning the forward). So a ring over the
Pallas kernels runs Pallas in both directions. K/V go around the ring again and
the ``dk``/``dv`` accumulators (f32) travel with them, arriving back at their owner after the last step; ``dq``
stays local. Memory stays ``O(T / P)``.

Limitation: the block outputs (and the block gradients) come back from the backend in the input dtype, so with bf16
inputs each merge starts from bf16-rounded partial results (the merge and the accumulators are f32).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn._vma import match_vma
from jaxattn.backend import Backend
from jaxattn.ops.softmax import api as softmax_api
from jaxattn.ops.softmax.config import SoftmaxCall, SoftmaxResiduals
from jaxattn.parallel.plan import RingPlan

__all__ = ["merge_attention", "ring_attention_local", "RingBlock", "block_backends"]


def merge_attention(out_a, lse_a, out_b, lse_b):
  r"""Merges two partial attention results over disjoint key sets (online softmax).

  Args:
    out_a, out_b: ``[B, T, H, E]`` partial outputs (each normalised over its own keys).
    lse_a, lse_b: ``[B, H, T]`` their natural-log log-sum-exps (``-inf`` where a row saw no key).

  Returns:
    ``(out [B, T, H, E] f32, lse [B, H, T] f32)`` over the union of the key sets; rows that saw no key in either
    give ``(0, -inf)``, never NaN.
  """
  lse_a, lse_b = lse_a.astype(jnp.float32), lse_b.astype(jnp.float32)
  m = jnp.maximum(lse_a, lse_b)
  m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
  wa, wb = jnp.exp(lse_a - m_safe), jnp.exp(lse_b - m_safe)  # [B, H, T], 0 where a side is -inf
  den = wa + wb
  lse = jnp.where(den > 0, m_safe + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)
  inv = 1.0 / jnp.where(den > 0, den, 1.0)
  wa, wb = (wa * inv).transpose(0, 2, 1)[..., None], (wb * inv).transpose(0, 2, 1)[..., None]  # [B, T, H, 1]
  return wa * out_a.astype(jnp.float32) + wb * out_b.astype(jnp.float32), lse


@dataclasses.dataclass(frozen=True)
class _Static:
  axis_name: str
  plan: RingPlan
  scale: float
  implementation: str | tuple | None


class RingBlock(NamedTuple):
  """One branch of the ring: the backend, call and config that compute a block under one plan mask."""

  backend: Backend
  call: SoftmaxCall
  config: object


# q, k, v are differentiated; bias (absent), q_ids and kv_ids are not.
_NEEDS = (True, True, True, False, False, False)


def block_backends(plan: RingPlan, q, k, v, *, scale: float, segment_ids: bool,
                   implementation=None) -> tuple[RingBlock, ...]:
  """The softmax backend serving each of ``plan.masks`` (in order) for this device's shards.

  Args:
    plan: the ring plan.
    q, k, v: this device's shards (arrays or ``jax.ShapeDtypeStruct``): ``[B, Tl, H, D]``, ``[B, Tl, G, D|E]``.
    scale: logit scale; segment_ids: whether ids travel with K/V.
    implementation: as in :func:`jaxattn.softmax_attention` (a name, ``(name, Config)``, a sequence or None).

  Returns:
    One ``(backend, call, config)`` per plan mask (``block_backends(...)[n - 1]`` serves branch ``n``).
  """
  blocks = []
  for mask in plan.masks:
    call = softmax_api.make_call(q, k, v, mask=mask, segment_ids=segment_ids, scale=scale, return_lse=True)
    backend, config = softmax_api.resolve_backend(call, implementation)
    blocks.append(RingBlock(backend, call, config))
  return tuple(blocks)


def _blocks(st: _Static, q, k, v, q_ids) -> tuple[RingBlock, ...]:
  return block_backends(st.plan, q, k, v, scale=st.scale, segment_ids=q_ids is not None,
                        implementation=st.implementation)


def _shift_perm(P: int, shift: int) -> list[tuple[int, int]]:
  return [(i, (i + shift) % P) for i in range(P)]


def _switch(branches, branch, *args):
  if isinstance(branch, int):  # every device and step uses the same branch: no switch
    return branches[branch](*args)
  return lax.switch(branch, branches, *args)


# --------------------------------------------------------------------------------------------------- forward
def _block_forward(blocks, q, q_ids, kk, vv, kid, branch):
  """Attention of the local queries against one K/V shard, by the plan's branch. -> (out f32, lse f32)."""
  B, Tl, H, _ = q.shape
  E = vv.shape[-1]

  def skip(q, kk, vv, q_ids, kid):
    out = jnp.zeros((B, Tl, H, E), jnp.float32)
    lse = jnp.full((B, H, Tl), -jnp.inf, jnp.float32)
    return match_vma((out, lse), q, kk, q_ids, kid)

  def attend(block: RingBlock, q, kk, vv, q_ids, kid):
    (out, lse), _ = block.backend.fwd(block.call, block.config, (q, kk, vv, None, q_ids, kid))
    return match_vma((out.astype(jnp.float32), lse.astype(jnp.float32)), q, kk, q_ids, kid)

  branches = [skip] + [functools.partial(attend, b) for b in blocks]
  return _switch(branches, branch, q, kk, vv, q_ids, kid)


def _branch_fn(st: _Static):
  """``step -> branch index`` for this device (a Python int when the whole table is one branch)."""
  table = np.asarray(st.plan.table, np.int32)  # [num_steps, P]
  if (table == table.flat[0]).all():
    return lambda s: int(table.flat[0])
  table_j = jnp.asarray(table)
  r = lax.axis_index(st.axis_name)
  return lambda s: table_j[s, r]


def _forward(q, k, v, q_ids, kv_ids, st: _Static):
  plan = st.plan
  P, n = plan.P, plan.num_steps
  B, Tl, H, _ = q.shape
  E = v.shape[-1]
  blocks = _blocks(st, q, k, v, q_ids)
  branch = _branch_fn(st)
  fwd = _shift_perm(P, 1)
  out = jnp.zeros((B, Tl, H, E), jnp.float32)
  lse = jnp.full((B, H, Tl), -jnp.inf, jnp.float32)
  out, lse = match_vma((out, lse), q, k, q_ids, kv_ids)

  def body(s, carry):
    kk, vv, kid, out, lse = carry
    nxt = lax.ppermute((kk, vv, kid), st.axis_name, fwd)  # issued before this block's compute
    o_b, l_b = _block_forward(blocks, q, q_ids, kk, vv, kid, branch(s))
    out, lse = merge_attention(out, lse, o_b, l_b)
    return (*nxt, out, lse)

  carry = (k, v, kv_ids, out, lse)
  if n > 1:
    carry = lax.fori_loop(0, n - 1, body, carry)
  kk, vv, kid, out, lse = carry
  o_b, l_b = _block_forward(blocks, q, q_ids, kk, vv, kid, branch(n - 1))
  out, lse = merge_attention(out, lse, o_b, l_b)
  return out.astype(q.dtype), lse


# -------------------------------------------------------------------------------------------------- backward
def _block_grads(blocks, q, q_ids, out, lse, dout, dlse, kk, vv, kid, branch):
  """This block's exact contributions (f32) to dq, dk, dv, by the block's backend given the global out and lse."""
  B, Tl, H, D = q.shape
  _, Sk, G, E = vv.shape

  def skip(q, kk, vv, q_ids, kid, out, lse, dout, dlse):
    z = (jnp.zeros((B, Tl, H, D), jnp.float32), jnp.zeros((B, Sk, G, D), jnp.float32),
         jnp.zeros((B, Sk, G, E), jnp.float32))
    return match_vma(z, q, kk, q_ids, kid, out, lse, dout, dlse)

  def grads(block: RingBlock, q, kk, vv, q_ids, kid, out, lse, dout, dlse):
    extra = block.backend.residual_extra(block.call, block.config)
    res = SoftmaxResiduals(q, kk, vv, None, q_ids, kid, out, lse, extra)
    dq, dk, dv = block.backend.bwd(block.call, block.config, res, (dout, dlse), _NEEDS)[:3]
    z = (dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32))
    return match_vma(z, q, kk, q_ids, kid, out, lse, dout, dlse)

  branches = [skip] + [functools.partial(grads, b) for b in blocks]
  return _switch(branches, branch, q, kk, vv, q_ids, kid, out, lse, dout, dlse)


def _backward(st: _Static, res, g):
  q, k, v, q_ids, kv_ids, out, lse = res
  dout, dlse = g
  plan = st.plan
  P, n = plan.P, plan.num_steps
  dout = dout.astype(q.dtype)
  dlse = dlse.astype(jnp.float32)
  blocks = _blocks(st, q, k, v, q_ids)
  branch = _branch_fn(st)
  fwd = _shift_perm(P, 1)
  dq = jnp.zeros(q.shape, jnp.float32)
  dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  dq, dk, dv = match_vma((dq, dk, dv), q, k, out, lse, dout, dlse, q_ids, kv_ids)
  # Each block's backend sees the row's global out, lse and dlse, so its delta_i = dO_i . O_i - dlse_i is the
  # global row term and its gradients are the block's exact share.
  step = lambda kk, vv, kid, s: _block_grads(blocks, q, q_ids, out, lse, dout, dlse, kk, vv, kid, branch(s))

  def body(s, carry):
    kk, vv, kid, dk, dv, dq = carry
    nxt = lax.ppermute((kk, vv, kid), st.axis_name, fwd)
    dq_b, dk_b, dv_b = step(kk, vv, kid, s)
    dk, dv = lax.ppermute((dk + dk_b, dv + dv_b), st.axis_name, fwd)  # the accumulators follow their K/V shard
    return (*nxt, dk, dv, dq + dq_b)

  carry = (k, v, kv_ids, dk, dv, dq)
  if n > 1:
    carry = lax.fori_loop(0, n - 1, body, carry)
  kk, vv, kid, dk, dv, dq = carry
  dq_b, dk_b, dv_b = step(kk, vv, kid, n - 1)
  dq, dk, dv = dq + dq_b, dk + dk_b, dv + dv_b
  if n > 1:  # device r holds the accumulators of shard r - (n - 1): send them home
    dk, dv = lax.ppermute((dk, dv), st.axis_name, _shift_perm(P, -(n - 1)))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, q_ids, kv_ids, st: _Static):
  return _forward(q, k, v, q_ids, kv_ids, st)


def _ring_fwd(q, k, v, q_ids, kv_ids, st):
  out, lse = _forward(q, k, v, q_ids, kv_ids, st)
  return (out, lse), (q, k, v, q_ids, kv_ids, out, lse)


_ring.defvjp(_ring_fwd, _backward)


def ring_attention_local(q, k, v, q_ids, kv_ids, *, axis_name: str, plan: RingPlan, scale: float,
                         implementation=None):
  """Ring attention on this device's shards (inside ``shard_map``), already in ``plan.layout`` order.

  Args:
    q: ``[B, Tl, H, D]``; k: ``[B, Tl, G, D]``; v: ``[B, Tl, G, E]`` (``Tl = plan.T / plan.P``).
    q_ids, kv_ids: ``[B, Tl]`` int32 segment ids, or None.
    axis_name: the ring's mesh axis.
    plan: from :func:`jaxattn.parallel.plan.ring_plan`.
    scale: logit scale.
    implementation: the softmax backend of the blocks, forward and backward: a name, ``(name, Config)``, a
      sequence of those or None (see :func:`jaxattn.softmax_attention`).

  Returns:
    ``(out [B, Tl, H, E] in q's dtype, lse [B, H, Tl] f32)``.
  """
  impl = implementation
  if impl is not None and not isinstance(impl, (str, tuple)):
    impl = tuple(impl)
  return _ring(q, k, v, q_ids, kv_ids, _Static(axis_name, plan, float(scale), impl))
