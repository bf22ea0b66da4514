"""Capture and interventions on NNX models: eager, nnx.jit, jax.jit; head masks, probability hooks, ACT; errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn
from jaxattn import analysis, masks
from jaxattn.nn import LinearAttention, MultiHeadAttention, as_attention_fn

CAUSAL = masks.Causal()


class Model(nnx.Module):
  """Two jaxattn layers (GQA) and a flax layer through the adapter, all reading the same input."""

  def __init__(self, rngs):
    self.a0 = MultiHeadAttention(4, 16, num_kv_heads=2, mask=CAUSAL, rngs=rngs)
    self.a1 = MultiHeadAttention(4, 16, mask=CAUSAL, rngs=rngs)
    self.flax = nnx.MultiHeadAttention(2, 16, attention_fn=as_attention_fn(mask=CAUSAL), decode=False, rngs=rngs)

  def __call__(self, x):
    return self.a0(x) + self.a1(x) + self.flax(x)


@pytest.fixture(scope="module")
def setup():
  return Model(nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (2, 7, 16))


def _qkv(layer, x):
  return layer.query(x), layer.key(x), layer.value(x)


def test_capture_eager_matches_dense_probs_and_restores(setup):
  model, x = setup
  y0 = model(x)
  with analysis.capture(model, stats=("probs", "colsum", "argmax")) as rec:
    y1 = model(x)
  np.testing.assert_array_equal(y0, y1)
  assert rec.paths == ("a0", "a1", "flax")
  for i, layer in enumerate((model.a0, model.a1, model.flax)):
    q, k, _ = _qkv(layer, x)
    want = analysis.attention_probs(q, k, mask=CAUSAL)
    np.testing.assert_allclose(rec[i]["probs"], want, atol=1e-6)
    np.testing.assert_allclose(rec[rec.paths[i]]["colsum"], want.sum(-2), atol=1e-5)
    np.testing.assert_array_equal(rec[i]["argmax"], np.asarray(want).argmax(-1))
  with pytest.raises(ValueError, match="shapes differ"):
    rec.stack("probs")  # the flax layer has 2 heads, the others 4
  assert model.a0.analysis_hook is None and type(model.flax.attention_fn).__name__ == "AttentionFn"


def test_capture_under_nnx_jit_and_jax_jit(setup):
  model, x = setup
  f = nnx.jit(lambda m, x: m(x))
  y0 = f(model, x)
  with analysis.capture(model, stats=("colsum", "rowmax"), layers=["a0", "flax"]) as rec:
    model(x)
    y1, recs = nnx.jit(rec.wrap(lambda m, x: m(x)))(model, x)
    graphdef, state = nnx.split(model)
    y2, recs2 = jax.jit(rec.wrap(lambda s, x: nnx.merge(graphdef, s)(x)))(state, x)
    with pytest.raises(ValueError, match=r"rec.wrap"):
      f(model, x)  # retraced (the hooks are static), and traced statistics cannot be stored on rec
  np.testing.assert_allclose(y1, y0, atol=1e-6)
  np.testing.assert_allclose(y2, y0, atol=1e-6)
  assert recs.paths == recs2.paths == rec.paths == ("a0", "flax")
  for layer in ("a0", "flax"):
    for s in ("colsum", "rowmax"):
      np.testing.assert_allclose(recs[layer][s], rec[layer][s], atol=1e-6)
      np.testing.assert_allclose(recs2[layer][s], rec[layer][s], atol=1e-6)
  with pytest.raises(ValueError, match="has no records"):
    recs["a1"]


def _layer_out(layer, x, q=None, zero_head=None):
  q0, k, v = _qkv(layer, x)
  q = q0 if q is None else q
  o = jaxattn.softmax_attention(q, k, v, mask=CAUSAL)
  if zero_head is not None:
    o = o.at[:, :, zero_head].set(0.0)
  return layer.out(o)


def test_head_mask_modes(setup):
  model, x = setup
  f = nnx.jit(lambda m, x: m.a0(x))
  y0 = f(model, x)
  with analysis.intervene(model, head_mask=analysis.HeadMask({(0, 1), ("flax", 0)}, mode="zero")):
    np.testing.assert_allclose(f(model, x), _layer_out(model.a0, x, zero_head=1), atol=1e-5)  # nnx.jit retraces
  np.testing.assert_allclose(f(model, x), y0, atol=0)
  with analysis.intervene(model, head_mask=analysis.HeadMask({(-3, 1)}, mode="uniform")):
    with analysis.capture(model, stats=("probs",), layers=[0]) as rec:
      y = model.a0(x)
  q = model.a0.query(x).at[:, :, 1].set(0.0)
  np.testing.assert_allclose(y, _layer_out(model.a0, x, q=q), atol=1e-5)
  p = np.asarray(rec[0]["probs"])
  uniform = np.tril(np.ones((7, 7))) / np.arange(1, 8)[:, None]
  np.testing.assert_allclose(p[:, 1], np.broadcast_to(uniform, (2, 7, 7)), atol=1e-6)
  assert np.abs(p[:, 0] - uniform).max() > 1e-2  # the other heads are untouched


def test_probability_hook_and_act(setup):
  model, x = setup
  y0 = model.a1(x)
  with analysis.intervene(model, probs_hook=lambda p: p, hook_layers=["a1"]):
    np.testing.assert_allclose(model.a1(x), y0, atol=2e-6)
  flat = lambda p: jnp.where(p > 0, 1.0, 0.0) / jnp.maximum((p > 0).sum(-1, keepdims=True), 1)
  with analysis.intervene(model, probs_hook=flat, hook_layers=[1]):
    y_flat = model.a1(x)
  q = jnp.zeros_like(model.a1.query(x))
  np.testing.assert_allclose(y_flat, _layer_out(model.a1, x, q=q), atol=1e-5)
  with analysis.intervene(model, act=analysis.ACT(heads={("a1", 2)})):
    y_act = model.a1(x)
  q, k, v = _qkv(model.a1, x)
  want = model.a1.out(analysis.act_attention(q, k, v, mask=CAUSAL, heads=(2,)))
  np.testing.assert_allclose(y_act, want, atol=1e-5)


def test_decode_capture_reports_absolute_positions():
  layer = MultiHeadAttention(2, 16, use_rope=True, mask=CAUSAL, rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(3), (1, 9, 16))
  with analysis.capture(layer, stats=("probs",)) as full:
    layer(x)
  layer.init_cache(batch_size=1, max_length=12)
  layer(x[:, :6], decode=True)
  plain = layer(x[:, 6:7], decode=True)
  layer.init_cache(batch_size=1, max_length=12)
  with analysis.capture(layer, stats=("argmax", "colsum")) as rec:
    layer(x[:, :6], decode=True)
    hooked = layer(x[:, 6:7], decode=True)
    layer(x[:, 7:8], decode=True)
  np.testing.assert_allclose(hooked, plain, atol=1e-5)
  p = np.asarray(full[0]["probs"])
  assert len(rec.calls(0)) == 3
  steps = analysis.argmax_steps(rec, skip=1)  # [B, steps, L, H]
  assert steps.shape == (1, 2, 1, 2)
  np.testing.assert_array_equal(steps[:, :, 0], p[:, :, 6:8].argmax(-1).transpose(0, 2, 1))
  np.testing.assert_allclose(rec.calls(0)[0]["colsum"][..., :6], p[:, :, :6, :6].sum(-2), atol=1e-5)


def test_module_argument_and_errors(setup):
  model, x = setup
  hook = analysis.LayerHook(mask_heads=(1,), mask_mode="zero")
  layer = MultiHeadAttention(4, 16, mask=CAUSAL, analysis_hook=hook, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(layer(x), _layer_out(layer, x, zero_head=1), atol=1e-5)
  with pytest.raises(ValueError, match="names head 7"):
    MultiHeadAttention(4, 16, analysis_hook=analysis.LayerHook(mask_heads=(7,)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="names layer 3, but the model has 3 attention layers"):
    with analysis.intervene(model, head_mask=analysis.HeadMask({(3, 0)})):
      pass
  with pytest.raises(ValueError, match="names layer 'a9'"):
    with analysis.intervene(model, head_mask=analysis.HeadMask({("a9", 0)})):
      pass
  with pytest.raises(ValueError, match="names head 2 of layer 'flax'"):
    with analysis.intervene(model, head_mask=analysis.HeadMask({("flax", 2)})):
      pass
  with pytest.raises(ValueError, match="mode"):
    analysis.HeadMask({(0, 0)}, mode="drop")
  with pytest.raises(NotImplementedError, match="'cudnn' has no statistics mode"):
    with analysis.capture(model, stats=("colsum",), stats_implementation="cudnn"):
      pass
  with pytest.raises(ValueError, match="'weights'"):
    with analysis.capture(model, stats=("weights",)):
      pass

  class Hybrid(nnx.Module):
    def __init__(self, rngs):
      self.attn = MultiHeadAttention(2, 8, rngs=rngs)
      self.lin = LinearAttention(2, 8, rngs=rngs)
      self.plain = nnx.MultiHeadAttention(2, 8, decode=False, rngs=rngs)

  hybrid = Hybrid(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"lin: LinearAttention has no softmax probability matrix.*plain: flax"):
    with analysis.capture(hybrid):
      pass
  with analysis.capture(hybrid, on_unsupported="skip") as rec:
    hybrid.attn(jnp.ones((1, 3, 8)))
  assert rec.paths == ("attn",)
  kernel = MultiHeadAttention(2, 8, implementation="pallas_tpu", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="'pallas_tpu' never forms"):
    with analysis.intervene(kernel, probs_hook=lambda p: p):
      kernel(jnp.ones((1, 3, 8)))
