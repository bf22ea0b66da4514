"""pallas_gpu / pallas_tpu linear attention: both kernels in interpret mode against the recurrent reference.

Outputs, final states and every gradient (dq, dk, dv, dlog_decay, dinitial_state) through
``linear_attention(implementation=...)`` for no decay, per-head constants and per-token gates, GQA/MQA, initial
state, T that is not a multiple of the chunk; bf16; extreme decays (resets, lambda near 0 and near 1) without NaN;
the raw kernels with several state tiles (GPU) and the in-place 128-wide layout (TPU); lowering to Triton (cuda)
and Mosaic (tpu) on CPU; refusals and tiling validation; the TPU cost model. Shapes are tiny (T <= 64).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import testing
from jaxattn import backend as backend_lib
from jaxattn.ops.linear import PallasGpuConfig, PallasTpuConfig, linear_attention_reference
from jaxattn.ops.linear import api as linear_api
from jaxattn.ops.linear import pallas_gpu as ops_gpu
from jaxattn.ops.linear import pallas_tpu as ops_tpu
from pallas_kernels.linear import KERNEL_LOG_DECAY_FLOOR, gpu, tpu

IMPLS = ("pallas_gpu", "pallas_tpu")
_GRADS = ("dq", "dk", "dv", "dlog_decay", "dinitial_state")


def _inputs(seed, *, B=2, T=37, H=4, G=2, D=8, E=6, decay="head", dtype=jnp.float32, init=True):
  """q, k, v, log_decay (None / [H] / [B, T, H]), initial state (or None) and loss weights, all numpy-drawn."""
  rng = np.random.default_rng(seed)
  arr = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  q, k, v = arr(B, T, H, D).astype(dtype), arr(B, T, G, D).astype(dtype), arr(B, T, G, E).astype(dtype)
  ld = {"none": None,
        # per-head constants from typical to extreme: lambda = e^-0.3, 1 - 1e-7, ~0 (e^-60) and a reset every token
        "head": jnp.asarray(np.resize([-0.3, -1e-7, -60.0, -np.inf], H), jnp.float32),
        "token": jnp.asarray(np.log(rng.uniform(0.3, 1.0, (B, T, H))), jnp.float32)}[decay]
  s0 = arr(B, H, D, E) if init else None
  return q, k, v, ld, s0, arr(B, T, H, E), arr(B, H, D, E)


@functools.partial(jax.jit, static_argnames=("impl", "chunk"))
def _run(q, k, v, ld, s0, w_out, w_state, *, impl, chunk):
  """(out, final state) and the gradients of a loss that uses both, w.r.t. every array argument given."""

  def loss(q, k, v, ld, s0):
    out, state = jaxattn.linear_attention(q, k, v, log_decay=ld, initial_state=s0, return_final_state=True,
                                          implementation=impl, chunk_size=chunk)
    return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(state * w_state), (out, state)

  argnums = tuple(i for i, x in enumerate((q, k, v, ld, s0)) if x is not None)
  (_, (out, state)), grads = jax.value_and_grad(loss, argnums, has_aux=True)(q, k, v, ld, s0)
  return out, state, dict(zip((_GRADS[i] for i in argnums), grads))


def _compare(impl, q, k, v, ld, s0, w_out, w_state, *, chunk=16, rms=None):
  """Everything of ``impl`` against the f32 reference; f32 elementwise, bf16 by relative RMS (``rms``)."""
  out, state, grads = _run(q, k, v, ld, s0, w_out, w_state, impl=impl, chunk=chunk)
  f32 = lambda x: x.astype(jnp.float32)
  r_out, r_state, r_grads = _run(f32(q), f32(k), f32(v), ld, s0, w_out, w_state, impl="reference", chunk=None)
  assert out.dtype == q.dtype and out.shape == r_out.shape
  assert state.dtype == jnp.float32 and state.shape == r_state.shape
  assert set(grads) == set(r_grads)
  if rms is not None:  # bf16 inputs: the kernels round matmul operands (P, the state) to bf16
    for name, x, r in [("out", out, r_out), ("state", state, r_state)] + [(n, grads[n], r_grads[n]) for n in grads]:
      testing.assert_no_nan(x, name)
      assert testing.relative_rms(x, r) <= (rms if name in ("out", "state") else 2 * rms), name
    return out, state, grads
  testing.assert_close(out, r_out, name=f"{impl} out")
  testing.assert_close(state, r_state, name=f"{impl} final state")
  for name, g in grads.items():
    assert g.shape == r_grads[name].shape and g.dtype == r_grads[name].dtype, name
    if name == "dlog_decay":
      # The epilogue's identity (jaxattn/ops/linear/pallas_common.py) sums per-token terms that each hold the whole
      # decay horizon and cancel to the result (per-head: weighted by position): f32 rounding of ~1e-5 relative.
      with testing.override(jnp.float32, "grad", atol=2e-3, rtol=1e-4, reason="f32 rounding of cancelling sums"):
        testing.assert_close(g, r_grads[name], kind="grad", name=f"{impl} {name}")
    else:
      testing.assert_close(g, r_grads[name], kind="grad", name=f"{impl} {name}")
  return out, state, grads


# --------------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("decay", ["none", "head", "token"])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference_gqa_initial_state_ragged(impl, decay):
  # T = 37 spans three chunks of 16, the last one ragged; 4 query heads share 2 kv heads.
  _, _, grads = _compare(impl, *_inputs(0, decay=decay))
  if decay == "head":
    assert grads["dlog_decay"][3] == 0  # a reset (-inf) has no slope


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_mqa_without_initial_state(impl):
  q, k, v, ld, _, w_out, w_state = _inputs(1, B=1, T=48, H=4, G=1, D=16, E=16, decay="token", dtype=jnp.bfloat16,
                                           init=False)
  _compare(impl, q, k, v, ld, None, w_out, w_state, rms=testing.RMS_TOLERANCES["bfloat16"] * 2)


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_per_token_decays_no_nan(impl):
  """Resets (-inf), lambda = e^-60 and e^-200 (below the kernel floor), lambda = 1 - 1e-7 and exactly 1, T = 64.

  (Extreme per-head constants are part of ``test_matches_reference_gqa_initial_state_ragged``.) The strong gates
  sit mid-chunk, so the later pairs of that chunk need the compensated chunk sums to meet the f32 tolerance.
  """
  B, T, H = 1, 64, 4
  q, k, v, _, s0, w_out, w_state = _inputs(2, B=B, T=T, H=H, G=2)
  g = np.log(np.random.default_rng(3).uniform(0.5, 1.0, (B, T, H))).astype(np.float32)
  g[0, :, 0] = -1e-7  # lambda close to 1 over the whole sequence
  g[0, 5, 1], g[0, 20:23, 1], g[0, 40, 1] = -np.inf, -60.0, -200.0  # resets, lambda ~ 0, below the floor
  g[0, ::3, 2] = 0.0  # exactly no decay on some tokens
  g[0, :, 3] = -40.0
  _, _, grads = _compare(impl, q, k, v, jnp.asarray(g), s0, w_out, w_state, chunk=16)
  d = np.asarray(grads["dlog_decay"])
  assert np.all(d[0, [5, 40], 1] == 0)  # no slope through a reset or below the floor


def test_state_only_loss_with_constant_decay():
  """A loss of the final state alone (the output cotangent is a symbolic zero) and a decay that is not
  differentiated (the backward skips the log-decay terms): gradients still match."""
  q, k, v, ld, s0, _, w_state = _inputs(8, B=1, T=24, H=2, G=1, D=16, E=16, decay="token")

  def grads(impl):
    def loss(q, k, v, s0):
      _, state = jaxattn.linear_attention(q, k, v, log_decay=ld, initial_state=s0, return_final_state=True,
                                          implementation=impl, chunk_size=16)
      return jnp.sum(state * w_state)

    return jax.jit(jax.grad(loss, (0, 1, 2, 3)))(q, k, v, s0)

  for name, g, r in zip(("dq", "dk", "dv", "dinitial_state"), grads("pallas_gpu"), grads("reference")):
    testing.assert_close(g, r, kind="grad", name=name)


# ------------------------------------------------------------------------------------------------ raw kernels
def _reference_everything(q, k, v, ld, s0, w_out, w_state, scale):
  cfg = linear_api.make_call(q, k, v, log_decay=ld, initial_state=s0, scale=scale)

  def loss(q, k, v, s0):
    out, state = linear_attention_reference(q, k, v, ld, s0, cfg)
    return jnp.sum(out * w_out) + jnp.sum(state * w_state), (out, state)

  (_, (out, state)), grads = jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)(q, k, v, s0)
  return out, state, grads


def test_gpu_raw_kernels_several_state_tiles():
  """D = 40, E = 24 padded to 64 / 32 with 16-wide tiles: several state tiles in both state passes, several value
  tiles (output, dv) and key tiles (dq/dk); the constant-decay variant of the backward (no log-decay terms)."""
  q, k, v, ld, s0, w_out, w_state = _inputs(4, B=1, T=40, H=2, G=1, D=40, E=24, decay="token")
  scale = 0.3
  blocks = gpu.BlockSizes(chunk=16, block_d_state=16, block_e_state=16, block_e=16, block_d_dq=16,
                          block_e_dkv=16).resolve(40, 40, 24)
  assert (blocks.chunk, blocks.block_d_state, blocks.block_e_state, blocks.block_e, blocks.block_d_dq,
          blocks.block_e_dkv) == (16,) * 6

  @jax.jit
  def kernels(q, k, v, ld, s0, do, dst):
    out, state = gpu.linear_fwd(q, k, v, ld, s0, scale=scale, blocks=blocks, interpret=True)
    dq, dk, dv, ds0, dG = gpu.linear_bwd(q, k, v, ld, s0, do, dst, scale=scale, blocks=blocks, interpret=True,
                                         log_decay_grad=False)
    assert dG is None
    return out, state, (dq, dk, dv, ds0)

  out, state, grads = kernels(q, k, v, ld, s0, w_out, w_state)
  r_out, r_state, r_grads = _reference_everything(q, k, v, ld, s0, w_out, w_state, scale)
  testing.assert_close(out, r_out, name="out")
  testing.assert_close(state, r_state, name="state")
  for name, g, r in zip(("dq", "dk", "dv", "dinitial_state"), grads, r_grads):
    testing.assert_close(g, r, kind="grad", name=name)


@pytest.mark.parametrize("T,chunk,decay,init,tuning", [
    (64, 16, "head", True, dict(state_interval=2)),  # 2 stored forward states, each walked over 2 chunks
    (128, 32, "token", False, dict(state_interval=1, block_d_dq=16)),  # dq/dk in 2 key tiles + a separate dv pass
    pytest.param(128, 16, "none", True, dict(state_interval=4), marks=pytest.mark.slow),
    pytest.param(64, 32, "head", False, dict(block_e=16, block_e_dkv=16), marks=pytest.mark.slow),
    pytest.param(100, 32, "token", True, dict(state_interval=2), marks=pytest.mark.slow),  # ragged: 100 = 3 * 32 + 4
])
def test_gpu_chunk_parallel_passes(T, chunk, decay, init, tuning):
  """The chunk-parallel passes at D = E = 32 over 2-8 chunks: outputs, final state and every gradient (the per-head
  decays include a reset and lambda ~ e^-60, so the chunk-boundary states cross them)."""
  config = PallasGpuConfig(chunk_size=chunk, **tuning)
  _compare(("pallas_gpu", config), *_inputs(12, B=1, T=T, H=4, G=2, D=32, E=32, decay=decay, init=init), chunk=None)


def test_tpu_raw_kernels_lane_dense_layout():
  """D = E = 128 reads q/k/v in place as [B, T, H * 128] (no transpose); T = 24 in chunks of 8, per-head decay."""
  q, k, v, ld, s0, w_out, w_state = _inputs(5, B=1, T=24, H=2, G=1, D=128, E=128, decay="head")
  scale = 128 ** -0.5

  @jax.jit
  def kernels(q, k, v, ld, s0, do, dst):
    kw = dict(scale=scale, chunk=8, interpret=True)
    out, state = tpu.linear_fwd(q, k, v, ld, s0, **kw)
    dq, rq = tpu.linear_bwd_dq(q, k, v, ld, s0, do, log_decay_grad=False, **kw)  # the constant-decay variant
    dk, dv, ds0, r = tpu.linear_bwd_dkv(q, k, v, ld, do, dst, log_decay_grad=False, **kw)
    assert rq is None and r is None
    return out, state, (dq, dk, dv, ds0)

  out, state, grads = kernels(q, k, v, ld, s0, w_out, w_state)
  r_out, r_state, r_grads = _reference_everything(q, k, v, ld, s0, w_out, w_state, scale)
  testing.assert_close(out, r_out, name="out")
  testing.assert_close(state, r_state, name="state")
  for name, g, r in zip(("dq", "dk", "dv", "dinitial_state"), grads, r_grads):
    # 128-long f32 dot products of O(10) terms: ~1e-5 absolute rounding
    with testing.override(jnp.float32, "grad", atol=1e-4, rtol=2e-5, reason="f32 rounding, 128-wide dots"):
      testing.assert_close(g, r, kind="grad", name=name)


def test_lowers_for_tpu_and_cuda():
  """Cross-lowering on CPU (no accelerator): three Mosaic custom calls for "tpu"; for "cuda" the forward's state and
  output passes and the backward's state, reverse state and dq/dk passes, plus a separate dv pass when the dq/dk pass
  is tiled (bf16 log-decay gradient at D = 128), else fused into it."""
  B, T, H, G, D = 1, 1000, 4, 2, 128
  x = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((B, T, G, D), jnp.bfloat16)
  gates = jax.ShapeDtypeStruct((B, T, H), jnp.float32)
  st = jax.ShapeDtypeStruct((B, H, D, D), jnp.float32)

  # use_platform: dispatch and build the kernels for the target (not in interpret mode) although the backend is CPU.
  def direct(q, k, v, g, s0, backend, config):
    call = linear_api.make_call(q, k, v, log_decay=g, initial_state=s0, scale=0.1)
    out, state = backend_lib.flash_vjp(backend, call, config, q, k, v, g, s0)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(state)

  tpu_k = dict(backend=ops_tpu.BACKEND, config=PallasTpuConfig(chunk_size=128))
  gpu_k = dict(backend=ops_gpu.BACKEND, config=PallasGpuConfig())
  with backend_lib.use_platform("tpu"):
    f = jax.jit(jax.grad(functools.partial(direct, **tpu_k), (0, 1, 2, 3, 4)))
    assert jax.export.export(f, platforms=["tpu"])(x, kv, kv, gates, st).mlir_module().count("tpu_custom_call") == 3
  with backend_lib.use_platform("gpu"):
    for argnums, calls in (((0, 1, 2, 3, 4), 6), ((0, 1, 2), 5)):  # the decay differentiated, and a constant decay
      f = jax.jit(jax.grad(functools.partial(direct, **gpu_k), argnums))
      text = f.trace(x, kv, kv, gates, st).lower(lowering_platforms=("cuda",)).as_text()
      assert text.count("xla.gpu.triton") == calls, argnums
      assert ("jaxattn_linear_bwd_dv" in text) == (calls == 6)
  # f32, per-head decay, head dim 64 (the transposed [B, H, T, D] layout) lowers too
  x32 = jax.ShapeDtypeStruct((B, 256, H, 64), jnp.float32)
  kv32 = jax.ShapeDtypeStruct((B, 256, G, 64), jnp.float32)
  with backend_lib.use_platform("tpu"):
    f = jax.jit(jax.grad(functools.partial(direct, **tpu_k), (0, 1, 2, 3)))
    exported = jax.export.export(f, platforms=["tpu"])(x32, kv32, kv32, jax.ShapeDtypeStruct((H,), jnp.float32),
                                                       None)
  assert exported.mlir_module().count("tpu_custom_call") == 3


# ------------------------------------------------------------------------------------------ options, refusals
@pytest.mark.parametrize("impl", IMPLS)
def test_refusals_and_fallback(impl):
  q, k, v, _, _, _, _ = _inputs(6, B=1, T=20, H=2, G=2, D=8, E=8, decay="none")
  with pytest.raises(NotImplementedError, match="causal=False"):
    jaxattn.linear_attention(q, k, v, causal=False, implementation=impl)
  # a sequence falls back to the next implementation, with one warning naming the skipped one and why
  with pytest.warns(backend_lib.FallbackWarning, match=f"skipping '{impl}'.*causal=False"):
    out = jaxattn.linear_attention(q, k, v, causal=False, implementation=(impl, "xla"))
  testing.assert_close(out, jaxattn.linear_attention(q, k, v, causal=False, implementation="xla"))
  # a chunk the kernels cannot tile is an invalid config: ValueError, named and explicit or in a chain
  with pytest.raises(ValueError, match=f"{impl}: Pallas(Gpu|Tpu)Config.chunk_size=12 must be"):
    jaxattn.linear_attention(q, k, v, implementation=impl, chunk_size=12)
  with pytest.raises(ValueError, match="chunk_size=12"):
    jaxattn.linear_attention(q, k, v, implementation=(impl, "xla"), chunk_size=12)


def test_backend_specific_refusals_and_tiling():
  q, k, v, _, _, _, _ = _inputs(7, B=1, T=40, H=2, G=2, D=8, E=8, decay="none")
  with pytest.raises(NotImplementedError, match="float16"):
    jaxattn.linear_attention(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16),
                             implementation="pallas_tpu")
  big = jnp.zeros((1, 8, 1, 512), jnp.float32)
  with pytest.raises(NotImplementedError, match="head dims up to 256"):
    jaxattn.linear_attention(big, big, big, implementation="pallas_gpu")
  # The raw TPU kernels check the tiling rule themselves (interpret mode would not): chunk 12 is a sublane dim.
  with pytest.raises(ValueError, match="multiple of 8"):
    tpu.linear_fwd(q, k, v, None, None, scale=1.0, chunk=12, interpret=True)
  with pytest.raises(ValueError, match="multiple of 16"):
    tpu.linear_fwd(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), None, None, scale=1.0,
                   chunk=8, interpret=True)
  with pytest.raises(ValueError, match=r"minor \(lane\) dim 64 must be a multiple of 128"):
    tpu.check_block_shapes("x", (None, 8, 64), (1, 40, 256), jnp.float32)
  tpu.check_block_shapes("x", (None, 8, 64), (1, 40, 64), jnp.float32)  # full-dim lane block: legal
  assert ops_tpu.chunk_for(12, jnp.float32, 12) == 12  # any chunk that covers T
  with pytest.raises(ValueError, match="multiple of 8"):
    ops_tpu.chunk_for(40, jnp.float32, 12)
  assert ops_tpu.chunk_for(37, jnp.float32) == 40 and ops_tpu.chunk_for(37, jnp.bfloat16) == 48
  assert ops_tpu.chunk_for(5000, jnp.bfloat16) == 128
  with pytest.raises(ValueError, match="power of two"):
    gpu.BlockSizes(chunk=24)
  with pytest.raises(ValueError, match="num_warps"):
    gpu.BlockSizes(num_warps=3)
  r = gpu.BlockSizes().resolve(20, 8, 200)  # Dp = 16, Ep = 256; the dq/dk tile is chosen per backward call
  assert (r.chunk, r.state_interval, r.block_d_state, r.block_e_state, r.block_e, r.block_d_dq,
          r.block_e_dkv) == (32, 1, 16, 64, 64, None, 128)
  r = gpu.BlockSizes(block_d_dq=512).resolve(8192, 256, 256)
  assert (r.chunk, r.state_interval, r.block_d_state, r.block_e_state, r.block_e, r.block_d_dq,
          r.block_e_dkv) == (64, 4, 64, 64, 64, 256, 64)
  # the state passes' tiles shrink until B * H * tiles >= 256 programs (value dim first, down to 32)
  tiles = lambda heads: (lambda r: (r.block_d_state, r.block_e_state))(gpu.BlockSizes().resolve(8192, 128, 128,
                                                                                                 heads=heads))
  assert tiles(64) == (64, 64) and tiles(32) == (64, 32) and tiles(16) == (32, 32) and tiles(1) == (32, 32)
  assert gpu.BlockSizes(block_e_state=64).resolve(8192, 128, 128, heads=16).block_e_state == 64
  with pytest.raises(ValueError, match="state_interval"):
    gpu.BlockSizes(state_interval=3)
  # CPU default never picks a kernel
  assert linear_api.DEFAULTS["cpu"] == ("xla",)
  assert linear_api.DEFAULTS["gpu"] == ("pallas_gpu", "xla")
  assert KERNEL_LOG_DECAY_FLOOR < -103.3  # exp(floor) is 0 in f32


@pytest.mark.parametrize("impl,config,match", [
    ("pallas_gpu", PallasGpuConfig(chunk_size=24), r"pallas_gpu: PallasGpuConfig.chunk_size=24 must be a power of two"),
    ("pallas_gpu", PallasGpuConfig(block_e=8), r"pallas_gpu: PallasGpuConfig.block_e=8 must be a power of two"),
    ("pallas_gpu", PallasGpuConfig(num_warps=3), r"pallas_gpu: PallasGpuConfig.num_warps=3 must be None or one of"),
    ("pallas_gpu", PallasGpuConfig(state_interval=6), r"pallas_gpu: PallasGpuConfig.state_interval=6 must be a power"),
    ("pallas_gpu", PallasGpuConfig(num_stages=0), r"pallas_gpu: PallasGpuConfig.num_stages=0 must be an int"),
    ("pallas_tpu", PallasTpuConfig(chunk_size=12), r"pallas_tpu: PallasTpuConfig.chunk_size=12 must be a multiple "
                                                   r"of 8 for float32"),
    ("pallas_tpu", PallasTpuConfig(chunk_size=0), r"pallas_tpu: PallasTpuConfig.chunk_size=0 must be a positive int"),
])
def test_invalid_config_raises_value_error(impl, config, match):
  """Each kernel backend rejects a bad Config with a ValueError naming the field (nothing is built or run)."""
  q, k, v, _, _, _, _ = _inputs(10, B=1, T=40, H=2, G=2, D=8, E=8, decay="none")
  with pytest.raises(ValueError, match=match):
    jaxattn.linear_attention(q, k, v, implementation=(impl, config))


@pytest.mark.parametrize("impl,config", [("pallas_gpu", PallasGpuConfig(chunk_size=16, block_e=16, block_d_dq=16)),
                                         ("pallas_tpu", PallasTpuConfig(chunk_size=8))])
def test_config_runs(impl, config):
  """``implementation=(name, Config)`` runs the kernels with that config (per-token decay, ragged T = 20)."""
  q, k, v, ld, s0, w_out, w_state = _inputs(11, B=1, T=20, H=2, G=1, D=24, E=16, decay="token")
  _compare((impl, config), q, k, v, ld, s0, w_out, w_state, chunk=None)


def test_tpu_cost_model():
  B, T, H, D = 2, 8192, 16, 128
  c = ops_tpu.kernel_cost(B, T, H, D, decay="head")
  C, N = 128, T // 128
  assert c["chunk"] == C
  per_chunk = 2 * C * C * 2 * D + 4 * C * D * D
  assert c["forward"]["flops"] == B * H * N * per_chunk
  assert c["backward"]["dkv"]["flops"] == B * H * N * (4 * C * C * 2 * D + 10 * C * D * D)  # + hi/lo split
  fixed = ops_tpu.kernel_cost(B, T, H, D, decay="head", decay_grad=False)  # a constant decay: no split, no r
  assert fixed["backward"]["dkv"]["flops"] == B * H * N * (4 * C * C * 2 * D + 6 * C * D * D)
  assert fixed["backward"]["bytes"] < c["backward"]["bytes"]
  # forward bytes: q + out, K + V per query head, decay sums, final state (bf16)
  assert c["forward"]["bytes"] == B * H * T * 4 * D * 2 + B * H * N * C * 4 + B * H * D * D * 4
  for chip, (peak, bw) in ops_tpu.TPU_SPECS.items():
    r = c["roofline"][chip]
    f = c["forward"]
    assert r["forward_s"] == pytest.approx(max(f["flops"] / peak, f["bytes"] / bw))
    assert r["forward_backward_s"] > r["forward_s"] > 0
  assert c["roofline"]["v5e"]["forward_bound"] == "memory"
  gqa = ops_tpu.kernel_cost(B, T, H, D, G=4, decay="token")
  assert gqa["backward"]["dkv"]["bytes"] < c["backward"]["dkv"]["bytes"]  # K/V traffic per kv head in dk/dv
  with pytest.raises(ValueError, match="decay"):
    ops_tpu.kernel_cost(B, T, H, D, decay="per-head")


# ------------------------------------------------------------------------------------------- real hardware
def _hardware_check(impl):
  """bf16 at a real size against the f32 xla path (itself pinned to the reference above): relative RMS only."""
  for decay in ("head", "token"):
    q, k, v, ld, s0, w_out, w_state = _inputs(9, B=2, T=2048, H=8, G=2, D=128, E=128, decay=decay,
                                              dtype=jnp.bfloat16)
    out, state, grads = _run(q, k, v, ld, s0, w_out, w_state, impl=impl, chunk=None)
    f32 = lambda x: x.astype(jnp.float32)
    r_out, r_state, r_grads = _run(f32(q), f32(k), f32(v), ld, s0, w_out, w_state, impl="xla", chunk=None)
    for name, x, r in [("out", out, r_out), ("state", state, r_state)] + [(n, grads[n], r_grads[n]) for n in grads]:
      testing.assert_no_nan(x, name)
      assert testing.relative_rms(x, r) <= 2e-2, (decay, name, testing.relative_rms(x, r))


@pytest.mark.gpu
def test_on_gpu_bf16():
  _hardware_check("pallas_gpu")


@pytest.mark.tpu
def test_on_tpu_bf16():
  _hardware_check("pallas_tpu")
