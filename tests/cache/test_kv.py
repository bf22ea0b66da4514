"""KVCache: chunked prefill == one-shot, decode appends, ragged lengths, GQA, attend == dense reference,
decode_with_probs, page bounds, jit == eager, capacity and shape errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import cache, testing
from jaxattn.cache import reference as ref
from tests.cache.common import B, D, G, H, L, LENGTHS, filled


def _leaves_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert jax.tree.structure(a) == jax.tree.structure(b)


def test_chunked_prefill_equals_one_shot():
  _, k, v = testing.random_qkv(1, B=B, T=1, S=L, H=H, G=G, D=D)
  lengths = np.asarray(LENGTHS, np.int32)
  one = cache.prefill(cache.init(B, L, G, D, page_size=8), k, v, lengths)
  # three ragged chunks of 24 slots: sequence b's real tokens of each chunk are a prefix of it
  c = cache.init(B, L, G, D, page_size=8)
  done = np.zeros(B, np.int32)
  for n0 in (20, 24, 24):
    n = np.minimum(lengths - done, n0).astype(np.int32)
    kc = jnp.stack([jnp.pad(k[b, done[b]:done[b] + n[b]], [(0, 24 - n[b]), (0, 0), (0, 0)]) for b in range(B)])
    vc = jnp.stack([jnp.pad(v[b, done[b]:done[b] + n[b]], [(0, 24 - n[b]), (0, 0), (0, 0)]) for b in range(B)])
    c = cache.prefill(c, kc, vc, n)
    done += n
  _leaves_equal(c, one)
  np.testing.assert_array_equal(np.asarray(one.lengths), lengths)
  kk = np.asarray(one.k)
  for b in range(B):
    np.testing.assert_array_equal(kk[b, :lengths[b]], np.asarray(k)[b, :lengths[b]])
    assert not kk[b, lengths[b]:].any()  # padding tokens were not written


def test_decode_appends_equal_prefill():
  _, k, v = testing.random_qkv(2, B=B, T=1, S=16, H=H, G=G, D=D)
  one = cache.prefill(cache.init(B, 16, G, D, page_size=4), k, v)
  c = cache.init(B, 16, G, D, page_size=4)
  for t in range(16):
    c = cache.append(c, k[:, t], v[:, t])
  _leaves_equal(c, one)


def test_page_bounds():
  c, _, k, _ = filled(3, page_size=8)
  mn, mx = np.asarray(c.page_min), np.asarray(c.page_max)
  for b, n in enumerate(LENGTHS):
    for p in range(L // 8):
      keys = k[b, p * 8:min(n, p * 8 + 8)]
      if len(keys):
        np.testing.assert_array_equal(mn[b, p], keys.min(0))
        np.testing.assert_array_equal(mx[b, p], keys.max(0))
      else:
        assert np.all(mn[b, p] == np.inf) and np.all(mx[b, p] == -np.inf)


@pytest.mark.parametrize("T", [1, 5])
def test_attend_matches_dense_reference(T):
  c, q, k, v = filled(4, T_q=T)
  allowed = np.zeros((B, H, T, L), bool)
  for b, n in enumerate(LENGTHS):
    for t in range(T):
      allowed[b, :, t, :n - T + t + 1] = True
  want = ref.masked_attention(q, k, v, allowed)
  testing.assert_close(cache.attend(q, c), want, name="attend")
  out, p = cache.decode_with_probs(q, c)
  testing.assert_close(out, want, name="decode_with_probs out")
  testing.assert_close(p, ref.probs(q, k, LENGTHS), name="probs")
  np.testing.assert_allclose(np.asarray(p).sum(-1), 1.0, rtol=1e-5)


def test_bfloat16_cache():
  _, q, k, v = filled(9, T_q=2)
  c = cache.prefill(cache.init(B, L, G, D, dtype=jnp.bfloat16), jnp.asarray(k, jnp.bfloat16),
                    jnp.asarray(v, jnp.bfloat16), np.asarray(LENGTHS, np.int32))
  qb = jnp.asarray(q, jnp.bfloat16)
  allowed = np.zeros((B, H, 2, L), bool)
  for b, n in enumerate(LENGTHS):
    allowed[b, :, 0, :n - 1] = True
    allowed[b, :, 1, :n] = True
  f32 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)  # noqa: E731
  want = ref.masked_attention(f32(q), f32(k), f32(v), allowed)
  out = cache.attend(qb, c)
  assert out.dtype == jnp.bfloat16
  testing.assert_close(out, want, dtype=jnp.bfloat16, name="attend bf16")
  testing.assert_close(cache.decode_with_probs(qb, c)[0], want, dtype=jnp.bfloat16, name="decode_with_probs bf16")


def test_gqa_head_mapping():
  """Query head h uses kv head h // (H // G): changing kv head 1 changes only query heads 2, 3."""
  c, q, _, _ = filled(5)
  o1 = np.asarray(cache.attend(q, c))
  c2 = dataclasses.replace(c, v=c.v.at[:, :, 1].add(1.0))
  o2 = np.asarray(cache.attend(q, c2))
  np.testing.assert_array_equal(o1[:, :, :2], o2[:, :, :2])
  assert np.all(np.abs(o1[:, :, 2:] - o2[:, :, 2:]) > 0.5)


