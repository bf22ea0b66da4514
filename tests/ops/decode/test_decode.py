"""decode_attention: the reference against a numpy oracle, the xla backend (forward, statistics, gradients) against
the reference, masked non-finite values, empty rows, dispatch, the cache wiring and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import cache, testing
from jaxattn.ops.decode import XlaConfig
from jaxattn.ops.decode.api import resolve_backend, make_call

B, H, G, D, E, L = 2, 4, 2, 16, 8, 40


def _inputs(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, H, D)), dtype)
  k = jnp.asarray(rng.standard_normal((B, L, G, D)), dtype)
  v = jnp.asarray(rng.standard_normal((B, L, G, E)), dtype)
  return q, k, v


def _selection(seed=1, K=12):
  """An index with a repeated position, per-(b, g) counts and a count of 0."""
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, L, (B, G, K)).astype(np.int32)
  idx[0, 0, 1] = idx[0, 0, 0]  # a repeat: attended once
  counts = np.array([[K, 7], [0, K - 2]], np.int32)  # [1, 0] selects nothing
  return idx, counts


def _oracle(q, k, v, lengths, valid=None, idx=None, counts=None, scale=None):
  """Loops in float64: ``(out [B, H, E], probs [B, H, L], probs per entry [B, H, K] or None)``."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  scale = D ** -0.5 if scale is None else scale
  R = H // G
  out, probs = np.zeros((B, H, E)), np.zeros((B, H, L))
  per_entry = None if idx is None else np.zeros((B, H, idx.shape[-1]))
  for b in range(B):
    for h in range(H):
      g = h // R
      att = np.arange(L) < lengths[b]
      if valid is not None:
        att &= valid[b, :, g]
      if idx is not None:
        sel = np.zeros(L, bool)
        sel[idx[b, g, :counts[b, g]]] = True
        att &= sel
      if not att.any():
        continue
      s = k[b, :, g] @ q[b, h] * scale
      p = np.where(att, np.exp(s - s[att].max()), 0.0)
      p /= p.sum()
      probs[b, h] = p
      out[b, h] = p @ v[b, :, g]
      if idx is not None:
        n = counts[b, g]
        per_entry[b, h, :n] = p[idx[b, g, :n]]
  return out, probs, per_entry


def _colsum(p):
  return p.reshape(B, G, H // G, -1).sum(2)


def test_reference_matches_numpy_oracle():
  q, k, v = _inputs()
  lengths = np.array([33, 0], np.int32)
  valid = np.random.default_rng(5).random((B, L, G)) < 0.7
  out, probs = jaxattn.decode_attention(q, k, v, lengths=lengths, valid=valid, return_stats="probs",
                                        implementation="reference")
  w_out, w_probs, _ = _oracle(q, k, v, lengths, valid)
  testing.assert_close(out, w_out, name="dense out")
  testing.assert_close(probs, w_probs, name="dense probs")
  idx, counts = _selection()
  lengths = np.array([L, 30], np.int32)
  out, colsum = jaxattn.decode_attention(q, k, v, lengths=lengths, index=idx, index_counts=counts,
                                         return_stats="colsum", implementation="reference")
  w_out, _, w_entry = _oracle(q, k, v, lengths, idx=idx, counts=counts)
  testing.assert_close(out, w_out, name="gathered out")
  testing.assert_close(colsum, _colsum(w_entry), name="gathered colsum")


@functools.partial(jax.jit, static_argnames=("impl", "stats", "gathered"))
def _loss_and_grads(q, k, v, lengths, valid, idx, counts, w, ws, *, impl, stats, gathered):
  def loss(q, k, v):
    kw = dict(index=idx, index_counts=counts) if gathered else dict(valid=valid)
    out, st = jaxattn.decode_attention(q, k, v, lengths=lengths, return_stats=stats, implementation=impl, **kw)
    return jnp.sum(out.astype(jnp.float32) * w) + jnp.sum(st * ws[..., :st.shape[-1]]), (out, st)

  return jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)


@pytest.mark.parametrize("stats,gathered", [("probs", False), ("colsum", True),
                                            pytest.param("colsum", False, marks=pytest.mark.slow),
                                            pytest.param("probs", True, marks=pytest.mark.slow)],
                         ids=["probs-dense", "colsum-gathered", "colsum-dense", "probs-gathered"])
