"""Landmark retrieval inference: top-k covering every cached block equals full grouped attention (exact RoPE
positions, and without RoPE in every selection mode), top-k selection against a brute-force per-query formula,
ring-buffer cache round trip, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import testing
from jaxattn.ops.landmark.retrieval import LandmarkCache, landmark_retrieval_attention, rope

B, T, H, G, D, BS = 2, 71, 4, 2, 16, 8


def _feed(q, k, v, cache, chunks, **kw):
  outs, t = [], 0
  for c in chunks:
    o, cache = landmark_retrieval_attention(q[:, t:t + c], k[:, t:t + c], v[:, t:t + c], cache, **kw)
    outs.append(o)
    t += c
  return jnp.concatenate(outs, axis=1), cache


def test_top_k_covering_every_block_equals_full_attention_with_rope():
  q, k, v = testing.random_qkv(0, B=B, T=T, H=H, G=G, D=D)
  pos = jnp.arange(T)[:, None]
  full = jaxattn.landmark_attention(rope(q, pos, 1e4), rope(k, pos, 1e4), v, block_size=BS,
                                    implementation="reference")
  cache = LandmarkCache.create(B, 16, BS, G, D)
  out, cache = _feed(q, k, v, cache, [13, 30, 28], top_k=16, positions="exact", rope_base=1e4)
  testing.assert_close(out, full, name="retrieval (top-k = all, exact positions)")
  assert int(cache.num_blocks) == T // BS and int(cache.local_len) == T % BS and int(cache.length) == T


@pytest.mark.parametrize("mode", ["per_token_and_head", pytest.param("max_over_heads", marks=pytest.mark.slow),
                                  pytest.param("max_over_tokens", marks=pytest.mark.slow)])
def test_every_mode_with_all_blocks_equals_full_attention(mode):
  q, k, v = testing.random_qkv(1, B=B, T=72, H=H, G=G, D=D)
  full = jaxattn.landmark_attention(q, k, v, block_size=BS, implementation="reference")
  out, _ = _feed(q, k, v, LandmarkCache.create(B, 12, BS, G, D), [24, 24, 24], top_k=12, mode=mode)
  testing.assert_close(out, full, name=mode)


def _brute_force(q, k, v, prefix, top_k, scale):
  """Chunk queries ``q[:, prefix:]`` (prefix a whole number of blocks): per (token, head) keep the ``top_k`` cached
  blocks by landmark logit, then the grouped softmax over them plus the local frame (no RoPE), in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  Bq, Tq, Hq, _ = q.shape
  R = Hq // k.shape[2]
  nmem = prefix // BS
  out = np.zeros((Bq, Tq - prefix, Hq, v.shape[-1]))
  for b in range(Bq):
    for h in range(Hq):
      kk, vv = k[b, :, h // R], v[b, :, h // R]
      for i in range(prefix, Tq):
        s = kk @ q[b, i, h] * scale
        mem_scores = [s[n * BS + BS - 1] for n in range(nmem)]
        keep = set(np.argsort(mem_scores)[::-1][:top_k].tolist())
        c = i // BS
        logits, values = [], []
        for j in range(c * BS, i + 1):
          if (j + 1) % BS:
            logits.append(s[j])
            values.append(vv[j])
        for blk in range(c):
          if blk < nmem and blk not in keep:
            continue
          lm = blk * BS + BS - 1
          reg = np.arange(blk * BS, lm)
          p = np.exp(s[reg] - s[reg].max())
          logits.append(s[lm])
          values.append(p @ vv[reg] / p.sum())
        w = np.exp(np.array(logits) - max(logits))
        out[b, i - prefix, h] = w @ np.array(values) / w.sum()
  return out


def test_top_k_selection_matches_brute_force():
  q, k, v = testing.random_qkv(2, B=1, T=60, H=H, G=G, D=D)
  prefix = 40  # 5 cached blocks; the 20-token chunk completes 2 more inside its local frame
  cache = LandmarkCache.create(1, 8, BS, G, D)
  _, cache = landmark_retrieval_attention(q[:, :prefix], k[:, :prefix], v[:, :prefix], cache, top_k=2)
  out, _ = landmark_retrieval_attention(q[:, prefix:], k[:, prefix:], v[:, prefix:], cache, top_k=2)
  expected = _brute_force(q, k, v, prefix, 2, D ** -0.5)
  testing.assert_close(out, expected.astype(np.float32), name="top-2 retrieval")


@pytest.mark.slow
def test_rows_sum_to_one_with_partial_retrieval():
  q, k, _ = testing.random_qkv(3, B=B, T=72, H=H, G=G, D=D)
  v = jnp.ones((B, 72, G, 3), jnp.float32)
  cache = LandmarkCache.create(B, 16, BS, G, D, value_dim=3)
  out, _ = _feed(q, k, v, cache, [24, 24, 24], top_k=1, mode="max_over_tokens", rope_base=1e4)
  np.testing.assert_allclose(np.asarray(out), 1.0, atol=1e-5)


def test_cache_round_trip():
  """The ring buffer holds the last M complete blocks' pre-RoPE keys/values in slot n % M, the incomplete block sits
  in the local buffer, any chunking gives the same cache, and the cache survives tree flatten / jit unchanged."""
  q, k, v = testing.random_qkv(4, B=B, T=T, H=H, G=G, D=D)
  M = 4
  _, cache = _feed(q, k, v, LandmarkCache.create(B, M, BS, G, D), [24, 24, 23], top_k=2, rope_base=1e4)
  nb = T // BS  # 8 blocks: slots hold blocks 4..7
  assert int(cache.num_blocks) == nb and int(cache.local_len) == T - nb * BS
  for n in range(nb - M, nb):
    np.testing.assert_array_equal(np.asarray(cache.mem_k[:, n % M]), np.asarray(k[:, n * BS:(n + 1) * BS]))
    np.testing.assert_array_equal(np.asarray(cache.mem_v[:, n % M]), np.asarray(v[:, n * BS:(n + 1) * BS]))
  np.testing.assert_array_equal(np.asarray(cache.local_k[:, :T % BS]), np.asarray(k[:, nb * BS:]))
  leaves, tree = jax.tree.flatten(cache)
  again = jax.jit(lambda c: c)(jax.tree.unflatten(tree, leaves))
  assert isinstance(again, LandmarkCache) and again.block_size == BS and again.mem_blocks == M
  for a, b in zip(jax.tree.leaves(again), leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, other = _feed(q, k, v, LandmarkCache.create(B, M, BS, G, D), [23, 24, 24], top_k=2, rope_base=1e4)
  for a, b in zip(jax.tree.leaves(other), leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs():
  q, k, v = testing.random_qkv(0, B=1, T=40, H=4, G=2, D=16)
  cache = LandmarkCache.create(1, 2, BS, 2, 16)
  with pytest.raises(ValueError, match="top_k must be an int in"):
    landmark_retrieval_attention(q, k, v, cache, top_k=3)
  with pytest.raises(ValueError, match="can complete 5 blocks, more than the cache's 2 slots"):
    landmark_retrieval_attention(q, k, v, cache, top_k=1)
  with pytest.raises(ValueError, match="mode must be one of"):
    landmark_retrieval_attention(q[:, :8], k[:, :8], v[:, :8], cache, top_k=1, mode="max")
  with pytest.raises(ValueError, match="made for batch size 2, got 1"):
    landmark_retrieval_attention(q[:, :8], k[:, :8], v[:, :8], LandmarkCache.create(2, 2, BS, 2, 16), top_k=1)
