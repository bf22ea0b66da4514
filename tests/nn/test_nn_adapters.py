"""``as_attention_fn`` inside flax's own attention layers, compared with flax's default attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from jaxattn import masks, testing
from jaxattn.nn import as_attention_fn

B, T, F = 2, 8, 16


def _x(seed=1, shape=(B, T, F)):
  # numpy, not jax.random: every new jax.random shape costs a compile, which dominates CPU test time
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _qkv(seed, *, B, T, S=None, H, G=None, D):
  S, G = S or T, G or H
  return _x(seed, (B, T, H, D)), _x(seed + 1, (B, S, G, D)), _x(seed + 2, (B, S, G, D))


def _bernoulli(seed, p, shape):
  return jnp.asarray(np.random.default_rng(seed).random(shape) < p)


@functools.partial(nnx.jit, static_argnames=("is_causal", "decode"))
def apply(layer, x, mask=None, *, is_causal=False, decode=None):
  return layer(x, mask=mask, is_causal=is_causal, decode=decode)


def _pair(attention_fn, **kwargs):
  """Two flax layers with identical parameters: flax's default attention and ``attention_fn``."""
  ref = nnx.MultiHeadAttention(4, F, decode=False, rngs=nnx.Rngs(0), **kwargs)
  ours = nnx.MultiHeadAttention(4, F, decode=False, attention_fn=attention_fn, rngs=nnx.Rngs(0), **kwargs)
  return ref, ours


def test_nnx_layer_matches_flax_default():
  num_kv_heads = 2  # GQA; flax's default attention handles it too
  ref, ours = _pair(as_attention_fn(), num_kv_heads=num_kv_heads)
  x = _x()
  causal = nnx.make_causal_mask(x[..., 0])  # dense [B, 1, T, T]
  testing.assert_close(apply(ours, x), apply(ref, x), name="no mask")
  testing.assert_close(apply(ours, x, causal), apply(ref, x, causal), name="dense causal mask")
  testing.assert_close(apply(ours, x, is_causal=True), apply(ref, x, causal), name="is_causal")
  # a static causal mask in the adapter gives the same result without any dense mask
  _, static = _pair(as_attention_fn(mask=masks.Causal()), num_kv_heads=num_kv_heads)
  testing.assert_close(apply(static, x), apply(ref, x, causal), name="static causal")


def test_padding_mask_and_fully_masked_rows():
  """Dense masks are routed exactly; a query with no allowed key gets 0 (flax's default gives the value mean)."""
  fn = as_attention_fn()
  q, k, v = _qkv(0, B=B, T=T, S=6, H=4, G=2, D=8)
  valid = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)  # key padding [B, S]
  mask = valid[:, None, None, :] & (jnp.arange(T) < 6)[None, None, :, None]  # queries 6, 7 see nothing
  out = jax.jit(fn)(q, k, v, mask=mask)
  ref = nnx.dot_product_attention(q, k, v, mask=mask)
  testing.assert_close(out[:, :6], ref[:, :6], name="valid rows")
  np.testing.assert_array_equal(np.asarray(out[:, 6:]), 0.0)
  # per-head masks [B, H, T, S] and a bias on top
  mask_h = _bernoulli(3, 0.7, (B, 4, T, 6)) | (jnp.arange(6) == 0)
  bias = _x(4, (1, 4, T, 6))
  testing.assert_close(jax.jit(fn)(q, k, v, bias=bias, mask=mask_h),
                       nnx.dot_product_attention(q, k, v, bias=bias, mask=mask_h), name="per-head mask + bias")


