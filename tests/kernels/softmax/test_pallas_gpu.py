"""pallas_gpu: the Triton-style Pallas kernels (interpret mode on CPU) against the dense reference.

Forward output, lse and dq/dk/dv (autodiff through ``softmax_attention(implementation="pallas_gpu")``) for the
mask zoo, GQA/MQA, segment ids, soft cap, lengths that are not block multiples and rows with no allowed key; the
raw kernels with per-(batch, head) visiting lists; and a check that the kernels lower to Triton for CUDA (no GPU
needed). ``TestOnGpu`` repeats the comparison at real sizes on a GPU (skipped elsewhere).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import backend as backend_lib
from jaxattn import masks, testing
from tests.kernels.softmax import common
from jaxattn.ops.softmax import api as softmax_api
from jaxattn.ops.softmax import pallas_gpu
from jaxattn.ops.softmax.config import PallasGpuConfig
from pallas_kernels.softmax import gpu

BS = jaxattn.BlockSizes
_inputs, _run = common.inputs, common.run


def _compare(q, k, v, seg, w_out, w_lse, mask, cap, blocks, dtype=None):
  out, lse, grads = _run(q, k, v, seg, w_out, w_lse, impl="pallas_gpu", mask=mask, cap=cap, blocks=blocks)
  f32 = lambda x: x.astype(jnp.float32)
  r_out, r_lse, r_grads = _run(f32(q), f32(k), f32(v), seg, w_out, w_lse, impl="reference", mask=mask, cap=cap,
                               blocks=None)
  dtype = dtype or q.dtype
  assert out.dtype == q.dtype and out.shape == r_out.shape
  assert lse.dtype == jnp.float32 and lse.shape == r_lse.shape
  testing.assert_close(out, r_out, dtype=dtype, name="out")
  testing.assert_close(lse, r_lse, dtype=dtype, name="lse")
  for name, g, r, x in zip(("dq", "dk", "dv"), grads, r_grads, (q, k, v)):
    assert g.dtype == x.dtype and g.shape == x.shape
    testing.assert_close(g, r, dtype=dtype, kind="grad", name=name)
  return out, lse, grads


def _doc_ids(B, n, lens, empty_at=None):
  ids = np.repeat(np.arange(len(lens)), lens)[None].repeat(B, 0)[:, :n].astype(np.int32)
  if empty_at is not None:
    ids = ids.copy()
    ids[:, empty_at] = 99  # no key carries id 99: these query rows have no allowed key
  return jnp.asarray(ids)


_LAYOUT = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 1]], bool)

# id: (B, T, S, H, G, D, E, mask, segments, cap, blocks)
CASES = {
    # GQA; T = S = 56 (partial edge blocks); different forward / dk-dv tiles.
    "causal-gqa": (1, 56, 56, 4, 2, 32, 32, masks.Causal(), None, None,
                   BS(32, 16, block_q_dkv=16, block_k_dkv=32)),
    # Causal cross-attention (bottom-right aligned), MQA, E != D, soft cap.
    "cross-causal-mqa-softcap": (1, 40, 72, 2, 1, 16, 32, masks.Causal(32), None, 5.0, BS(16, 16)),
    # Local window with documents as segment ids and a few query rows that see nothing; batch 2.
    "local-segments-empty-rows": (2, 48, 48, 2, 2, 16, 16, masks.Local(10, 3), "docs", None, BS(16, 16)),
    # Documents as slices plus a sliding window; soft cap.
    "documents-slices-softcap": (1, 64, 64, 2, 1, 16, 16, masks.causal_document([20, 29, 15]) &
                                 masks.sliding_window(24), None, 3.0, BS(16, 32, block_q_dq=32, block_k_dq=16)),
    # Block layout combined with And / Or (causal cross offset); S not a block multiple; GQA.
    "blocksparse-and-or": (1, 48, 60, 4, 2, 16, 16, (masks.BlockSparse(_LAYOUT, 16, 16) & masks.Causal(12)) |
                           masks.Local(2, 0, 12), None, None, BS(16, 16)),
    # A whole query block with no allowed key (count 0) and a partial last block.
    "empty-query-block": (1, 40, 40, 2, 1, 16, 16, masks.Slices(((0, 16, 0, 40, "full"),
                                                                  (32, 40, 0, 24, "inv_causal"))),
                          None, None, BS(16, 16)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_interpret(case):
  B, T, S, H, G, D, E, mask, segments, cap, blocks = CASES[case]
  q, k, v, w_out, w_lse = _inputs(list(CASES).index(case), B, T, S, H, G, D, E)
  seg = None
  empty_rows = []
  if segments == "docs":
    empty_rows = [5, 6, 30]
    seg = (_doc_ids(B, T, [13, 20, 15], empty_at=empty_rows), _doc_ids(B, S, [13, 20, 15]))
  out, lse, grads = _compare(q, k, v, seg, w_out, w_lse, mask, cap, blocks)
  dense = np.asarray(mask.to_dense(T, S))
  empty = [i for i in range(T) if not dense[i].any()] + empty_rows
  if empty:
    assert np.all(np.asarray(out)[:, empty] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[:, :, empty]))
    assert np.all(np.asarray(grads[0])[:, empty] == 0)


def test_bf16_dense_default_blocks():
  """No mask, bf16, default tiles (shrunk to the short sequence), H=G."""
  q, k, v, w_out, w_lse = _inputs(7, 1, 24, 40, 2, 2, 32, 32, jnp.bfloat16)
  _compare(q, k, v, None, w_out, w_lse, None, None, None)


# ------------------------------------------------------------------------------------------ raw kernels, dynamic
def _per_head_lists(layout):
  """``layout [B, H, nR, nC]`` bool -> BlockLists with ``[B, H, nR, K]`` (entries past the count are junk)."""
  B, H, nr, nc = layout.shape
  K = max(1, int(layout.sum(-1).max()))
  index = np.full((B, H, nr, K), nc - 1, np.int32)
  count = layout.sum(-1).astype(np.int32)
  for b, h, r in np.ndindex(B, H, nr):
    cols = np.nonzero(layout[b, h, r])[0]
    index[b, h, r, :len(cols)] = cols
  return gpu.BlockLists(jnp.asarray(index), jnp.asarray(count))


def test_raw_kernels_per_batch_and_head_lists():
  """Data-dependent lists ``[B, H, nQ, K]`` (no tiles; S padding masked by the iota bound) vs a dense oracle."""
  B, T, S, H, G, D, bq, bk = 2, 32, 40, 4, 2, 16, 16, 16
  nq, nk = -(-T // bq), -(-S // bk)
  rng = np.random.default_rng(0)
  layout = rng.random((B, H, nq, nk)) < 0.5
  layout[0, 1, 0] = False  # an empty query block
  layout[1, 2, :, nk - 1] = True  # the partial padded kv block
  q, k, v, w_out, _ = _inputs(3, B, T, S, H, G, D, D)
  scale = D ** -0.5
  allowed = np.repeat(np.repeat(layout, bq, 2), bk, 3)[:, :, :T, :S]  # [B, H, T, S]

  def dense(q, k, v):
    R = H // G
    kk, vv = jnp.repeat(k, R, 2), jnp.repeat(v, R, 2)
    s = jnp.einsum("bthd,bshd->bhts", q, kk, precision="highest") * scale
    s = jnp.where(allowed, s, -jnp.inf)
    m = jnp.max(s, -1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = p.sum(-1, keepdims=True)
    o = jnp.einsum("bhts,bshe->bthe", p / jnp.where(l == 0, 1.0, l), vv, precision="highest")
    return o, jnp.where(l[..., 0] > 0, m[..., 0] + jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)), -jnp.inf)

  lists, lists_t = _per_head_lists(layout), _per_head_lists(layout.transpose(0, 1, 3, 2))
  kw = dict(scale=scale, interpret=True)

  @jax.jit
  def kernels(q, k, v, do):
    out, lse = gpu.flash_forward(q, k, v, None, None, lists, None, block_q=bq, block_k=bk, **kw)
    delta = jnp.einsum("bthe,bthe->bht", do, out)
    dq = gpu.flash_backward_dq(q, k, v, None, None, do, lse, delta, lists, None, block_q=bq, block_k=bk, **kw)
    dk, dv = gpu.flash_backward_dkv(q, k, v, None, None, do, lse, delta, lists_t, None, block_q=bq, block_k=bk,
                                    **kw)
    return out, lse, (dq, dk, dv)

  out, lse, grads = kernels(q, k, v, w_out)
  (r_out, r_lse), vjp = jax.vjp(dense, q, k, v)
  r_grads = vjp((w_out, jnp.zeros_like(r_lse)))
  testing.assert_close(out, r_out, name="out")
  testing.assert_close(lse, r_lse, name="lse")
  for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
    testing.assert_close(g, r, kind="grad", name=name)


# ------------------------------------------------------------------------------------------- options, refusals
def _call(T, S, D=128, dtype="bfloat16", **kw):
  q = jax.ShapeDtypeStruct((1, T, 2, D), jnp.dtype(dtype))
  kv = jax.ShapeDtypeStruct((1, S, 2, D), jnp.dtype(dtype))
  return softmax_api.make_call(q, kv, kv, **kw)


def test_config_validation_and_defaults():
  be = pallas_gpu.BACKEND
  call = _call(64, 64)
  for bad, field, match in ((PallasGpuConfig(48, 64), "block_q", "power of two"),
                            (PallasGpuConfig(64, 64, block_k_dq=8), "block_k_dq", "power of two"),
                            (PallasGpuConfig(64, 64, num_warps=3), "num_warps", "one of 1, 2, 4, 8, 16"),
                            (PallasGpuConfig(64, 64, num_stages_bwd=9), "num_stages_bwd", r"in \[1, 8\]")):
    with pytest.raises(ValueError, match=rf"^pallas_gpu: PallasGpuConfig\.{field}=\d+ must be .*{match}"):
      be.validate_config(call, bad)
  be.validate_config(call, PallasGpuConfig(16, 32, block_q_dkv=32))  # backward tiles None = forward's
  d = be.default_config(_call(40, 3000))
  assert (d.block_q, d.block_k, d.block_q_dq, d.block_k_dkv) == (64, 64, 64, 64)
  assert be.default_config(_call(4096, 4096, 256)).fwd == (64, 64)  # tiles shrink for wide heads / f32
  assert be.default_config(_call(4096, 4096, 128, "float32")).dkv == (32, 32)
  assert be.default_config(_call(4096, 4096, 64)) == PallasGpuConfig(128, 64, 64, 64, 64, 64)
  assert PallasGpuConfig(64, 64).warps(64) == 4 and PallasGpuConfig(64, 64).warps(128) == 8
  assert gpu.padded_head_dim(8) == 16 and gpu.padded_head_dim(96) == 128


def test_refusals():
  q, k, v, _, _ = _inputs(0, 1, 16, 16, 2, 2, 16, 16)
  with pytest.raises(NotImplementedError, match="boolean mask arrays"):
    jaxattn.softmax_attention(q, k, v, mask=jnp.ones((16, 16), bool), implementation="pallas_gpu")
  with pytest.raises(ValueError, match="block_q=24 must be a power of two"):
    jaxattn.softmax_attention(q, k, v, implementation="pallas_gpu", block_sizes=BS(24, 16))
  q2, k2, v2, _, _ = _inputs(0, 1, 16, 16, 1, 1, 512, 16)
  with pytest.raises(NotImplementedError, match="head dims"):
    jaxattn.softmax_attention(q2, k2, v2, implementation="pallas_gpu")


def test_lowers_to_triton_for_cuda():
  """Cross-lowering (no GPU needed): forward, dq and dk/dv become three Triton custom calls at real tile sizes."""
  B, T, S, H, G, D = 1, 300, 300, 4, 2, 128
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
  call = softmax_api.make_call(spec(B, T, H, D), spec(B, S, G, D), spec(B, S, G, D), segment_ids=True,
                               mask=masks.causal_document([100, 200]), logits_soft_cap=30.0, return_lse=True)
  be = pallas_gpu.BACKEND
  config = be.default_config(call)

  def loss(q, k, v, qi, ki):
    o, l = backend_lib.flash_vjp(be, call, config, q, k, v, None, qi, ki)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(l), l, 0.0))

  with backend_lib.use_platform("gpu"):  # build the real Triton kernels, not interpret mode
    lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(spec(B, T, H, D), spec(B, S, G, D), spec(B, S, G, D), ids,
                                                       ids).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("xla.gpu.triton") == 3


# ---------------------------------------------------------------------------------------------- real hardware
@pytest.mark.gpu
class TestOnGpu:
  """Compiled Triton kernels at real sizes (default tiles) against the f32 reference."""

  @pytest.mark.parametrize("D", [64, 128])
  @pytest.mark.parametrize("mask", [None, masks.Causal(), masks.causal_document([300, 500, 224]),
                                    masks.random_block_sparse(8, 8, 0.4, 128, 128, seed=0)],
                           ids=["full", "causal", "documents", "blocksparse"])
  def test_bf16_matches_reference(self, D, mask):
    B, T, H, G = 2, 1024, 8, 2
    q, k, v, w_out, w_lse = _inputs(1, B, T, T, H, G, D, D, jnp.bfloat16)
    out, lse, grads = _run(q, k, v, None, w_out, w_lse, impl="pallas_gpu", mask=mask, cap=None, blocks=None)
    f32 = lambda x: x.astype(jnp.float32)
    r_out, r_lse, r_grads = _run(f32(q), f32(k), f32(v), None, w_out, w_lse, impl="reference", mask=mask,
                                 cap=None, blocks=None)
    testing.assert_close(out, r_out, dtype=jnp.bfloat16, name="out", rms=testing.RMS_TOLERANCES["bfloat16"])
    testing.assert_close(lse, r_lse, dtype=jnp.bfloat16, name="lse")
    for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
      # bf16 gradients accumulate over ~1000 keys and the bf16 dO: bound them by relative RMS only.
      testing.assert_no_nan(g, name)
      assert testing.relative_rms(g, r) <= 2e-2, name

  def test_f32_gqa_segments_softcap_unaligned(self):
    B, T, S, H, G, D = 1, 333, 517, 4, 1, 80
    q, k, v, w_out, w_lse = _inputs(2, B, T, S, H, G, D, D)
    seg = (_doc_ids(B, T, [100, 233]), _doc_ids(B, S, [150, 367]))
    _compare(q, k, v, seg, w_out, w_lse, masks.Causal(S - T), 20.0, None)


# ------------------------------------------------------------------------------------------------- fuzzed (slow)
@pytest.mark.slow
def test_fuzzed_masks_interpret():
  """The fuzzed mask strategies (random slices, windows, layouts, combinations, segment ids) in interpret mode."""
  from hypothesis import given, settings, strategies as st

  from tests import strategies as mst

  @settings(max_examples=5, deadline=None)
  @given(data=st.data(), T=st.integers(1, 48), S=st.integers(1, 48), heads=st.sampled_from([(2, 2), (4, 2), (2, 1)]),
         bq=st.sampled_from([16, 32]), bk=st.sampled_from([16, 32]), segments=st.booleans(),
         cap=st.sampled_from([None, 5.0]), seed=st.integers(0, 1000))
  def check(data, T, S, heads, bq, bk, segments, cap, seed):
    H, G = heads
    mask = data.draw(mst.any_mask(T, S))
    q, k, v, w_out, w_lse = _inputs(seed, 2, T, S, H, G, 16, 16)
    seg = None
    if segments:
      rng = np.random.default_rng(seed)
      seg = (jnp.asarray(np.sort(rng.integers(0, 3, (2, T)), 1), jnp.int32),
             jnp.asarray(np.sort(rng.integers(0, 3, (2, S)), 1), jnp.int32))
    _compare(q, k, v, seg, w_out, w_lse, mask, cap, BS(bq, bk))

  check()
