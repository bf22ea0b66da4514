"""attention_stats (blockwise xla and reference) and attention_probs against a numpy dense softmax."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import masks, testing
from jaxattn.ops.softmax.config import BlockSizes
from jaxattn.ops.softmax.stats import STATS, attention_probs, attention_stats


def numpy_probs(q, k, allowed, scale, bias=None, cap=None):
  """Dense masked softmax in float64: ``[B, H, T, S]`` and the broadcast allowed mask."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  B, T, H, D = q.shape
  G = k.shape[2]
  kh = np.repeat(k, H // G, axis=2)
  s = np.einsum("bthd,bshd->bhts", q, kh) * scale
  if bias is not None:
    s = s + np.asarray(bias, np.float64)
  if cap is not None:
    s = cap * np.tanh(s / cap)
  allowed = np.broadcast_to(allowed, s.shape)
  s = np.where(allowed, s, -np.inf)
  m = s.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.where(allowed, np.exp(s - m), 0.0)
  l = p.sum(-1, keepdims=True)
  return p / np.where(l == 0, 1.0, l), allowed


def numpy_stats(p, allowed):
  any_key = allowed.any(-1)
  ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)
  return {"colsum": p.sum(-2), "colcount": allowed.sum(-2), "rowmax": p.max(-1),
          "argmax": np.where(any_key, p.argmax(-1), -1), "entropy": ent}


CASES = {
    "causal_cross": dict(mask=masks.Causal(offset=8)),
    "docs_window": dict(mask=masks.causal_document([20, 17]) & masks.Local(5, 2), T=37, S=37),
}


@pytest.mark.parametrize("name,impl", [("causal_cross", "xla"), ("docs_window", "xla"),
                                       ("causal_cross", "reference")])
def test_stats_match_dense_numpy(name, impl):
  case = CASES[name]
  T, S = case.get("T", 37), case.get("S", 45)
  q, k, _ = testing.random_qkv(3, B=2, T=T, S=S, H=4, G=2, D=8)
  mask = case["mask"]
  allowed = np.ones((T, S), bool) if mask is None else mask.to_dense(T, S)
  p, al = numpy_probs(q, k, allowed, 8 ** -0.5)
  want = numpy_stats(p, al)
  got = attention_stats(q, k, mask=mask, stats=STATS, implementation=impl, block_sizes=BlockSizes(8, 16))
  qf, kf = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, axis=2)
  s = np.where(al, np.einsum("bthd,bshd->bhts", qf, kf) * 8 ** -0.5, -np.inf)
  np.testing.assert_allclose(got["lse"], np.log(np.exp(s).sum(-1)), atol=1e-5, rtol=1e-5)
  for s in ("colsum", "rowmax", "entropy"):
    np.testing.assert_allclose(got[s], want[s], atol=2e-5, rtol=1e-5, err_msg=s)
  np.testing.assert_array_equal(got["colcount"], want["colcount"])
  np.testing.assert_array_equal(got["argmax"], want["argmax"])
  assert got["argmax"].dtype == jnp.int32 and got["colcount"].dtype == jnp.int32


def test_stats_segments_bias_softcap_and_lse_passthrough():
  B, T, S, H = 2, 24, 24, 4
  q, k, _ = testing.random_qkv(5, B=B, T=T, S=S, H=H, G=1, D=8)
  ids = np.array([[0] * 10 + [1] * 14, [0] * 5 + [1] * 19])
  bias = np.random.default_rng(0).normal(size=(1, H, T, S)).astype(np.float32)
  allowed = (ids[:, :, None] == ids[:, None, :])[:, None]
  p, al = numpy_probs(q, k, allowed, 0.3, bias=bias, cap=2.0)
  want = numpy_stats(p, al)
  kw = dict(segment_ids=jnp.asarray(ids), bias=bias, scale=0.3, logits_soft_cap=2.0)
  got = attention_stats(q, k, stats=("lse", "colsum", "argmax", "entropy"), block_sizes=BlockSizes(8, 8), **kw)
  for s in ("colsum", "entropy"):
    np.testing.assert_allclose(got[s], want[s], atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(got["argmax"], want["argmax"])
  only_cols = attention_stats(q, k, lse=got["lse"], stats=("colsum",), block_sizes=BlockSizes(8, 8), **kw)
  np.testing.assert_allclose(only_cols["colsum"], want["colsum"], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(attention_probs(q, k, **kw), p, atol=1e-5)


def test_rows_without_keys_and_mask_arrays():
  T, S = 6, 9
  q, k, _ = testing.random_qkv(7, B=1, T=T, S=S, H=2, D=4)
  arr = np.random.default_rng(1).random((1, 1, T, S)) < 0.5
  arr[0, 0, 2] = False  # a row with no allowed key
  got = attention_stats(q, k, mask=jnp.asarray(arr), stats=STATS, block_sizes=BlockSizes(8, 8))
  assert int(got["argmax"][0, 0, 2]) == -1 and float(got["rowmax"][0, 0, 2]) == 0.0
  assert float(got["entropy"][0, 0, 2]) == 0.0 and np.isneginf(got["lse"][0, 0, 2])
  p, al = numpy_probs(q, k, arr, 4 ** -0.5)
  np.testing.assert_allclose(got["colsum"], p.sum(-2), atol=2e-5)


def test_stats_errors_name_the_value():
  q, k, _ = testing.random_qkv(0, B=1, T=8, H=2, D=4)
  with pytest.raises(NotImplementedError, match="'cudnn' has no statistics mode"):
    attention_stats(q, k, implementation="cudnn")
  with pytest.raises(ValueError, match="'colsums'"):
    attention_stats(q, k, stats=("colsums",))
  with pytest.raises(ValueError, match="'nope'"):
    attention_stats(q, k, implementation="nope")
  with pytest.raises(ValueError, match="lse must have shape"):
    attention_stats(q, k, lse=jnp.zeros((1, 2, 7)), stats=("colsum",))
