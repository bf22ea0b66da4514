"""NNX LinearAttention: every feature map against a dense hand-written form, and CAB conformance for the patterns
each one declares (causal prefix, causal cross prefix, incremental decode == full)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import testing
from jaxattn.nn import LinearAttention
from jaxattn.nn.linear import PATTERNS, SUPPORTED_PATTERNS

B, T, S, F, H = 2, 8, 11, 16, 2
MAPS = ("elu", "relu", "cosformer", "performer")


def _x(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@functools.partial(nnx.jit, static_argnames=("decode",))
def _apply(m, x, context=None, *, decode=False):
  return m(x, context, decode=decode)


def _phi_dense(m, x, pos, length, is_key):
  """Feature maps written out again (no stabiliser for Performer: it cancels in the ratio)."""
  if m.feature_map == "elu":
    return jax.nn.elu(x) + 1
  if m.feature_map == "relu":
    return jax.nn.relu(x)
  if m.feature_map == "cosformer":
    a = math.pi / 2 * pos / length
    return jnp.concatenate([jax.nn.relu(x) * jnp.cos(a)[:, None, None], jax.nn.relu(x) * jnp.sin(a)[:, None, None]], -1)
  w = m.random_features[...]
  xs = x * m.head_dim ** -0.25
  return jnp.exp(jnp.einsum("blhd,md->blhm", xs, w, precision="highest") - 0.5 * jnp.sum(xs * xs, -1, keepdims=True))


def _dense(m, x, context=None):
  """``o_i = sum_j A_ij v_j / max(sum_j A_ij, eps)`` with ``A_ij = phi(q_i) . phi(k_j)`` materialised."""
  src = x if context is None else context
  q, k, v = m.query(x), m.key(src), m.value(src)
  Tq, Tk = x.shape[1], src.shape[1]
  R = m.num_heads // m.num_kv_heads
  length = float(max(Tq, Tk))
  fq = _phi_dense(m, q, jnp.arange(Tq), length, False)
  fk = jnp.repeat(_phi_dense(m, k, jnp.arange(Tk), length, True), R, axis=2)
  a = jnp.einsum("bthd,bshd->bhts", fq, fk, precision="highest")
  if m.causal and context is None:
    a = jnp.where(jnp.tril(jnp.ones((Tq, Tk), bool)), a, 0.0)
  num = jnp.einsum("bhts,bshe->bthe", a, jnp.repeat(v, R, axis=2), precision="highest")
  den = jnp.sum(a, -1).transpose(0, 2, 1)[..., None]
  return m.out(num / jnp.maximum(den, m.eps))


def _module(feature_map, causal, seed=0, **kw):
  return LinearAttention(H, F, feature_map=feature_map, causal=causal, chunk_size=4, rngs=nnx.Rngs(seed), **kw)


@pytest.mark.parametrize("feature_map", MAPS)
def test_noncausal_matches_dense_and_cab_patterns(feature_map):
  assert set(SUPPORTED_PATTERNS[feature_map]) <= set(PATTERNS)
  m = _module(feature_map, causal=False, num_kv_heads=1)
  assert {"NS", "NC"} <= m.supported_patterns
  x, ctx = _x(1, (B, T, F)), _x(2, (B, S, F))
  testing.assert_close(_apply(m, x), _dense(m, x), name=f"{feature_map} NS")
  testing.assert_close(_apply(m, x, ctx), _dense(m, x, ctx), name=f"{feature_map} NC")


@pytest.mark.parametrize("feature_map", MAPS)
def test_causal_patterns(feature_map):
  """CS: matches the dense causal form, prefix invariance, decode == full. CC: cross prefix invariance."""
  patterns = SUPPORTED_PATTERNS[feature_map]
  if "CS" not in patterns and "CC" not in patterns:
    with pytest.raises(ValueError, match="causal=True is not available"):
      _module(feature_map, causal=True)
    m = _module(feature_map, causal=False)
    assert "CS" not in m.supported_patterns
    return
  m = _module(feature_map, causal=True, seed=3, num_kv_heads=1)
  x, ctx = _x(4, (B, T, F)), _x(5, (B, S, F))
  attn = lambda q, k, v: _apply(m, q)
  if "CS" in patterns:
    testing.assert_close(_apply(m, x), _dense(m, x), name=f"{feature_map} CS")
    testing.check_causal_prefix(attn, x, x, x)

    def init_fn():
      m.init_cache(B)
      return None

    def step_fn(cache, x_t):
      return cache, _apply(m, x_t, decode=True)

    testing.check_decode_matches_full(lambda x: _apply(m, x), init_fn, step_fn, x)
    # prefill then decode
    m.init_cache(B)
    y = jnp.concatenate([_apply(m, x[:, :5], decode=True), _apply(m, x[:, 5:6], decode=True),
                         _apply(m, x[:, 6:], decode=True)], axis=1)
    testing.assert_close(y, _apply(m, x), name="prefill + decode")
  if "CC" in patterns:
    testing.check_causal_cross_prefix(lambda q, k, v: _apply(m, q, k), x, ctx, ctx)


def test_undeclared_patterns_raise():
  m = _module("cosformer", causal=False)
  with pytest.raises(ValueError, match="decoding needs causal self-attention"):
    m.init_cache(B)
  m2 = _module("elu", causal=True)
  m2.init_cache(B)
  with pytest.raises(ValueError, match="decode=True is for causal self-attention"):
    m2(_x(6, (B, 1, F)), _x(7, (B, S, F)), decode=True)
  with pytest.raises(ValueError, match="feature_map must be one of"):
    _module("softmax", causal=False)
  with pytest.raises(ValueError, match=r"x must have shape \[B, T, 16\]"):
    m2(_x(8, (B, T, F + 1)))
  with pytest.raises(ValueError, match="call init_cache"):
    _module("relu", causal=True)(_x(9, (B, 1, F)), decode=True)


def test_performer_features_are_orthogonal_per_block():
  m = _module("performer", causal=False, num_random_features=16)  # D = 8: two blocks of 8
  w = np.asarray(m.random_features[...], np.float64)
  assert w.shape == (16, 8)
  for blk in (w[:8], w[8:]):
    gram = blk @ blk.T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-4)
  # random features are not trainable parameters
  assert not any("random_features" in str(p) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param)))


def test_performer_no_overflow_with_large_inputs():
  m = _module("performer", causal=True)
  y = _apply(m, 30.0 * _x(10, (B, T, F)))
  testing.assert_no_nan(y)
  assert np.isfinite(np.asarray(y)).all()
