"""Tests for ``jaxattn.nn.pair``: pooling and scoring functions against numpy / loop references (values and
gradients, fully padded rows finite), the backbone's mask switch and padding on the reference and xla backends,
the three PairEncoder modes (bi, cross, fid with view tokens) and ValueErrors on bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import testing
from jaxattn.nn import pair
from jaxattn.nn import pair_losses
from jaxattn.nn.pair import PairEncoder, TextBackbone


def _rand(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _valid(lengths, T):
  return jnp.asarray(np.arange(T)[None] < np.asarray(lengths)[:, None])


LENGTHS = [5, 1, 0, 3]  # row 2 fully padded


# ----------------------------------------------------------------------------------------------- pooling
def _ref_pool(h, lengths, kind, w=None):
  out = []
  for b, n in enumerate(lengths):
    if n == 0:
      out.append(jnp.zeros(h.shape[-1]))
    elif kind == "mean":
      out.append(sum(h[b, t] for t in range(n)) / n)
    elif kind == "cls":
      out.append(h[b, 0])
    elif kind == "last":
      out.append(h[b, n - 1])
    else:
      s = jnp.stack([jnp.dot(h[b, t], w) for t in range(n)])
      p = jnp.exp(s - s.max()) / jnp.sum(jnp.exp(s - s.max()))
      out.append(sum(p[t] * h[b, t] for t in range(n)))
  return jnp.stack(out)


@pytest.mark.parametrize("kind", pair.POOLINGS)
def test_pooling_matches_loop_reference(kind):
  h, w = _rand(0, (4, 5, 6)), _rand(1, (6,))
  valid = _valid(LENGTHS, 5)
  ours = lambda h, w: pair.pool(h, valid, kind, w)
  ref = lambda h, w: _ref_pool(h, LENGTHS, kind, w)
  with jax.default_matmul_precision("highest"):
    testing.assert_close(ours(h, w), ref(h, w), name=f"{kind} pool")
    ct = _rand(2, (4, 6))
    g = jax.grad(lambda h, w: jnp.sum(ours(h, w) * ct), (0, 1))(h, w)
    gr = jax.grad(lambda h, w: jnp.sum(ref(h, w) * ct), (0, 1))(h, w)
  for a, b in zip(g, gr):
    testing.assert_close(a, b, kind="grad", name=f"{kind} pool grad")
  out = ours(h, w)
  assert bool(jnp.all(out[2] == 0)) and bool(jnp.all(jnp.isfinite(g[0])))  # fully padded row: zeros, finite


def test_cosine_and_dse_features():
  u, v = _rand(3, (5, 4)), _rand(4, (5, 4))
  un, vn = np.asarray(u), np.asarray(v)
  ref = (un * vn).sum(1) / np.linalg.norm(un, axis=1) / np.linalg.norm(vn, axis=1)
  testing.assert_close(pair.cosine(u, v), ref)
  assert float(pair.cosine(jnp.zeros((1, 4)), v[:1])[0]) == 0.0  # zero vector: 0, not NaN
  f = np.asarray(pair.dse_features(u, v))
  np.testing.assert_array_equal(f, np.concatenate([un, vn, un * vn, np.abs(un - vn)], 1))
  sw = np.asarray(pair.dse_features(v, u))
  np.testing.assert_array_equal(f[:, 8:], sw[:, 8:])  # u*v and |u-v| symmetric


def test_pack_pairs_matches_loop():
  a = jnp.array([[5, 6, 7], [8, 0, 0], [9, 9, 0]])
  b = jnp.array([[10, 11], [12, 13], [14, 0]])
  la, lb = jnp.array([3, 1, 2]), jnp.array([2, 2, 1])
  tok, lengths, types = pair.pack_pairs(a, la, b, lb)
  for i in range(3):
    seq = [1] + list(np.asarray(a[i, :la[i]])) + [2] + list(np.asarray(b[i, :lb[i]])) + [2]
    typ = [0] * (int(la[i]) + 2) + [1] * (int(lb[i]) + 1)
    n = len(seq)
    assert int(lengths[i]) == n
    np.testing.assert_array_equal(np.asarray(tok[i, :n]), seq)
    assert (np.asarray(tok[i, n:]) == 0).all()
    np.testing.assert_array_equal(np.asarray(types[i, :n]), typ)
    assert (np.asarray(types[i, n:]) == 0).all()


# ---------------------------------------------------------------------------------------------- backbone
def _backbone(impl=None, seed=0, layers=1, **kw):
  return TextBackbone(30, 16, features=16, num_heads=2, num_layers=layers, implementation=impl, rngs=nnx.Rngs(seed),
                      **kw)


# causal=True is slow on 2 shared cores (~10 CPU-s); the mask switch itself is covered by test_mask_switch_and_padding
@pytest.mark.parametrize("causal", [pytest.param(True, marks=pytest.mark.slow), False])
def test_backbone_xla_matches_reference_backend(causal):
  tok = jnp.asarray(np.random.default_rng(0).integers(3, 30, (3, 7)))
  valid = _valid([7, 4, 0], 7)
  ref_m, xla_m = _backbone("reference", layers=2), _backbone("xla", layers=2)
  f = lambda m, x: m.encode(x, valid, causal=causal)
  x = ref_m.embed(tok)
  testing.assert_close(f(xla_m, x), f(ref_m, x))
  ct = _rand(5, (3, 7, 16))
  gx = jax.grad(lambda x: jnp.sum(f(xla_m, x) * ct))(x)
  gr = jax.grad(lambda x: jnp.sum(f(ref_m, x) * ct))(x)
  testing.assert_close(gx, gr, kind="grad")
  assert bool(jnp.all(jnp.isfinite(f(xla_m, x)))) and bool(jnp.all(jnp.isfinite(gx)))


def test_mask_switch_and_padding():
  m = _backbone()
  rng = np.random.default_rng(1)
  tok = jnp.asarray(rng.integers(3, 30, (2, 8)))
  tok2 = tok.at[:, 5:].set(jnp.asarray(rng.integers(3, 30, (2, 3))))  # later tokens changed
  valid = jnp.ones((2, 8), bool)
  c1, c2 = m(tok, valid, causal=True), m(tok2, valid, causal=True)
  testing.assert_close(c1[:, :5], c2[:, :5])  # causal: a prefix never sees the future
  b1, b2 = m(tok, valid, causal=False), m(tok2, valid, causal=False)
  assert float(jnp.abs(b1[:, :5] - b2[:, :5]).max()) > 1e-3  # bidirectional: it does
  assert m.causal is False and float(jnp.abs(m(tok, valid) - b1).max()) == 0.0  # default from construction
  short = _valid([5, 5], 8)
  p1, p2 = m(tok, short, causal=False), m(tok2, short, causal=False)  # changing padded tokens changes nothing
  testing.assert_close(p1[:, :5], p2[:, :5])


# ------------------------------------------------------------------------------------------ PairEncoder
def test_bi_mode_embed_score_and_dse_head():
  bb = _backbone()
  enc = PairEncoder(bb, mode="bi", pooling="mean", rngs=nnx.Rngs(1))
  a = jnp.array([[5, 6, 7, 0], [8, 9, 0, 0]])
  la = jnp.array([3, 2])
  b = jnp.array([[9, 9, 4, 3], [5, 0, 0, 0]])
  lb = jnp.array([4, 1])
  u = enc.embed(a, la)
  testing.assert_close(u, pair.mean_pool(bb(a, _valid([3, 2], 4)), _valid([3, 2], 4)))
  np.testing.assert_allclose(enc.score(a, la, a, la), 1.0, rtol=1e-5)
  testing.assert_close(enc.score(a, la, b, lb), enc.score(b, lb, a, la))
  dse = PairEncoder(bb, mode="bi", head="dse", num_outputs=3, dse_hidden=8, rngs=nnx.Rngs(2))
  u, v = dse.embed(a, la), dse.embed(b, lb)
  z = np.asarray(pair.dse_features(u, v))
  h = np.maximum(z @ np.asarray(dse.dse.fc1.kernel[...]) + np.asarray(dse.dse.fc1.bias[...]), 0)
  ref = h @ np.asarray(dse.dse.fc2.kernel[...]) + np.asarray(dse.dse.fc2.bias[...])
  testing.assert_close(dse.score(a, la, b, lb), ref, name="dse logits")


def test_cross_mode_is_head_of_joint_sequence():
  bb = _backbone()
  enc = PairEncoder(bb, mode="cross", pooling="cls", num_outputs=2, rngs=nnx.Rngs(3))
  a, la = jnp.array([[5, 6, 7], [8, 9, 0]]), jnp.array([3, 2])
  b, lb = jnp.array([[4, 4], [3, 0]]), jnp.array([2, 1])
  tok, lengths, types = pair.pack_pairs(a, la, b, lb)
  valid = _valid(np.asarray(lengths), tok.shape[1])
  ref = enc.cross(bb(tok, valid, types=types)[:, 0])
  score = nnx.jit(lambda m, *x: m.score(*x))
  testing.assert_close(score(enc, a, la, b, lb), ref)
  assert float(jnp.abs(score(enc, a, la, b, lb) - score(enc, b, lb, a, la)).max()) > 1e-4  # order matters (joint)


def test_fid_mode_views_permutation_and_orthogonality():
  bb = _backbone()
  enc = PairEncoder(bb, mode="fid", num_view_tokens=2, rngs=nnx.Rngs(4))
  rerank = nnx.jit(lambda m, *a: m.rerank(*a))
  rng = np.random.default_rng(2)
  q, ql = jnp.asarray(rng.integers(3, 30, (2, 3))), jnp.array([3, 2])
  ps = jnp.asarray(rng.integers(3, 30, (2, 3, 4)))
  pl = jnp.array([[4, 2, 3], [1, 4, 4]])
  s, views = rerank(enc, q, ql, ps, pl)
  assert s.shape == (2, 3) and views.shape == (2, 3, 2, 16)
  perm = np.array([2, 0, 1])
  s2, v2 = rerank(enc, q, ql, ps[:, perm], pl[:, perm])
  testing.assert_close(s2, s[:, perm])  # candidate order cannot change a candidate's score
  testing.assert_close(v2, views[:, perm])
  # a candidate's view vectors depend on it and the query only (independent encoding, FiD)
  _, v3 = rerank(enc, q, ql, ps.at[:, 1].set(5), pl)
  testing.assert_close(v3[:, 0], views[:, 0])

  def loss(m):
    sc, vw = m.rerank(q, ql, ps, pl, jnp.array([[True, True, False], [True, True, True]]))
    return pair_losses.orthogonality_loss(vw) + jnp.sum(sc)
  val, g = nnx.jit(lambda m: nnx.value_and_grad(loss)(m))(enc)
  assert np.isfinite(float(val)) and all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))


def test_bad_inputs():
  bb = _backbone()
  enc = PairEncoder(bb, rngs=nnx.Rngs(0))
  a, la = jnp.array([[5, 6]]), jnp.array([2])
  with pytest.raises(ValueError, match="pair batch sizes differ"):
    enc.score(a, la, jnp.array([[5, 6], [7, 8]]), jnp.array([2, 2]))
  with pytest.raises(ValueError, match=r"lengths must lie in \[0, 2\]"):
    enc.embed(a, jnp.array([3]))
  with pytest.raises(ValueError, match="mode must be one of"):
    PairEncoder(bb, mode="late", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pooling must be one of"):
    PairEncoder(bb, pooling="max", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_view_tokens"):
    PairEncoder(bb, mode="fid", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="rerank"):
    enc.rerank(a, la, a[:, None], la[:, None])
  with pytest.raises(ValueError, match="exceeds the backbone's max_len 16"):
    bb(jnp.ones((1, 17), jnp.int32), jnp.ones((1, 17), bool))
  with pytest.raises(ValueError, match=r"valid must be bool of shape \(2, 3\)"):
    pair.mean_pool(jnp.ones((2, 3, 4)), jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match=r"attention pooling weight must have shape \(4,\)"):
    pair.attention_pool(jnp.ones((2, 3, 4)), jnp.ones((2, 3), bool), jnp.ones(5))
  with pytest.raises(ValueError, match="pair batch sizes differ: u has 2 rows, v has 3"):
    pair.cosine(jnp.ones((2, 4)), jnp.ones((3, 4)))