def test_empty_sequence_gives_zero_not_nan():
  c, q, _, _ = filled(6, lengths=(10, 0))
  # the empty sequence's query sits at position -1: it sees nothing
  out, p = cache.decode_with_probs(q, c)
  assert not np.isnan(np.asarray(out)).any()
  assert not np.asarray(out)[1].any() and not np.asarray(p)[1].any()
  assert not np.asarray(cache.attend(q, c))[1].any()


def test_jit_equals_eager():
  c, q, k, v = filled(7, page_size=8)
  f = lambda c, q, k, v: cache.decode_with_probs(q, cache.append(c, k, v))  # noqa: E731
  c = dataclasses.replace(c, lengths=c.lengths - 1, seen=c.seen - 1)  # room for one more token
  args = (c, q, jnp.asarray(k[:, 0]), jnp.asarray(v[:, 0]))
  for a, b in zip(jax.tree.leaves(f(*args)), jax.tree.leaves(jax.jit(f)(*args))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_capacity_errors():
  c, _, k, v = filled(8)
  with pytest.raises(ValueError, match="capacity 64 exceeded"):
    cache.append(c, jnp.asarray(k[:, 0]), jnp.asarray(v[:, 0]))
  # under jit the check cannot run: the extra token is dropped and lengths saturates
  c2 = jax.jit(cache.append)(c, jnp.asarray(k[:, 0]), jnp.asarray(v[:, 0]))
  np.testing.assert_array_equal(np.asarray(c2.lengths), [64, 46])
  np.testing.assert_array_equal(np.asarray(c2.k)[0], np.asarray(c.k)[0])


def test_bad_input_errors():
  with pytest.raises(ValueError, match="page_size 6 does not divide capacity 64"):
    cache.init(B, L, G, D, page_size=6)
  with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
    cache.init(B, 0, G, D)
  with pytest.raises(ValueError, match="capacity must be >= 1, got -3"):
    cache.init(B, -3, G, D)
  c = cache.init(B, L, G, D)
  with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=4\], got \[5, 1\]"):
    cache.prefill(c, jnp.ones((B, 4, G, D)), jnp.ones((B, 4, G, D)), np.asarray([5, 1], np.int32))
  with pytest.raises(ValueError, match=r"k must have shape \[B=2, T, G=2, 16\], got \(2, 4, 3, 16\)"):
    cache.prefill(c, jnp.ones((B, 4, 3, D)), jnp.ones((B, 4, 3, D)))
  with pytest.raises(ValueError, match="q has 3 heads, not a multiple"):
    cache.attend(jnp.ones((B, 1, 3, D)), c)