def test_batch_dims_other_than_one():
  fn = jax.jit(as_attention_fn())
  q, k, v = _qkv(0, B=6, T=5, S=7, H=2, D=8)
  q3, k3, v3 = q[0], k[0], v[0]  # no batch dim: [T, H, D]
  testing.assert_close(fn(q3, k3, v3), nnx.dot_product_attention(q3, k3, v3), name="rank 3")
  q5, k5, v5 = (a.reshape(2, 3, *a.shape[1:]) for a in (q, k, v))  # two batch dims
  mask = _bernoulli(1, 0.8, (3, 1, 5, 7)) | (jnp.arange(7) == 0)
  ref = nnx.dot_product_attention(q5, k5, v5, mask=jnp.broadcast_to(mask, (2, 3, 1, 5, 7)))
  testing.assert_close(fn(q5, k5, v5, mask=mask), ref, name="rank 5")


def test_flax_decode_with_adapter_matches_full_causal_pass():
  """flax's own KV cache passes a dense ``[B, 1, 1, L]`` mask each step; the adapter must honour it exactly."""
  ref, ours = _pair(as_attention_fn(), num_kv_heads=2)
  x = _x()
  causal = nnx.make_causal_mask(x[..., 0])

  def init():
    ours.init_cache((B, T, F))
    return ours

  def step(layer, x_t):
    return layer, apply(layer, x_t, decode=True)

  testing.check_decode_matches_full(lambda x: apply(ref, x, causal), init, step, x)


def test_linen_layer_matches_flax_default():
  ref = linen.MultiHeadDotProductAttention(num_heads=4, qkv_features=F)
  ours = linen.MultiHeadDotProductAttention(num_heads=4, qkv_features=F, attention_fn=as_attention_fn())
  x = _x()
  variables = ref.init(jax.random.key(0), x)
  causal = linen.make_causal_mask(x[..., 0])
  run = jax.jit(lambda layer, v, x, m: layer.apply(v, x, mask=m), static_argnums=0)
  testing.assert_close(run(ours, variables, x, causal), run(ref, variables, x, causal), name="linen")


def test_soft_cap_and_scale_are_applied():
  q, k, v = _qkv(0, B=1, T=T, H=2, D=8)
  out = jax.jit(as_attention_fn(logits_soft_cap=1.5, scale=0.7, mask=masks.Causal()))(q, k, v)
  from jaxattn import softmax_attention
  ref = softmax_attention(q, k, v, mask=masks.Causal(), logits_soft_cap=1.5, scale=0.7, implementation="reference")
  testing.assert_close(out, ref, name="soft cap")


def test_unsupported_options_raise():
  fn = as_attention_fn()
  q, k, v = _qkv(0, B=1, T=4, H=2, D=8)
  # training-mode dropout is supported now (tests/nn/test_dropout_module.py); without a key it raises
  with pytest.raises(ValueError, match="dropout_rng"):
    fn(q, k, v, dropout_rate=0.1, deterministic=False)
  # inference mode with a dropout rate is fine
  testing.assert_close(jax.jit(functools.partial(fn, dropout_rate=0.1, deterministic=True))(q, k, v),
                       nnx.dot_product_attention(q, k, v), name="deterministic")
  layer = nnx.MultiHeadAttention(2, 16, dropout_rate=0.1, attention_fn=fn, decode=False, rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match="sow"):
    fn(q, k, v, module=layer)
  with pytest.raises(ValueError, match=r"mask shape \(3, 4\) does not broadcast"):
    fn(q, k, v, mask=jnp.ones((3, 4), bool))


@pytest.mark.parametrize("kwargs,match", [
    (dict(mask=np.ones((4, 4), bool)), "mask must be a jaxattn.masks.Mask"),
    (dict(logits_soft_cap=0.0), "logits_soft_cap must be a positive float"),
    (dict(scale=float("nan")), "scale must be a finite float"),
])
def test_bad_adapter_args(kwargs, match):
  with pytest.raises(ValueError, match=match):
    as_attention_fn(**kwargs)


def test_adapter_is_hashable_static_config():
  a = as_attention_fn(mask=masks.Causal(), implementation=["xla", "reference"])
  assert a == as_attention_fn(mask=masks.Causal(), implementation=("xla", "reference"))
  assert hash(a) == hash(as_attention_fn(mask=masks.Causal(), implementation=("xla", "reference")))
