"""Attention Residuals (jaxattn/nn/attnres.py) against plain references: depth attention forward and gradients,
zero-init = uniform average, Block(S=1) = Full, two-phase = one-phase, the whole decoder against a hand-written
recursion, fixed-size buffers with a count, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import testing
from jaxattn.nn import AttnResDecoder, AttnResLM, DepthAttention, depth_attention

HI = jax.lax.Precision.HIGHEST


def _ref_depth(v, q, g, eps=1e-6):
  """Plain softmax over sources: logits_i = sum_d v_i / rms(v_i) * g * q."""
  v = v.astype(jnp.float32)
  keys = v / jnp.sqrt(jnp.mean(v ** 2, axis=-1, keepdims=True) + eps) * g
  logits = jnp.sum(keys * q, axis=-1)  # [N, B, T]
  w = jnp.exp(logits - logits.max(0)) / jnp.exp(logits - logits.max(0)).sum(0)
  return jnp.sum(w[..., None] * v, axis=0)


def _rand(key, shape, scale=1.0):
  return scale * jax.random.normal(key, shape, jnp.float32)


def test_depth_attention_matches_reference_fwd_and_grads():
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  v = _rand(ks[0], (5, 2, 7, 16)) * jnp.arange(1, 6)[:, None, None, None]  # sources of different sizes
  q, g = _rand(ks[1], (16,)), 1.0 + 0.3 * _rand(ks[2], (16,))
  testing.assert_close(depth_attention(v, q, gain=g), _ref_depth(v, q, g), name="out")
  ct = _rand(ks[3], (2, 7, 16))
  f = lambda v, q, g: jnp.sum(depth_attention(v, q, gain=g) * ct)
  fr = lambda v, q, g: jnp.sum(_ref_depth(v, q, g) * ct)
  got, want = jax.grad(f, argnums=(0, 1, 2))(v, q, g), jax.grad(fr, argnums=(0, 1, 2))(v, q, g)
  for name, a, b in zip(("dv", "dq", "dgain"), got, want):
    testing.assert_close(a, b, kind="grad", name=name)


def test_zero_init_is_uniform_average_and_list_input():
  v = _rand(jax.random.PRNGKey(1), (4, 2, 3, 8))
  da = DepthAttention(8)
  testing.assert_close(da(v), v.mean(0), name="uniform")
  testing.assert_close(da([v[i] for i in range(4)]), v.mean(0), name="list")


def test_count_masks_unused_slots_exactly():
  ks = jax.random.split(jax.random.PRNGKey(2), 3)
  v = _rand(ks[0], (6, 2, 3, 8))
  q = _rand(ks[1], (8,))
  buf = v.at[4:].set(1e6)  # garbage in the unused slots must not leak
  for count in (1, 3, 4):
    want = _ref_depth(v[:count], q, 1.0)
    testing.assert_close(depth_attention(buf, q, count=count), want, name=f"count={count}")
  got = jax.jit(lambda b, c: depth_attention(b, q, count=c))(buf.at[4:].set(0.0), 4)  # traced count, zero slots
  testing.assert_close(got, _ref_depth(v[:4], q, 1.0), name="traced count")
  assert np.isfinite(np.asarray(got)).all()


@pytest.mark.parametrize("bad, match", [
    (dict(query=jnp.zeros(7)), "query must have shape"),
    (dict(gain=jnp.ones(3)), "gain must have shape"),
    (dict(count=0), "count must lie in"),
    (dict(count=9), "count must lie in"),
])
def test_depth_attention_errors(bad, match):
  v = jnp.ones((4, 1, 2, 8))
  kw = dict(query=jnp.zeros(8))
  kw.update(bad)
  with pytest.raises(ValueError, match=match):
    depth_attention(v, **kw)


def test_errors_name_values():
  with pytest.raises(ValueError, match="mode must be one of"):
    AttnResDecoder(16, 2, 2, mode="sigmoid", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
    AttnResDecoder(16, 2, 2, mode="block", block_size=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="share one shape"):
    depth_attention([jnp.ones((1, 2, 8)), jnp.ones((1, 3, 8))], jnp.zeros(8))
  with pytest.raises(ValueError, match="empty"):
    depth_attention([], jnp.zeros(8))
  dec = AttnResDecoder(16, 1, 2, mode="full", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"x must have shape \[B, T, 16\]"):
    dec(jnp.ones((1, 4, 8)))


def _randomise_queries(dec: AttnResDecoder, key):
  """Non-zero pseudo-queries and gains (zero init would make every depth attention a plain mean)."""
  for i, r in enumerate(list(dec.res) + [dec.final_res]):
    kq, kg = jax.random.split(jax.random.fold_in(key, i))
    r.query[...] = 0.5 * jax.random.normal(kq, r.query.shape)
    r.gain[...] = 1.0 + 0.5 * jax.random.normal(kg, r.gain.shape)
  return dec


def _ref_decoder(dec: AttnResDecoder, x):
  """The AttnRes recursion written out with the module's sub-layers: sources, block sums, depth attention."""
  n_sub = 2 * dec.num_layers
  if dec.mode == "none":
    h = x
    for i in range(n_sub):
      h = h + dec.sublayers[i](dec.norms[i](h))
    return h
  S = 1 if dec.mode == "full" else dec.block_size
  outs = []
  for i in range(n_sub):
    n_done = i // S  # completed blocks before sub-layer i
    srcs = [x] + [sum(outs[b * S:(b + 1) * S]) for b in range(n_done)]
    if i % S:
      srcs.append(sum(outs[n_done * S:i]))
    r = dec.res[i]
    h = _ref_depth(jnp.stack(srcs), r.query[...], r.gain[...])
    outs.append(dec.sublayers[i](dec.norms[i](h)))
  n_done = -(-n_sub // S)
  srcs = [x] + [sum(outs[b * S:(b + 1) * S]) for b in range(n_done)]
  return _ref_depth(jnp.stack(srcs), dec.final_res.query[...], dec.final_res.gain[...])


_SLOW = pytest.mark.slow  # eager-mode gradients through the whole decoder: ~20-60 CPU-s each


@pytest.mark.parametrize("mode, S", [pytest.param("none", 4, marks=_SLOW), pytest.param("full", 1, marks=_SLOW),
                                     pytest.param("block", 2, marks=_SLOW), ("block", 3)])
def test_decoder_matches_reference_recursion_fwd_and_grads(mode, S):
  dec = AttnResDecoder(16, 3, 2, mode=mode, block_size=S, implementation="reference", rngs=nnx.Rngs(3))
  if mode != "none":
    _randomise_queries(dec, jax.random.PRNGKey(4))
  x = _rand(jax.random.PRNGKey(5), (2, 6, 16))
  with jax.default_matmul_precision("highest"):
    testing.assert_close(dec(x), _ref_decoder(dec, x), name=f"{mode} S={S}")
    gd, params = nnx.split(dec)
    f = lambda p, x, fn: jnp.sum(jnp.sin(fn(nnx.merge(gd, p), x)))
    g1 = jax.grad(f, argnums=(0, 1))(params, x, lambda m, x: m(x))
    g2 = jax.grad(f, argnums=(0, 1))(params, x, _ref_decoder)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    testing.assert_close(a, b, kind="grad", name="grad")


def test_block_size_one_equals_full():
  full = AttnResDecoder(16, 2, 2, mode="full", implementation="reference", rngs=nnx.Rngs(6))
  _randomise_queries(full, jax.random.PRNGKey(7))
  block = AttnResDecoder(16, 2, 2, mode="block", block_size=1, implementation="reference", rngs=nnx.Rngs(0))
  nnx.update(block, nnx.state(full))
  x = _rand(jax.random.PRNGKey(8), (2, 5, 16))
  testing.assert_close(block(x), full(x), name="block S=1 vs full")


@pytest.mark.parametrize("mode, S", [pytest.param("full", 1, marks=_SLOW), ("block", 3),
                                     pytest.param("block", 4, marks=_SLOW)])
def test_two_phase_equals_one_phase_fwd_and_grads(mode, S):
  dec = AttnResDecoder(16, 3, 2, mode=mode, block_size=S, implementation="reference", rngs=nnx.Rngs(9))
  _randomise_queries(dec, jax.random.PRNGKey(10))
  x = _rand(jax.random.PRNGKey(11), (2, 5, 16))
  with jax.default_matmul_precision("highest"):
    testing.assert_close(dec(x, two_phase=True), dec(x), name="two-phase")
    gd, params = nnx.split(dec)
    f = lambda p, tp: jnp.sum(jnp.cos(nnx.merge(gd, p)(x, two_phase=tp)))
    for a, b in zip(jax.tree.leaves(jax.grad(f)(params, True)), jax.tree.leaves(jax.grad(f)(params, False))):
      testing.assert_close(a, b, kind="grad", name="two-phase grad")


def test_lm_shapes_params_and_stats():
  counts = {}
  for mode in ("none", "full", "block"):
    lm = AttnResLM(64, 16, 1, 2, mode=mode, block_size=1, rngs=nnx.Rngs(0))
    counts[mode] = sum(x.size for x in jax.tree.leaves(nnx.state(lm, nnx.Param)))
    tok = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 64)
    assert lm(tok).shape == (2, 8, 64)
    h, st = lm.decoder(lm.embed(tok), return_stats=True)
    assert st["input_rms"].shape == (2,) and np.isfinite(np.asarray(st["output_rms"])).all()
  # AttnRes adds a query and a gain per sub-layer (2) and for the output: 2 * 16 * 3
  assert counts["full"] - counts["none"] == counts["block"] - counts["none"] == 2 * 16 * 3
  with pytest.raises(ValueError, match="tokens must be an int array"):
    lm(jnp.ones((2, 8)))
