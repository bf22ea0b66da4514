"""All-gather context parallelism (MaxText's default, Llama-3 style): gather K/V, attend locally to what is visible.

Inside ``shard_map``, every device all-gathers the K/V shards (and kv segment ids) along the sequence axis and runs
one :func:`jaxattn.softmax_attention` of its own queries against the whole sequence, with the local mask the plan
derives for its query chunks (:func:`jaxattn.parallel.plan.gather_plan`: the static mask's blocks that are not
visible are skipped inside the kernel). With zigzag-ordered queries every device attends the same causal area.

Backward is autodiff: the attention's own ``custom_vjp`` (:func:`jaxattn.backend.flash_vjp`, so the chosen backend's
``bwd``: the Pallas dq and dk/dv kernels under ``implementation="pallas_gpu"`` / ``"pallas_tpu"``) and the
transpose of ``all_gather`` (a reduce-scatter of dK/dV). Memory per device holds the full K/V (``O(T)``), the
price of the single collective.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from jaxattn._vma import match_vma
from jaxattn.ops.softmax import api as softmax_api
from jaxattn.parallel.plan import GatherPlan

__all__ = ["all_gather_attention_local"]


def all_gather_attention_local(q, k, v, q_ids, kv_ids, *, axis_name: str, plan: GatherPlan, scale: float,
                               implementation=None):
  """All-gather attention on this device's shards (inside ``shard_map``).

  Args:
    q: ``[B, Tl, H, D]`` in the plan's query layout; k, v: ``[B, Tl, G, D|E]`` in its kv layout.
    q_ids, kv_ids: ``[B, Tl]`` segment ids or None.
    axis_name: the sequence mesh axis.
    plan: from :func:`jaxattn.parallel.plan.gather_plan`.
    scale: logit scale; implementation: passed to :func:`jaxattn.softmax_attention`.

  Returns:
    ``(out [B, Tl, H, E] in q's dtype, lse [B, H, Tl] f32)``.
  """
  kg = lax.all_gather(k, axis_name, axis=1, tiled=True)  # [B, T, G, D]
  vg = lax.all_gather(v, axis_name, axis=1, tiled=True)
  kid = None if kv_ids is None else lax.all_gather(kv_ids, axis_name, axis=1, tiled=True)
  B, Tl, H, _ = q.shape
  E = v.shape[-1]

  def skip(q, kg, vg, q_ids, kid):
    out = jnp.zeros((B, Tl, H, E), q.dtype)
    lse = jnp.full((B, H, Tl), -jnp.inf, jnp.float32)
    return match_vma((out, lse), q, kg, q_ids, kid)

  def attend(mask, q, kg, vg, q_ids, kid):
    seg = None if q_ids is None else (q_ids, kid)
    return softmax_api.softmax_attention(q, kg, vg, mask=mask, segment_ids=seg, scale=scale, return_lse=True,
                                         implementation=implementation)

  branches = [skip] + [functools.partial(attend, m) for m in plan.masks]
  if len(set(plan.table)) == 1:
    return branches[plan.table[0]](q, kg, vg, q_ids, kid)
  index = jnp.asarray(plan.table, jnp.int32)[lax.axis_index(axis_name)]
  return lax.switch(index, branches, q, kg, vg, q_ids, kid)