def test_xla_matches_reference_with_gradients(stats, gathered):
  q, k, v = _inputs(2)
  idx, counts = _selection(3)
  lengths = jnp.asarray([L - 3, 0] if not gathered else [L, 25], jnp.int32)
  valid = jnp.asarray(np.random.default_rng(4).random((B, L, G)) < 0.8)
  rng = np.random.default_rng(6)
  w = jnp.asarray(rng.standard_normal((B, H, E)), jnp.float32)
  rows = H if stats == "probs" else G
  ws = jnp.asarray(rng.standard_normal((B, rows, L)), jnp.float32)
  impl = ("xla", XlaConfig(chunk=7))  # chunks that do not divide L or K: the shifted last chunk
  args = (q, k, v, lengths, valid, jnp.asarray(idx), jnp.asarray(counts), w, ws)
  (_, (out, st)), grads = _loss_and_grads(*args, impl=impl, stats=stats, gathered=gathered)
  (_, (r_out, r_st)), r_grads = _loss_and_grads(*args, impl="reference", stats=stats, gathered=gathered)
  testing.assert_close(out, r_out, name="out")
  testing.assert_close(st, r_st, name=stats)
  for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
    testing.assert_close(g, r, kind="grad", name=name)
  assert np.abs(np.asarray(grads[1])).sum() > 0  # the test can fail: gradients are not all zero


def test_xla_bfloat16():
  q, k, v = _inputs(7, jnp.bfloat16)
  idx, counts = _selection(8)
  got = jaxattn.decode_attention(q, k, v, index=idx, index_counts=counts, implementation="xla")
  want = jaxattn.decode_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), index=idx,
                                  index_counts=counts, implementation="reference")
  assert got.dtype == jnp.bfloat16
  testing.assert_close(got, want.astype(jnp.bfloat16), dtype=jnp.bfloat16)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_nonfinite_outside_the_attended_keys_never_reaches_the_output(impl):
  q, k, v = _inputs(9)
  lengths = np.array([30, 20], np.int32)
  valid = np.ones((B, L, G), bool)
  valid[0, 3, 1] = False
  k = k.at[:, 32:].set(jnp.nan).at[1, 25].set(jnp.inf).at[0, 3, 1].set(jnp.nan)
  v = v.at[:, 35:].set(jnp.inf).at[1, 22].set(jnp.nan).at[0, 3, 1].set(-jnp.inf)
  out, st = jaxattn.decode_attention(q, k, v, lengths=lengths, valid=jnp.asarray(valid), return_stats="probs",
                                     implementation=impl)
  clean_k, clean_v = (jnp.where(jnp.isfinite(x), x, 0.0) for x in (k, v))
  w_out, w_probs, _ = _oracle(q, clean_k, clean_v, lengths, valid)
  testing.assert_close(out, w_out)
  testing.assert_close(st, w_probs)
  # gathered: non-finite values at positions nobody lists
  idx = np.tile(np.arange(0, 20, 2, dtype=np.int32), (B, G, 1))
  k2, v2 = k.at[:, 1:20:2].set(jnp.nan), v.at[:, 1:20:2].set(jnp.inf)
  out = jaxattn.decode_attention(q, k2, v2, index=idx, implementation=impl)
  w_out, _, _ = _oracle(q, clean_k, clean_v, np.full(B, L), idx=idx, counts=np.full((B, G), 10))
  testing.assert_close(out, w_out)
  # a row that attends a non-finite key gets NaN (never a silently finite value)
  bad = jaxattn.decode_attention(q, k, v, lengths=np.array([33, 20], np.int32), implementation=impl)
  assert np.isnan(np.asarray(bad[0])).all() and np.isfinite(np.asarray(bad[1])).all()


@pytest.mark.parametrize("impl", [pytest.param("reference", marks=pytest.mark.slow), "xla"])
def test_rows_without_keys_give_zeros(impl):
  q, k, v = _inputs(10)
  k, v = k.at[1].set(jnp.nan), v.at[1].set(jnp.nan)  # sequence 1 is empty: its contents never matter
  f = lambda q, k, v: jaxattn.decode_attention(q, k, v, lengths=jnp.asarray([L, 0]), return_stats="colsum",
                                               implementation=impl)
  out, st = f(q, k, v)
  assert not np.asarray(out[1]).any() and not np.asarray(st[1]).any()
  testing.assert_no_nan((out, st))
  grads = jax.grad(lambda q: jnp.sum(f(q, k, v)[0]))(q)
  testing.assert_no_nan(grads)
  assert not np.asarray(grads[1]).any()
  idx = np.zeros((B, G, 3), np.int32)
  out = jaxattn.decode_attention(q, k.at[1].set(0.0), v.at[1].set(0.0), index=idx,
                                 index_valid=np.zeros((B, G, 3), bool), implementation=impl)
  assert not np.asarray(out).any()


def test_traced_out_of_range_entries_are_dropped_and_lengths_clamped():
  q, k, v = _inputs(11)
  idx = np.array([[[3, 5, L, -1], [0, 1, 2, 99]], [[7, 7, 8, L + 5], [39, 38, -7, 0]]], np.int32)
  ok = (idx >= 0) & (idx < L)
  run = jax.jit(lambda idx, n: jaxattn.decode_attention(q, k, v, index=idx, lengths=n, implementation="xla"))
  got = run(jnp.asarray(idx), jnp.asarray([L + 10, L]))
  want = jaxattn.decode_attention(q, k, v, index=np.where(ok, idx, 0), index_valid=ok, implementation="reference")
  testing.assert_close(got, want)


