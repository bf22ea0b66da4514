"""Tests for ``jaxattn.nn.cross``: every variant against a dense reference built on
``softmax_attention(implementation="reference")`` with boolean mask arrays, forward and gradients, padding (fully
padded rows never NaN), GQA, every softmax implementation, and ValueErrors naming the offending dimension."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import masks, softmax_attention, testing
from jaxattn.nn import (CoAttentionLayer, CrossAttention, LabelAttentionHead, LoRRASideLearner, LXMERTEncoder,
                        ObjectPointerHead, SideMemoryBlock, batch_distractor, top_r_indices)
from jaxattn.nn.cross import dense_probs, l2_normalize

HI = jax.lax.Precision.HIGHEST
# Pallas ones run in interpret mode on CPU. The composite modules (LXMERT, side memory, Wings, CrossTune head) are
# checked with the reference backend: their attention calls are the CrossAttention ones tested on every backend here.
IMPLS = ["reference", "xla"] + [pytest.param(i, marks=pytest.mark.slow) for i in ("pallas_gpu", "pallas_tpu")]


def _rand(seed, shape):
  # numpy, not jax.random: a new jax.random shape costs a compile
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _randomize(module, seed=0, scale=0.3):
  """Replaces every parameter by random normal values (zero-initialised low-rank B's and gates included)."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  leaves, tree = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  leaves = [jnp.asarray(rng.normal(size=np.shape(p)) * scale, jnp.float32) for p in leaves]
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(tree, leaves), rest)


# ------------------------------------------------------------------------------------------- dense reference
def _ref_attention(q, k, v, allowed, scale):
  """``softmax_attention`` reference backend with a boolean ``allowed [B, T, S]`` mask (None: all)."""
  mask = None if allowed is None else allowed[:, None]
  return softmax_attention(q, k, v, mask=mask, scale=scale, implementation="reference")


def _allowed(B, T, S, kv_valid=None, q_valid=None, q_ids=None, kv_ids=None, static=None):
  a = jnp.ones((B, T, S), bool)
  if kv_valid is not None:
    a &= kv_valid[:, None, :]
  if q_valid is not None:
    a &= q_valid[:, :, None]
  if q_ids is not None:
    a &= q_ids[:, :, None] == kv_ids[:, None, :]
  if static is not None:
    a &= jnp.asarray(static.to_dense(T, S))[None]
  return a


def _proj_q(m, x):
  B, T, _ = x.shape
  if m.q_proj == "linear":
    y = jnp.einsum("btf,fhd->bthd", x, m.query.kernel[...], precision=HI)
    return y if m.query.bias is None else y + m.query.bias[...]
  if m.q_proj == "lowrank_residual":
    x = x + x @ m.query.a[...] @ m.query.b[...]
  return x.reshape(B, T, m.num_heads, m.head_dim)


def _proj_kv(m, c):
  B, S, _ = c.shape
  if m.normalize_memory:
    c = c / jnp.linalg.norm(c, axis=-1, keepdims=True)
  if m.kv_proj == "linear":
    def lin(p):
      y = jnp.einsum("bsf,fgd->bsgd", c, p.kernel[...], precision=HI)
      return y if p.bias is None else y + p.bias[...]
    return lin(m.key), lin(m.value)
  shape = (B, S, m.num_kv_heads, m.head_dim)
  if m.kv_proj == "lowrank_residual":
    return ((c + c @ m.key.a[...] @ m.key.b[...]).reshape(shape),
            (c + c @ m.value.a[...] @ m.value.b[...]).reshape(shape))
  return c.reshape(shape), c.reshape(shape)


