"""jaxattn.sparse: each builder's selection against a numpy reference, the block-sparse output given the built
lists against dense masked attention, jit == eager, recall / sparsity sweeps, and clear errors on bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import masks, sparse, testing
from jaxattn.sparse import reference as ref

B, H, G, D = 1, 4, 2, 16
VS = dict(n_vertical=12, n_slash=10, last_q=32, force_first=2, force_local=4)
SWEEP = (0.0, 0.5, 0.8, 0.9, 0.95)


def _qkv(seed=0, T=128, S=None):
  return testing.random_qkv(seed, B=B, T=T, S=S, H=H, G=G, D=D)


def _assert_same_top(got, want, score, name):
  """Equal sets, or differing only on near-ties of ``score`` (f32 selection vs f64 reference)."""
  if got == want:
    return
  kept = np.asarray(sorted(want))
  threshold = np.min(np.where(np.isinf(score[kept]), np.inf, score[kept]))
  for e in got ^ want:
    assert abs(score[e] - threshold) <= 1e-5 * max(1.0, abs(threshold)), (
        f"{name}: {sorted(got ^ want)} differ; score {score[e]} vs threshold {threshold}")


def _sets(ids, valid):
  ids, valid = np.asarray(ids), np.asarray(valid)
  return [[set(ids[b, h][valid[b, h]].tolist()) for h in range(ids.shape[1])] for b in range(ids.shape[0])]


def _check_vs(sel, cols, offs, vertical, slash):
  got_c, got_o = _sets(sel.columns, sel.column_valid), _sets(sel.offsets, sel.offset_valid)
  for b in range(B):
    for h in range(H):
      _assert_same_top(got_c[b][h], cols[b][h], vertical[b, h], f"columns b={b} h={h}")
      _assert_same_top(got_o[b][h], offs[b][h], slash[b, h], f"offsets b={b} h={h}")
  return got_c, got_o


@pytest.mark.parametrize("T,S,bq,bk", [(128, 128, 16, 16), (100, 120, 32, 16)])
def test_vertical_slash_selection_mask_and_blocks(T, S, bq, bk):
  q, k, _ = _qkv(1, T, S)
  cfg = sparse.VerticalSlash(**VS)
  sel = cfg.select(q, k)
  cols, offs, vertical, slash = ref.vertical_slash_reference(q, k, **VS)
  got_c, got_o = _check_vs(sel, cols, offs, vertical, slash)
  token = ref.vs_mask_reference(got_c, got_o, T, S)
  np.testing.assert_array_equal(np.asarray(sel.to_mask()), token)
  index = sel.to_blocks(block_q=bq, block_k=bk)
  np.testing.assert_array_equal(np.asarray(index.layout()), ref.blocks_covering(token, bq, bk))
  if T == S:  # the exact token-level attention path
    v = _qkv(1, T, S)[2]
    testing.assert_close(sparse.sparse_attention(q, k, v, sel),
                         ref.masked_attention_reference(q, k, v, token).astype(np.float32), name="token-level")
  assert (np.asarray(index.to_mask()) | ~token).all()  # the block selection is a superset of the token one
  # builders list each block once, sorted, padded by 0
  idx, cnt = np.asarray(index.indices), np.asarray(index.counts)
  for r in np.ndindex(cnt.shape):
    listed = idx[r][:cnt[r]]
    assert (np.diff(listed) > 0).all() and (idx[r][cnt[r]:] == 0).all()


def test_flexprefill_selection_matches_reference():
  q, k, _ = _planted(2, T=128, per_head=True)
  cfg = dict(alpha=0.6, min_budget=3, max_vertical=24, max_slash=20, last_q=32, force_first=2, force_local=2)
  sel = sparse.FlexPrefill(**cfg).select(q, k)
  cols, offs, vertical, slash = ref.flexprefill_reference(q, k, **cfg)
  _check_vs(sel, cols, offs, vertical, slash)
  nv, ns = (np.asarray(x) for x in sel.budgets())
  assert (nv == [[len(c) for c in row] for row in cols]).all() and (ns == [[len(o) for o in row] for row in offs]).all()
  assert nv.min() >= 3 and nv.max() <= 24 and len(set(nv.ravel().tolist())) > 1, nv  # adaptive per head


@pytest.mark.parametrize("T,S,bq,bk,top_k,local", [(128, 128, 16, 16, 4, 2), (100, 120, 32, 16, 5, 1)])
def test_block_topk_matches_reference(T, S, bq, bk, top_k, local):
  q, k, _ = _qkv(3, T, S)
  index = sparse.BlockTopK(top_k, force_local=local).build(q, k, block_q=bq, block_k=bk)
  want = ref.block_topk_reference(q, k, top_k=top_k, block_q=bq, block_k=bk, force_local=local)
  np.testing.assert_array_equal(np.asarray(index.layout()), want)
  np.testing.assert_array_equal(np.asarray(index.counts), want.sum(-1))


def _builders():
  return {
      "vertical_slash": lambda q, k: sparse.VerticalSlash(3, 3, last_q=32, force_first=1, force_local=2).build(
          q, k, block_q=16, block_k=16),
      "flexprefill": lambda q, k: sparse.FlexPrefill(0.5, 2, 4, 4, last_q=32, force_first=1,
                                                     force_local=2).build(q, k, block_q=16, block_k=8),
      "block_topk": lambda q, k: sparse.BlockTopK(3, force_local=1).build(q, k, block_q=32, block_k=16),
  }


@pytest.mark.parametrize("name", ["vertical_slash", "flexprefill", "block_topk"])
def test_output_given_lists_equals_dense_masked_attention(name):
  q, k, v = _qkv(4, 128)
  build = _builders()[name]
  index = build(q, k)
  jit_index = jax.jit(build)(q, k)
  np.testing.assert_array_equal(np.asarray(jit_index.indices), np.asarray(index.indices))
  np.testing.assert_array_equal(np.asarray(jit_index.counts), np.asarray(index.counts))
  allowed = np.asarray(index.to_mask())
  assert 0 < allowed.sum() < np.tril(np.ones((128, 128))).sum() * H  # really sparse, not empty
  out = sparse.sparse_attention(q, k, v, index, implementation="xla")
  testing.assert_close(out, ref.masked_attention_reference(q, k, v, allowed).astype(np.float32), name=name)
  if name == "vertical_slash":  # build + attention inside one jit: the lists are traced
    fused = jax.jit(lambda q, k, v: sparse.sparse_attention(q, k, v, build(q, k), implementation="xla"))
    np.testing.assert_array_equal(np.asarray(fused(q, k, v)), np.asarray(out))
  # gradients through the lists (the backward block_sparse_attention runs), against the dense masked reference
  w = jnp.asarray(np.random.default_rng(0).standard_normal(out.shape), jnp.float32)
  f = lambda q, k, v: jnp.sum(sparse.sparse_attention(q, k, v, index, implementation="xla") * w)
  allowed_j = jnp.asarray(allowed).reshape(B, G, H // G, 128, 128)

  def dense(q, k, v):
    s = jnp.einsum("btgrd,bsgd->bgrts", q.reshape(B, 128, G, H // G, D), k, precision="highest") * D ** -0.5
    p = jax.nn.softmax(jnp.where(allowed_j, s, -jnp.inf), -1)
    o = jnp.einsum("bgrts,bsge->btgre", p, v, precision="highest").reshape(out.shape)
    return jnp.sum(o * w)

  testing.assert_close(jax.grad(f, (0, 1, 2))(q, k, v), jax.grad(dense, (0, 1, 2))(q, k, v), kind="grad",
                       name=f"{name} grads")


def test_recall_matches_reference_and_jit():
  q, k, _ = _qkv(5, 128)
  sel = sparse.VerticalSlash(**VS).select(q, k)
  token = np.asarray(sel.to_mask())
  index = sel.to_blocks(block_q=16, block_k=32)
  for s, dense_sel in ((sel, token), (index, np.asarray(index.to_mask())), (jnp.asarray(token), token)):
    got = sparse.attention_recall(q, k, s, chunk=48)  # ragged chunks
    want = ref.recall_reference(q, k, dense_sel)
    np.testing.assert_allclose(np.asarray(got.per_head), want, rtol=1e-5, atol=1e-6)
    jitted = jax.jit(lambda q, k, s: sparse.attention_recall(q, k, s, chunk=48))(q, k, s)
    np.testing.assert_allclose(np.asarray(jitted.per_head), np.asarray(got.per_head), rtol=1e-6)
  assert (np.asarray(sparse.attention_recall(q, k, index).per_head)
          >= np.asarray(sparse.attention_recall(q, k, sel).per_head) - 1e-6).all()  # superset covers more


def test_sparsity_counts_match_dense():
  q, k, _ = _qkv(6, 100, 120)
  sel = sparse.VerticalSlash(**VS).select(q, k)
  causal = sparse.causal_mask(100, 120).to_dense(100, 120)
  for s in (sel, sel.to_blocks(block_q=32, block_k=16),
            sparse.BlockTopK(4, force_local=1).build(q, k, block_q=16, block_k=32)):
    dense_sel = np.asarray(s.to_mask())
    want = 1 - dense_sel.sum((-1, -2)) / causal.sum()
    np.testing.assert_allclose(np.asarray(sparse.sparsity(s).per_head), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sparse.sparsity(jnp.asarray(dense_sel)).per_head), want, atol=1e-6)


def _sweep_configs(T):
  return {
      "vertical_slash": lambda s: sparse.VerticalSlash.for_sparsity(s, T, last_q=32, force_first=2, force_local=2),
      "flexprefill": lambda s: sparse.FlexPrefill.for_sparsity(s, T, alpha=0.9, last_q=32, force_first=2,
                                                               force_local=2),
      "block_topk": lambda s: sparse.BlockTopK.for_sparsity(s, T, block_q=16, block_k=16, force_local=1),
  }


@pytest.mark.parametrize("sweep", [(0.0, 0.8, 0.95), pytest.param(SWEEP, marks=pytest.mark.slow)],
                         ids=["fast", "full"])
@pytest.mark.parametrize("name", ["vertical_slash", "flexprefill", "block_topk"])
def test_sparsity_sweep_recall(name, sweep):
  T = 256
  q, k, v = _qkv(7, T)
  recalls, token_s = [], []
  for s in sweep:
    cfg = _sweep_configs(T)[name](s)
    if name == "block_topk":
      sel = index = cfg.build(q, k, block_q=16, block_k=16)
    else:
      sel = cfg.select(q, k)
      index = sel.to_blocks(block_q=16, block_k=16)
    recalls.append(float(sparse.attention_recall(q, k, sel).mean))
    token_s.append(float(sparse.sparsity(sel).mean))
    if s == 0.0:  # s = 0 is dense causal attention exactly
      assert token_s[-1] == 0.0 and float(sparse.sparsity(index).mean) == 0.0
      np.testing.assert_allclose(recalls[-1], 1.0, rtol=1e-6)
      out = sparse.sparse_attention(q, k, v, index, implementation="xla")
      testing.assert_close(out, ref.masked_attention_reference(q, k, v, np.tril(np.ones((T, T), bool)))
                           .astype(np.float32), name=f"{name} s=0")
  assert all(a >= b - 1e-6 for a, b in zip(recalls, recalls[1:])), (name, recalls)
  assert recalls[-1] < 0.9 * recalls[0], (name, recalls)  # random data: sparse selections lose mass
  assert all(a <= b + 1e-6 for a, b in zip(token_s, token_s[1:])), (name, token_s)
  if name != "block_topk":  # budgets bound the computed pairs from above: at least the target sparsity
    assert all(got >= want - 0.02 for got, want in zip(token_s, sweep)), (name, token_s)


def _planted(seed, T=256, n_cols=3, strength=4.0, per_head=False):
  """Random q, k plus a few key columns every query attends strongly (attention sinks / retrieval columns);
  ``per_head``: query head ``h`` is drawn to them with strength ``strength * h / (H - 1)`` (head 0 diffuse)."""
  q, k, v = _qkv(seed, T)
  rng = np.random.default_rng(seed)
  u = rng.standard_normal(D).astype(np.float32)
  u /= np.linalg.norm(u)
  head = np.arange(H, dtype=np.float32)[:, None] / (H - 1) if per_head else np.ones((H, 1), np.float32)
  q = np.asarray(q) * 0.3 + strength * head * u
  k = np.asarray(k) * 0.3
  cols = rng.choice(np.arange(8, T // 2), n_cols, replace=False)
  k[:, cols] += 4.0 * strength * u
  return jnp.asarray(q), jnp.asarray(k), v


def test_planted_columns_high_recall_at_high_sparsity():
  T = 256
  q, k, _ = _planted(8, T)
  cfg = sparse.VerticalSlash.for_sparsity(0.95, T, last_q=32, force_first=0, force_local=1)
  sel = cfg.select(q, k)
  assert float(sparse.sparsity(sel).mean) > 0.9
  assert float(sparse.attention_recall(q, k, sel).mean) > 0.9
  # random data at the same budget keeps far less
  qr, kr, _ = _qkv(8, T)
  assert float(sparse.attention_recall(qr, kr, cfg.select(qr, kr)).mean) < 0.5


def test_bad_input_raises_clear_errors():
  q, k, _ = _qkv(9, 64)
  with pytest.raises(ValueError, match="n_vertical=0"):
    sparse.VerticalSlash(0, 8, force_first=0, force_local=0)
  with pytest.raises(ValueError, match="n_slash=-3"):
    sparse.VerticalSlash(8, -3)
  with pytest.raises(ValueError, match="n_vertical=2 is below force_first=4"):
    sparse.VerticalSlash(2, 64)
  with pytest.raises(ValueError, match="n_slash=8 is below force_local=64"):
    sparse.VerticalSlash(8, 8)
  with pytest.raises(ValueError, match="n_vertical=65 exceeds the context length S=64"):
    sparse.VerticalSlash(65, 8, last_q=8, force_local=4).build(q, k, block_q=16, block_k=16)
  with pytest.raises(ValueError, match="last_q=128 exceeds"):
    sparse.VerticalSlash(8, 8, last_q=128, force_local=4).select(q, k)
  with pytest.raises(ValueError, match="alpha must be a number in \\(0, 1\\], got 1.5"):
    sparse.FlexPrefill(1.5, 4, 8, 8)
  with pytest.raises(ValueError, match="min_budget=0"):
    sparse.FlexPrefill(0.9, 0, 8, 8)
  with pytest.raises(ValueError, match="min_budget=16 exceeds"):
    sparse.FlexPrefill(0.9, 16, 8, 80, force_local=4)
  with pytest.raises(ValueError, match="top_k=5 exceeds the number of kv blocks"):
    sparse.BlockTopK(5).build(q, k, block_q=16, block_k=16)
  with pytest.raises(ValueError, match="top_k=1 is below the forced blocks"):
    sparse.BlockTopK(1).build(q, k, block_q=16, block_k=16)
  with pytest.raises(ValueError, match="top_k=0"):
    sparse.BlockTopK(0)
  with pytest.raises(ValueError, match="block_q=0 must be >= 1"):
    sparse.BlockTopK(2).build(q, k, block_q=0, block_k=16)
  with pytest.raises(ValueError, match="target sparsity must be a number in \\[0, 1\\), got 1.0"):
    sparse.VerticalSlash.for_sparsity(1.0, 64)
  with pytest.raises(ValueError, match="force_first \\+ force_local"):
    sparse.VerticalSlash.for_sparsity(0.95, 64)
  with pytest.raises(ValueError, match="T <= S"):
    sparse.BlockTopK(2).build(q, k[:, :32], block_q=16, block_k=16)
  index = sparse.BlockTopK(4).build(q, k, block_q=16, block_k=16)
  q2, k2, v2 = _qkv(9, 32)
  with pytest.raises(ValueError, match="built for T=64, S=64"):
    sparse.sparse_attention(q2, k2, v2, index)
  with pytest.raises(ValueError, match="built for T=64, S=64"):
    sparse.attention_recall(q2, k2, index)


@pytest.mark.parametrize("T,S,bq,bk", [(37, 53, 8, 16), (20, 100, 64, 5)])
def test_block_conversion_and_sparsity_on_odd_shapes(T, S, bq, bk):
  """Hand-made selections (not builder-driven) on ragged, offset and unequal block shapes."""
  rng = np.random.default_rng(T * S)
  nv, ns = 5, 4
  cols = np.stack([rng.choice(S, nv, replace=False) for _ in range(B * H)]).reshape(B, H, nv)
  offs = np.stack([rng.choice(S, ns, replace=False) for _ in range(B * H)]).reshape(B, H, ns)
  cv, ov = rng.random((B, H, nv)) < 0.8, rng.random((B, H, ns)) < 0.8
  sel = sparse.VerticalSlashSelection(jnp.asarray(cols, jnp.int32), jnp.asarray(cv), jnp.asarray(offs, jnp.int32),
                                      jnp.asarray(ov), T, S)
  token = ref.vs_mask_reference(_sets(cols, cv), _sets(offs, ov), T, S)
  np.testing.assert_array_equal(np.asarray(sel.to_mask()), token)
  index = sel.to_blocks(block_q=bq, block_k=bk)
  np.testing.assert_array_equal(np.asarray(index.layout()), ref.blocks_covering(token, bq, bk))
  area = sparse.causal_mask(T, S).area(T, S)
  np.testing.assert_allclose(np.asarray(sparse.sparsity(sel).per_head), 1 - token.sum((-1, -2)) / area, atol=1e-6)
  np.testing.assert_allclose(np.asarray(sparse.sparsity(index).per_head),
                             1 - np.asarray(index.to_mask()).sum((-1, -2)) / area, atol=1e-6)
  # user lists with repeats and entries past the count: each listed block counts once
  nq, nk = -(-T // bq), -(-S // bk)
  idx = rng.integers(0, nk, (B, H, nq, 3)).astype(np.int32)
  idx[..., 1] = idx[..., 0]
  cnt = rng.integers(0, 4, (B, H, nq)).astype(np.int32)
  user = sparse.BlockIndex(jnp.asarray(idx), jnp.asarray(cnt), bq, bk, T, S)
  np.testing.assert_allclose(np.asarray(sparse.sparsity(user).per_head),
                             1 - np.asarray(user.to_mask()).sum((-1, -2)) / area, atol=1e-6)


def test_recall_under_a_non_causal_mask():
  q, k, _ = _qkv(10, 64)
  sel = sparse.VerticalSlash(8, 8, last_q=16, force_first=1, force_local=2).select(q, k)
  token = np.asarray(sel.to_mask())
  got = sparse.attention_recall(q, k, sel, mask=masks.Full(), chunk=16)
  P = ref.dense_probs(q, k, allowed=np.ones((64, 64), bool))
  np.testing.assert_allclose(np.asarray(got.per_head), (P * token).sum(-1).mean(-1), rtol=1e-5, atol=1e-6)