def test_cache_attend_and_quest_attend_use_decode_attention():
  q, k, v = _inputs(12)
  c = cache.prefill(cache.init(batch=B, capacity=L, num_kv_heads=G, head_dim=D, value_dim=E, page_size=8),
                    k[:, :30], v[:, :30], lengths=jnp.asarray([30, 17]))
  q4 = q[:, None]
  want = jaxattn.decode_attention(q, c.k, c.v, lengths=c.lengths, implementation="reference")
  testing.assert_close(cache.attend(q4, c)[:, 0], want, name="attend")
  out, pages, valid = cache.quest_attend(q4, c, 16)
  mask = np.asarray(cache.quest_key_mask(c, pages, valid))  # [B, G, L]
  want = jaxattn.decode_attention(q, c.k, c.v, lengths=c.lengths, valid=jnp.asarray(mask.transpose(0, 2, 1)),
                                  implementation="reference")
  testing.assert_close(out[:, 0], want, name="quest_attend")


def test_cpu_default_is_xla_and_pallas_backends_refuse_gradients():
  q, k, v = _inputs(13)
  call = make_call(q, k, v)
  assert resolve_backend(call)[0].name == "xla"
  with pytest.raises(NotImplementedError, match="'pallas_gpu' is forward only"):
    jax.grad(lambda q: jaxattn.decode_attention(q, k, v, implementation="pallas_gpu").sum())(q)
  g = jax.grad(lambda q: jaxattn.decode_attention(q, k, v, implementation="xla").sum())(q)
  testing.assert_no_nan(g)


def test_bad_input_raises_naming_the_value():
  q, k, v = _inputs(14)
  run = lambda **kw: jaxattn.decode_attention(q, k, v, **kw)
  with pytest.raises(ValueError, match=r"q must have rank 3"):
    jaxattn.decode_attention(q[:, None], k, v)
  with pytest.raises(ValueError, match=r"not a multiple of k's 3 kv heads"):
    jaxattn.decode_attention(q, jnp.zeros((B, L, 3, D)), jnp.zeros((B, L, 3, E)))
  with pytest.raises(ValueError, match=r"lengths must lie in \[0, L=40\].*got 41 at b=1"):
    run(lengths=np.array([3, 41]))
  with pytest.raises(ValueError, match=r"lengths must be int \[B=2\]"):
    run(lengths=np.array([3]))
  with pytest.raises(ValueError, match=r"index entries must lie in \[0, L=40\).*got 40 at \[b, g, k\] = \[1, 0, 2\]"):
    run(index=np.array([[[0, 1, 2]] * G, [[0, 1, 40]] * G]))
  run(index=np.array([[[0, 1, 2]] * G, [[0, 1, 40]] * G]), index_counts=np.full((B, G), 2))  # past the count: fine
  with pytest.raises(ValueError, match=r"index_counts must lie in \[0, K=3\], got 4 at \[b, g\] = \[0, 1\]"):
    run(index=np.zeros((B, G, 3), np.int32), index_counts=np.array([[0, 4], [1, 1]]))
  with pytest.raises(ValueError, match="not both"):
    run(index=np.zeros((B, G, 3), np.int32), index_counts=np.ones((B, G), np.int32),
        index_valid=np.ones((B, G, 3), bool))
  with pytest.raises(ValueError, match=r"index must be int \[B=2, G=2, K\]"):
    run(index=np.zeros((B, H, 3), np.int32))
  with pytest.raises(ValueError, match="index must be integers"):
    run(index=np.zeros((B, G, 3), np.float32))
  with pytest.raises(ValueError, match=r"valid must be bool \[B=2, L=40, G=2\]"):
    run(valid=np.ones((B, G, L), bool))
  with pytest.raises(ValueError, match="return_stats must be one of"):
    run(return_stats="lse")
  with pytest.raises(ValueError, match="scale must be a finite float > 0"):
    run(scale=-1.0)
  with pytest.raises(ValueError, match=r"^xla: XlaConfig\.chunk=0 must be a positive int"):
    run(implementation=("xla", XlaConfig(0)))
  with pytest.raises(ValueError, match=r"^pallas_gpu: PallasGpuConfig\.block_k=24 must be a power of two"):
    run(implementation=("pallas_gpu", jaxattn.ops.decode.PallasGpuConfig(block_k=24)))
  with pytest.raises(ValueError, match=r"^pallas_tpu: PallasTpuConfig\.block_k=64 breaks the TPU"):
    jaxattn.decode_attention(q, jnp.zeros((B, 256, G, D)), jnp.zeros((B, 256, G, E)),
                             implementation=("pallas_tpu", jaxattn.ops.decode.PallasTpuConfig(block_k=64)))
  with pytest.raises(NotImplementedError, match="does not support float16"):
    jaxattn.decode_attention(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16),
                             implementation="pallas_tpu")
