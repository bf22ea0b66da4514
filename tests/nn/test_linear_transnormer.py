"""TransNormerLLM pieces: SRMSNorm, decay schedule, LRPE-d, the gated linear attention layer against a dense form,
and the LM's constant-size decode cache (step-by-step decode == full pass)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import testing
from jaxattn.nn import LRPE, GatedLinearAttention, SGLU, SRMSNorm, TransNormerLM, srms_norm, tnl_decay_slopes


def _x(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_srms_norm():
  x = _x(0, (3, 5, 16))
  want = x / np.sqrt(np.mean(np.asarray(x) ** 2, -1, keepdims=True) + 1e-6)
  testing.assert_close(srms_norm(x), want, name="srms_norm")
  assert srms_norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
  assert not nnx.state(SRMSNorm(), nnx.Param)  # no learnable gain
  with pytest.raises(ValueError, match="eps"):
    SRMSNorm(-1.0)


def test_decay_schedule_released_code_and_paper():
  s = tnl_decay_slopes(8, 0, 24)
  np.testing.assert_allclose(s, [2.0 ** (-(h + 1)) * (1 + 1e-5) for h in range(8)], rtol=1e-12)
  np.testing.assert_allclose(np.exp(-s[[0, 7]]), [0.6065, 0.9961], atol=1e-4)  # layer 0: fastest decay
  np.testing.assert_allclose(tnl_decay_slopes(8, 23, 24), 1e-5 * 2.0 ** -np.arange(1, 9.0), rtol=1e-9)  # ~no decay
  np.testing.assert_allclose(tnl_decay_slopes(4, 0, 1), 2.0 ** (-2.0 * np.arange(1, 5)) * (1 + 1e-5))  # L == 1
  # non-power-of-2 heads: ALiBi interleave (4 heads' slopes, then every other slope of 8 heads)
  np.testing.assert_allclose(tnl_decay_slopes(6, 0, 2) / (1 + 1e-5),
                             [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])
  np.testing.assert_allclose(tnl_decay_slopes(4, 1, 2, rule="paper"), [1.0, 2.0, 3.0, 4.0])
  with pytest.raises(ValueError, match="layer_idx"):
    tnl_decay_slopes(4, 2, 2)
  with pytest.raises(ValueError, match="rule"):
    tnl_decay_slopes(4, 0, 2, rule="alibi")


def test_lrpe_is_relative():
  lrpe = LRPE(2, 4)
  q, k = _x(1, (1, 6, 2, 4)), _x(2, (1, 6, 2, 4))
  pos = jnp.arange(6)
  dots = jnp.einsum("bthd,bshd->bhts", lrpe(q, pos), lrpe(k, pos))
  shifted = jnp.einsum("bthd,bshd->bhts", lrpe(q, pos + 37), lrpe(k, pos + 37))
  testing.assert_close(shifted, dots, name="shift invariance")
  theta = np.asarray(lrpe.theta[...], np.float64)
  want = 10000.0 ** (-2.0 * np.arange(8) / 8)
  np.testing.assert_allclose(theta.reshape(-1), want, rtol=1e-6)
  # q . k cos(theta (t - s)), summed over features
  t, s_ = 4, 1
  direct = np.sum(np.asarray(q[0, t]) * np.asarray(k[0, s_]) * np.cos(theta * (t - s_)), -1)
  np.testing.assert_allclose(np.asarray(dots[0, :, t, s_]), direct, rtol=1e-5, atol=1e-5)


def _dense_tnl(m: GatedLinearAttention, x):
  """TransNormerLLM Eq. 11 written densely with the layer's parameters."""
  B, T, _ = x.shape
  H, d = m.num_heads, m.head_dim
  w = m.qkvu_proj.kernel[...]
  q, k, v, u = jnp.split(jnp.einsum("btf,fo->bto", x, w, precision="highest"), 4, -1)
  q, k = jax.nn.silu(q).reshape(B, T, H, d), jax.nn.silu(k).reshape(B, T, H, d)
  if m.use_lrpe:
    th = m.lrpe.theta[...]
    ang = jnp.arange(T)[:, None, None] * th
    q = jnp.concatenate([q * jnp.cos(ang), q * jnp.sin(ang)], -1)
    k = jnp.concatenate([k * jnp.cos(ang), k * jnp.sin(ang)], -1)
  lam = np.exp(-np.asarray(tnl_decay_slopes(H, 0, 2)))  # layer 0 of 2 (as built below)
  t = np.arange(T)
  decay = np.where(t[:, None] >= t[None, :], lam[:, None, None] ** np.maximum(t[:, None] - t[None, :], 0), 0)
  a = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") * jnp.asarray(decay, jnp.float32)
  o = jnp.einsum("bhts,bshd->bthd", a, v.reshape(B, T, H, d), precision="highest").reshape(B, T, H * d)
  o = o / jnp.sqrt(jnp.mean(o * o, -1, keepdims=True) + 1e-6)
  return jnp.einsum("bto,of->btf", o * u, m.out_proj.kernel[...], precision="highest")


