"""block_sparse_attention: dynamic kv block lists against the dense masked reference, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import masks, testing


def _lists(seed, B, H, nq, nk, K):
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, nk, (B, H, nq, K)).astype(np.int32)
  cnt = rng.integers(0, K + 1, (B, H, nq)).astype(np.int32)
  cnt[0, 0, 0] = 0  # a query block that visits nothing
  idx[0, 1, 0, :2] = idx[0, 1, 0, 0]  # a repeated index counts once
  return jnp.asarray(idx), jnp.asarray(cnt)


def _dense_layout_attention(q, k, v, idx, cnt, bq, bk, mask):
  """An independent oracle: build the per-(b, h) dense mask in numpy, then masked dense softmax by hand."""
  B, T, H, D = q.shape
  S, G = k.shape[1], k.shape[2]
  allowed = np.zeros((B, H, T, S), bool)
  for b in range(B):
    for h in range(H):
      for r in range(idx.shape[2]):
        for j in np.asarray(idx[b, h, r, :cnt[b, h, r]]):
          allowed[b, h, r * bq:(r + 1) * bq, j * bk:(j + 1) * bk] = True
  if mask is not None:
    allowed &= mask.to_dense(T, S)
  kk = np.repeat(np.asarray(k, np.float64), H // G, 2)
  vv = np.repeat(np.asarray(v, np.float64), H // G, 2)
  s = np.einsum("bthd,bshd->bhts", np.asarray(q, np.float64), kk) / np.sqrt(D)
  s = np.where(allowed, s, -np.inf)
  m = np.max(s, -1, keepdims=True)
  p = np.where(allowed, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
  l = p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshe->bthe", p / np.where(l == 0, 1, l), vv)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("mask", [None, masks.Causal()])
def test_matches_dense_masked_oracle(impl, mask):
  B, T, S, H, G, D, bq, bk, K = 2, 40, 40, 4, 2, 8, 16, 8, 3
  q, k, v = testing.random_qkv(jax.random.key(0), B=B, T=T, S=S, H=H, G=G, D=D)
  idx, cnt = _lists(1, B, H, 3, 5, K)
  out = jaxattn.block_sparse_attention(q, k, v, idx, cnt, block_q=bq, block_k=bk, mask=mask, implementation=impl)
  testing.assert_close(out, _dense_layout_attention(q, k, v, idx, cnt, bq, bk, mask), dtype=jnp.float32)
  if impl == "xla":
    loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(jaxattn.block_sparse_attention(
        q, k, v, idx, cnt, block_q=bq, block_k=bk, mask=mask, implementation=impl)))
    got = jax.grad(loss("xla"), (0, 1, 2))(q, k, v)
    want = jax.grad(loss("reference"), (0, 1, 2))(q, k, v)
    testing.assert_close(got, want, kind="grad", name="block-sparse grads")


def test_equals_static_block_sparse_mask():
  B, T, H, D, b = 1, 64, 2, 8, 16
  q, k, v = testing.random_qkv(jax.random.key(2), B=B, T=T, H=H, D=D)
  m = masks.random_block_sparse(4, 4, 0.5, b, b, seed=4)
  rows = [np.nonzero(r)[0] for r in m.layout]
  idx = jnp.asarray(np.broadcast_to(np.stack(rows), (B, H, 4, 2)).astype(np.int32))
  cnt = jnp.full((B, H, 4), 2, jnp.int32)
  out = jaxattn.block_sparse_attention(q, k, v, idx, cnt, block_q=b, block_k=b)
  testing.assert_close(out, jaxattn.softmax_attention(q, k, v, mask=m, implementation="reference"))


def test_bad_lists_raise():
  q, k, v = testing.random_qkv(jax.random.key(0), B=1, T=32, H=2, D=8)
  with pytest.raises(ValueError, match="kv_block_indices must be int"):
    jaxattn.block_sparse_attention(q, k, v, jnp.zeros((1, 2, 3, 1), jnp.int32), jnp.zeros((1, 2, 2), jnp.int32),
                                   block_q=16, block_k=16)
  with pytest.raises(ValueError, match="kv_block_counts"):
    jaxattn.block_sparse_attention(q, k, v, jnp.zeros((1, 2, 2, 1), jnp.int32), jnp.zeros((1, 2), jnp.int32),
                                   block_q=16, block_k=16)
  with pytest.raises(ValueError, match="block_q must be a positive int"):
    jaxattn.block_sparse_attention(q, k, v, jnp.zeros((1, 2, 2, 1), jnp.int32), jnp.zeros((1, 2, 2), jnp.int32),
                                   block_q=0, block_k=16)
