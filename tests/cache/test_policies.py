"""Eviction / selection policies: each selection against a numpy reference (ragged lengths, GQA), attention given
the selection against dense masked attention over the kept keys, decoding after compression, jit == eager, and
clear errors for bad budgets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import cache, testing
from jaxattn.cache import reference as ref
from tests.cache.common import B, D, G, H, L, LENGTHS, assert_same_selection, filled


def _kept_attention(c_small, q, k, v, sets, lengths=LENGTHS):
  """Compressed-cache attention of the last query against dense masked attention over the kept keys."""
  allowed = np.zeros((B, H, 1, L), bool)
  for b in range(B):
    for h in range(H):
      allowed[b, h, 0, sorted(sets[b][h // (H // G)])] = True
  want = ref.masked_attention(q, k, v, allowed)
  testing.assert_close(cache.attend(q, c_small), want, name="attend(compressed)")


def _check_compressed(small, sets, k, v):
  """The compressed cache holds exactly the selected tokens, at their positions, per kv head."""
  pos, ok = np.asarray(small.positions), np.asarray(small.valid)
  kk, vv = np.asarray(small.k), np.asarray(small.v)
  for b in range(B):
    for g in range(G):
      held = pos[b, :, g][ok[b, :, g]]
      assert set(held.tolist()) == sets[b][g]
      np.testing.assert_array_equal(kk[b, :, g][ok[b, :, g]], k[b, held, g])
      np.testing.assert_array_equal(vv[b, :, g][ok[b, :, g]], v[b, held, g])


def test_streaming_llm():
  c, q, k, v = filled(10)
  small = cache.streaming_llm(c, sinks=4, window=12, room=2)
  want = ref.streaming_llm(LENGTHS, G, 4, 12)
  assert_same_selection(ref.as_sets(*cache.streaming_llm_select(c, sinks=4, window=12)), want)
  _check_compressed(small, want, k, v)
  assert small.capacity == 18
  _kept_attention(small, q, k, v, want)


def test_streaming_llm_short_sequence_keeps_all():
  c, _, _, _ = filled(11, lengths=(64, 10))
  sets = ref.as_sets(*cache.streaming_llm_select(c, sinks=4, window=12))
  assert sets[1] == [set(range(10))] * G


@pytest.mark.parametrize("how", ["max", "mean"])
def test_h2o(how):
  c, q, k, v = filled(12, T_q=8)
  scores = cache.h2o_scores(q, c, gqa_reduce=how)
  want_scores = ref.h2o_scores(q, k, LENGTHS, G, how)
  testing.assert_close(scores, want_scores, name="h2o scores")
  got = ref.as_sets(*cache.h2o_select(c, scores, budget=16))
  want = ref.h2o(LENGTHS, want_scores, 16)
  assert_same_selection(got, want, want_scores, "h2o")
  small = cache.h2o(c, scores, budget=16)
  _check_compressed(small, got, k, v)
  _kept_attention(small, q[:, -1:], k, v, got)


def test_snapkv():
  kw = dict(capacity=24, window=8, pool=5, keep_first=2, keep_last=4)
  c, q, k, v = filled(13, T_q=8)
  got = ref.as_sets(*cache.snapkv_select(q, c, **kw))
  want = ref.snapkv(q, k, LENGTHS, 24, 5, 2, 4)
  assert_same_selection(got, want, ref._snap_score(q, k, LENGTHS, 5, "snap"), "snapkv")
  for b in range(B):
    for g in range(G):
      assert len(got[b][g]) == 24 and {0, 1, LENGTHS[b] - 1} <= got[b][g]
  small = cache.snapkv_compress(q, c, **kw)
  _check_compressed(small, got, k, v)
  _kept_attention(small, q[:, -1:], k, v, got)


def test_ada_snapkv_per_head_budgets():
  kw = dict(capacity=20, window=8, pool=5, keep_first=2, keep_last=4, min_ratio=0.5)
  c, q, k, v = filled(14, T_q=8)
  idx, ok = cache.ada_snapkv_select(q, c, **kw)
  assert idx.shape == (B, G, min(L, 2 * 20 - 10))  # C_max = G * capacity - (G - 1) * m, m = 10
  got = ref.as_sets(idx, ok)
  want = ref.ada_snapkv(q, k, LENGTHS, 20, 5, 2, 4, 0.5)
  for b in range(B):
    assert sum(len(s) for s in got[b]) == G * 20
    assert all(len(s) >= 10 for s in got[b])
  assert len({len(s) for b in range(B) for s in got[b]}) > 1  # non-uniform per-head lengths
  assert got == want
  small = cache.ada_snapkv_compress(q, c, **kw)
  _check_compressed(small, got, k, v)
  _kept_attention(small, q[:, -1:], k, v, got)


def test_decode_after_compression():
  """A token appended to a compressed cache is seen by every head at its true position."""
  c, q, k, v = filled(15, lengths=(60, 40), T_q=8)
  small = cache.snapkv_compress(q, c, capacity=16, window=8, pool=3, keep_first=2, keep_last=4, room=1)
  sets = ref.as_sets(*cache.snapkv_select(q, c, capacity=16, window=8, pool=3, keep_first=2, keep_last=4))
  kn, vn = testing.random_qkv(16, B=B, T=1, S=1, H=H, G=G, D=D)[1:]
  small = cache.append(small, kn[:, 0], vn[:, 0])
  full = cache.append(c, kn[:, 0], vn[:, 0])
  np.testing.assert_array_equal(np.asarray(small.seen), [61, 41])
  qn = testing.random_qkv(17, B=B, T=1, S=1, H=H, G=G, D=D)[0]
  sets = [[s | {n} for s in row] for row, n in zip(sets, (60, 40))]
  kf, vf = np.asarray(full.k), np.asarray(full.v)
  _kept_attention(small, qn, kf, vf, sets)


@pytest.mark.parametrize("share_pages", [True, False])
def test_quest(share_pages):
  c, q, k, v = filled(18, page_size=8)
  pages, ok = cache.quest_select(q, c.page_min, c.page_max, 24, page_size=8, lengths=c.lengths,
                                 share_pages=share_pages)
  assert pages.shape == (B, G if share_pages else H, 3)
  got = ref.as_sets(pages, ok)
  want = ref.quest(q[:, 0], k, LENGTHS, 24, 8, share_pages)
  assert got == want
  for b, n in enumerate(LENGTHS):
    assert all((n - 1) // 8 in s for s in got[b])  # the current page is always selected
  out, _, _ = cache.quest_attend(q, c, 24, share_pages=share_pages)
  allowed = np.zeros((B, H, 1, L), bool)
  for b, n in enumerate(LENGTHS):
    for h in range(H):
      for p in got[b][h // (H // G) if share_pages else h]:
        allowed[b, h, 0, p * 8:min(n, p * 8 + 8)] = True
  testing.assert_close(out, ref.masked_attention(q, k, v, allowed), name="quest_attend")


def test_select_topk_from_probs():
  c, q, k, _ = filled(19)
  _, p = cache.decode_with_probs(q, c)
  for how in ("max", "mean"):
    idx, ok, _ = cache.select_topk_from_probs(p[:, 0], 12, num_kv_heads=G, pool=7, gqa_reduce=how,
                                              lengths=c.lengths)
    p64 = ref.probs(q, k, LENGTHS)[:, 0]
    want, scores = [], np.zeros((B, G, L))
    for b, n in enumerate(LENGTHS):
      red = ref.reduce_group(p64[b], G, how)
      scores[b] = [ref.max_pool(red[g], 7) for g in range(G)]
      want.append([ref.top(scores[b, g], 12, [j < n for j in range(L)]) for g in range(G)])
    assert_same_selection(ref.as_sets(idx, ok), want, scores, f"select_topk_from_probs[{how}]")


def test_policies_jit_equal_eager():
  c, q, _, _ = filled(20, T_q=8, page_size=8)
  fns = {
      "streaming": lambda c, q: cache.streaming_llm_select(c, sinks=4, window=12),
      "ada": lambda c, q: cache.ada_snapkv_select(q, c, capacity=16, window=8, pool=5, keep_first=2, keep_last=4),
      "quest": lambda c, q: cache.quest_select(q[:, -1:], c.page_min, c.page_max, 16, page_size=8,
                                               lengths=c.lengths),
  }
  for name, f in fns.items():
    for a, b in zip(f(c, q), jax.jit(f)(c, q)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_bad_budgets():
  c, q, _, _ = filled(21, T_q=8, page_size=8)
  snap = dict(window=8, pool=5, keep_first=2, keep_last=4)
  with pytest.raises(ValueError, match="capacity 65 is larger than the context"):
    cache.snapkv_compress(q, c, capacity=65, **snap)
  with pytest.raises(ValueError, match="capacity 5 is below keep_first \\+ keep_last = 6"):
    cache.snapkv_compress(q, c, capacity=5, **snap)
  with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
    cache.ada_snapkv_compress(q, c, capacity=0, **snap)
  with pytest.raises(ValueError, match="pool must be odd"):
    cache.snapkv_compress(q, c, capacity=16, **{**snap, "pool": 4})
  with pytest.raises(ValueError, match="min_ratio must be a number in \\[0, 1\\], got 1.5"):
    cache.ada_snapkv_compress(q, c, capacity=16, min_ratio=1.5, **snap)
  with pytest.raises(ValueError, match="q_window holds 8 queries but window is 4"):
    cache.snapkv_compress(q, c, capacity=16, **{**snap, "window": 4})
  with pytest.raises(ValueError, match="window must be >= 1, got 0"):
    cache.streaming_llm(c, sinks=4, window=0)
  with pytest.raises(ValueError, match="sinks must be >= 0, got -1"):
    cache.streaming_llm(c, sinks=-1, window=4)
  with pytest.raises(ValueError, match="sinks \\+ window 70 is larger than the context"):
    cache.streaming_llm(c, sinks=4, window=66)
  with pytest.raises(ValueError, match="budget must be >= 2"):
    cache.h2o(c, jnp.zeros((B, G, L)), budget=1)
  with pytest.raises(ValueError, match="budget must be >= 1, got -4"):
    cache.h2o(c, jnp.zeros((B, G, L)), budget=-4)
  with pytest.raises(ValueError, match="budget 20 is not a multiple of page_size 8"):
    cache.quest_attend(q[:, -1:], c, 20)
  with pytest.raises(ValueError, match="budget 72 is larger than the context"):
    cache.quest_attend(q[:, -1:], c, 72)
  with pytest.raises(ValueError, match="budget must be >= 1, got 0"):
    cache.quest_attend(q[:, -1:], c, 0)
  with pytest.raises(ValueError, match="no page metadata"):
    cache.quest_attend(q[:, -1:], filled(21)[0], 16)
  with pytest.raises(ValueError, match="gqa_reduce must be one of"):
    cache.h2o_scores(q, c, gqa_reduce="sum")
  with pytest.raises(ValueError, match="k 65 is larger than the context"):
    cache.select_topk_from_probs(jnp.zeros((B, H, L)), 65, num_kv_heads=G)
  small = cache.streaming_llm(c, sinks=4, window=4)
  with pytest.raises(ValueError, match="already compressed"):
    cache.streaming_llm(small, sinks=2, window=2)
