"""Attention dropout in the NNX module and the flax adapter (``dropout_rate``, ``deterministic``, rngs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import masks, testing
from jaxattn.nn import MultiHeadAttention, as_attention_fn
from jaxattn.ops.softmax.api import softmax_attention


def _layer(rate=0.5, **kw):
  return MultiHeadAttention(2, 16, mask=masks.Causal(), dropout_rate=rate, implementation="xla",
                            rngs=nnx.Rngs(0, dropout=7), **kw)


def test_module_dropout_train_eval_and_rngs():
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  clean = _layer(0.0)(x)
  layer = _layer(0.5)
  with pytest.raises(ValueError, match="deterministic"):
    layer(x)
  np.testing.assert_array_equal(np.asarray(layer(x, deterministic=True)), np.asarray(clean))
  a = layer(x, deterministic=False)
  b = layer(x, deterministic=False)  # the stored stream advances: new bits
  assert float(jnp.abs(a - clean).max()) > 1e-3 and float(jnp.abs(a - b).max()) > 1e-3
  # explicit rngs give reproducible bits
  c = layer(x, deterministic=False, rngs=nnx.Rngs(dropout=3))
  d = layer(x, deterministic=False, rngs=nnx.Rngs(dropout=3))
  np.testing.assert_array_equal(np.asarray(c), np.asarray(d))
  # train() / eval() toggle the attribute like flax's Dropout
  layer.eval()
  np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(clean))
  layer.train()
  assert float(jnp.abs(layer(x) - clean).max()) > 1e-3
  # keep_rngs=False: a training call needs rngs
  bare = _layer(0.5, keep_rngs=False, deterministic=False)
  with pytest.raises(ValueError, match="rngs"):
    bare(x)
  bare(x, rngs=nnx.Rngs(dropout=1))
  with pytest.raises(ValueError, match="dropout_rate"):
    _layer(1.0)


def test_module_dropout_equals_functional_with_the_same_key():
  x = jax.random.normal(jax.random.key(1), (2, 8, 16))
  layer = _layer(0.3, deterministic=False)
  key = nnx.Rngs(dropout=5).dropout()
  out = layer(x, rngs=nnx.Rngs(dropout=5))
  q, k, v = layer.query(x), layer.key(x), layer.value(x)
  ref = layer.out(softmax_attention(q, k, v, mask=masks.Causal(), dropout_rate=0.3, dropout_rng=key,
                                    implementation="reference"))
  testing.assert_close(out, ref, name="module vs reference")


def test_module_dropout_gradients_under_jit():
  x = jax.random.normal(jax.random.key(2), (2, 8, 16))
  layer = _layer(0.2, deterministic=False)

  @nnx.jit
  def grad_fn(layer, x):
    return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)

  g = grad_fn(layer, x)
  leaves = jax.tree.leaves(nnx.state(g, nnx.Param))
  assert leaves and all(bool(jnp.isfinite(l).all()) for l in leaves)
  assert any(float(jnp.abs(l).max()) > 0 for l in leaves)


def test_adapter_dropout_in_flax_layer():
  x = jax.random.normal(jax.random.key(3), (2, 8, 16))
  fn = as_attention_fn(implementation="xla")
  layer = nnx.MultiHeadAttention(2, 16, dropout_rate=0.4, attention_fn=fn, decode=False, rngs=nnx.Rngs(0))
  det = layer(x, deterministic=True)
  out = layer(x, deterministic=False)
  assert out.shape == det.shape and float(jnp.abs(out - det).max()) > 1e-3
  # the adapter equals softmax_attention with the key flax hands it
  q, k, v = testing.random_qkv(jax.random.key(4), B=2, T=8, S=8, H=2, G=2, D=8)
  key = jax.random.key(9)
  got = fn(q, k, v, dropout_rate=0.4, dropout_rng=key, deterministic=False)
  ref = softmax_attention(q, k, v, dropout_rate=0.4, dropout_rng=key, implementation="reference")
  testing.assert_close(got, ref, name="adapter dropout")
  # a dense mask with a soft cap works now (routed as a boolean mask array)
  m = jax.random.bernoulli(jax.random.key(5), 0.7, (2, 1, 8, 8))
  got = as_attention_fn(logits_soft_cap=2.0, implementation="xla")(q, k, v, mask=m)
  ref = softmax_attention(q, k, v, mask=m, logits_soft_cap=2.0, implementation="reference")
  testing.assert_close(got, ref, name="adapter mask + soft cap")
