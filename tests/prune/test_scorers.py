"""Every scorer against a plain float64 reference on random inputs (the paper formulas over dense probabilities)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import masks, prune, testing


def dense_probs(q, k, causal=False):
  """float64 softmax probabilities ``[B, H, T, S]`` (GQA: query head h reads kv head h // (H // G))."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  B, T, H, D = q.shape
  k = np.repeat(k, H // k.shape[2], axis=2)
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)
  if causal:  # bottom-right aligned, as masks.Causal(offset=S - T)
    S = k.shape[1]
    s = np.where(np.arange(S)[None] <= np.arange(T)[:, None] + S - T, s, -np.inf)
  s = s - s.max(-1, keepdims=True)
  p = np.exp(s)
  return p / p.sum(-1, keepdims=True)


def close(x, ref):
  testing.assert_close(jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32))


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_row_attention_weighted_column_sums(implementation):
  q, k, _ = testing.random_qkv(1, B=2, T=7, S=19, H=4, G=2, D=8)
  w = np.random.default_rng(0).uniform(0, 2, (2, 4, 7)).astype(np.float32)
  w[0, :, 3] = 0.0  # a zero weight contributes nothing
  P = dense_probs(q, k)
  close(prune.row_attention(q, k, implementation=implementation), P.sum(2).mean(1))
  close(prune.row_attention(q, k, weights=w, reduce_heads=None, implementation=implementation),
        np.einsum("bht,bhts->bhs", w, P))
  close(prune.row_attention(q, k, weights=w[:, 0], reduce_heads="sum", implementation=implementation),
        np.einsum("bt,bhts->bs", w[:, 0], P))
  # a block of longer rows: keys 0..9 of rows normalised over all 19 keys
  lse = jax.scipy.special.logsumexp(jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, 2, axis=2),
                                               precision="highest") / np.sqrt(8), axis=-1)
  close(prune.row_attention(q, k[:, :10], lse=lse, reduce_heads=None, implementation=implementation),
        P[..., :10].sum(2))


@pytest.mark.parametrize("cls_index", [0, 5])
def test_cls_attention_is_the_cls_row(cls_index):
  q, k, _ = testing.random_qkv(2, B=3, T=17, S=17, H=4, G=4, D=16)
  row = dense_probs(q, k)[:, :, cls_index].mean(1)
  ref = np.delete(row, cls_index, axis=1)
  got = prune.cls_attention(q, k, cls_index=cls_index)
  close(got, ref)
  close(prune.cls_attention(q[:, cls_index:cls_index + 1], k, cls_index=cls_index), ref)  # only the CLS row
  assert got.shape == (3, 16)
  with pytest.raises(ValueError, match="cls_index=17"):
    prune.cls_attention(q, k, cls_index=17)


def adaptinfer_reference(q, k, V, weighting, lengths=None, smoothing=1.0):
  """AdaptInfer (``../shared/papers/cross.md`` §17a) per sample on the unpadded sequence ``[visual; text]``."""
  q, k = np.asarray(q), np.asarray(k)
  B = q.shape[0]
  out = np.zeros((B, V))
  for b in range(B):
    L = q.shape[1] if lengths is None else V + int(lengths[b])
    P = dense_probs(q[b:b + 1, :L], k[b:b + 1, :L], causal=True)[0]  # [H, L, L]
    A_tt, A_tv = P[:, V:, V:], P[:, V:, :V]
    if weighting == "adaptinfer":
      S = A_tt + A_tt.transpose(0, 2, 1) - np.einsum("hii->hi", A_tt)[:, :, None] * np.eye(A_tt.shape[1])
      S = (1 - smoothing) * S.mean((1, 2), keepdims=True) + smoothing * S
      pi = S.sum(1)  # [H, T]: sum over rows i
      out[b] = np.einsum("ht,htv->v", pi, A_tv)
    elif weighting == "mean":
      out[b] = A_tv.mean(1).mean(0)
    else:
      out[b] = A_tv[:, -1].mean(0)
  return out


@pytest.mark.parametrize("weighting", prune.WEIGHTINGS)
@pytest.mark.parametrize("padded", [False, True])
def test_text_to_visual_matches_the_paper_formula(weighting, padded):
  V, T = 11, 6
  q, k, _ = testing.random_qkv(3, B=3, T=V + T, S=V + T, H=4, G=2, D=8)
  lengths = np.array([6, 4, 2]) if padded else None
  valid = None if lengths is None else np.arange(T)[None] < lengths[:, None]
  got = prune.text_to_visual(q[:, V:], k[:, :V], k[:, V:], weighting=weighting, text_valid=valid)
  ref = adaptinfer_reference(q, k, V, weighting, lengths)
  assert got.shape == (3, V)
  close(got, ref)


def test_text_importance_smoothing_and_gqa():
  V, T = 5, 7
  q, k, _ = testing.random_qkv(4, B=2, T=V + T, S=V + T, H=4, G=1, D=8)
  got = prune.text_to_visual(q[:, V:], k[:, :V], k[:, V:], smoothing=0.3)
  close(got, adaptinfer_reference(q, k, V, "adaptinfer", smoothing=0.3))
  with pytest.raises(ValueError, match="smoothing"):
    prune.text_to_visual(q[:, V:], k[:, :V], k[:, V:], smoothing=1.5)
  with pytest.raises(ValueError, match="weighting"):
    prune.text_to_visual(q[:, V:], k[:, :V], k[:, V:], weighting="first")


def test_baseline_scorers():
  x = jax.random.normal(jax.random.key(0), (2, 9, 5))
  close(prune.feature_norm(x), np.sqrt((np.asarray(x, np.float64) ** 2).sum(-1)))
  r = prune.random_scores(jax.random.key(1), 2, 9)
  assert r.shape == (2, 9) and float(r.min()) >= 0 and float(r.max()) < 1
  assert not np.allclose(r[0], r[1])
  rel = jnp.asarray([[0.0, 1.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.25]])
  idx = prune.topk_keep_order(prune.oracle_scores(rel, key=jax.random.key(2)), 2)
  np.testing.assert_array_equal(idx, [[1, 2], [0, 3]])
  # feature norm is differentiable: d||x|| / dx = x / ||x||
  g = jax.grad(lambda x: prune.feature_norm(x).sum())(x)
  close(g, np.asarray(x) / np.linalg.norm(np.asarray(x, np.float64), axis=-1, keepdims=True))
  with pytest.raises(ValueError, match="rank 3"):
    prune.feature_norm(x[0])


def test_attention_scorers_never_nan_on_masked_text_rows():
  V, T = 4, 5
  q, k, _ = testing.random_qkv(5, B=2, T=V + T, S=V + T, H=2, G=2, D=8)
  valid = np.zeros((2, T), bool)
  valid[0, :3] = True  # the second sample has no text at all
  for w in prune.WEIGHTINGS:
    s = prune.text_to_visual(q[:, V:], k[:, :V], k[:, V:], weighting=w, text_valid=valid)
    testing.assert_no_nan(s, w)
  assert masks.Causal() is not None
