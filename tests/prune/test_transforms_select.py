"""Debiasing transforms, order-keeping top-k, schedules, the inflection analysis, and bad-input errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import prune, testing


def planted(M=300, N=48, seed=0, pad_from=40, boost=4.0):
  """Scores with an exp-cubic recency trend, one planted object per sample, inflated pad tokens (pilot §21-B)."""
  rng = np.random.default_rng(seed)
  x = np.arange(N) / (N - 1)
  log_trend = 1.5 * x ** 3 - 0.5 * x
  s = np.exp(log_trend + 0.3 * rng.normal(size=(M, N)))
  obj = rng.integers(0, pad_from - 3, M)
  for i, o in enumerate(obj):
    s[i, o:o + 3] *= boost
  pad = np.arange(N) >= pad_from
  s[:, pad] += 20.0  # sinks: far above everything else
  return s / s.sum(1, keepdims=True), pad, log_trend, obj


def test_fit_position_trend_recovers_the_planted_trend_on_non_pad_positions():
  s, pad, log_trend, _ = planted(boost=1.0)
  trend = prune.fit_position_trend(s, valid=~pad)
  lt = trend.log_trend()[~pad]
  ref = log_trend[~pad]
  assert np.abs((lt - lt.mean()) - (ref - ref.mean())).max() < 0.1
  w = trend.weights()
  assert w.shape == (48,) and (w > 0).all() and w.max() == pytest.approx(1.0)
  # detrended scores carry no positional trend on non-pad tokens
  d = np.asarray(prune.positional_detrend(jnp.asarray(s), trend))
  assert abs(np.corrcoef(np.arange(40), d[:, :40].mean(0))[0, 1]) < 0.3 < np.corrcoef(np.arange(40),
                                                                                         s[:, :40].mean(0))[0, 1]
  # weights stay positive even when the pads are left in (log space), unlike a plain polynomial of the means
  assert (prune.fit_position_trend(s).weights() > 0).all()


def test_debiasing_raises_object_recall():
  s, pad, _, obj = planted(seed=1)
  trend = prune.fit_position_trend(s[:150], valid=~pad)
  test, o = jnp.asarray(s[150:]), obj[150:]
  k = 3

  def recall(scores):
    idx = np.asarray(prune.topk_keep_order(scores, k))
    return np.mean([np.isin(np.arange(a, a + 3), i).mean() for a, i in zip(o, idx)])
  raw = recall(test)
  both = recall(prune.suppress(prune.positional_detrend(test, trend), pad))
  assert raw < 0.1 and both > 0.5


def test_transform_errors_and_gradient():
  s, pad, _, _ = planted(M=20)
  trend = prune.fit_position_trend(s, valid=~pad)
  with pytest.raises(ValueError, match="47 tokens but the trend was calibrated on 48"):
    prune.positional_detrend(jnp.asarray(s[:, :47]), trend)
  with pytest.raises(ValueError, match="non-negative"):
    prune.fit_position_trend(-s)
  with pytest.raises(ValueError, match="degree=3 needs 4"):
    prune.fit_position_trend(s, valid=np.arange(48) < 3)
  with pytest.raises(ValueError, match="drop must have shape"):
    prune.suppress(jnp.asarray(s), pad[:5])
  g = jax.grad(lambda x: prune.positional_detrend(x, trend).sum())(jnp.asarray(s, jnp.float32))
  testing.assert_close(g, jnp.broadcast_to(jnp.asarray(trend.weights()), g.shape))
  sup = prune.suppress(jnp.asarray(s), pad)
  assert np.isneginf(np.asarray(sup)[:, pad]).all()


def test_topk_keeps_order_and_picks_the_top():
  scores = jax.random.normal(jax.random.key(0), (4, 30))
  idx = np.asarray(prune.topk_keep_order(scores, 7))
  assert idx.dtype == np.int32 and (np.diff(idx, axis=1) > 0).all()
  ref = np.sort(np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :7], axis=1)
  np.testing.assert_array_equal(idx, ref)
  sup = prune.suppress(scores, np.arange(30) < 25)
  np.testing.assert_array_equal(prune.topk_keep_order(sup, 5), np.tile(np.arange(25, 30), (4, 1)))
  with pytest.raises(ValueError, match="budget k=31 must lie in"):
    prune.topk_keep_order(scores, 31)
  with pytest.raises(ValueError, match="budget k=0"):
    prune.topk_keep_order(scores, 0)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_keep_ratio_outside_unit_interval(ratio):
  with pytest.raises(ValueError, match="keep ratio must lie in"):
    prune.keep_count(64, ratio)
  with pytest.raises(ValueError, match="keep ratio must lie in"):
    prune.PruningSchedule((1,), (ratio,))


def test_schedule():
  s = prune.PruningSchedule((1, 2, 3), (0.5, 0.25, 0.1))
  assert s.counts(64) == (32, 16, 6)
  assert prune.keep_count(64, 0.05) == 3 and prune.keep_count(10, 0.01) == 1 and prune.keep_count(64, 1.0) == 64
  assert s.validate(4) is s
  assert s.average_kept(64, 4) == pytest.approx((64 + 32 + 16 + 6) / 4)
  with pytest.raises(ValueError, match=r"layer\(s\) \[3\] but the model has 3 layers"):
    s.validate(3)
  with pytest.raises(ValueError, match="non-increasing"):
    prune.PruningSchedule((1, 2), (0.25, 0.5))
  with pytest.raises(ValueError, match="strictly increasing"):
    prune.PruningSchedule((2, 1), (0.5, 0.25))
  with pytest.raises(ValueError, match="one keep ratio per layer"):
    prune.PruningSchedule((1, 2), (0.5,))


def test_attention_shift_and_inflection_layers():
  rng = np.random.default_rng(0)
  base = rng.uniform(size=(2, 16))
  other = rng.uniform(size=(2, 16)) ** 4
  maps = np.stack([base, base, other, other, base])  # changes entering layers 2 and 4
  js = prune.attention_shift(maps)
  assert js.shape == (4,) and js[0] == pytest.approx(0.0, abs=1e-12) and js[2] == pytest.approx(0.0, abs=1e-12)
  p, q = base / base.sum(-1, keepdims=True), other / other.sum(-1, keepdims=True)
  m = (p + q) / 2
  ref = (0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1)).mean()
  assert js[1] == pytest.approx(ref) and 0 < ref <= np.log(2)
  assert prune.inflection_layers(js, 2) == (2, 4)
  with pytest.raises(ValueError, match="num=5"):
    prune.inflection_layers(js, 5)
