"""Attention dropout in ``softmax_attention`` (reference and xla; the kernels refuse it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import masks, testing
from jaxattn.backend import FallbackWarning
from jaxattn.ops.softmax import dropout
from jaxattn.ops.softmax.config import BlockSizes

B, T, S, H, G, D = 2, 24, 36, 4, 2, 16


def _qkv(seed=0):
  return testing.random_qkv(jax.random.key(seed), B=B, T=T, S=S, H=H, G=G, D=D)


def _attn(q, k, v, impl, tiles=BlockSizes(8, 16), **kw):
  extra = {"block_sizes": tiles} if impl == "xla" else {}
  return jaxattn.softmax_attention(q, k, v, implementation=impl, return_lse=True, **kw, **extra)


def _keep_dense(key, rate):
  """The keep mask [B, H, T, S] straight from the definition in jaxattn.ops.softmax.dropout."""
  seed = dropout.dropout_seed(key)
  u = lambda n, shape: jnp.arange(n, dtype=jnp.uint32).reshape(shape)
  keys = dropout.head_keys(seed, u(B, (B, 1, 1, 1)), u(H, (1, H, 1, 1)))
  return dropout.keep_mask(keys, rate, u(T, (1, 1, T, 1)), u(S, (1, 1, 1, S)))


def _manual(q, k, v, keep, rate, mask=None):
  """Dense attention with explicit dropout of the normalised probabilities."""
  R = H // G
  kk, vv = jnp.repeat(k, R, axis=2), jnp.repeat(v, R, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q, kk, precision="highest") * D ** -0.5
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  p = jax.nn.softmax(s, -1)
  if mask is not None:
    p = jnp.where(jnp.asarray(mask).any(-1, keepdims=True), p, 0.0)
  p = jnp.where(keep, p / (1 - rate), 0.0)
  return jnp.einsum("bhts,bshe->bthe", p, vv, precision="highest")


def test_rate_zero_equals_no_dropout():
  q, k, v = _qkv(1)
  for impl in ("xla", "reference"):
    a = _attn(q, k, v, impl, dropout_rate=0.0, dropout_rng=jax.random.key(3))
    b = _attn(q, k, v, impl)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))


@pytest.mark.parametrize("rate, mask, all_tiles", [(0.5, None, True), (0.1, masks.Causal(offset=S - T), False),
                                                   (0.3, "array", False)], ids=str)
def test_xla_equals_reference_and_definition(rate, mask, all_tiles):
  q, k, v = _qkv(2)
  key = jax.random.key(7)
  if mask == "array":
    mask = jax.random.bernoulli(jax.random.key(4), 0.6, (B, 1, T, S)).at[:, :, 2].set(False)
  kw = dict(mask=mask, dropout_rate=rate, dropout_rng=key)
  ref_out, ref_lse = _attn(q, k, v, "reference", **kw)
  no_drop_out, no_drop_lse = _attn(q, k, v, "reference", mask=mask)
  dense_mask = None if mask is None else (mask.to_dense(T, S) if isinstance(mask, masks.Mask) else mask)
  testing.assert_close(ref_out, _manual(q, k, v, _keep_dense(key, rate), rate, dense_mask), name="definition")
  testing.assert_close(ref_lse, no_drop_lse, name="lse unchanged by dropout")
  assert float(jnp.abs(ref_out - no_drop_out).max()) > 1e-2  # dropout does something
  tile_sets = (BlockSizes(8, 16), BlockSizes(16, 8, 8, 8, 24, 16))  # different fwd / dq / dkv tiles
  for tiles in tile_sets if all_tiles else tile_sets[1:]:
    out, lse = _attn(q, k, v, "xla", tiles=tiles, **kw)
    testing.assert_close(out, ref_out, name=f"xla out {tiles}")
    testing.assert_close(lse, ref_lse, name="xla lse")
    w = jax.random.normal(jax.random.key(11), out.shape)

    def loss(impl, q, k, v, bias):
      o, l = _attn(q, k, v, impl, tiles=tiles, bias=bias, **kw)
      return jnp.sum(o * w) + 0.2 * jnp.sum(jnp.where(jnp.isfinite(l), l, 0.0))

    bias = jax.random.normal(jax.random.key(12), (1, H, T, S))
    gx = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2, 3))(q, k, v, bias)
    gr = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2, 3))(q, k, v, bias)
    for a, b, name in zip(gx, gr, "qkvb"):
      testing.assert_no_nan(a, name)
      testing.assert_close(a, b, kind="grad", name=f"d{name}")


def test_backward_matches_vjp_of_the_definition_with_the_same_key():
  q, k, v = _qkv(3)
  key, rate = jax.random.key(21), 0.3
  keep = _keep_dense(key, rate)
  f_x = lambda q, k, v: jaxattn.softmax_attention(q, k, v, dropout_rate=rate, dropout_rng=key,
                                                  implementation="xla", block_sizes=BlockSizes(8, 8))
  f_d = lambda q, k, v: _manual(q, k, v, keep, rate)
  out, vjp_x = jax.vjp(f_x, q, k, v)
  out_d, vjp_d = jax.vjp(f_d, q, k, v)
  testing.assert_close(out, out_d, name="out")
  ct = jax.random.normal(jax.random.key(5), out.shape)
  for a, b, name in zip(vjp_x(ct), vjp_d(ct), "qkv"):
    testing.assert_close(a, b, kind="grad", name=f"d{name}")


def test_same_key_same_bits_other_key_other_bits_and_jit():
  q, k, v = _qkv(4)
  f = jax.jit(lambda q, k, v, key: jaxattn.softmax_attention(q, k, v, dropout_rate=0.4, dropout_rng=key,
                                                              implementation="xla"))
  a, b = f(q, k, v, jax.random.key(1)), f(q, k, v, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = f(q, k, v, jax.random.key(2))
  assert float(jnp.abs(a - c).max()) > 1e-2
  # raw uint32 PRNGKey works too and equals the typed key with the same data
  d = f(q, k, v, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(d))


def test_mean_preserving_and_rate_statistics():
  rate = 0.3
  keep = np.asarray(_keep_dense(jax.random.key(0), rate))
  assert abs(keep.mean() - (1 - rate)) < 0.02
  # independent across batch and heads (not broadcast)
  assert (keep[0] != keep[1]).mean() > 0.3 and (keep[:, 0] != keep[:, 1]).mean() > 0.3
  # averaging over many keys recovers the dropout-free output (kept ones are scaled by 1 / (1 - rate))
  q, k, v = testing.random_qkv(jax.random.key(9), B=1, T=8, S=8, H=1, G=1, D=8)
  f = jax.jit(jax.vmap(lambda key: jaxattn.softmax_attention(q, k, v, dropout_rate=rate, dropout_rng=key,
                                                             implementation="xla")))
  outs = f(jax.random.split(jax.random.key(3), 256))
  clean = jaxattn.softmax_attention(q, k, v, implementation="xla")
  err = float(jnp.abs(outs.mean(0) - clean).max())
  spread = float(outs.std(0).max())
  assert err < 4 * spread / np.sqrt(256) + 1e-3, (err, spread)
  assert spread > 1e-2


def test_fully_masked_rows_stay_zero_with_dropout():
  q, k, v = _qkv(5)
  m = np.ones((T, S), bool)
  m[4] = False
  for impl in ("xla", "reference"):
    out, lse = _attn(q, k, v, impl, mask=jnp.asarray(m), dropout_rate=0.5, dropout_rng=jax.random.key(0))
    assert np.all(np.asarray(out)[:, 4] == 0) and np.all(np.isneginf(np.asarray(lse)[:, :, 4]))
    g = jax.grad(lambda q: _attn(q, k, v, impl, mask=jnp.asarray(m), dropout_rate=0.5,
                                 dropout_rng=jax.random.key(0))[0].sum())(q)
    testing.assert_no_nan(g, "dq")
    assert np.all(np.asarray(g)[:, 4] == 0)


def test_kernels_refuse_and_validation():
  q, k, v = _qkv(6)
  kw = dict(dropout_rate=0.1, dropout_rng=jax.random.key(0))
  for impl in ("pallas_gpu", "pallas_tpu", "cudnn"):
    with pytest.raises(NotImplementedError, match="dropout"):
      jaxattn.softmax_attention(q, k, v, implementation=impl, **kw)
  with pytest.warns(FallbackWarning, match="dropout"):
    jaxattn.softmax_attention(q, k, v, implementation=("pallas_tpu", "xla"), **kw)
  with pytest.raises(ValueError, match="needs dropout_rng"):
    jaxattn.softmax_attention(q, k, v, dropout_rate=0.1)
  for bad in (1.0, -0.1, "0.1", True):
    with pytest.raises(ValueError, match="dropout_rate"):
      jaxattn.softmax_attention(q, k, v, dropout_rate=bad, dropout_rng=jax.random.key(0))
  with pytest.raises(ValueError, match="dropout_rng must be a jax PRNG key"):
    jaxattn.softmax_attention(q, k, v, dropout_rate=0.1, dropout_rng=jnp.ones((3,), jnp.float32))
