"""decode_attention on the Pallas kernels (interpret mode on CPU) against the reference; the block-list builders
against numpy; lowering of both kernels for their hardware (no accelerator needed).

One input set covers, per kernel: GQA (R = 2), several key blocks and a partial last block (L not a block multiple),
ragged lengths with a sequence of length 0, a per-slot validity, NaN / inf in k and v past the lengths, at invalid
slots and at unlisted positions, a gathered index with a repeated position, invalid entries and an all-invalid
(sequence, kv head), several GPU splits, and the statistics.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import backend as backend_lib
from jaxattn import testing
from jaxattn.ops.decode import PallasGpuConfig, PallasTpuConfig, api
from pallas_kernels.decode import lists

B, H, G, D, E = 2, 4, 2, 32, 16
CASES = {  # id: (implementation, L)
    "gpu": (("pallas_gpu", PallasGpuConfig(block_k=16, num_splits=3)), 70),
    "tpu": (("pallas_tpu", PallasTpuConfig(block_k=128)), 300),
}


def _inputs(L, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, H, D)), jnp.float32)
  k = rng.standard_normal((B, L, G, D)).astype(np.float32)
  v = rng.standard_normal((B, L, G, E)).astype(np.float32)
  lengths = np.array([L - 9, 0], np.int32)
  valid = rng.random((B, L, G)) < 0.8
  valid[:, L - 9:] = True  # the keys past the length are masked by the length only
  k[0, L - 9:] = np.nan  # past the length
  v[0, L - 5:] = np.inf
  bad = np.argwhere(~valid[0, :L - 9])[0]
  k[0, bad[0], bad[1]] = np.nan  # at an invalid slot
  K = 9
  idx = rng.integers(0, L - 9, (B, G, K)).astype(np.int32)
  idx[0, 0, 1] = idx[0, 0, 0]  # a repeated position
  ev = rng.random((B, G, K)) < 0.7
  ev[1, 1] = False  # an all-invalid (sequence, kv head)
  idx[0, 1, 2], ev[0, 1, 2] = L - 9, True  # a listed position at the length: masked (k there is NaN)
  listed = np.zeros((B, L), bool)
  for b in range(B):
    listed[b, idx[b].reshape(-1)] = True
  unlisted = np.argwhere(~listed[1, :L - 9])[:3, 0]
  v[1, unlisted] = np.nan  # at positions nobody lists (sequence 1 is dense-empty: length 0)
  return q, jnp.asarray(k), jnp.asarray(v), lengths, valid, idx, ev


@pytest.mark.parametrize("form", ["dense", "gathered"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_interpret(case, form):
  impl, L = CASES[case]
  q, k, v, lengths, valid, idx, ev = _inputs(L)
  if form == "dense":
    kw = dict(lengths=lengths, valid=valid, return_stats="probs")
  else:
    kw = dict(lengths=np.array([L - 9, L], np.int32), index=idx, index_valid=ev, return_stats="colsum")
  out, st = jaxattn.decode_attention(q, k, v, implementation=impl, **kw)
  r_out, r_st = jaxattn.decode_attention(q, k, v, implementation="reference", **kw)
  testing.assert_close(out, r_out, name="out")
  testing.assert_close(st, r_st, name="stats")
  assert np.abs(np.asarray(out[0])).sum() > 0  # not a trivially empty comparison
  if form == "dense":
    assert not np.asarray(out[1]).any()  # length 0
  else:
    assert not np.asarray(out[1, 2:]).any()  # kv head 1 of sequence 1 lists nothing valid


@pytest.mark.parametrize("case", ["gpu", pytest.param("tpu", marks=pytest.mark.slow)])
def test_bfloat16_default_config(case):
  (name, _), L = CASES[case]
  q, k, v, *_ = _inputs(L, seed=1)
  q, k, v = (jnp.asarray(jnp.where(jnp.isfinite(x), x, 0.0), jnp.bfloat16) for x in (q, k, v))
  lengths = np.array([L, L // 2], np.int32)
  got = jaxattn.decode_attention(q, k, v, lengths=lengths, implementation=name)
  want = jaxattn.decode_attention(*(x.astype(jnp.float32) for x in (q, k, v)), lengths=lengths,
                                  implementation="reference")
  testing.assert_close(got, want.astype(jnp.bfloat16), dtype=jnp.bfloat16)


def test_block_lists_match_numpy():
  rng = np.random.default_rng(3)
  L, bk, K = 100, 16, 12
  idx = jnp.asarray(rng.integers(0, L, (B, G, K)), jnp.int32)
  ev = jnp.asarray(rng.random((B, G, K)) < 0.6).at[1, 0].set(False)
  blocks, counts = jax.jit(lists.gathered_lists, static_argnums=(2, 3))(idx, ev, L, bk)
  mask = np.asarray(jax.jit(lists.scatter_key_mask, static_argnums=2)(idx, ev, L))
  nk = -(-L // bk)
  assert blocks.shape == (B, G, min(K, nk))
  idx_np, ev_np, blocks_np, counts_np = (np.asarray(x) for x in (idx, ev, blocks, counts))
  for b in range(B):
    for g in range(G):
      want = sorted({int(i) // bk for i in idx_np[b, g][ev_np[b, g]]})
      assert counts_np[b, g] == len(want)
      np.testing.assert_array_equal(blocks_np[b, g, :len(want)], want)
      m = np.zeros(L, bool)
      m[idx_np[b, g][ev_np[b, g]]] = True
      np.testing.assert_array_equal(mask[b, g], m)
  fetch = np.asarray(lists.fetch_order(blocks, counts, nk))
  assert fetch.min() >= 0 and fetch.max() < nk
  np.testing.assert_array_equal(fetch[1, 0], 0)  # an empty list fetches block 0 only
  d_blocks, d_counts = lists.dense_lists(jnp.asarray([L, 17]), G, L, bk)
  np.testing.assert_array_equal(np.asarray(d_counts), [[nk, nk], [2, 2]])


def _lowering_fn(name, L, K):
  specs = (jax.ShapeDtypeStruct((B, H, 128), jnp.bfloat16), jax.ShapeDtypeStruct((B, L, G, 128), jnp.bfloat16),
           jax.ShapeDtypeStruct((B, L, G, 128), jnp.bfloat16), jax.ShapeDtypeStruct((B,), jnp.int32),
           jax.ShapeDtypeStruct((B, G, K), jnp.int32))
  fn = jax.jit(lambda q, k, v, n, idx: jaxattn.decode_attention(q, k, v, lengths=n, index=idx, implementation=name))
  return fn, specs


def test_lowers_to_triton_for_cuda():
  fn, specs = _lowering_fn("pallas_gpu", 1024, 64)
  with backend_lib.use_platform("gpu"):
    assert fn.trace(*specs).lower(lowering_platforms=("cuda",)).as_text().count("xla.gpu.triton") == 1


def test_lowers_to_mosaic_for_tpu():
  fn, specs = _lowering_fn("pallas_tpu", 2048, 64)
  with backend_lib.use_platform("tpu"):
    assert jax.export.export(fn, platforms=["tpu"])(*specs).mlir_module().count("tpu_custom_call") == 1


def test_gpu_default_splits_and_blocks():
  call = api.make_call(jax.ShapeDtypeStruct((1, 8, 128), jnp.bfloat16),
                       jax.ShapeDtypeStruct((1, 32768, 2, 128), jnp.bfloat16),
                       jax.ShapeDtypeStruct((1, 32768, 2, 128), jnp.bfloat16))
  cfg = api.BACKENDS["pallas_gpu"].default_config(call)
  assert (cfg.block_k, cfg.num_splits) == (128, 128)  # 256 programs for B * G = 2
  assert api.BACKENDS["pallas_tpu"].default_config(call).block_k == 512