def _ref_cross(m, x, c, allowed, gate=None):
  """Dense forward pass of a :class:`CrossAttention` from its parameters."""
  q = _proj_q(m, x)
  k, v = _proj_kv(m, c)
  scale = m.scale or m.head_dim ** -0.5
  o = _ref_attention(q, k, v, allowed, scale)  # [B, T, H, D]
  if m.out_proj == "linear":
    a = jnp.einsum("bthd,hdf->btf", o, m.out.kernel[...], precision=HI)
    a = a if m.out.bias is None else a + m.out.bias[...]
  else:
    a = o.reshape(o.shape[:2] + (-1,))
    if m.out_proj == "lowrank":
      a = a @ m.out.a[...] @ m.out.b[...]
  if gate is not None:
    a = a * gate[..., None]
  if m.combine == "none":
    return a
  if m.combine == "residual":
    return x + a
  if m.combine == "residual_l2":
    y = x + a
    return y / jnp.linalg.norm(y, axis=-1, keepdims=True)
  return x + jnp.tanh(m.gate_alpha[...]) * a


def _check_fwd_grad(module, run, ref, args):
  """Output and gradients (wrt the array args and every parameter) of ``run(m, *args)`` vs ``ref(m, *args)``."""
  graphdef, state = nnx.split(module)
  w = _rand(99, np.shape(ref(module, *args)))

  @functools.partial(jax.jit, static_argnums=0)
  def loss(use_ref, state, *a):
    m = nnx.merge(graphdef, state)
    y = (ref if use_ref else run)(m, *a)
    return jnp.sum(y * w), y

  g = jax.grad(loss, argnums=tuple(range(1, 2 + len(args))), has_aux=True)
  (gs, y), (gs_ref, y_ref) = g(False, state, *args), g(True, state, *args)
  testing.assert_close(y, y_ref, name="out")
  testing.assert_no_nan(gs, "grads")
  testing.assert_close(gs, gs_ref, kind="grad", name="grads")
  return y


# -------------------------------------------------------------------------------------------- CrossAttention
B, T, S, F = 2, 5, 7, 16


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_gqa_padding_every_implementation(impl):
  """Standard cross-attention, GQA 4:2, one fully padded memory row (output 0, no NaN, zero gradients there)."""
  m = _randomize(CrossAttention(4, F, in_kv_features=12, num_kv_heads=2, use_bias=True, implementation=impl,
                                rngs=nnx.Rngs(0)))
  x, c = _rand(1, (B, T, F)), _rand(2, (B, S, 12))
  lengths = jnp.array([4, 0])
  kv_valid = jnp.arange(S)[None] < lengths[:, None]
  y = _check_fwd_grad(m, lambda m, x, c: m(x, c, kv_lengths=lengths),
                      lambda m, x, c: _ref_cross(m, x, c, _allowed(B, T, S, kv_valid)), (x, c))
  np.testing.assert_allclose(y[1], jnp.broadcast_to(m.out.bias[...], (T, F)), atol=1e-6)  # no key: 0 -> bias


@pytest.mark.parametrize("impl", ["xla", pytest.param("pallas_gpu", marks=pytest.mark.slow)])
def test_rca_kv_free_l2_residual(impl):
  """Bayes-PFL RCA: K=V=l2norm(memory) split into heads, full-width scale, residual + L2 norm, no out proj."""
  m = _randomize(CrossAttention(4, F, kv_proj="none", out_proj="none", normalize_memory=True,
                                combine="residual_l2", scale=F ** -0.5, use_bias=True, implementation=impl,
                                rngs=nnx.Rngs(0)), seed=3)
  assert m.key is None and m.out is None and m.head_dim == 4
  x, c = _rand(4, (B, 3, F)), _rand(5, (B, S, F))
  kv_mask = jnp.asarray(np.random.default_rng(6).random((B, S)) < 0.7).at[:, 0].set(True)
  y = _check_fwd_grad(m, lambda m, x, c: m(x, c, kv_mask=kv_mask),
                      lambda m, x, c: _ref_cross(m, x, c, _allowed(B, 3, S, kv_mask)), (x, c))
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), 1.0, atol=1e-5)
  # padded memory tokens do not matter, whatever they hold
  c2 = jnp.where(kv_mask[..., None], c, 100.0)
  testing.assert_close(m(x, c2, kv_mask=kv_mask), y)


