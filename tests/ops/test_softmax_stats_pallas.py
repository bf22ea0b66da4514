"""The Pallas statistics kernels (``attention_stats(implementation="pallas_tpu" | "pallas_gpu")``) against the dense
f32 reference, in interpret mode: static masks, segment ids, GQA, soft cap, fully masked rows, f32 and bf16;
errors for inputs they refuse; (libtpu) a deviceless Mosaic compile. The mask fuzz is ``slow``.

Interpret mode is slow (the TPU one ~0.2 s per grid step), so the fast cases are tiny but still cover several
blocks, partial edge blocks (T, S not block multiples) and skipped blocks.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxattn import backend as backend_lib
from jaxattn import masks, testing
from jaxattn.ops.softmax.config import BlockSizes, PallasGpuConfig, PallasTpuConfig
from jaxattn.ops.softmax.stats import STATS, STATS_BACKENDS, attention_probs, attention_stats

_FLOAT = ("lse", "rowmax", "entropy", "colsum")


def _check(got: dict, q, k, dtype, **kw):
  """Every statistic of ``got`` against the reference (tolerances of ``dtype``); argmax by the probability it picks."""
  ref = attention_stats(q, k, stats=STATS, implementation="reference", **kw)
  probs = np.asarray(attention_probs(q, k, **kw))  # [B, H, T, S]
  assert set(got) == set(STATS)
  B, T, H, _ = q.shape
  S = k.shape[1]
  for name in STATS:
    want = (B, H, S) if name.startswith("col") else (B, H, T)
    assert got[name].shape == want, (name, got[name].shape)
  assert got["argmax"].dtype == jnp.int32 and got["colcount"].dtype == jnp.int32
  empty = np.isneginf(np.asarray(ref["lse"]))
  for name in _FLOAT:
    testing.assert_close(got[name], ref[name], dtype=dtype, name=name)  # -inf lse must match -inf; no NaN
  np.testing.assert_array_equal(got["colcount"], ref["colcount"])
  am = np.asarray(got["argmax"])
  np.testing.assert_array_equal(am == -1, empty)
  assert ((am >= -1) & (am < S)).all()
  picked = np.take_along_axis(probs, np.maximum(am, 0)[..., None], -1)[..., 0]
  tol = testing.tolerance(dtype)
  np.testing.assert_allclose(np.where(empty, 0.0, picked), np.asarray(ref["rowmax"]), atol=tol.atol, rtol=tol.rtol)
  if jnp.dtype(dtype) == jnp.float32:
    np.testing.assert_array_equal(am, ref["argmax"])
  # fully masked rows: zeros, never NaN
  for name in ("rowmax", "entropy"):
    assert (np.asarray(got[name])[empty] == 0).all()
  return ref


def _seg(B, T, S, T_docs, S_docs):
  """Segment ids with a query document (id 9) that has no keys: its rows are fully masked."""
  q_ids = np.repeat(np.asarray(masks.document_segment_ids(T_docs))[None], B, 0)
  kv_ids = np.repeat(np.asarray(masks.document_segment_ids(S_docs))[None], B, 0)
  q_ids[:, -3:] = 9
  return jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)


def test_gpu_f32_causal_gqa_segments_cap_and_empty_rows():
  B, T, S, H, G, D = 1, 24, 40, 4, 2, 12  # D padded to 16; T, S not block multiples
  q, k, _ = testing.random_qkv(1, B=B, T=T, S=S, H=H, G=G, D=D)
  kw = dict(mask=masks.Causal(offset=S - T), segment_ids=_seg(B, T, S, [10, 14], [22, 18]), logits_soft_cap=3.0)
  got = attention_stats(q, k, stats=STATS, implementation="pallas_gpu", block_sizes=BlockSizes(16, 16), **kw)
  ref = _check(got, q, k, jnp.float32, **kw)
  assert np.isneginf(np.asarray(ref["lse"])).sum() == B * H * 3  # the id-9 rows
  # colsum / colcount only, from a given lse: the row kernel is skipped and the result is the same
  cols = attention_stats(q, k, stats=("colcount", "colsum"), lse=ref["lse"], implementation="pallas_gpu",
                         block_sizes=BlockSizes(16, 16), **kw)
  assert list(cols) == ["colcount", "colsum"]
  testing.assert_close(cols["colsum"], got["colsum"], dtype=jnp.float32)


def test_gpu_bf16_window_and_block_sparse():
  B, T, S, H, G, D = 2, 40, 48, 2, 1, 16
  q, k, _ = testing.random_qkv(2, B=B, T=T, S=S, H=H, G=G, D=D, dtype=jnp.bfloat16)
  layout = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]], bool)  # 16 x 16 blocks; the last query block is empty
  mask = (masks.Local(9, 2) | masks.BlockSparse(layout, 16, 16)) & masks.Slices(((0, 32, 0, S, "full"),))
  got = attention_stats(q, k, mask=mask, stats=STATS, implementation="pallas_gpu",
                        block_sizes=PallasGpuConfig(16, 16))
  ref = _check(got, q, k, jnp.bfloat16, mask=mask)
  assert np.isneginf(np.asarray(ref["lse"]))[..., 32:].all()


def test_tpu_f32_gqa_segments_documents_and_empty_rows():
  B, T, S, H, G, D = 1, 16, 256, 2, 1, 8  # two kv blocks of 128 lanes, two query blocks of 8 rows
  q, k, _ = testing.random_qkv(3, B=B, T=T, S=S, H=H, G=G, D=D)
  kw = dict(mask=masks.Causal(offset=S - T) & masks.Local(150, 0, offset=S - T),
            segment_ids=_seg(B, T, S, [6, 10], [100, 156]), logits_soft_cap=4.0)
  got = attention_stats(q, k, stats=STATS, implementation="pallas_tpu", block_sizes=BlockSizes(8, 128), **kw)
  ref = _check(got, q, k, jnp.float32, **kw)
  assert np.isneginf(np.asarray(ref["lse"])).sum() == B * H * 3


def test_tpu_bf16_causal_partial_blocks():
  B, T, S, H, G, D = 1, 12, 140, 2, 2, 8  # T, S not multiples of (8, 128): edge blocks are partial
  q, k, _ = testing.random_qkv(4, B=B, T=T, S=S, H=H, G=G, D=D, dtype=jnp.bfloat16)
  mask = masks.Causal(offset=S - T)
  got = attention_stats(q, k, mask=mask, stats=STATS, implementation="pallas_tpu",
                        block_sizes=PallasTpuConfig(8, 128))
  _check(got, q, k, jnp.bfloat16, mask=mask)


def test_unsupported_inputs_raise_naming_the_value():
  q, k, _ = testing.random_qkv(0, B=1, T=16, H=2, D=8)
  bias = jnp.ones((1, 2, 16, 16))
  for impl in ("pallas_tpu", "pallas_gpu"):
    with pytest.raises(ValueError, match=rf"implementation='{impl}'.*no additive bias \(got one of dims \(1, 2\)"):
      attention_stats(q, k, bias=bias, implementation=impl)
    with pytest.raises(ValueError, match="boolean mask arrays"):
      attention_stats(q, k, mask=jnp.ones((16, 16), bool), implementation=impl)
    with pytest.raises(ValueError, match="per-head masks"):
      attention_stats(q, k, mask=masks.PerHead((masks.Causal(), masks.Full())), implementation=impl)
  with pytest.raises(ValueError, match=r"block_q=12 breaks the TPU \(8, 128\) tiling rule"):
    attention_stats(q, k, implementation="pallas_tpu", block_sizes=BlockSizes(12, 16))
  with pytest.raises(ValueError, match=r"block_k=24 breaks the TPU"):
    attention_stats(q, k[:, :1].repeat(40, 1), implementation="pallas_tpu", block_sizes=BlockSizes(8, 24))
  with pytest.raises(ValueError, match=r"block_q=24 must be a power of two"):
    attention_stats(q, k, implementation="pallas_gpu", block_sizes=BlockSizes(24, 16))
  q5, k5, _ = testing.random_qkv(0, B=1, T=16, H=2, D=300)
  with pytest.raises(ValueError, match="head dims up to 256, got D=300"):
    attention_stats(q5, k5, implementation="pallas_gpu")
  with pytest.raises(NotImplementedError, match="'cudnn' has no statistics mode"):
    attention_stats(q, k, implementation="cudnn")
  with pytest.raises(ValueError, match="'pallas'"):
    attention_stats(q, k, implementation="pallas")
  with backend_lib.use_platform("gpu"), pytest.raises(ValueError, match="pallas_tpu runs on TPU"):
    attention_stats(q, k, implementation="pallas_tpu")
  for backend in STATS_BACKENDS.values():  # statistics are not differentiated
    with pytest.raises(NotImplementedError, match="no backward"):
      backend.bwd(None, None, None, None, (True,))


def test_default_configs_are_the_flash_defaults():
  q, k, _ = testing.random_qkv(0, B=1, T=16, H=2, D=8)
  from jaxattn.ops.softmax import api
  from jaxattn.ops.softmax.stats import prepare
  call = prepare(q, k, None, None, None, None, None)[-1]
  assert STATS_BACKENDS["pallas_gpu"].default_config(call) == api.BACKENDS["pallas_gpu"].default_config(call)
  assert STATS_BACKENDS["pallas_tpu"].default_config(call) == api.BACKENDS["pallas_tpu"].default_config(call)
  # a plain BlockSizes keeps the backend's launch knobs
  cfg = STATS_BACKENDS["pallas_gpu"].config_from(call, BlockSizes(16, 32))
  assert isinstance(cfg, PallasGpuConfig) and cfg.fwd == (16, 32)


def test_capture_routes_stats_to_the_gpu_kernels():
  from flax import nnx

  from jaxattn import analysis
  from jaxattn.nn import MultiHeadAttention
  layer = MultiHeadAttention(4, 16, num_kv_heads=2, mask=masks.Causal(), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 20, 16))
  recs = {}
  for impl in ("xla", "pallas_gpu"):
    with analysis.capture(layer, stats=("colsum", "argmax", "entropy"), stats_implementation=impl) as rec:
      layer(x)
    recs[impl] = rec[0]
  for name in ("colsum", "entropy"):
    testing.assert_close(recs["pallas_gpu"][name], recs["xla"][name], dtype=jnp.float32, name=name)
  np.testing.assert_array_equal(recs["pallas_gpu"]["argmax"], recs["xla"]["argmax"])


_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _LIBTPU, reason="libtpu is not installed (pip install 'jax[tpu]')")
def test_tpu_deviceless_compile_builds_both_mosaic_kernels(monkeypatch):
  # libtpu takes a machine-wide lock file; another process (a parallel test, a compile experiment) may hold it
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from pallas_kernels.common.vmem import use_tpu_generation
  topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
  sharding = NamedSharding(Mesh(np.array(topo.devices[:1]), ("x",)), PartitionSpec())
  B, T, H, G, D = 1, 4096, 8, 2, 128
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  f = lambda q, k, ids: attention_stats(q, k, mask=masks.Causal(), segment_ids=(ids, ids), stats=STATS,
                                        logits_soft_cap=30.0, implementation="pallas_tpu")
  with backend_lib.use_platform("tpu"), use_tpu_generation("v5e"):
    text = jax.jit(f).trace(spec((B, T, H, D), jnp.bfloat16), spec((B, T, G, D), jnp.bfloat16),
                            spec((B, T), jnp.int32)).lower().compile().as_text()
  assert text.count('custom_call_target="tpu_custom_call"') == 2
  assert "jaxattn_softmax_row_stats" in text and "jaxattn_softmax_col_stats" in text


# ------------------------------------------------------------------------------------------------ mask fuzz (slow)
@st.composite
def _cases(draw):
  T = draw(st.integers(5, 40))
  S = draw(st.integers(5, 300))
  kind = draw(st.sampled_from(["causal", "window", "documents", "block_sparse", "full"]))
  if kind == "causal":
    mask = masks.Causal(offset=draw(st.integers(-4, S)))
  elif kind == "window":
    mask = masks.Local(draw(st.integers(0, 20)), draw(st.integers(0, 5)), offset=draw(st.integers(-3, S)))
  elif kind == "documents":
    cuts = sorted(draw(st.lists(st.integers(1, min(T, S) - 1), max_size=3, unique=True)))
    bounds = [0] + cuts + [min(T, S)]
    mask = masks.Slices(tuple((a, b, a, b, draw(st.sampled_from(["full", "causal"])))
                              for a, b in zip(bounds[:-1], bounds[1:])))
  elif kind == "block_sparse":
    bq, bk = draw(st.sampled_from([4, 8])), draw(st.sampled_from([8, 16]))
    layout = np.array(draw(st.lists(st.booleans(), min_size=(-(-T // bq)) * (-(-S // bk)),
                                    max_size=(-(-T // bq)) * (-(-S // bk))))).reshape(-(-T // bq), -(-S // bk))
    mask = masks.BlockSparse(layout, bq, bk)
  else:
    mask = None
  G = draw(st.sampled_from([1, 2]))
  return dict(T=T, S=S, mask=mask, G=G, H=G * draw(st.sampled_from([1, 2])),
              dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])), seed=draw(st.integers(0, 99)),
              cap=draw(st.sampled_from([None, 5.0])), seg=draw(st.booleans()))


def _fuzz(case, impl, blocks):
  T, S = case["T"], case["S"]
  q, k, _ = testing.random_qkv(case["seed"], B=1, T=T, S=S, H=case["H"], G=case["G"], D=8, dtype=case["dtype"])
  seg = None
  if case["seg"]:
    rng = np.random.default_rng(case["seed"])
    seg = (jnp.asarray(np.sort(rng.integers(0, 3, (1, T))), jnp.int32),
           jnp.asarray(np.sort(rng.integers(0, 3, (1, S))), jnp.int32))
  kw = dict(mask=case["mask"], segment_ids=seg, logits_soft_cap=case["cap"])
  got = attention_stats(q, k, stats=STATS, implementation=impl, block_sizes=blocks, **kw)
  _check(got, q, k, case["dtype"], **kw)


@pytest.mark.slow
@settings(max_examples=10)
@given(case=_cases())
def test_fuzz_masks_gpu(case):
  _fuzz(case, "pallas_gpu", BlockSizes(16, 32))


@pytest.mark.slow
@settings(max_examples=6)
@given(case=_cases())
def test_fuzz_masks_tpu(case):
  _fuzz(case, "pallas_tpu", BlockSizes(8, 128))
