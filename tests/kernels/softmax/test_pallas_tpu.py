"""pallas_tpu: the Mosaic TPU kernels, run in Pallas TPU interpret mode on CPU, against the dense reference.

Forward output, lse and dq/dk/dv (autodiff through ``softmax_attention(implementation="pallas_tpu")`` of a loss that
uses both out and lse) for the mask zoo, GQA/MQA, segment ids, soft cap, lengths that are not block multiples, rows
with no allowed key, both kernel layouts (head dim 128: fused ``[B, T, H*D]``; 64: ``[B, H, T, D]``); the raw kernels
with per-(batch, head) visiting lists; lowering to Mosaic for platform "tpu" (no TPU needed); block-size validation;
the cost model. Shapes obey the tiling rule the kernels enforce (blocks of 128 with T, S of 200-300). ``TestOnTpu``
repeats the comparison compiled, at real sizes, on a TPU (skipped elsewhere).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import jaxattn
from jaxattn import masks, testing
from tests.kernels.softmax import common
from jaxattn.ops.softmax import api as softmax_api
from jaxattn.ops.softmax import pallas_tpu
from jaxattn.ops.softmax.config import PallasTpuConfig
from jaxattn.ops.softmax.mask_info import mask_info
from pallas_kernels.softmax import tpu

BS = jaxattn.BlockSizes
_inputs, _run = common.inputs, common.run


def _compare(q, k, v, seg, w_out, w_lse, mask, cap, blocks):
  out, lse, grads = _run(q, k, v, seg, w_out, w_lse, impl="pallas_tpu", mask=mask, cap=cap, blocks=blocks)
  f32 = lambda x: x.astype(jnp.float32)
  r_out, r_lse, r_grads = _run(f32(q), f32(k), f32(v), seg, w_out, w_lse, impl="reference", mask=mask, cap=cap,
                               blocks=None)
  assert out.dtype == q.dtype and out.shape == r_out.shape
  assert lse.dtype == jnp.float32 and lse.shape == r_lse.shape
  testing.assert_close(out, r_out, dtype=q.dtype, name="out")
  testing.assert_close(lse, r_lse, dtype=q.dtype, name="lse")
  for name, g, r, x in zip(("dq", "dk", "dv"), grads, r_grads, (q, k, v)):
    assert g.dtype == x.dtype and g.shape == x.shape
    testing.assert_close(g, r, dtype=q.dtype, kind="grad", name=name)
  return out, lse, grads


def _doc_ids(B, n, lens, empty_at=()):
  ids = np.repeat(np.arange(len(lens)), lens)[None].repeat(B, 0)[:, :n].astype(np.int32)
  ids[:, list(empty_at)] = 99  # no key carries id 99: these query rows have no allowed key
  return jnp.asarray(ids)


# 64 x 64 layout on a 200 x 260 problem: row 1 (queries 64..127) is empty, and 64-granular blocks make partial
# 128-tiles.
_LAYOUT = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], bool)

# id: (B, T, S, H, G, D, E, dtype, mask, segments, cap, blocks)
CASES = {
    # MQA (2 query heads share the kv head: dk/dv summed in-kernel); T = S = 200 (padded edge blocks); soft cap.
    "causal-mqa-softcap": (1, 200, 200, 2, 1, 128, 128, jnp.float32, masks.Causal(), None, 5.0, BS(128, 128)),
    # Bottom-right causal cross-attention, head dim 64 ([B, H, T, D] layout), documents as segment ids with query
    # rows that see nothing, batch 2; other tiles for dq / dk-dv (256 clamps to the whole T = 200).
    "cross-causal-segments-d64": (2, 200, 300, 2, 2, 64, 64, jnp.float32, masks.Causal(100), "docs", None,
                                  BS(128, 128, block_q_dq=64, block_q_dkv=256, block_k_dkv=64)),
    # Sliding window (left 100, right 20) in bf16, GQA 4:2, E != D.
    "local-bf16-gqa": (1, 300, 300, 4, 2, 128, 64, jnp.bfloat16, masks.Local(100, 20), None, None, BS(128, 128)),
    # Documents as slices & a causal window (And of Slices and Local); soft cap.
    "documents-and-window-softcap": (1, 300, 300, 2, 2, 128, 128, jnp.float32,
                                     masks.causal_document([90, 130, 80]) & masks.sliding_window(64), None, 3.0,
                                     BS(128, 128)),
    # (BlockSparse & Causal cross) | a full slice; an all-empty band of query rows; GQA 4:2.
    "blocksparse-and-or-empty-rows": (1, 200, 260, 4, 2, 128, 128, jnp.float32,
                                      (masks.BlockSparse(_LAYOUT, 64, 64) & masks.Causal(60)) |
                                      masks.Slices(((150, 200, 0, 40, "full"),)), None, None, BS(128, 128)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_interpret(case):
  B, T, S, H, G, D, E, dtype, mask, segments, cap, blocks = CASES[case]
  q, k, v, w_out, w_lse = _inputs(list(CASES).index(case), B, T, S, H, G, D, E, dtype)
  seg, empty_rows = None, []
  if segments == "docs":
    empty_rows = [5, 6, 120]
    seg = (_doc_ids(B, T, [60, 90, 50], empty_rows), _doc_ids(B, S, [60, 90, 50, 100]))
  out, lse, grads = _compare(q, k, v, seg, w_out, w_lse, mask, cap, blocks)
  dense = np.asarray(mask.to_dense(T, S))
  empty = sorted(set(i for i in range(T) if not dense[i].any()) | set(empty_rows))
  if case == "blocksparse-and-or-empty-rows":
    assert set(range(64, 128)) <= set(empty)
  if empty:
    assert np.all(np.asarray(out, np.float32)[:, empty] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[:, :, empty]))
    assert np.all(np.asarray(grads[0], np.float32)[:, empty] == 0)


# ------------------------------------------------------------------------------------------ raw kernels, dynamic
def _per_head_lists(layout):
  """``layout [B, H, nR, nC]`` bool -> VisitLists ``[B, H, nR, K]`` (all full blocks; junk past the count)."""
  B, H, nr, nc = layout.shape
  K = max(1, int(layout.sum(-1).max()))
  index = np.full((B, H, nr, K), 0, np.int32)
  count = layout.sum(-1).astype(np.int32)
  for b, h, r in np.ndindex(B, H, nr):
    cols = np.nonzero(layout[b, h, r])[0]
    index[b, h, r, :len(cols)] = cols
  return tpu.VisitLists(jnp.asarray(index), jnp.asarray(count), jnp.zeros_like(jnp.asarray(index)))


def test_raw_kernels_per_batch_and_head_lists():
  """Data-dependent lists ``[B, H, nQ, K]`` without tiles (the kernel masks the padded keys itself), MQA."""
  B, T, S, H, G, D, bq, bk = 2, 200, 300, 2, 1, 128, 128, 128
  nq, nk = -(-T // bq), -(-S // bk)
  rng = np.random.default_rng(0)
  layout = rng.random((B, H, nq, nk)) < 0.5
  layout[0, 1, 0] = False  # an empty query block
  layout[1, 0, :, nk - 1] = True  # the padded kv block
  q, k, v, w_out, _ = _inputs(3, B, T, S, H, G, D, D)
  scale = D ** -0.5
  allowed = np.repeat(np.repeat(layout, bq, 2), bk, 3)[:, :, :T, :S]  # [B, H, T, S]

  def dense(q, k, v):
    kk, vv = jnp.repeat(k, H // G, 2), jnp.repeat(v, H // G, 2)
    s = jnp.einsum("bthd,bshd->bhts", q, kk, precision="highest") * scale
    s = jnp.where(allowed, s, -jnp.inf)
    m = jnp.max(s, -1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = p.sum(-1, keepdims=True)
    o = jnp.einsum("bhts,bshe->bthe", p / jnp.where(l == 0, 1.0, l), vv, precision="highest")
    return o, jnp.where(l[..., 0] > 0, m[..., 0] + jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)), -jnp.inf)

  lists, lists_t = _per_head_lists(layout), _per_head_lists(layout.transpose(0, 1, 3, 2))
  kw = dict(scale=scale, block_q=bq, block_k=bk, interpret=pltpu.InterpretParams())

  @jax.jit
  def kernels(q, k, v, do):
    out, lse = tpu.flash_attention_fwd(q, k, v, lists, **kw)
    delta = jnp.einsum("bthe,bthe->bht", do, out)
    dq = tpu.flash_attention_bwd_dq(q, k, v, do, lse, delta, lists, **kw)
    dk, dv = tpu.flash_attention_bwd_dkv(q, k, v, do, lse, delta, lists_t, **kw)
    return out, lse, (dq, dk, dv)

  out, lse, grads = kernels(q, k, v, w_out)
  (r_out, r_lse), vjp = jax.vjp(dense, q, k, v)
  r_grads = vjp((w_out, jnp.zeros_like(r_lse)))
  testing.assert_close(out, r_out, name="out")
  testing.assert_close(lse, r_lse, name="lse")
  for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
    testing.assert_close(g, r, kind="grad", name=name)


@pytest.mark.parametrize("D", [128, 64])
def test_lowers_to_mosaic_for_tpu(D):
  """The three kernels lower to Mosaic custom calls for platform "tpu" (export on CPU; no TPU needed)."""
  B, T, S, H, G, bq, bk = 1, 1024, 1024, 4, 2, 256, 256
  mask = masks.Causal() & masks.Local(300, 0)
  info = mask_info(mask, T, S, bq, bk)
  lists = tpu.VisitLists(info.kv_index[None, None], info.kv_count[None, None], info.kv_tile[None, None])
  lists_t = tpu.VisitLists(info.q_index[None, None], info.q_count[None, None], info.q_tile[None, None])
  kw = dict(scale=0.1, soft_cap=20.0, block_q=bq, block_k=bk, interpret=False)

  def f(q, k, v, q_ids, kv_ids):
    seg = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    o, lse = tpu.flash_attention_fwd(q, k, v, lists, info.tiles, **seg, **kw)
    dq = tpu.flash_attention_bwd_dq(q, k, v, o, lse, lse, lists, info.tiles, **seg, **kw)
    dk, dv = tpu.flash_attention_bwd_dkv(q, k, v, o, lse, lse, lists_t, info.tiles, **seg, **kw)
    return o, lse, dq, dk, dv

  x = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((B, S, G, D), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
  exported = jax.export.export(jax.jit(f), platforms=["tpu"])(x, kv, kv, ids, ids)
  assert exported.mlir_module().count("tpu_custom_call") == 3


# ------------------------------------------------------------------------------------------- options, refusals
def test_config_validation():
  with pytest.raises(ValueError, match="positive int"):
    PallasTpuConfig(block_q=0, block_k=128)
  res = lambda *a, **kw: pallas_tpu.resolve_tiles(PallasTpuConfig(*a, **kw), 300, 300)
  # block_k is a lane dim: multiple of 128 unless it covers S.
  with pytest.raises(ValueError, match=r"^pallas_tpu: PallasTpuConfig\.block_k=192 .* multiple of 128 .*S=300"):
    res(128, 192)
  # block_q is a sublane dim in the forward (multiple of 8) but a lane dim in dk/dv (block_q_dkv).
  assert res(136, 128, block_q_dkv=128).block_q == 136
  with pytest.raises(ValueError, match="block_q_dkv=136"):
    res(136, 128)
  with pytest.raises(ValueError, match=r"block_q=100 .* multiple of 8"):
    res(100, 128, block_q_dkv=128)
  with pytest.raises(ValueError, match="block_k_dkv=60"):
    res(128, 128, block_k_dkv=60)
  with pytest.raises(ValueError, match="vmem_limit_bytes=0"):
    res(128, 128, vmem_limit_bytes=0)
  # Sizes larger than the sequence clamp to it (a block spanning the whole axis is always legal).
  call = softmax_api.make_call(jax.ShapeDtypeStruct((1, 200, 2, 128), jnp.bfloat16),
                               *[jax.ShapeDtypeStruct((1, 300, 2, 128), jnp.bfloat16)] * 2)
  default = pallas_tpu.BACKEND.default_config(call)
  assert default == PallasTpuConfig(512, 512)
  r = pallas_tpu.resolve_tiles(default, 200, 300)
  assert (r.block_q, r.block_k, r.block_q_dq, r.block_k_dq, r.block_q_dkv, r.block_k_dkv) == (
      200, 300, 200, 300, 200, 300)
  r = pallas_tpu.resolve_tiles(BS(256, 128, block_k_dkv=64), 1024, 1024)
  assert (r.fwd, r.dq, r.dkv) == ((256, 128), (256, 128), (256, 64))


def test_validation_through_api_and_refusals():
  q, k, v, _, _ = _inputs(0, 1, 200, 300, 2, 2, 128, 128)
  with pytest.raises(ValueError, match="block_k=100"):
    jaxattn.softmax_attention(q, k, v, implementation="pallas_tpu", block_sizes=BS(128, 100))
  with pytest.raises(NotImplementedError, match="boolean mask arrays"):
    jaxattn.softmax_attention(q, k, v, mask=jnp.ones((200, 300), bool), implementation="pallas_tpu")
  # The raw kernels check the rule too (interpret mode would not).
  lists = tpu.VisitLists(np.zeros((1, 1, 2, 1), np.int32), np.ones((1, 1, 2), np.int32),
                         np.zeros((1, 1, 2, 1), np.int32))
  with pytest.raises(ValueError, match="block_k=120"):
    tpu.flash_attention_fwd(q, k, v, lists, scale=1.0, block_q=128, block_k=120, interpret=True)
  with pytest.raises(ValueError, match=r"lists have shape \[1, 1, 2, 1\]"):
    tpu.flash_attention_fwd(q, k, v, lists, scale=1.0, block_q=64, block_k=128, interpret=True)


def test_kernel_cost_counts():
  """FLOPs count every visited padded tile; bytes follow the pipeline's copies; roofline is consistent."""
  B, T, H, D = 1, 2048, 4, 128
  full = pallas_tpu.kernel_cost(B, T, T, H, D, blocks=BS(512, 512))
  assert full["forward"]["flops"] == full["forward"]["model_flops"] == 4 * B * H * T * T * D
  assert full["backward"]["flops"] == 2 * B * H * T * T * (4 * D + 3 * D)  # dq: 2D + E, dk/dv: 2D + 2E
  # Dense, no sparsity: K/V read once per query block (nQ = 4), q read and out written once.
  it = 2
  expect = B * H * (4 * 4 * 512 * 2 * D * it + T * 2 * D * it)
  assert full["forward"]["bytes"] == expect
  causal = pallas_tpu.kernel_cost(B, T, T, H, D, mask=masks.Causal(), blocks=BS(512, 512))
  assert causal["forward"]["visited_blocks"] == B * H * 10  # 4 * 5 / 2 tiles
  assert causal["forward"]["model_flops"] == 4 * B * H * D * (T * (T + 1) // 2)
  for chip, (peak, bw) in pallas_tpu.TPU_SPECS.items():
    r = causal["roofline"][chip]
    f = causal["forward"]
    assert r["forward_s"] == pytest.approx(max(f["flops"] / peak, f["bytes"] / bw))
    assert r["forward_backward_s"] > r["forward_s"] > 0
  assert pallas_tpu.TPU_SPECS["v5e"] == (197e12, 819e9) and pallas_tpu.TPU_SPECS["v5p"] == (459e12, 2765e9)


# ------------------------------------------------------------------------------------------- real hardware
@pytest.mark.tpu
class TestOnTpu:
  """Compiled Mosaic kernels on a TPU (the platform picks non-interpret mode), default 512-tiles, bf16."""

  @pytest.mark.parametrize("mask", [None, masks.Causal(), masks.Local(256, 0), masks.causal_document([700, 1348])])
  def test_matches_reference(self, mask):
    q, k, v, w_out, w_lse = _inputs(0, 2, 2048, 2048, 8, 2, 128, 128, jnp.bfloat16)
    _compare(q, k, v, None, w_out, w_lse, mask, None, None)

  def test_segments_softcap_cross(self):
    B, T, S = 1, 1000, 1500
    q, k, v, w_out, w_lse = _inputs(1, B, T, S, 4, 4, 128, 128, jnp.bfloat16)
    seg = (_doc_ids(B, T, [400, 600], [3]), _doc_ids(B, S, [600, 900]))
    _compare(q, k, v, seg, w_out, w_lse, masks.Causal(S - T), 30.0, None)
