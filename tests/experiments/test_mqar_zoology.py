"""Zoology mixers and scaffold: each mixer against a direct (dense / loop) form, causality of every mixer in both
modes, the selection hybrid's sparse evaluation path, initialisation and errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.mqar.zoology import (MIXERS, BaseConv, ImplicitFilter, LongConv, SigmoidSelectiveAttention,
                                      ShortConv, TaylorLinearAttention, ZooLM, fft_causal_conv, make_mixer,
                                      taylor_features)

B, T, D = 2, 12, 16


def _x(seed, shape=(B, T, D)):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_fft_causal_conv_matches_direct_sum():
  u = _x(0)
  h = _x(1, (T, D))
  y = fft_causal_conv(u, h)
  ref = np.zeros((B, T, D))
  un, hn = np.asarray(u, np.float64), np.asarray(h, np.float64)
  for t in range(T):
    for s in range(t + 1):
      ref[:, t] += hn[t - s] * un[:, s]
  np.testing.assert_allclose(np.asarray(y), ref, atol=2e-5)


def test_short_conv_matches_formula():
  conv = ShortConv(D, 3, rngs=nnx.Rngs(0))
  u = _x(2)
  w, b = np.asarray(conv.weight[...]), np.asarray(conv.bias[...])
  un = np.pad(np.asarray(u), ((0, 0), (2, 0), (0, 0)))
  ref = b + sum(w[i] * un[:, i:i + T] for i in range(3))
  np.testing.assert_allclose(np.asarray(conv(u)), ref, atol=1e-6)


def test_base_conv_short_and_long():
  u = _x(3)
  short = BaseConv(D, 3, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(short(u)),
                             np.asarray(short.conv(u) * short.projection(u) + u), atol=1e-6)
  long = BaseConv(D, -1, seq_len=T, rngs=nnx.Rngs(0))
  assert isinstance(long.conv, LongConv)
  h = long.conv.filter()  # [T, D]
  assert h.shape == (T, D)
  inner = fft_causal_conv(u, h) + u
  np.testing.assert_allclose(np.asarray(long(u)), np.asarray(inner * long.projection(u) + u), atol=1e-5)


def test_implicit_filter_positional_features():
  f = ImplicitFilter(4, 8, emb_dim=5, rngs=nnx.Rngs(0))
  z, t = f.positional_features()
  assert z.shape == (8, 5) and t.shape == (8, 1)
  np.testing.assert_allclose(t[:, 0], np.linspace(0, 1, 8), atol=1e-7)
  # bands = 2, frequencies linspace(1e-4, 1, 2)
  w = 2 * np.pi * np.arange(8) / 8
  np.testing.assert_allclose(z[:, 2], np.cos(1.0 * w), atol=1e-6)
  np.testing.assert_allclose(z[:, 4], -np.sin(1.0 * w), atol=1e-6)
  with pytest.raises(ValueError, match="odd"):
    ImplicitFilter(4, 8, emb_dim=4, rngs=nnx.Rngs(0))


def test_taylor_features_kernel_identity():
  x, y = _x(4, (5, 8)), _x(5, (5, 8))
  dots = jnp.sum(taylor_features(x) * taylor_features(y), -1)
  qk = jnp.sum(x * y, -1)
  np.testing.assert_allclose(np.asarray(dots), np.asarray(1 + qk / math.sqrt(8) + qk ** 2 / 16), rtol=1e-5)


def test_taylor_linear_attention_matches_quadratic_form():
  m = TaylorLinearAttention(D, feature_dim=4, num_heads=2, rngs=nnx.Rngs(0))
  x = _x(6)
  q = taylor_features(m.proj_q(x).reshape(B, T, 2, 4))
  k = taylor_features(m.proj_k(x).reshape(B, T, 2, 4))
  v = m.proj_v(x).reshape(B, T, 2, D // 2)
  a = jnp.einsum("bthf,bshf->bhts", q, k) * jnp.tril(jnp.ones((T, T)))
  o = jnp.einsum("bhts,bshe->bthe", a, v) / (jnp.sum(a, -1).transpose(0, 2, 1)[..., None] + m.eps)
  np.testing.assert_allclose(np.asarray(m(x)), np.asarray(m.proj_o(o.reshape(B, T, D))), atol=2e-5)


def _dense_selective(m: SigmoidSelectiveAttention, x, keep):
  """``x + keep * s * Attn(x)`` with the attention written out densely (``keep [B, T]`` in {0, 1})."""
  q, k, v = jnp.split(m.qkv(x), 3, -1)
  s = jax.nn.sigmoid(m.selecting(x)[..., 0])
  logits = jnp.einsum("btd,bsd->bts", q, k) / math.sqrt(D)
  logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf)
  attn = m.out_proj(jnp.einsum("bts,bsd->btd", jax.nn.softmax(logits, -1), v))
  return x + (keep * s)[..., None] * attn, s


def test_selective_attention_train_dense_and_aux():
  m = SigmoidSelectiveAttention(D, selection_penalty=0.5, rngs=nnx.Rngs(0))
  x = _x(7)
  y, aux = m.call_with_aux(x, train=True)
  ref, s = _dense_selective(m, x, jnp.ones((B, T)))
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5)
  np.testing.assert_allclose(float(aux), 0.5 * max(float(jnp.mean(s)) - math.sqrt(T) / T, 0.0), atol=1e-6)


def test_selective_attention_eval_is_top_k_sparse():
  m = SigmoidSelectiveAttention(D, rngs=nnx.Rngs(1))
  x = _x(8)
  k = m.num_selected(T)
  assert k == math.ceil(math.sqrt(T))
  y, aux = m.call_with_aux(x, train=False)
  s = jax.nn.sigmoid(m.selecting(x)[..., 0])
  top = jnp.argsort(-s, axis=-1)[:, :k]
  keep = jnp.zeros((B, T)).at[jnp.arange(B)[:, None], top].set(1.0)
  ref, _ = _dense_selective(m, x, keep)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5)
  assert float(aux) == 0.0
  untouched = np.asarray(keep) == 0
  np.testing.assert_array_equal(np.asarray(y)[untouched], np.asarray(x)[untouched])


@pytest.mark.parametrize("mixer, train", [(m, False) for m in MIXERS] + [("hybrid", True)])  # only hybrid differs
def test_mixers_are_causal(mixer, train):
  m = make_mixer(mixer, D, T, layer_idx=1, num_layers=2, window=4, n_lookups=T if mixer == "hybrid" else None,
                 rngs=nnx.Rngs(0))
  x = _x(9)
  x2 = x.at[:, 7:].set(_x(10)[:, 7:])
  y1, y2 = m(x, train=train), m(x2, train=train)
  np.testing.assert_allclose(np.asarray(y1[:, :7]), np.asarray(y2[:, :7]), atol=1e-5)
  assert not np.allclose(np.asarray(y1[:, 7:]), np.asarray(y2[:, 7:]))


@pytest.mark.parametrize("mixer", MIXERS)
def test_zoo_lm_shapes_state_and_init(mixer):
  lm = ZooLM(40, 16, 8, mixer, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 8)), jnp.int32)
  logits = lm(tokens)
  assert logits.shape == (2, 8, 40) and bool(jnp.all(jnp.isfinite(logits)))
  h, aux = lm.hidden(tokens, train=True)
  assert h.shape == (2, 8, 16) and aux.shape == ()
  assert lm.state_size() > 0
  assert (lm.positions is not None) == (mixer in ("attention", "sliding_window"))
  emb = np.asarray(lm.embed.embedding[...])
  assert 0.015 < emb.std() < 0.025  # N(0, 0.02)


def test_rotary_attention_replaces_learned_positions_and_stays_causal():
  """``use_rope``: no learned position table, rotary embeddings really applied (same weights, different output than
  without them, and the same output as the MultiHeadAttention it wraps with use_rope), still causal."""
  lm = ZooLM(40, 16, 8, "attention", use_rope=True, rngs=nnx.Rngs(0))
  assert lm.positions is None and all(m.attn.use_rope for m in lm.mixers)
  assert ZooLM(40, 16, 8, "baseconv", use_rope=True, rngs=nnx.Rngs(0)).positions is None
  rope = make_mixer("attention", D, T, use_rope=True, rngs=nnx.Rngs(0))
  plain = make_mixer("attention", D, T, rngs=nnx.Rngs(0))  # the same parameters (same seed, same shapes)
  x = _x(11)
  y_rope, y_plain = np.asarray(rope(x)), np.asarray(plain(x))
  assert not np.allclose(y_rope, y_plain, atol=1e-3)
  np.testing.assert_allclose(y_plain[:, 0], np.asarray(rope(x))[:, 0], atol=1e-5)  # position 0: rotation by 0
  x2 = x.at[:, 5:].set(_x(12)[:, 5:])
  np.testing.assert_allclose(y_rope[:, :5], np.asarray(rope(x2))[:, :5], atol=1e-5)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 40, (2, 8)), jnp.int32)
  assert bool(jnp.all(jnp.isfinite(lm(tokens))))


def test_zoo_lm_out_projection_rescaled_and_dropout():
  lm = ZooLM(64, 32, 8, "attention", num_layers=2, embed_dropout=0.5, rngs=nnx.Rngs(0))
  out_std = float(np.std(np.asarray(lm.mixers[0].attn.out.kernel[...])))
  q_std = float(np.std(np.asarray(lm.mixers[0].attn.query.kernel[...])))
  assert out_std < 0.7 * q_std  # 0.02 / sqrt(2 L) = 0.01 vs 0.02
  tokens = jnp.zeros((2, 8), jnp.int32)
  a = lm.hidden(tokens, train=True, dropout_key=jax.random.key(0))[0]
  b = lm.hidden(tokens, train=True, dropout_key=jax.random.key(1))[0]
  c = lm.hidden(tokens, train=False, dropout_key=jax.random.key(0))[0]
  assert not np.allclose(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(c), np.asarray(lm.hidden(tokens)[0]))


def test_errors_name_the_values():
  with pytest.raises(ValueError, match="unknown mixer 'mamba'"):
    ZooLM(16, 8, 8, "mamba", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="kernel_size"):
    BaseConv(8, 0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="needs seq_len"):
    BaseConv(8, -1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="embed_dropout"):
    ZooLM(16, 8, 8, "attention", embed_dropout=1.0, rngs=nnx.Rngs(0))
  lm = ZooLM(16, 8, 8, "baseconv", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="at most 8 tokens, got 9"):
    lm(jnp.zeros((1, 9), jnp.int32))
  with pytest.raises(ValueError, match=r"x must have shape \[B, T, 8\]"):
    lm.mixers[0](jnp.zeros((1, 4, 5)))