@pytest.mark.parametrize("use_lrpe", [True, False])
def test_gated_linear_attention_matches_dense(use_lrpe):
  m = GatedLinearAttention(16, 2, layer_idx=0, num_layers=2, use_lrpe=use_lrpe, chunk_size=4,
                           precision="highest", rngs=nnx.Rngs(0))
  x = _x(3, (2, 11, 16))
  y = nnx.jit(lambda m, x: m(x))(m, x)
  testing.assert_close(y, _dense_tnl(m, x), name="GLA vs dense")


def test_sglu():
  m = SGLU(8, 12, rngs=nnx.Rngs(0))
  x = _x(4, (2, 3, 8))
  want = ((x @ m.v_proj.kernel[...]) * (x @ m.u_proj.kernel[...])) @ m.o_proj.kernel[...]
  testing.assert_close(m(x), want, name="sglu")


@functools.partial(nnx.jit, static_argnames=("decode",))
def _lm(m, tokens, decode=False):
  return m(tokens, decode=decode)


@pytest.mark.parametrize("tie", [True, False])
def test_lm_decode_equals_full_pass(tie):
  lm = TransNormerLM(vocab_size=40, features=16, num_layers=2, num_heads=2, tie_embeddings=tie, chunk_size=4,
                     rngs=nnx.Rngs(1))
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 40, (2, 9)), jnp.int32)
  full = _lm(lm, tokens)
  assert full.shape == (2, 9, 40) and np.isfinite(np.asarray(full)).all()
  lm.init_cache(2)
  outs = [_lm(lm, tokens[:, :4], decode=True)]  # prefill (chunked path with an initial state)
  outs += [_lm(lm, tokens[:, t:t + 1], decode=True) for t in range(4, 9)]  # single steps
  testing.assert_close(jnp.concatenate(outs, 1), full, name="decode vs full")
  # the cache is constant-size: one [B, H, d_qk, d] state per layer (d_qk doubled by LRPE in layer 0)
  shapes = [b.token_mixer.state.shape for b in lm.blocks]
  assert shapes == [(2, 2, 16, 8), (2, 2, 8, 8)]
  assert int(lm.blocks[0].token_mixer.position[...]) == 9


def test_lm_gradients_are_finite():
  lm = TransNormerLM(vocab_size=20, features=16, num_layers=2, num_heads=2, chunk_size=4, rngs=nnx.Rngs(2))
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, 20, (2, 7)), jnp.int32)

  @nnx.jit
  def loss_grad(m, tokens):
    def loss(m):
      logits = m(tokens[:, :-1])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
    return nnx.value_and_grad(loss)(m)

  value, grads = loss_grad(lm, tokens)
  assert np.isfinite(float(value))
  testing.assert_no_nan(nnx.to_pure_dict(grads) if hasattr(nnx, "to_pure_dict") else grads)


def test_bad_arguments():
  with pytest.raises(ValueError, match="multiple of num_heads"):
    GatedLinearAttention(10, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="lrpe_layers"):
    TransNormerLM(vocab_size=10, features=8, num_layers=2, num_heads=2, lrpe_layers=(2,), rngs=nnx.Rngs(0))
  lm = TransNormerLM(vocab_size=10, features=8, num_layers=1, num_heads=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="init_cache"):
    lm(jnp.zeros((1, 2), jnp.int32), decode=True)
  with pytest.raises(ValueError, match="int array"):
    lm(jnp.zeros((1, 2)))
