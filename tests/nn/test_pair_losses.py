"""Tests for ``jaxattn.nn.pair_losses``: each loss against a plain per-example loop reference (values, and gradients
by autodiff of the loop), hard-negative mixing properties, and ValueErrors on bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import testing
from jaxattn.nn import pair_losses as L


def _rand(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _cos(a, b):
  return jnp.dot(a, b) / (jnp.sqrt(jnp.maximum(jnp.dot(a, a), 1e-12)) * jnp.sqrt(jnp.maximum(jnp.dot(b, b), 1e-12)))


# ------------------------------------------------------------------------------------------ loop references
def _ref_info_nce(q, p, hn, en, tau, in_batch, share, gamma):
  B = q.shape[0]
  total = 0.0
  for i in range(B):
    pos = jnp.exp(_cos(q[i], p[i]) / tau)
    z = pos
    if in_batch:
      for j in range(B):
        if j != i:
          z = z + jnp.exp(_cos(q[i], p[j]) / tau)
    if hn is not None:
      for j in (range(B) if share else [i]):
        for k in range(hn.shape[1]):
          z = z + jnp.exp(_cos(q[i], hn[j, k]) / tau)
    if en is not None:
      for k in range(en.shape[1]):
        z = z + jnp.exp(_cos(q[i], jax.lax.stop_gradient(en[i, k])) / tau)
    pi = pos / z
    total = total + (1 - pi) ** gamma * -jnp.log(pi)
  return total / B


CASES = [  # the shared-hard-negative loop is the slowest (~8 CPU-s): slow marker
    pytest.param(dict(hn=True, en=False, in_batch=True, share=True, gamma=0.0, tau=0.5), marks=pytest.mark.slow),
    dict(hn=True, en=False, in_batch=False, share=False, gamma=2.0, tau=0.3),
    dict(hn=True, en=True, in_batch=True, share=False, gamma=1.0, tau=0.2),
]


def _case_id(c):
  return "-".join(f"{k}{v}" for k, v in c.items()) if isinstance(c, dict) else None


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_info_nce_matches_loop(case):
  B, M, K, D = 3, 2, 2, 4
  q, p = _rand(0, (B, D)), _rand(1, (B, D))
  hn = _rand(2, (B, M, D)) if case["hn"] else None
  en = _rand(3, (B, K, D)) if case["en"] else None
  kw = dict(temperature=case["tau"], in_batch=case["in_batch"], share_hard_negatives=case["share"])

  def ours(q, p, hn):
    return L.info_nce(q, p, hn, extra_negatives=en, focal_gamma=case["gamma"], **kw)

  def ref(q, p, hn):
    return _ref_info_nce(q, p, hn, en, case["tau"], case["in_batch"], case["share"], case["gamma"])

  with jax.default_matmul_precision("highest"):
    testing.assert_close(ours(q, p, hn), ref(q, p, hn), name="info_nce")
    argnums = (0, 1, 2) if hn is not None else (0, 1)
    g, gr = jax.grad(ours, argnums)(q, p, hn), jax.grad(ref, argnums)(q, p, hn)
  for a, b in zip(g, gr):
    testing.assert_close(a, b, kind="grad", name="info_nce grad")
  if en is not None:  # extra negatives never receive gradient
    ge = jax.grad(lambda e: L.info_nce(q, p, extra_negatives=e, **kw))(en)
    assert float(jnp.abs(ge).max()) == 0.0


def test_info_nce_probs_and_focal_bounds():
  q, p = _rand(4, (6, 5)), _rand(5, (6, 5))
  pr = L.info_nce_probs(q, p, temperature=0.2)
  assert pr.shape == (6,) and bool(jnp.all((pr > 0) & (pr < 1)))
  plain = L.info_nce(q, p, temperature=0.2)
  np.testing.assert_allclose(plain, -np.mean(np.log(pr)), rtol=1e-5)
  assert float(L.info_nce(q, p, temperature=0.2, focal_gamma=2.0)) < float(plain)  # (1-p)^g < 1 downweights


def test_info_nce_zero_vectors_finite():
  q = jnp.zeros((3, 4)).at[0].set(1.0)
  p = jnp.zeros((3, 4))
  val, g = jax.value_and_grad(lambda q: L.info_nce(q, p, temperature=0.1))(q)
  assert math.isfinite(float(val)) and bool(jnp.all(jnp.isfinite(g)))


def _ref_mix(q, negs, ia, ib, alpha):
  out = np.zeros(ia.shape + (q.shape[1],))
  nn = negs / np.linalg.norm(negs, axis=-1, keepdims=True)
  for i in range(ia.shape[0]):
    for r in range(ia.shape[1]):
      v = alpha[i, r] * nn[i, ia[i, r]] + (1 - alpha[i, r]) * nn[i, ib[i, r]]
      out[i, r] = v / np.linalg.norm(v)
  return out


def test_mix_hard_negatives_properties():
  B, M, D = 3, 6, 8
  q, negs = _rand(6, (B, D)), _rand(7, (B, M, D))
  key = jax.random.key(0)
  mixed = L.mix_hard_negatives(key, q, negs, num=5, top_k=2)
  assert mixed.shape == (B, 5, D)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(mixed), axis=-1), 1.0, rtol=1e-5)
  # every synthetic negative is normalize(alpha n_a + (1 - alpha) n_b) of two of the query's top-2 negatives
  qn = np.asarray(q) / np.linalg.norm(np.asarray(q), axis=-1, keepdims=True)
  nn = np.asarray(negs) / np.linalg.norm(np.asarray(negs), axis=-1, keepdims=True)
  top = np.argsort(-np.einsum("bd,bmd->bm", qn, nn), axis=1)[:, :2]
  for i in range(B):
    basis = nn[i, top[i]].T  # [D, 2]
    coef, *_ = np.linalg.lstsq(basis, np.asarray(mixed[i]).T, rcond=None)
    np.testing.assert_allclose(basis @ coef, np.asarray(mixed[i]).T, atol=1e-5)
    assert (coef >= -1e-5).all()  # a convex combination (before normalising)
    # the same formula, recomputed in numpy from the recovered mixing weights
    a = coef[0] / coef.sum(0)
    ref = _ref_mix(np.asarray(q)[i:i + 1], np.asarray(negs)[i:i + 1], np.full((1, 5), top[i, 0]),
                   np.full((1, 5), top[i, 1]), a[None])
    np.testing.assert_allclose(ref[0], np.asarray(mixed[i]), atol=1e-5)
  g = jax.grad(lambda n: jnp.sum(L.mix_hard_negatives(key, q, n, num=2)))(negs)
  assert float(jnp.abs(g).max()) == 0.0  # stop_gradient


def _ref_dse(s, t, y, alpha):
  B = s.shape[0]
  l2 = 0.0
  ce = 0.0
  for b in range(B):
    for c in range(s.shape[1]):
      l2 = l2 + (s[b, c] - jax.lax.stop_gradient(t[b, c])) ** 2
    ce = ce - (s[b, y[b]] - jnp.log(jnp.sum(jnp.exp(s[b]))))
  return (1 - alpha) * ce / B + alpha * l2 / B


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_logit_l2_distill(alpha):
  s, t = _rand(8, (5, 3)), _rand(9, (5, 3))
  y = jnp.array([0, 2, 1, 1, 0])
  testing.assert_close(L.logit_l2_distill(s, t, y, alpha=alpha), _ref_dse(s, t, y, alpha))
  gs, gt = jax.grad(lambda s, t: L.logit_l2_distill(s, t, y, alpha=alpha), (0, 1))(s, t)
  testing.assert_close(gs, jax.grad(_ref_dse)(s, t, y, alpha), kind="grad")
  assert float(jnp.abs(gt).max()) == 0.0


def _ref_orth(views):
  n = 0.0
  lead = views.reshape(-1, *views.shape[-2:])
  for e in lead:
    m = e.shape[0]
    en = [e[k] / jnp.sqrt(jnp.dot(e[k], e[k])) for k in range(m)]
    for a in range(m):
      for b in range(m):
        n = n + (jnp.dot(en[a], en[b]) - (1.0 if a == b else 0.0)) ** 2
  return n / lead.shape[0]


def test_orthogonality_loss():
  v = _rand(10, (2, 2, 3, 4))
  with jax.default_matmul_precision("highest"):
    testing.assert_close(L.orthogonality_loss(v), _ref_orth(v))
    testing.assert_close(jax.grad(L.orthogonality_loss)(v), jax.grad(_ref_orth)(v), kind="grad")
  ortho = jnp.eye(4)[None, None]  # orthonormal views: zero loss
  assert float(L.orthogonality_loss(ortho)) < 1e-10
  valid = jnp.array([[True, False], [True, True]])
  sel = L.orthogonality_loss(v, valid)
  testing.assert_close(sel, _ref_orth(v[np.asarray(valid)]))


def test_trans_encoder_losses():
  s, t = _rand(11, (4, 3)), _rand(12, (4, 3))
  ref_kl = 0.0
  for b in range(4):
    ps, pt = jax.nn.softmax(s[b] / 2.0), jax.nn.softmax(t[b] / 2.0)
    ref_kl = ref_kl + jnp.sum(pt * (jnp.log(pt) - jnp.log(ps)))
  testing.assert_close(L.kl_distill(s, t, temperature=2.0), 4.0 * ref_kl / 4)
  testing.assert_close(jax.grad(lambda s: L.kl_distill(s, t, temperature=2.0))(s),
                       jax.grad(lambda s: 4.0 * sum(jnp.sum(jax.nn.softmax(t[b] / 2) * (
                           jnp.log(jax.nn.softmax(t[b] / 2)) - jax.nn.log_softmax(s[b] / 2))) for b in range(4)) / 4)(s),
                       kind="grad")
  testing.assert_close(L.mse_distill(s, t), np.mean((np.asarray(s) - np.asarray(t)) ** 2))
  x, y = _rand(13, (6,)), jnp.asarray(np.random.default_rng(14).uniform(size=6), jnp.float32)

  def ref_bce(x):
    return sum(-(y[i] * jnp.log(jax.nn.sigmoid(x[i])) + (1 - y[i]) * jnp.log(1 - jax.nn.sigmoid(x[i])))
               for i in range(6)) / 6
  testing.assert_close(L.bce_distill(x, y), ref_bce(x))
  testing.assert_close(jax.grad(lambda x: L.bce_distill(x, y))(x), jax.grad(ref_bce)(x), kind="grad")
  u, v = _rand(15, (6, 5)), _rand(16, (6, 5))

  def ref_cm(u):
    return sum((_cos(u[i], v[i]) - y[i]) ** 2 for i in range(6)) / 6
  with jax.default_matmul_precision("highest"):
    testing.assert_close(L.cosine_mse(u, v, y), ref_cm(u))
    testing.assert_close(jax.grad(lambda u: L.cosine_mse(u, v, y))(u), jax.grad(ref_cm)(u), kind="grad")


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs():
  q, p = _rand(0, (4, 8)), _rand(1, (4, 8))
  with pytest.raises(ValueError, match="batch sizes differ: 4 queries but 3"):
    L.info_nce(q, p[:3])
  with pytest.raises(ValueError, match=r"hard_negatives must have shape \[B=4, M, D=8\].*\(4, 8\)"):
    L.info_nce(q, p, _rand(2, (4, 8)))
  with pytest.raises(ValueError, match=r"hard_negatives.*\(3, 2, 8\)"):
    L.info_nce(q, p, _rand(2, (3, 2, 8)))
  for bad in (0.0, -0.1, float("nan")):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
      L.info_nce(q, p, temperature=bad)
  with pytest.raises(ValueError, match="focal_gamma"):
    L.info_nce(q, p, focal_gamma=-1.0)
  with pytest.raises(ValueError, match="features"):
    L.info_nce(q, _rand(1, (4, 7)))
  with pytest.raises(ValueError, match="same shape"):
    L.logit_l2_distill(_rand(0, (4, 2)), _rand(1, (3, 2)))
  with pytest.raises(ValueError, match="labels are required"):
    L.logit_l2_distill(_rand(0, (4, 2)), _rand(1, (4, 2)), alpha=0.5)
  with pytest.raises(ValueError, match="alpha must lie"):
    L.logit_l2_distill(_rand(0, (4, 2)), _rand(1, (4, 2)), alpha=1.5)
  with pytest.raises(ValueError, match="temperature"):
    L.kl_distill(_rand(0, (4, 2)), _rand(1, (4, 2)), temperature=0)
  with pytest.raises(ValueError, match="labels must have shape"):
    L.cosine_mse(q, p, jnp.ones(3))
  with pytest.raises(ValueError, match="num must be a positive int"):
    L.mix_hard_negatives(jax.random.key(0), q, _rand(2, (4, 3, 8)), num=0)


def test_jit_and_optax_ready():
  import optax
  q, p, hn = _rand(0, (4, 8)), _rand(1, (4, 8)), _rand(2, (4, 2, 8))
  f = jax.jit(lambda q: L.info_nce(q, p, hn, temperature=0.1, focal_gamma=1.0))
  tx = optax.sgd(0.5)
  st = tx.init(q)
  l0 = float(f(q))
  for _ in range(5):
    upd, st = tx.update(jax.grad(f)(q), st)
    q = optax.apply_updates(q, upd)
  assert float(f(q)) < l0
