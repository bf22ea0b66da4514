"""Saliency against finite differences; retrieval scores against the official loop; needle task; head search."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import analysis

W = jax.random.normal(jax.random.key(0), (5, 3))


def model(x):  # [B, T, E] -> [B]: a small nonlinear per-sample score (tokens interact)
  h = jnp.tanh(x @ W)  # [B, T, 3]
  return (h.sum(1) ** 2).sum(-1) + jnp.sin(x[:, 0, 0])


X = jax.random.normal(jax.random.key(1), (2, 4, 5))


def test_grad_x_input_matches_finite_differences():
  got = np.asarray(analysis.grad_x_input(model, X, reduce=None))
  x = np.asarray(X, np.float64)
  f = lambda x: float(np.asarray(model(jnp.asarray(x, jnp.float32))).sum())
  eps = 1e-2
  for idx in [(0, 0, 0), (0, 2, 3), (1, 3, 1)]:
    xp, xm = x.copy(), x.copy()
    xp[idx] += eps
    xm[idx] -= eps
    fd = (f(xp) - f(xm)) / (2 * eps)
    np.testing.assert_allclose(got[idx], fd * x[idx], rtol=2e-2, atol=2e-3)
  np.testing.assert_allclose(analysis.grad_x_input(model, X), got.sum(-1), rtol=1e-6)
  np.testing.assert_allclose(analysis.grad_x_input(model, X, reduce="l2"), np.sqrt((got ** 2).sum(-1)), rtol=1e-5)


def test_integrated_gradients_completeness_and_linear_case():
  base = 0.1 * jnp.ones_like(X)
  ig = analysis.integrated_gradients(model, X, baseline=base, steps=64)
  np.testing.assert_allclose(ig.sum(1), model(X) - model(base), rtol=2e-3, atol=2e-3)
  lin = lambda x: (x * W[:, 0]).sum((1, 2))
  np.testing.assert_allclose(analysis.integrated_gradients(lin, X, steps=1, method="midpoint"),
                             analysis.grad_x_input(lin, X), rtol=1e-6)
  with pytest.raises(ValueError, match="steps"):
    analysis.integrated_gradients(model, X, steps=0)


def official_loop(argmax, prompt, generated, s0, s1, valid, answer):
  """The detection loop, written as the official code: per step, per head, top-1 copy check; keep if recall > 0.5."""
  N, steps, L, H = argmax.shape
  history = [[[] for _ in range(H)] for _ in range(L)]
  for n in range(N):
    score = np.zeros((L, H))
    out = []
    for t in range(steps):
      if not valid[n, t]:
        break
      w = generated[n, t]
      out.append(w)
      for layer in range(L):
        for h in range(H):
          j = argmax[n, t, layer, h]
          if s0[n] <= j < s1[n] and prompt[n, j] == w:
            score[layer, h] += 1 / (s1[n] - s0[n])
    if analysis.rouge1_recall(answer[n], out) > 0.5:
      for layer in range(L):
        for h in range(H):
          history[layer][h].append(score[layer, h])
  return np.array([[np.mean(history[l][h]) if history[l][h] else 0.0 for h in range(H)] for l in range(L)])


def test_needle_task_and_retrieval_scores_match_official_loop():
  batch = analysis.needle_task(6, length=40, needle_len=5, vocab=50, seed=3)
  again = analysis.needle_task(6, length=40, needle_len=5, vocab=50, seed=3)
  np.testing.assert_array_equal(batch.tokens, again.tokens)
  for i in range(6):
    np.testing.assert_array_equal(batch.tokens[i, batch.needle_start[i]:batch.needle_end[i]], batch.answer[i])
    assert batch.tokens[i, batch.needle_start[i] - 1] == 1 and batch.tokens[i, -1] == 2
  rng = np.random.default_rng(0)
  N, steps, L, H = 6, 7, 3, 4
  generated = np.concatenate([batch.answer, rng.integers(4, 50, (N, 2))], 1)
  generated[4] = rng.integers(4, 50, steps)  # a failed response (dropped by the recall check)
  valid = np.ones((N, steps), bool)
  valid[:, 5:] = False  # the loop stopped after the needle
  argmax = rng.integers(0, 40, (N, steps, L, H))
  copy = batch.needle_start[:, None] + np.arange(steps)[None, :]  # the position of the token being copied
  argmax[:, :, 0, 1] = np.minimum(copy, 39)  # a perfect retrieval head
  argmax[:, :, 2, 0] = np.minimum(copy + 1, 39)  # attends the needle, but the next token (no copy)
  got = analysis.retrieval_scores(argmax, batch.tokens, generated, batch.needle_start, batch.needle_end,
                                  valid=valid, answer=batch.answer)
  want = official_loop(argmax, batch.tokens, generated, batch.needle_start, batch.needle_end, valid, batch.answer)
  np.testing.assert_allclose(got.score, want, atol=1e-12)
  assert got.score[0, 1] == 1.0 and not got.kept[4] and got.kept.sum() == 5
  assert analysis.rank_heads(got.score)[0] == (0, 1)
  assert analysis.top_heads(got.score, 1) == frozenset({(0, 1)})
  rand = analysis.random_heads(got.score, 3, seed=0, exclude_top=1)
  assert len(rand) == 3 and (0, 1) not in rand
  assert rand == analysis.random_heads(got.score, 3, seed=0, exclude_top=1)
  with pytest.raises(ValueError, match="needle spans"):
    analysis.retrieval_scores(argmax, batch.tokens, generated, batch.needle_end, batch.needle_start)


def test_search_heads_and_rouge():
  gains = {(0, 0): 0.1, (1, 2): -0.2, (2, 1): 0.3}
  res = analysis.search_heads(lambda heads: 0.5 + sum(gains[h] for h in heads), list(gains))
  assert res.baseline == 0.5 and res.ranked[0][0] == (2, 1) and res.kept == frozenset({(0, 0), (2, 1)})
  assert analysis.rouge1_recall([1, 2, 2, 3], [2, 3, 3]) == 0.5
