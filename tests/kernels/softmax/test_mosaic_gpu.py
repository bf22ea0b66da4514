"""mosaic_gpu: the Hopper (Pallas Mosaic GPU) kernels in the Mosaic GPU interpreter on CPU against the reference.

Forward output, lse and dq/dk/dv (autodiff through ``softmax_attention(implementation="mosaic_gpu")``, a loss that
uses out and lse) for causal, full, local, documents, block-sparse layouts, GQA/MQA, segment ids, soft cap, D=64 /
128, E != D, float16, lengths that are not tile multiples and rows with no allowed key; one or two compute
warpgroups per CTA, pipeline depths 1 to 3, a NaN key that must reach only the rows attending it. The interpreter
runs each kernel on CPU (tens of seconds at these sizes), so one case is fast and the rest are ``slow``. The
interpreter of jax 0.10 computes the matmuls with ``dot_general`` instead of ``wgmma``; the ``wgmma`` path is checked
here by lowering for CUDA (no GPU needed), by a deviceless sm_90 compile (``slow``, needs the CUDA plugin) and, on a
Hopper GPU, by ``TestOnGpu``.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import backend as backend_lib
from jaxattn import masks, testing
from jaxattn.ops.softmax import api as softmax_api
from jaxattn.ops.softmax import mosaic_gpu
from jaxattn.ops.softmax.mosaic_gpu import MosaicGpuConfig
from pallas_kernels.softmax import mosaic_gpu as mg
from tests.kernels.softmax import common


def _interpreter_reason():
  try:
    mg.interpret_params()
  except (ImportError, AttributeError) as e:
    return f"this jax ({jax.__version__}) has no Mosaic GPU interpreter: {e}"
  return None


needs_interpreter = pytest.mark.skipif(_interpreter_reason() is not None, reason=str(_interpreter_reason()))
BS = jaxattn.BlockSizes


def _compare(case_id, B, T, S, H, G, D, E, mask, segments, cap, blocks, dtype=jnp.bfloat16):
  q, k, v, w_out, w_lse = common.inputs(case_id, B, T, S, H, G, D, E, dtype)
  seg = None
  if segments:
    seg = (jnp.asarray(np.repeat(np.arange(3), [T // 3, T // 3, T - 2 * (T // 3)])[None].repeat(B, 0), jnp.int32),
           jnp.asarray(np.repeat(np.arange(3), [S // 3, S // 3, S - 2 * (S // 3)])[None].repeat(B, 0), jnp.int32))
    seg = (seg[0].at[:, 5].set(99), seg[1])  # query row 5 matches no key: output 0, lse -inf, zero dq
  out, lse, grads = common.run(q, k, v, seg, w_out, w_lse, impl="mosaic_gpu", mask=mask, cap=cap, blocks=blocks)
  f32 = lambda x: x.astype(jnp.float32)
  r_out, r_lse, r_grads = common.run(f32(q), f32(k), f32(v), seg, w_out, w_lse, impl="reference", mask=mask,
                                     cap=cap, blocks=None)
  assert out.dtype == q.dtype and out.shape == r_out.shape
  assert lse.dtype == jnp.float32 and lse.shape == r_lse.shape
  testing.assert_close(out, r_out, dtype=dtype, name="out")
  np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(r_lse)))
  testing.assert_close(lse, r_lse, dtype=dtype, name="lse")
  for name, g, r, x in zip(("dq", "dk", "dv"), grads, r_grads, (q, k, v)):
    assert g.dtype == x.dtype and g.shape == x.shape
    testing.assert_close(g, r, dtype=dtype, kind="grad", name=name)
  empty = np.isneginf(np.asarray(r_lse))  # [B, H, T]
  if empty.any():
    assert np.all(np.asarray(out).transpose(0, 2, 1, 3)[empty] == 0)
    assert np.all(np.asarray(grads[0]).transpose(0, 2, 1, 3)[empty] == 0)


@needs_interpreter
def test_causal_interpret():
  """Causal, T=S=64 at 64 x 64 tiles (one partial block: the pattern tile path), D=64, two query heads on one kv
  head (summed in the dk/dv kernel): forward, lse and all three gradients."""
  _compare(0, 1, 64, 64, 2, 1, 64, 64, masks.Causal(), False, None, BS(64, 64, 64, 64, 64, 64))


_LAYOUT = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 1], [0, 0, 0, 1]], bool)

# id: (B, T, S, H, G, D, E, mask, segments, cap, blocks)
CASES = {
    # No mask (no pattern tiles, 128-row kv tiles), D=128, GQA 4 -> 2.
    "full-d128-gqa": (1, 128, 128, 4, 2, 128, 128, None, False, None, BS(64, 128, 64, 128, 128, 64)),
    # Two compute warpgroups per CTA (forward ping-pong, dq, dk/dv), causal.
    "causal-two-warpgroups": (1, 256, 256, 2, 1, 64, 64, masks.Causal(), False, None,
                              BS(128, 64, 128, 64, 64, 128)),
    # Sliding window, T not a tile multiple (padded rows and columns masked by the pattern tiles).
    "local-ragged": (1, 200, 200, 2, 1, 64, 64, masks.Local(40, 0), False, None, BS(64, 64)),
    # Block-sparse layout, segment ids (one query row sees nothing), soft cap, batch 2.
    "blocksparse-segments-softcap": (2, 256, 256, 2, 2, 64, 64, masks.BlockSparse(_LAYOUT, 64, 64), True, 20.0,
                                     BS(64, 64)),
    # Causal cross-attention (bottom-right aligned), MQA, E != D, S ragged without partial blocks in the middle.
    "cross-causal-mqa-e128": (1, 100, 172, 3, 1, 64, 128, masks.Causal(72), False, None, BS(64, 64)),
    # Documents and a whole query block with no allowed key (count 0), non-multiple-of-64 head dim (zero-padded).
    "documents-empty-block": (1, 192, 192, 2, 1, 40, 40, masks.Slices(((64, 192, 0, 192, "causal"),)), False, None,
                              BS(64, 64)),
}


@needs_interpreter
@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_interpret(case):
  _compare(list(CASES).index(case) + 1, *CASES[case])


@needs_interpreter
@pytest.mark.slow
def test_float16_interpret():
  """float16 inputs (the probabilities and dS enter the second matmuls as f16), causal with a local window."""
  _compare(11, 1, 128, 128, 2, 1, 64, 64, masks.Local(70, 0), False, None, BS(64, 64), dtype=jnp.float16)


@needs_interpreter
@pytest.mark.slow
def test_nonfinite_key_reaches_only_rows_that_attend_it():
  """A NaN in key 100 (causal, T=128): rows before it keep finite, exact outputs and dq; rows from 100 on are NaN."""
  q, k, v, w_out, w_lse = common.inputs(12, 1, 128, 128, 2, 1, 64, 64, jnp.bfloat16)
  bad = k.at[0, 100, 0, 3].set(jnp.nan)
  blocks = BS(64, 64)
  out, lse, grads = common.run(q, bad, v, None, w_out, w_lse, impl="mosaic_gpu", mask=masks.Causal(), cap=None,
                               blocks=blocks)
  f32 = lambda x: x.astype(jnp.float32)
  r_out, r_lse, r_grads = common.run(f32(q), f32(k), f32(v), None, w_out, w_lse, impl="reference",
                                     mask=masks.Causal(), cap=None, blocks=None)
  testing.assert_close(out[:, :100], r_out[:, :100], dtype=jnp.bfloat16, name="out")
  testing.assert_close(lse[:, :, :100], r_lse[:, :, :100], dtype=jnp.bfloat16, name="lse")
  testing.assert_close(grads[0][:, :100], r_grads[0][:, :100], dtype=jnp.bfloat16, kind="grad", name="dq")
  assert np.isnan(np.asarray(out[:, 100:], np.float32)).all()
  assert np.isnan(np.asarray(lse[:, :, 100:])).all()


@needs_interpreter
@pytest.mark.slow
def test_pipeline_depths_interpret():
  """A full Config: 3 forward slots (the K/V ring wraps over 4 kv blocks), 1 backward slot (every copy waits for
  the previous step's release), two forward compute warpgroups without the ping-pong barrier."""
  q, k, v, w_out, w_lse = common.inputs(13, 1, 256, 256, 2, 1, 64, 64, jnp.bfloat16)
  cfg = MosaicGpuConfig(128, 64, 64, 64, 64, 64, num_stages=3, num_stages_bwd=1, schedule_barrier=False)
  out, lse, grads = common.run(q, k, v, None, w_out, w_lse, impl=("mosaic_gpu", cfg), mask=masks.Causal(), cap=None,
                               blocks=None)
  f32 = lambda x: x.astype(jnp.float32)
  r_out, r_lse, r_grads = common.run(f32(q), f32(k), f32(v), None, w_out, w_lse, impl="reference",
                                     mask=masks.Causal(), cap=None, blocks=None)
  testing.assert_close(out, r_out, dtype=jnp.bfloat16, name="out")
  testing.assert_close(lse, r_lse, dtype=jnp.bfloat16, name="lse")
  for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
    testing.assert_close(g, r, dtype=jnp.bfloat16, kind="grad", name=name)


# ------------------------------------------------------------------------------------------- no kernel runs
def _call(T, S, D=128, dtype="bfloat16", **kw):
  q = jax.ShapeDtypeStruct((1, T, 2, D), jnp.dtype(dtype))
  kv = jax.ShapeDtypeStruct((1, S, 2, D), jnp.dtype(dtype))
  return softmax_api.make_call(q, kv, kv, **kw)


def test_config_validation_and_defaults():
  be = mosaic_gpu.BACKEND
  call = _call(256, 256)
  for bad, field, rule in ((MosaicGpuConfig(96, 64), "block_q", r"one of \(64, 128\)"),
                           (MosaicGpuConfig(64, 64, block_k_dkv=256), "block_k_dkv", r"one of \(64, 128\)"),
                           (MosaicGpuConfig(64, 32), "block_k", r"one of \(64, 128\)"),
                           (MosaicGpuConfig(64, 64, num_stages_bwd=0), "num_stages_bwd", r"an int in \[1, 4\]")):
    with pytest.raises(ValueError, match=rf"^mosaic_gpu: MosaicGpuConfig\.{field}=\d+ must be {rule}"):
      be.validate_config(call, bad)
  be.validate_config(call, MosaicGpuConfig(128, 64))
  assert MosaicGpuConfig(128, 64, block_k_dkv=64).compute_warpgroups == (2, 2, 1)
  # D=128 bf16: 128-column kv tiles in the forward only without pattern tiles (shared memory, see DEFAULT_TABLE).
  assert be.default_config(_call(8192, 8192)).fwd == (128, 128)
  assert be.default_config(_call(8192, 8192, mask=masks.Causal())).fwd == (128, 64)
  assert be.default_config(_call(8192, 8192, 64, mask=masks.Causal())).fwd == (128, 128)
  d = be.default_config(_call(8192, 8192))
  assert (d.dq, d.dkv, d.num_stages, d.num_stages_bwd) == ((128, 64), (64, 128), 2, 2)
  short = be.default_config(_call(40, 60))
  assert short.fwd == short.dq == short.dkv == (64, 64)


def test_refusals():
  be = mosaic_gpu.BACKEND
  assert "float32" in be.supports(_call(64, 64, dtype="float32"))
  assert "bias" in be.supports(_call(64, 64, bias=jax.ShapeDtypeStruct((1, 1, 64, 64), jnp.float32)))
  assert "head dims up to 128" in be.supports(_call(64, 64, D=256))
  assert "dropout" in be.supports(_call(64, 64, dropout_rate=0.1))
  with backend_lib.use_platform("tpu"):
    assert "not on 'tpu'" in be.supports(_call(64, 64))
  assert be.supports(_call(64, 64, mask=masks.Causal(), segment_ids=True, logits_soft_cap=5.0)) is None
  q, k, v, _, _ = common.inputs(0, 1, 64, 64, 2, 2, 64, 64, jnp.float32)
  with pytest.raises(NotImplementedError, match="'mosaic_gpu' cannot serve this call: .*float32"):
    jaxattn.softmax_attention(q, k, v, implementation="mosaic_gpu")


def test_explicit_only():
  """implementation=None never picks mosaic_gpu (not timed on hardware yet), on any platform."""
  assert all("mosaic_gpu" not in chain for chain in softmax_api.DEFAULTS.values())
  assert "mosaic_gpu" in softmax_api.BACKENDS
  with backend_lib.use_platform("gpu"), pytest.warns(backend_lib.FallbackWarning, match="'cudnn'"):
    backend, _ = softmax_api.resolve_backend(_call(256, 256, mask=masks.Causal(), segment_ids=True))
  assert backend.name == "pallas_gpu"  # cudnn refuses segment ids; mosaic_gpu is never in the chain


def test_lowers_to_mosaic_gpu_for_cuda():
  """The real (wgmma / TMA) kernels lower for CUDA without a GPU: forward, dq and dk/dv are three Mosaic GPU
  custom calls (ragged T, GQA, segment ids, causal pattern tiles, two compute warpgroups)."""
  B, T, H, G, D = 1, 300, 4, 2, 128
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((B, T), jnp.int32)

  def f(q, k, v, qi, ki):
    loss = lambda q, k, v: jaxattn.softmax_attention(q, k, v, mask=masks.Causal(), segment_ids=(qi, ki),
                                                     implementation="mosaic_gpu").astype(jnp.float32).sum()
    return jax.grad(loss, (0, 1, 2))(q, k, v)

  with backend_lib.use_platform("gpu"):
    lowered = jax.jit(f).trace(spec(B, T, H, D), spec(B, T, G, D), spec(B, T, G, D), ids, ids).lower(
        lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert text.count('custom_call @mosaic_gpu') == 3 or text.count("mosaic_gpu_v2") == 3, text[:2000]


def test_gpu_compile_presets_cover_mosaic():
  """``python -m experiments gpu_compile`` builds the mosaic_gpu kernels for Hopper targets only."""
  from configs import gpu_compile as gc_configs
  from experiments.gpu_compile import run
  mosaic = run.builds(dataclasses.replace(gc_configs.MOSAIC, targets=("h100", "a100")))
  assert {(b.mode, b.D, b.target) for b in mosaic} == {(m, d, "h100") for m in ("fwd", "fwd_bwd") for d in (64, 128)}
  assert {b.family for b in run.builds(gc_configs.DEFAULT)} == {"softmax", "linear", "landmark", "softmax_mosaic"}
  f, shapes = run.op_fn(mosaic[0], gc_configs.MOSAIC)
  assert shapes[0] == (2, 8192, 16, 64)


def _plugin_reason():
  from experiments.gpu_compile import run  # the one plugin check (safe without the jax_plugins package)
  return run.plugin_missing()


@pytest.mark.slow
@pytest.mark.skipif(_plugin_reason() is not None, reason=str(_plugin_reason()))
def test_compiles_for_sm90_deviceless(tmp_path):
  """Deviceless XLA compile for an H100 target at B=2, T=8192, H=16, D=64/128 bf16, causal, forward and backward:
  every kernel lowers, fits shared memory and compiles (the Mosaic kernels stay MLIR until loaded on a GPU)."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  cmd = [sys.executable, "-m", "experiments", "gpu_compile", "--preset", "mosaic", "--out", str(tmp_path)]
  proc = subprocess.run(cmd, cwd=repo, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), rows
  for r in rows:
    names = [k["name"] for k in r["kernels"]]
    kernels = ("fwd",) if r["mode"] == "fwd" else ("fwd", "dq", "dkv")
    assert names == [f"mosaic_gpu_{k}" for k in kernels]
    assert all(0 < k["smem"] <= 232448 for k in r["kernels"])


# ---------------------------------------------------------------------------------------------- real hardware
@pytest.mark.gpu
class TestOnGpu:
  """The compiled wgmma / TMA kernels (default tiles) on a Hopper GPU against the f32 reference (skipped elsewhere;
  experiments/device/gpu_check.sh runs them). Refused with a reason on other GPUs."""

  @pytest.mark.parametrize("D, mask", [
      (128, None), (128, masks.Causal()), (64, masks.Causal()), (128, masks.causal_document([300, 500, 224])),
      (128, masks.random_block_sparse(8, 8, 0.4, 128, 128, seed=0))],
      ids=["full-d128", "causal-d128", "causal-d64", "documents-d128", "blocksparse-d128"])
  def test_bf16_matches_reference(self, D, mask):
    B, T, H, G = 2, 1024, 8, 2
    q, k, v, w_out, w_lse = common.inputs(1, B, T, T, H, G, D, D, jnp.bfloat16)
    reason = mosaic_gpu.BACKEND.supports(softmax_api.make_call(q, k, v, mask=mask))
    if reason is not None:
      pytest.skip(reason)
    out, lse, grads = common.run(q, k, v, None, w_out, w_lse, impl="mosaic_gpu", mask=mask, cap=None, blocks=None)
    f32 = lambda x: x.astype(jnp.float32)
    r_out, r_lse, r_grads = common.run(f32(q), f32(k), f32(v), None, w_out, w_lse, impl="reference", mask=mask,
                                       cap=None, blocks=None)
    testing.assert_close(out, r_out, dtype=jnp.bfloat16, name="out", rms=testing.RMS_TOLERANCES["bfloat16"])
    testing.assert_close(lse, r_lse, dtype=jnp.bfloat16, name="lse")
    for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
      # bf16 gradients accumulate over ~1000 keys and the bf16 dO: bound them by relative RMS only.
      testing.assert_no_nan(g, name)
      assert testing.relative_rms(g, r) <= 2e-2, name

  def test_gqa_segments_softcap_unaligned(self):
    B, T, S, H, G, D = 1, 333, 517, 4, 1, 80
    q, k, v, w_out, w_lse = common.inputs(2, B, T, S, H, G, D, D, jnp.bfloat16)
    if (reason := mosaic_gpu.BACKEND.supports(softmax_api.make_call(q, k, v))) is not None:
      pytest.skip(reason)
    seg = (jnp.asarray(np.repeat([0, 1], [100, 233])[None], jnp.int32),
           jnp.asarray(np.repeat([0, 1], [150, 367])[None], jnp.int32))
    out, lse, grads = common.run(q, k, v, seg, w_out, w_lse, impl="mosaic_gpu", mask=masks.Causal(S - T), cap=20.0,
                                 blocks=None)
    f32 = lambda x: x.astype(jnp.float32)
    r_out, r_lse, r_grads = common.run(f32(q), f32(k), f32(v), seg, w_out, w_lse, impl="reference",
                                       mask=masks.Causal(S - T), cap=20.0, blocks=None)
    testing.assert_close(out, r_out, dtype=jnp.bfloat16, name="out")
    testing.assert_close(lse, r_lse, dtype=jnp.bfloat16, name="lse")
    for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
      testing.assert_no_nan(g, name)
      assert testing.relative_rms(g, r) <= 2e-2, name
