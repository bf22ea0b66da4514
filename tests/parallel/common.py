"""Shared helpers for the context-parallel tests: 8-device meshes, tiny inputs, one compiled fwd+grad per case."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import masks, testing
from jaxattn.parallel import context_parallel_attention

B, T, H, G, D = 1, 64, 8, 2, 8  # GQA 4:1; T = 64 cuts into 2P = 16 zigzag chunks of 4 on 8 devices
DOC_LENS = (10, 20, 3, 31)  # documents straddle shard boundaries

MASKS = {
    "full": (None, False),
    "causal": (masks.Causal(), False),
    "sliding_window": (masks.sliding_window(6), False),
    "documents": (masks.Causal(), True),  # causal inside documents given by segment ids
}


def auto_mesh(shape, names):
  """A mesh with Auto axes (gradients work outside a ``jax.set_mesh`` context)."""
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is None:
    return jax.make_mesh(shape, names)
  return jax.make_mesh(shape, names, axis_types=(axis_type.Auto,) * len(shape))


@functools.lru_cache(maxsize=None)
def mesh_1d():
  return auto_mesh((8,), ("seq",))


@functools.lru_cache(maxsize=None)
def mesh_usp():
  return auto_mesh((2, 4), ("uly", "ring"))


def inputs(seed=0, *, b=B, t=T, h=H, g=G, d=D, dtype=jnp.float32):
  q, k, v = testing.random_qkv(seed, B=b, T=t, H=h, G=g, D=d, dtype=dtype)
  rng = np.random.default_rng(seed + 100)
  w_out = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)  # fixed cotangents
  w_lse = jnp.asarray(rng.standard_normal((b, h, t)), jnp.float32)
  return q, k, v, w_out, w_lse


def doc_ids(b=B):
  ids = masks.document_segment_ids(DOC_LENS)
  return jnp.asarray(np.tile(ids[None], (b, 1)))


def _loss(attn, q, k, v, w_out, w_lse):
  out, lse = attn(q, k, v)
  finite = jnp.where(jnp.isneginf(lse), 0.0, lse)
  return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(finite * w_lse), (out, lse)


def value_and_grads(attn, q, k, v, w_out, w_lse):
  """``(out, lse), (dq, dk, dv)`` of a fixed linear loss, compiled once."""
  fn = jax.jit(jax.value_and_grad(functools.partial(_loss, attn), (0, 1, 2), has_aux=True))
  (_, aux), grads = fn(q, k, v, w_out, w_lse)
  return aux, grads


def reference(mask, segment_ids, q, k, v, w_out, w_lse):
  attn = lambda q, k, v: jaxattn.softmax_attention(q, k, v, mask=mask, segment_ids=segment_ids, return_lse=True)
  return value_and_grads(attn, q, k, v, w_out, w_lse)


def check_strategy(strategy, mask_name, *, load_balance="zigzag", dtype=jnp.float32, seed=0, **kw):
  """Context-parallel attention == single-device attention: outputs, lse and gradients."""
  assert jax.device_count() == 8
  mask, docs = MASKS[mask_name] if isinstance(mask_name, str) else mask_name
  q, k, v, w_out, w_lse = inputs(seed, dtype=dtype)
  seg = doc_ids() if docs else None
  if strategy == "usp":
    mesh, axis = mesh_usp(), ("uly", "ring")
  else:
    mesh, axis = mesh_1d(), "seq"
  attn = lambda q, k, v: context_parallel_attention(q, k, v, mesh=mesh, seq_axis=axis, strategy=strategy, mask=mask,
                                                    segment_ids=seg, load_balance=load_balance, return_lse=True, **kw)
  (out, lse), grads = value_and_grads(attn, q, k, v, w_out, w_lse)
  (r_out, r_lse), r_grads = reference(mask, seg, q, k, v, w_out, w_lse)
  assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == (B, H, T)
  testing.assert_close(out, r_out, name=f"{strategy}/{mask_name} out")
  testing.assert_close(lse, r_lse, dtype=dtype, name=f"{strategy}/{mask_name} lse")
  for name, a, b in zip(("dq", "dk", "dv"), grads, r_grads):
    testing.assert_close(a, b, kind="grad", name=f"{strategy}/{mask_name} {name}")