def test_tanh_gate_is_identity_at_init_then_matches_reference():
  m = CrossAttention(2, F, combine="tanh_gate", implementation="xla", rngs=nnx.Rngs(0))
  x, c = _rand(7, (B, T, F)), _rand(8, (B, S, F))
  np.testing.assert_array_equal(m(x, c), x)
  m = _randomize(m, seed=9)
  _check_fwd_grad(m, lambda m, x, c: m(x, c), lambda m, x, c: _ref_cross(m, x, c, None), (x, c))


def test_external_gate_and_query_padding():
  """Wings-style per-token gate on the attention output; padded queries read nothing (y = x with a residual)."""
  m = _randomize(CrossAttention(2, F, combine="residual", implementation="xla", rngs=nnx.Rngs(0)), seed=10)
  x, c = _rand(11, (B, T, F)), _rand(12, (B, S, F))
  gate = jnp.asarray(np.random.default_rng(13).random((B, T)), jnp.float32)
  q_mask = jnp.arange(T)[None] < jnp.array([[T], [2]])
  y = _check_fwd_grad(m, lambda m, x, c: m(x, c, q_mask=q_mask, gate=gate),
                      lambda m, x, c: _ref_cross(m, x, c, _allowed(B, T, S, q_valid=q_mask), gate), (x, c))
  np.testing.assert_allclose(y[1, 2:], x[1, 2:], atol=1e-6)


def test_glca_query_subset_from_top_r():
  """DCAL GLCA: queries gathered at the top-R positions (ascending order), keys over all tokens."""
  m = _randomize(CrossAttention(2, F, implementation="xla", rngs=nnx.Rngs(0)), seed=14)
  x = _rand(15, (B, 9, F))
  scores = _rand(16, (B, 9))
  idx = top_r_indices(scores, 3)
  assert idx.shape == (B, 3) and bool(jnp.all(jnp.diff(idx, axis=1) > 0))
  np.testing.assert_array_equal(np.sort(idx, 1), np.sort(np.argsort(-np.asarray(scores), 1)[:, :3], 1))
  ref = lambda m, x: _ref_cross(m, jnp.take_along_axis(x, idx[..., None], 1), x, None)
  _check_fwd_grad(m, lambda m, x: m(x, x, query_index=idx), ref, (x,))
  valid = jnp.arange(9)[None] < jnp.array([[9], [2]])
  idx2 = top_r_indices(scores, 3, valid=valid)
  assert set(np.asarray(idx2[1, :2]).tolist()) == {0, 1}


@pytest.mark.slow  # compiles forward + gradient graphs: several CPU-s (fast suite budget)
def test_pwca_distractor_training_only():
  """DCAL PWCA: keys/values [memory; distractor] while training (padding respected), identity at eval."""
  m = _randomize(CrossAttention(2, F, implementation="xla", rngs=nnx.Rngs(0)), seed=17)
  x = _rand(18, (B, S, F))
  d = batch_distractor(x)
  np.testing.assert_array_equal(d[0], x[1])
  kv_valid = jnp.ones((B, S), bool)
  d_lengths = jnp.array([3, S])
  d_valid = jnp.arange(S)[None] < d_lengths[:, None]
  allowed = _allowed(B, S, 2 * S, jnp.concatenate([kv_valid, d_valid], 1))
  _check_fwd_grad(m, lambda m, x: m(x, x, distractor=batch_distractor(x), distractor_lengths=d_lengths),
                  lambda m, x: _ref_cross(m, x, jnp.concatenate([x, batch_distractor(x)], 1), allowed), (x,))
  m.eval()
  testing.assert_close(m(x, x, distractor=d), m(x, x))
  m.train()
  assert float(jnp.max(jnp.abs(m(x, x, distractor=d) - m(x, x)))) > 1e-3


