"""Aggregation, rollout, concentration, sinks, agreement and position profiles against numpy loops."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from jaxattn import analysis


def _softmax_rows(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


RNG = np.random.default_rng(0)
ATTN = _softmax_rows(RNG.normal(size=(3, 2, 4, 6, 6)) * 2).astype(np.float32)  # [L, B, H, T, T]


def test_rollout_matches_numpy_loop():
  got = np.asarray(analysis.rollout(ATTN, residual=0.5))
  L, B = ATTN.shape[:2]
  for b in range(B):
    acc = None
    for layer in range(L):
      a = 0.5 * ATTN[layer, b].mean(0).astype(np.float64) + 0.5 * np.eye(6)
      a /= a.sum(-1, keepdims=True)
      acc = a if acc is None else a @ acc
    np.testing.assert_allclose(got[b], acc, atol=1e-5)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
  every = np.asarray(analysis.rollout(ATTN, heads=[1, 2], return_all=True))
  assert every.shape == (3, 2, 6, 6)
  first = 0.5 * ATTN[0][:, [1, 2]].mean(1) + 0.5 * np.eye(6)
  np.testing.assert_allclose(every[0], first / first.sum(-1, keepdims=True), atol=1e-6)


def test_aggregate():
  np.testing.assert_allclose(analysis.aggregate(ATTN), ATTN.mean((0, 2)), atol=1e-6)
  np.testing.assert_allclose(analysis.aggregate(ATTN, layers=[-1], heads=[0, 3], how="max"),
                             ATTN[2][:, [0, 3]].max(1), atol=0)
  np.testing.assert_allclose(analysis.aggregate(ATTN, over="heads"), ATTN.mean(2), atol=1e-6)
  with pytest.raises(ValueError, match="head 4 does not exist"):
    analysis.aggregate(ATTN, heads=[4])
  with pytest.raises(ValueError, match="'median'"):
    analysis.aggregate(ATTN, how="median")


def test_concentration_and_sinks():
  p = ATTN[0, 0]
  want_h = -(p * np.log(p)).sum(-1)
  np.testing.assert_allclose(analysis.entropy(p), want_h, rtol=1e-5)
  np.testing.assert_allclose(analysis.entropy(np.full((3, 8), 1 / 8), normalize=True), 1.0, rtol=1e-6)
  np.testing.assert_allclose(analysis.top_k_mass(p, 2), np.sort(p, -1)[..., -2:].sum(-1), rtol=1e-6)
  counts = np.asarray(analysis.mass_count(p, 0.9))
  srt = np.sort(p, -1)[..., ::-1].cumsum(-1)
  np.testing.assert_array_equal(counts, (srt < 0.9 * (1 - 1e-6)).sum(-1) + 1)
  g = np.asarray(analysis.gini(np.array([[0.25] * 4, [1.0, 0, 0, 0]])))
  np.testing.assert_allclose(g, [0.0, 0.75], atol=1e-6)
  causal = np.tril(np.ones((5, 5)))
  probs = causal / causal.sum(-1, keepdims=True)  # uniform causal rows: mass on key 0 is 1 / (i + 1)
  np.testing.assert_allclose(analysis.sink_scores(probs), np.mean(1 / np.arange(1, 6)), rtol=1e-6)
  np.testing.assert_allclose(analysis.column_scores(probs.sum(0), causal.sum(0)),
                             probs.sum(0) / causal.sum(0), rtol=1e-6)


def test_pearson_spearman_match_scipy():
  x = RNG.normal(size=(4, 30))
  y = x + RNG.normal(size=(4, 30))
  y[0, :10] = y[0, 0]  # ties
  x[1, 5:9] = 1.0
  for i in range(4):
    np.testing.assert_allclose(analysis.pearson(x[i], y[i]), scipy.stats.pearsonr(x[i], y[i])[0], atol=1e-5)
    np.testing.assert_allclose(analysis.spearman(x, y)[i], scipy.stats.spearmanr(x[i], y[i])[0], atol=1e-5)
  np.testing.assert_allclose(analysis.pearson(x, y, axis=None), np.corrcoef(x.ravel(), y.ravel())[0, 1], atol=1e-5)
  assert float(analysis.pearson(np.ones(5), np.arange(5.0))) == 0.0


def test_position_profile_and_distance_profile():
  vals = np.array([[1, 0, 0, 0, 0, 1, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 9, 9, 9, 9]], float)
  lengths = np.array([6, 4, 8])
  prof, counts = analysis.position_profile(vals, lengths, n_bins=2, length_buckets=[0, 5, 10])
  np.testing.assert_array_equal(counts, [1, 2])
  np.testing.assert_allclose(prof[0], [0.0, 1.0])  # length 4: all mass in positions 2, 3 (second half)
  np.testing.assert_allclose(prof[1], [(0.5 + 0.1) / 2, (0.5 + 0.9) / 2])
  with pytest.raises(ValueError, match="lengths"):
    analysis.position_profile(vals, [9, 1, 1])
  p = np.tril(np.ones((4, 4)))
  p /= p.sum(-1, keepdims=True)
  d = np.asarray(analysis.distance_profile(p, 2))  # bins for d = -2..2
  want = np.zeros(5)
  for i in range(4):
    for j in range(4):
      want[np.clip(i - j, -2, 2) + 2] += p[i, j] / 4
  np.testing.assert_allclose(d, want, atol=1e-6)
