"""``softmax_attention(mask=<bool array>)`` and per-head static masks (``masks.PerHead`` / a sequence of masks)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxattn
from jaxattn import masks, testing
from jaxattn.backend import FallbackWarning
from jaxattn.ops.softmax.config import BlockSizes

B, T, S, H, G, D = 2, 20, 28, 4, 2, 16
TILES = BlockSizes(8, 8)  # several blocks, partial edge blocks


def _qkv(seed=0, dtype=jnp.float32):
  return testing.random_qkv(jax.random.key(seed), B=B, T=T, S=S, H=H, G=G, D=D, dtype=dtype)


def _attn(q, k, v, impl, **kw):
  extra = {"block_sizes": TILES} if impl == "xla" else {}
  return jaxattn.softmax_attention(q, k, v, implementation=impl, return_lse=True, **kw, **extra)


def _grads(q, k, v, impl, **kw):
  w = jax.random.normal(jax.random.key(99), (B, T, H, D))

  def loss(q, k, v, bias):
    out, lse = _attn(q, k, v, impl, bias=bias, **kw)
    return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * 0.3)

  bias = jax.random.normal(jax.random.key(5), (1, H, T, S))
  return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)


def _dense_allowed(mask_arr):
  """The [B, H, T, S] boolean the array means."""
  m = np.asarray(mask_arr)
  return np.broadcast_to(m.reshape((1,) * (4 - m.ndim) + m.shape), (B, H, T, S))


def _manual(q, k, v, allowed, bias=None):
  """Plain numpy-free dense attention in f64-ish f32 with explicit per-(b, h) allowed; empty rows -> 0."""
  R = H // G
  kk, vv = jnp.repeat(k, R, axis=2), jnp.repeat(v, R, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q, kk, precision="highest") * D ** -0.5
  if bias is not None:
    s = s + bias
  s = jnp.where(allowed, s, -jnp.inf)
  m = jnp.max(s, -1, keepdims=True)
  p = jnp.where(allowed, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0)), 0.0)
  l = p.sum(-1, keepdims=True)
  return jnp.einsum("bhts,bshe->bthe", p / jnp.where(l == 0, 1, l), vv, precision="highest")


BROADCAST_SHAPES = [(T, S), (1, S), (T, 1), (H, T, S), (1, 1, S), (B, 1, 1, S), (B, 1, T, 1), (B, H, T, S),
                    (1, H, 1, S), (B, 1, T, S), (1, 1, 1, 1), (B, H, 1, 1)]
GRAD_SHAPES = [(T, S), (B, 1, 1, S), (B, H, T, S), (B, H, 1, 1)]  # gradients (slower) on a representative few


@pytest.mark.parametrize("shape", BROADCAST_SHAPES, ids=str)
def test_every_broadcast_shape_matches_reference_and_definition(shape):
  q, k, v = _qkv(1)
  rng = np.random.default_rng(len(shape) * 31 + sum(shape))
  arr = jnp.asarray(rng.random(shape) < 0.6)
  out_x, lse_x = _attn(q, k, v, "xla", mask=arr)
  out_r, lse_r = _attn(q, k, v, "reference", mask=arr)
  testing.assert_close(out_x, out_r, name="xla out")
  testing.assert_close(lse_x, lse_r, name="xla lse")
  allowed = _dense_allowed(arr)
  testing.assert_close(out_r, _manual(q, k, v, allowed), name="reference vs definition")
  if allowed.any():
    assert np.abs(np.asarray(out_r)).max() > 0.05  # not all zeros
  # fully masked rows: output 0, lse -inf (e.g. the all-False broadcast cases)
  empty = ~allowed.any(-1)  # [B, H, T]
  assert np.all(np.asarray(out_x).transpose(0, 2, 1, 3)[empty] == 0)
  assert np.all(np.isneginf(np.asarray(lse_x)[empty]))
  assert np.all(np.isfinite(np.asarray(lse_x)[~empty]))
  if shape not in GRAD_SHAPES:
    return
  for gx, gr, name in zip(_grads(q, k, v, "xla", mask=arr), _grads(q, k, v, "reference", mask=arr), "qkvb"):
    testing.assert_no_nan(gx, name)
    testing.assert_close(gx, gr, kind="grad", name=f"d{name}")


@pytest.mark.parametrize("static", [masks.Causal(), masks.Local(5, 2), masks.causal_document([7, 13]),
                                    masks.Causal(offset=S - T)], ids=repr)
def test_equals_equivalent_static_mask(static):
  q, k, v = _qkv(2)
  arr = jnp.asarray(static.to_dense(T, S))
  for impl in ("xla", "reference"):
    a, la = _attn(q, k, v, impl, mask=arr)
    b, lb = _attn(q, k, v, impl, mask=static)
    testing.assert_close(a, b, name=f"{impl} out")
    testing.assert_close(la, lb, name=f"{impl} lse")
  for ga, gb in zip(_grads(q, k, v, "xla", mask=arr), _grads(q, k, v, "xla", mask=static)):
    testing.assert_close(ga, gb, kind="grad", name="grads")


@settings(max_examples=6)
@given(seed=st.integers(0, 2 ** 31 - 1), density=st.sampled_from([0.0, 0.05, 0.3, 0.8, 1.0]),
       empty_rows=st.integers(0, 5), soft_cap=st.sampled_from([None, 3.0]))
def test_fuzzed_masks_with_empty_rows_and_soft_cap(seed, density, empty_rows, soft_cap):
  q, k, v = _qkv(seed % 7)
  rng = np.random.default_rng(seed)
  m = rng.random((B, H, T, S)) < density
  m[:, :, rng.choice(T, empty_rows, replace=False)] = False
  arr = jnp.asarray(m)
  kw = dict(mask=arr, logits_soft_cap=soft_cap, bias=jnp.asarray(rng.normal(size=(B, 1, T, S)), jnp.float32))
  out_x, lse_x = _attn(q, k, v, "xla", **kw)
  out_r, lse_r = _attn(q, k, v, "reference", **kw)
  testing.assert_no_nan(out_x, "out")
  testing.assert_close(out_x, out_r, name="out")
  testing.assert_close(lse_x, lse_r, name="lse")
  empty = ~m.any(-1)
  assert np.all(np.asarray(out_x).transpose(0, 2, 1, 3)[empty] == 0)
  gx = _grads(q, k, v, "xla", mask=arr, logits_soft_cap=soft_cap)
  gr = _grads(q, k, v, "reference", mask=arr, logits_soft_cap=soft_cap)
  for a, b, name in zip(gx, gr, "qkvb"):
    testing.assert_no_nan(a, name)
    testing.assert_close(a, b, kind="grad", name=f"d{name}")
  # rows / keys masked everywhere get exactly zero gradient
  dq = np.asarray(gx[0]).transpose(0, 2, 1, 3)  # [B, H, T, D]
  assert np.all(dq[empty] == 0)
  assert np.all(np.asarray(gx[3])[np.broadcast_to(~m, gx[3].shape)] == 0) if gx[3].shape == m.shape else True


def test_non_finite_at_masked_positions_stays_out():
  q, k, v = _qkv(3)
  m = np.ones((B, 1, T, S), bool)
  m[:, :, :, 5] = False  # key 5 masked for everyone
  m[:, :, 3, :] = False  # query 3 sees nothing
  k = k.at[:, 5].set(jnp.nan)
  v = v.at[:, 5].set(jnp.inf)
  q = q.at[:, 3].set(jnp.nan)
  bias = jnp.zeros((B, 1, T, S)).at[:, :, :, 5].set(jnp.nan)
  for impl in ("xla", "reference"):
    out, lse = _attn(q, k, v, impl, mask=jnp.asarray(m), bias=bias, logits_soft_cap=5.0)
    testing.assert_no_nan(out, f"{impl} out")
    assert np.all(np.asarray(out)[:, 3] == 0)
    g = jax.grad(lambda q, k, v: _attn(q, k, v, impl, mask=jnp.asarray(m), logits_soft_cap=5.0)[0].sum(),
                 argnums=(0, 1, 2))(q, k, v)
    for x, name in zip(g, "qkv"):
      testing.assert_no_nan(x, f"{impl} d{name}")
  clean_k, clean_v = k.at[:, 5].set(0.0), v.at[:, 5].set(0.0)
  a = _attn(q, k, v, "xla", mask=jnp.asarray(m))[0]
  b = _attn(q, clean_k, clean_v, "reference", mask=jnp.asarray(m))[0]
  testing.assert_close(a, b, name="finite rows unaffected")


def test_mask_array_under_jit_and_traced():
  q, k, v = _qkv(4)
  arr = jax.random.bernoulli(jax.random.key(8), 0.5, (B, 1, 1, S))
  f = jax.jit(lambda q, k, v, m: jaxattn.softmax_attention(q, k, v, mask=m, implementation="xla"))
  testing.assert_close(f(q, k, v, arr), _attn(q, k, v, "reference", mask=arr)[0], name="jit")


def test_kernels_refuse_and_default_falls_back():
  q, k, v = _qkv(5)
  arr = jnp.ones((T, S), bool)
  for impl in ("pallas_gpu", "pallas_tpu", "cudnn"):
    with pytest.raises(NotImplementedError, match="mask arrays"):
      jaxattn.softmax_attention(q, k, v, mask=arr, implementation=impl)
  with pytest.warns(FallbackWarning, match="mask arrays"):
    out = jaxattn.softmax_attention(q, k, v, mask=arr, implementation=("pallas_tpu", "xla"))
  testing.assert_close(out, _attn(q, k, v, "reference")[0], name="fallback")


@pytest.mark.parametrize("bad, msg", [
    (jnp.ones((T, S), jnp.float32), r"must be boolean .*float32"),
    (jnp.ones((T + 1, S), bool), r"shape \(21, 28\) does not broadcast"),
    (jnp.ones((3, H, T, S), bool), r"shape \(3, 4, 20, 28\) does not broadcast"),
    (jnp.ones((1, 1, 1, T, S), bool), r"rank 2-4.*\(1, 1, 1, 20, 28\)"),
    (jnp.ones((S,), bool), r"rank 2-4"),
    ("causal", r"mask must be a jaxattn.masks.Mask"),
    ([masks.Causal()] * 3, r"3 per-head masks, but q has 4 heads"),
])
def test_validation_names_the_problem(bad, msg):
  q, k, v = _qkv(0)
  with pytest.raises(ValueError, match=msg):
    jaxattn.softmax_attention(q, k, v, mask=bad)


# ---------------------------------------------------------------------------------------------- per-head masks
PER_HEAD = (masks.Causal(), masks.Local(3, 1), masks.Full(), masks.causal_document([9, 11]) & masks.Causal(4))


@pytest.mark.parametrize("form, tiles", [("sequence", BlockSizes(8, 8)), ("PerHead", BlockSizes(16, 32)),
                                         ("PerHead", BlockSizes(8, 16, 16, 8, 8, 16))], ids=str)
def test_per_head_masks_equal_loop_over_heads(form, tiles):
  q, k, v = _qkv(6)
  mask = list(PER_HEAD) if form == "sequence" else masks.PerHead(PER_HEAD)
  R = H // G

  def per_head(q, k, v, impl):
    outs, lses = [], []
    for h in range(H):
      o, l = jaxattn.softmax_attention(q[:, :, h:h + 1], k[:, :, h // R:h // R + 1], v[:, :, h // R:h // R + 1],
                                       mask=PER_HEAD[h], implementation=impl, return_lse=True)
      outs.append(o)
      lses.append(l)
    return jnp.concatenate(outs, 2), jnp.concatenate(lses, 1)

  ref_out, ref_lse = per_head(q, k, v, "reference")
  for impl, extra in (("xla", dict(block_sizes=tiles)), ("reference", {})):
    out, lse = jaxattn.softmax_attention(q, k, v, mask=mask, implementation=impl, return_lse=True, **extra)
    testing.assert_close(out, ref_out, name=f"{impl} out")
    testing.assert_close(lse, ref_lse, name=f"{impl} lse")
    w = jax.random.normal(jax.random.key(1), out.shape)
    g = jax.grad(lambda q, k, v: jnp.sum(jaxattn.softmax_attention(q, k, v, mask=mask, implementation=impl,
                                                                   **extra) * w), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda q, k, v: jnp.sum(per_head(q, k, v, "reference")[0] * w), argnums=(0, 1, 2))(q, k, v)
    for a, b, name in zip(g, g_ref, "qkv"):
      testing.assert_close(a, b, kind="grad", name=f"{impl} d{name}")


def test_per_head_masks_refused_by_kernels_and_equal_masks_collapse():
  q, k, v = _qkv(7)
  with pytest.raises(NotImplementedError, match="per-head masks"):
    jaxattn.softmax_attention(q, k, v, mask=masks.PerHead(PER_HEAD), implementation="pallas_tpu")
  with warnings.catch_warnings():
    warnings.simplefilter("error", FallbackWarning)  # equal masks collapse to one static mask: no fallback
    out = jaxattn.softmax_attention(q, k, v, mask=[masks.Causal()] * H, implementation=("pallas_tpu", "xla"))
  testing.assert_close(out, _attn(q, k, v, "reference", mask=masks.Causal())[0], name="collapsed")


def test_per_head_mask_object():
  ph = masks.PerHead([masks.Causal(), masks.Full()])
  assert ph.masks == (masks.Causal(), masks.Full()) and hash(ph) == hash(masks.PerHead(ph.masks))
  dense = ph.to_dense_heads(4, 5)
  assert dense.shape == (2, 4, 5) and (dense[0] == masks.Causal().to_dense(4, 5)).all() and dense[1].all()
  assert (ph.union().to_dense(4, 5) == dense.any(0)).all()
  both = ph & masks.Local(1)
  assert isinstance(both, masks.PerHead) and (both.to_dense_heads(4, 5)[1] == masks.Local(1).to_dense(4, 5)).all()
  with pytest.raises(TypeError, match="one mask per head"):
    ph.to_dense(4, 5)
  with pytest.raises(ValueError, match="non-empty"):
    masks.PerHead(())
  with pytest.raises(ValueError, match="mask 1"):
    masks.PerHead((masks.Causal(), "x"))
