"""block_sparse_attention on the Pallas kernels (interpret mode on CPU): data-dependent lists against the reference.

The device-side list builder against a numpy oracle; both kernels' output and dq/dk/dv against
``block_sparse_attention(implementation="reference")`` with random lists (a zero count, repeated indices, more
entries than kv blocks), GQA, T and S that are not block multiples and a static causal mask on top; refusal of block
sizes the kernels cannot run (the dispatch chain then falls back to xla); lowering of the dynamic path to Triton and
Mosaic (no accelerator needed).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import backend as backend_lib
from jaxattn import masks, testing
from jaxattn.ops.softmax import block_sparse
from jaxattn.ops.softmax.mask_info import mask_info


def _lists(seed, B, H, nq, nk, K):
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, nk, (B, H, nq, K)).astype(np.int32)
  cnt = rng.integers(0, K + 1, (B, H, nq)).astype(np.int32)
  cnt[0, 0, 0] = 0  # a query block that visits nothing
  cnt[0, 1, 0] = max(cnt[0, 1, 0], 3)
  idx[0, 1, 0, :3] = idx[0, 1, 0, 0]  # a repeated index counts once
  return jnp.asarray(idx), jnp.asarray(cnt)


def test_device_lists_match_numpy_oracle():
  B, H, nq, nk, K, b = 2, 3, 5, 4, 6, 16
  idx, cnt = _lists(0, B, H, nq, nk, K)
  info = mask_info(masks.Causal(), nq * b - 5, nk * b - 3, b, b)
  got = jax.jit(block_sparse.device_lists, static_argnums=2)(idx, cnt, info)
  assert got.index.shape == (B, H, nq, min(K, nk)) and got.index_t.shape == (B, H, nk, nq)
  assert all(a.dtype == jnp.int32 for a in got)
  for bb in range(B):
    for h in range(H):
      visit = np.zeros((nq, nk), bool)
      for r in range(nq):
        cols = sorted({int(j) for j in np.asarray(idx[bb, h, r, :cnt[bb, h, r]]) if info.layout[r, j] != 0})
        visit[r, cols] = True
        n = len(cols)
        assert got.count[bb, h, r] == n
        row = np.asarray(got.index[bb, h, r])
        np.testing.assert_array_equal(row[:n], cols)
        np.testing.assert_array_equal(row[n:], cols[-1] if n else 0)  # padding repeats the last valid entry
        np.testing.assert_array_equal(got.tile[bb, h, r], info.tile_of[r, row])
      for c in range(nk):
        rows = np.nonzero(visit[:, c])[0]
        n = len(rows)
        assert got.count_t[bb, h, c] == n
        col = np.asarray(got.index_t[bb, h, c])
        np.testing.assert_array_equal(col[:n], rows)
        np.testing.assert_array_equal(col[n:], rows[-1] if n else 0)
        np.testing.assert_array_equal(got.tile_t[bb, h, c], info.tile_of[col, c])


@functools.partial(jax.jit, static_argnames=("impl", "bq", "bk", "mask"))
def _run(q, k, v, idx, cnt, w, *, impl, bq, bk, mask):
  """The output and the gradients of ``sum(out * w)``."""

  def loss(q, k, v):
    o = jaxattn.block_sparse_attention(q, k, v, idx, cnt, block_q=bq, block_k=bk, mask=mask, implementation=impl)
    return jnp.sum(o * w), o

  (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


# id: (implementation, B, T, S, H, G, D, E, block_q, block_k, K)
CASES = {
    # 4 x 5 blocks of 16 (T, S padded), GQA, E != D, K > nK.
    "gpu": ("pallas_gpu", 2, 60, 72, 4, 2, 32, 16, 16, 16, 6),
    # 2 x 3 blocks of 128 (S padded), GQA, fused [B, L, N * 128] q/k and split [B, N, L, 64] v/out layouts, K > nK.
    "tpu": ("pallas_tpu", 1, 256, 320, 4, 2, 128, 64, 128, 128, 4),
}


@pytest.mark.parametrize("mask", [None, masks.Causal()], ids=["nomask", "causal"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_interpret(case, mask):
  impl, B, T, S, H, G, D, E, bq, bk, K = CASES[case]
  nq, nk = -(-T // bq), -(-S // bk)
  q, k, v = testing.random_qkv(jax.random.key(1), B=B, T=T, S=S, H=H, G=G, D=D, E=E)
  idx, cnt = _lists(2, B, H, nq, nk, K)
  w = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, H, E)), jnp.float32)
  out, grads = _run(q, k, v, idx, cnt, w, impl=impl, bq=bq, bk=bk, mask=mask)
  r_out, r_grads = _run(q, k, v, idx, cnt, w, impl="reference", bq=bq, bk=bk, mask=mask)
  testing.assert_close(out, r_out, name="out")
  for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
    testing.assert_close(g, r, kind="grad", name=name)


def test_refuses_block_sizes_and_falls_back():
  q, k, v = testing.random_qkv(jax.random.key(0), B=1, T=256, S=256, H=2, D=16)
  call = lambda impl, bq, bk: jaxattn.block_sparse_attention(
      q, k, v, jnp.zeros((1, 2, -(-256 // bq), 1), jnp.int32), jnp.ones((1, 2, -(-256 // bq)), jnp.int32),
      block_q=bq, block_k=bk, implementation=impl)
  with pytest.raises(NotImplementedError, match="power of two"):
    call("pallas_gpu", 8, 16)
  with pytest.raises(NotImplementedError, match="power of two"):
    call("pallas_gpu", 16, 48)
  with pytest.raises(NotImplementedError, match="block_k"):
    call("pallas_tpu", 128, 64)
  with pytest.raises(NotImplementedError, match="block_q_dkv"):  # block_q is the dk/dv kernel's lane dim
    call("pallas_tpu", 64, 128)
  with pytest.warns(backend_lib.FallbackWarning) as record:
    testing.assert_close(call(("pallas_gpu", "pallas_tpu", "xla"), 8, 64), call("xla", 8, 64))
  assert [str(w.message).split("(")[0] for w in record] == [
      "block_sparse_attention: skipping 'pallas_gpu' ", "block_sparse_attention: skipping 'pallas_tpu' "]


def test_config_tiles_must_be_the_lists_blocks():
  q, k, v = testing.random_qkv(jax.random.key(1), B=1, T=64, S=64, H=2, D=16)
  idx, cnt = jnp.zeros((1, 2, 2, 1), jnp.int32), jnp.ones((1, 2, 2), jnp.int32)
  run = lambda impl: jaxattn.block_sparse_attention(q, k, v, idx, cnt, block_q=32, block_k=32, implementation=impl)
  with pytest.raises(ValueError, match=r"^pallas_gpu: PallasGpuConfig\.block_k_dq=16 must equal the lists' block"):
    run(("pallas_gpu", jaxattn.PallasGpuConfig(32, 32, block_k_dq=16)))
  with pytest.raises(ValueError, match=r"^pallas_gpu: PallasGpuConfig\.num_warps=3 must be None or one of"):
    run(("pallas_gpu", jaxattn.PallasGpuConfig(32, 32, num_warps=3)))
  with pytest.raises(ValueError, match=r"^pallas_tpu: PallasTpuConfig\.block_q=128 must equal the lists' block"):
    jaxattn.block_sparse_attention(q, k, v, idx[:, :, :1], cnt[:, :, :1], block_q=64, block_k=64,
                                   implementation=("pallas_tpu", jaxattn.PallasTpuConfig(128, 64)))
  # launch knobs are free: the lists' tiles with 2 warps still match the reference
  got = run(("pallas_gpu", jaxattn.PallasGpuConfig(32, 32, num_warps=2, num_stages=1)))
  testing.assert_close(got, run("reference"))


def _lowered_grad(name, B, T, S, H, G, D, bq, bk, K, mask):
  """The jitted gradient of the dynamic path with compiled (not interpreted) kernels, and its arg specs."""
  nq = -(-T // bq)
  specs = (jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16), jax.ShapeDtypeStruct((B, S, G, D), jnp.bfloat16),
           jax.ShapeDtypeStruct((B, S, G, D), jnp.bfloat16), jax.ShapeDtypeStruct((B, H, nq, K), jnp.int32),
           jax.ShapeDtypeStruct((B, H, nq), jnp.int32))
  call = block_sparse.BlockSparseCall(B=B, T=T, S=S, H=H, G=G, D=D, E=D, K=K, dtype="bfloat16", block_q=bq,
                                      block_k=bk, mask=mask, scale=D ** -0.5)
  be = block_sparse.BACKENDS[name]
  config = be.default_config(call)

  def f(q, k, v, idx, cnt):
    out = backend_lib.flash_vjp(be, call, config, q, k, v, idx, cnt)
    return jnp.sum(out.astype(jnp.float32))

  return jax.jit(jax.grad(f, (0, 1, 2))), specs


def test_lowers_to_triton_for_cuda():
  fn, specs = _lowered_grad("pallas_gpu", 1, 300, 300, 4, 2, 128, 64, 64, 3, masks.Causal())
  with backend_lib.use_platform("gpu"):
    assert fn.trace(*specs).lower(lowering_platforms=("cuda",)).as_text().count("xla.gpu.triton") == 3


def test_lowers_to_mosaic_for_tpu():
  fn, specs = _lowered_grad("pallas_tpu", 1, 1024, 1024, 4, 2, 128, 256, 256, 2, masks.Causal())
  with backend_lib.use_platform("tpu"):
    assert jax.export.export(fn, platforms=["tpu"])(*specs).mlir_module().count("tpu_custom_call") == 3