@pytest.mark.slow  # compiles forward + gradient graphs: several CPU-s (fast suite budget)
def test_lorra_projections_identity_then_reference():
  """Wings LoRRA: x + x A B projections (B zero-init) and a low-rank-only output: zero at init."""
  m = CrossAttention(4, F, q_proj="lowrank_residual", kv_proj="lowrank_residual", out_proj="lowrank",
                     lowrank_rank=3, mask=masks.Causal(), implementation="xla", rngs=nnx.Rngs(0))
  x = _rand(19, (B, T, F))
  np.testing.assert_array_equal(m(x, x), 0.0)
  m = _randomize(m, seed=20)
  _check_fwd_grad(m, lambda m, x: m(x, x), lambda m, x: _ref_cross(m, x, x, _allowed(B, T, T, static=masks.Causal())),
                  (x,))


@pytest.mark.slow  # compiles forward + gradient graphs: several CPU-s (fast suite budget)
def test_return_probs_and_frame_segments():
  """return_probs gives the dense softmax of the reference (rows sum to 1, padded ones 0); frame ids block it."""
  m = _randomize(CrossAttention(4, F, num_kv_heads=1, implementation="xla", rngs=nnx.Rngs(0)), seed=21)
  x, c = _rand(22, (B, T, F)), _rand(23, (B, S, F))
  q_ids = jnp.array([[0, 0, 1, 1, 2]] * B)
  kv_ids = jnp.array([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]])
  y, p = m(x, c, segment_ids=(q_ids, kv_ids), return_probs=True)
  allowed = _allowed(B, T, S, q_ids=q_ids, kv_ids=kv_ids)
  testing.assert_close(y, _ref_cross(m, x, c, allowed))
  assert p.shape == (B, 4, T, S)
  np.testing.assert_allclose(p[:, :, :4].sum(-1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(p[:, :, 4], 0.0)  # segment 2 has no key
  np.testing.assert_array_equal(np.where(~np.asarray(allowed)[:, None], np.asarray(p), 0.0), 0.0)
  q, k = _proj_q(m, x), _proj_kv(m, c)[0]
  s = jnp.einsum("bthd,bsd->bhts", q, k[:, :, 0], precision=HI) * m.head_dim ** -0.5
  ref = jax.nn.softmax(jnp.where(allowed[:, None], s, -jnp.inf), axis=-1)
  testing.assert_close(p[:, :, :4], ref[:, :, :4])
  assert dense_probs(q, k, scale=1.0).shape == (B, 4, T, S)


def test_cross_attention_errors_name_the_dimension():
  m = CrossAttention(4, F, num_kv_heads=2, rngs=nnx.Rngs(0))
  x, c = _rand(0, (B, T, F)), _rand(1, (B, S, F))
  with pytest.raises(ValueError, match="feature dimension 15, expected 16"):
    m(x[..., :15], c)
  with pytest.raises(ValueError, match="memory has batch dimension 1"):
    m(x, c[:1])
  with pytest.raises(ValueError, match=r"kv_lengths must lie in \[0, 7\]"):
    m(x, c, kv_lengths=jnp.array([8, 1]))
  with pytest.raises(ValueError, match=r"kv_lengths must be integers of shape \(2,\)"):
    m(x, c, kv_lengths=jnp.array([1, 2, 3]))
  with pytest.raises(ValueError, match=r"kv_mask must be bool of shape \(2, 7\)"):
    m(x, c, kv_mask=jnp.ones((B, 6), bool))
  with pytest.raises(ValueError, match="query_index"):
    m(x, c, query_index=jnp.zeros((3, 2), jnp.int32))
  with pytest.raises(ValueError, match=r"gate must have shape \(2, 5\)"):
    m(x, c, gate=jnp.ones((B, 4)))
  with pytest.raises(ValueError, match=r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"):
    CrossAttention(4, F, num_kv_heads=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"in_kv_features \(10\)"):
    CrossAttention(4, F, in_kv_features=10, kv_proj="none", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="out_features"):
    CrossAttention(4, F, out_features=8, combine="residual", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="combine must be one of"):
    CrossAttention(4, F, combine="gated", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="r=10 exceeds the number of positions N=9"):
    top_r_indices(jnp.zeros((2, 9)), 10)


# ---------------------------------------------------------------------------------------- LabelAttentionHead
@pytest.mark.slow  # compiles forward + gradient graphs: several CPU-s (fast suite budget)
def test_label_attention_head_matches_reference():
  """CrossTune: Z = Q + MHA(Q, X, X) with Q the projected label descriptions; logit = w . LN(Z) + b."""
  head = _randomize(LabelAttentionHead(2, F, label_features=12, hidden_features=8, implementation="reference",
                                       rngs=nnx.Rngs(0)), seed=24)
  tokens, labels = _rand(25, (B, S, F)), _rand(26, (3, 12))
  lengths = jnp.array([S, 2])

  def ref(h, tokens, labels):
    q = jnp.broadcast_to(labels @ h.label_proj.kernel[...] + h.label_proj.bias[...], (B, 3, 8))
    z = _ref_cross(h.attn, q, tokens, _allowed(B, 3, S, jnp.arange(S)[None] < lengths[:, None]))
    mu, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
    zn = (z - mu) / jnp.sqrt(var + 1e-6) * h.norm.scale[...] + h.norm.bias[...]
    return (zn @ h.classifier.kernel[...] + h.classifier.bias[...])[..., 0]

  logits = _check_fwd_grad(head, lambda h, t, l: h(t, l, kv_lengths=lengths), ref, (tokens, labels))
  assert logits.shape == (B, 3)
  cos = LabelAttentionHead(2, F, score="cosine", implementation="xla", rngs=nnx.Rngs(1))
  out, probs = cos(tokens, _rand(27, (B, 4, F)), return_probs=True)
  assert out.shape == (B, 4) and probs.shape == (B, 2, 4, S)
  assert bool(jnp.all(jnp.abs(out) <= 1.0 / 0.1 + 1e-4))
  with pytest.raises(ValueError, match="labels has feature dimension 5, expected 16"):
    cos(tokens, _rand(0, (3, 5)))


# ------------------------------------------------------------------------------------------------------- LXMERT
def _ln(x, p):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + 1e-6) * p.scale[...] + p.bias[...]


def _ref_sub(sub, x, c, kv_valid):
  return _ln(_ref_cross(sub.attn, x, c, None if kv_valid is None else
                        _allowed(x.shape[0], x.shape[1], c.shape[1], kv_valid)), sub.norm)


def _ref_enc(layer, x, valid):
  x = _ref_sub(layer.self_attn, x, x, valid)
  f = layer.ffn
  return _ln(x + jax.nn.gelu(x @ f.up.kernel[...] + f.up.bias[...]) @ f.down.kernel[...] + f.down.bias[...],
             layer.ffn_norm)


@pytest.mark.slow  # compiles forward + gradient graphs: several CPU-s (fast suite budget)
@pytest.mark.parametrize("share", [True, False])
def test_co_attention_layer_matches_reference(share):
  """LXMERT: both directions from the inputs through one shared (or two) CrossAtt sublayers, then SA and FFN."""
  layer = _randomize(CoAttentionLayer(F, 4, num_kv_heads=2, ffn_features=24, share_cross=share,
                                      implementation="reference", rngs=nnx.Rngs(0)), seed=28, scale=0.2)
  n_shared = len(jax.tree_util.tree_leaves(nnx.state(layer, nnx.Param)))
  lang, vis = _rand(29, (B, T, F)), _rand(30, (B, 6, F))
  l_len, v_len = jnp.array([T, 3]), jnp.array([6, 4])
  lv, vv = jnp.arange(T)[None] < l_len[:, None], jnp.arange(6)[None] < v_len[:, None]

  def ref(m, lang, vis):
    cv = m.cross_l if share else m.cross_v
    l1, v1 = _ref_sub(m.cross_l, lang, vis, vv), _ref_sub(cv, vis, lang, lv)
    return jnp.concatenate([_ref_enc(m.lang, l1, lv), _ref_enc(m.vis, v1, vv)], axis=1)

  run = lambda m, lang, vis: jnp.concatenate(m(lang, vis, lang_lengths=l_len, vis_lengths=v_len), axis=1)
  _check_fwd_grad(layer, run, ref, (lang, vis))
  lo, vo, probs = layer(lang, vis, lang_lengths=l_len, vis_lengths=v_len, return_probs=True)
  assert probs["l2v"].shape == (B, 4, T, 6) and probs["v2l"].shape == (B, 4, 6, T)
  np.testing.assert_array_equal(probs["l2v"][1, :, :, 4:], 0.0)
  if share:
    assert layer.cross_v is None
  else:
    assert n_shared > 0 and layer.cross_v is not None


@pytest.mark.slow  # compiles forward + gradient graphs: several CPU-s (fast suite budget)
def test_lxmert_encoder_padding_invariance():
  enc = LXMERTEncoder(F, 2, num_language_layers=1, num_object_layers=1, num_cross_layers=2,
                      implementation="reference", rngs=nnx.Rngs(0))
  lang, vis = _rand(31, (B, T, F)), _rand(32, (B, 6, F))
  v_len = jnp.array([6, 3])
  lo, vo, pooled = enc(lang, vis, vis_lengths=v_len)
  assert lo.shape == (B, T, F) and vo.shape == (B, 6, F) and pooled.shape == (B, F)
  vis2 = vis.at[1, 3:].set(50.0)  # padded objects change, valid outputs must not
  lo2, vo2, _ = enc(lang, vis2, vis_lengths=v_len)
  testing.assert_close(lo2, lo)
  testing.assert_close(vo2[1, :3], vo[1, :3])
  testing.assert_no_nan((lo, vo, pooled))
  with pytest.raises(ValueError, match="vis has batch dimension 1"):
    enc(lang, vis[:1])


# ----------------------------------------------------------------------------------------------- SideMemoryBlock
@pytest.mark.slow  # compiles forward + gradient graphs: several CPU-s (fast suite budget)
def test_side_memory_block_v2v_frames_and_t2v():
  """CrossLMM: pooled tokens (id 0) read their own frame's memory, text (id 1) all of it; others unchanged."""
  blk = SideMemoryBlock(F, 2, memory_features=12, implementation="reference", rngs=nnx.Rngs(0))
  L, M = 6, 8
  h, mem = _rand(33, (B, L, F)), _rand(34, (B, M, 12))
  qid = jnp.array([[0, 0, 1, 1, 1, 2], [0, 0, 1, 1, 2, 2]])
  qf = jnp.array([[0, 1, 0, 0, 0, 0]] * B)
  mf = jnp.array([[0, 0, 0, 0, 1, 1, 1, 1]] * B)
  m_len = jnp.array([M, 6])
  np.testing.assert_array_equal(blk(h, mem, qid, query_frames=qf, memory_frames=mf), h)  # gates start at 0
  blk = _randomize(blk, seed=35)
  mv = jnp.arange(M)[None] < m_len[:, None]

  def ref(b, h, mem):
    v = _ref_cross(b.v2v, h, mem, _allowed(B, L, M, mv, q_ids=qf, kv_ids=mf))
    t = _ref_cross(b.t2v, h, mem, _allowed(B, L, M, mv))
    return jnp.where((qid == 0)[..., None], v, jnp.where((qid == 1)[..., None], t, h))

  run = lambda b, h, mem: b(h, mem, qid, memory_lengths=m_len, query_frames=qf, memory_frames=mf)
  y = _check_fwd_grad(blk, run, ref, (h, mem))
  np.testing.assert_array_equal(y[qid == 2], h[qid == 2])
  _, probs = blk(h, mem, qid, memory_lengths=m_len, query_frames=qf, memory_frames=mf, return_probs=True)
  np.testing.assert_array_equal(probs["v2v"][:, :, 0, 4:], 0.0)  # frame 0 token never reads frame 1
  only = SideMemoryBlock(F, 2, branches=("v2v",), rngs=nnx.Rngs(0))
  assert only.t2v is None
  with pytest.raises(ValueError, match=r"query_ids must have shape \(2, 6\)"):
    blk(h, mem, qid[:, :5])


# ---------------------------------------------------------------------------------------------- LoRRASideLearner
@pytest.mark.slow  # compiles forward + gradient graphs: several CPU-s (fast suite budget)
def test_lorra_side_learner_router_and_reference():
  L, Nv = 6, 4
  wings = LoRRASideLearner(F, 2, rank=3, max_length=10, implementation="reference", rngs=nnx.Rngs(0))
  h, vis, txt = _rand(36, (B, L, F)), _rand(37, (B, Nv, F)), _rand(38, (B, L, F))
  probs = jax.nn.softmax(_rand(39, (B, 3, L, L)), axis=-1)
  text_mask = jnp.array([[True] * 2 + [False] * 2 + [True] * 2] * B)
  np.testing.assert_array_equal(wings(h, vis, txt, probs, text_mask=text_mask), h)  # zero-init B: identity
  wings = _randomize(wings, seed=40)
  v_len = jnp.array([Nv, 2])

  def ref(w, h, vis, txt):
    r = jax.nn.softmax(jax.nn.silu(probs.sum(1) @ w.router.kernel[...][:L] + w.router.bias[...]), -1)
    ov = _ref_cross(w.visual, h, vis, _allowed(B, L, Nv, jnp.arange(Nv)[None] < v_len[:, None]))
    ot = _ref_cross(w.textual, h, txt, _allowed(B, L, L, text_mask, static=masks.Causal()))
    return h + r[..., :1] * ov + r[..., 1:] * ot

  _check_fwd_grad(wings, lambda w, h, vis, txt: w(h, vis, txt, probs, text_mask=text_mask, visual_lengths=v_len),
                  ref, (h, vis, txt))
  _, r = wings(h, vis, txt, probs, text_mask=text_mask, return_router=True)
  np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="L=12 exceeds the router's max_length=10"):
    wings.route(jnp.ones((B, 1, 12, 12)))


# ------------------------------------------------------------------------------------------- ObjectPointerHead
@pytest.mark.slow  # compiles forward + gradient graphs: several CPU-s (fast suite budget)
def test_object_pointer_head():
  head = _randomize(ObjectPointerHead(3, F, 12, head_dim=4, rngs=nnx.Rngs(0)), seed=41)
  d, objs = _rand(42, (B, T, F)), _rand(43, (B, 5, 12))
  lengths = jnp.array([5, 2])

  def ref(p, d, objs):
    qd = jnp.einsum("btf,fgd->btgd", d, p.w_d.kernel[...], precision=HI)
    ke = jnp.einsum("bnf,fgd->bngd", objs, p.w_e.kernel[...], precision=HI)
    per_head = [jnp.einsum("btd,bnd->btn", qd[:, :, g], ke[:, :, g], precision=HI) / 2.0 for g in range(3)]
    per_head = [jnp.concatenate([l, jnp.zeros((B, T, 1))], -1) for l in per_head]
    out = sum(l * p.mix.kernel[...][g, 0] for g, l in enumerate(per_head)) + p.mix.bias[...][0]
    valid = jnp.concatenate([jnp.arange(5)[None] < lengths[:, None], jnp.ones((B, 1), bool)], 1)
    return jnp.where(valid[:, None], out, -1e9)

  logits = _check_fwd_grad(head, lambda p, d, o: p(d, o, object_lengths=lengths), ref, (d, objs))
  assert logits.shape == (B, T, 6)
  p = jax.nn.softmax(logits, -1)
  testing.assert_no_nan(p)
  np.testing.assert_array_equal(p[1, :, 2:5], 0.0)
  no_stop = ObjectPointerHead(2, F, stop_logit=False, rngs=nnx.Rngs(0))
  assert no_stop(d, _rand(44, (B, 5, F))).shape == (B, T, 5)
  with pytest.raises(ValueError, match="objects has feature dimension 16, expected 12"):
    head(d, _rand(0, (B, 5, F)))


def test_l2_normalize_zero_safe():
  z = jnp.zeros((2, 3))
  testing.assert_no_nan((l2_normalize(z), jax.grad(lambda a: l2_normalize(a).sum())(z)))
