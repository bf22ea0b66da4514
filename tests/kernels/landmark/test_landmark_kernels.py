"""Fused landmark kernels against the dense reference: pallas_gpu (Triton lowering, Pallas interpret mode on CPU) and
pallas_tpu (Mosaic, TPU interpret mode on CPU); forward, lse and dq/dk/dv (the loss uses out and lse) for GQA/MQA,
block sizes 64 and 128, several query tiles, a last block without landmark, non power-of-two head dims and bf16; a
cross-lowering check for each backend (no accelerator needed); block validation. ``TestOnGpu`` / ``TestOnTpu`` repeat
the comparison compiled at real sizes on hardware (skipped elsewhere)."""

import jax
import jax.numpy as jnp
import pytest

from jaxattn import backend as backend_lib
from jaxattn.ops.landmark import PallasGpuConfig, PallasTpuConfig, api, pallas_gpu, pallas_tpu
from pallas_kernels.landmark import gpu, tpu
from tests.ops.landmark.suite import compare, inputs

# id: (B, T, H, G, D, E, block_size, block_q, dtype)
GPU_CASES = {
    "bs16-gqa-two-blocks-per-query-tile-partial-last": (1, 70, 4, 2, 16, 8, 16, 32, jnp.float32),
    "bs16-mqa-head-dim-24": (2, 48, 2, 1, 24, 16, 16, 16, jnp.float32),
    "bs64-mqa-last-block-without-landmark": (1, 160, 2, 1, 16, 16, 64, 64, jnp.float32),
    "bs128-query-tile-128": (1, 200, 2, 2, 16, 8, 128, 128, jnp.float32),
    "bs16-bf16": (1, 64, 2, 1, 32, 32, 16, 32, jnp.bfloat16),
}

TPU_CASES = {
    "bs8-gqa-two-blocks-per-query-tile-partial-last": (1, 44, 4, 2, 16, 8, 8, 16, jnp.float32),
    "bs64-mqa-query-tile-128": (1, 160, 2, 1, 16, 16, 64, 128, jnp.float32),
    "bs128-head-dim-128": (1, 136, 2, 2, 128, 128, 128, 128, jnp.float32),
    "bs16-bf16-batch2": (2, 40, 2, 1, 32, 32, 16, 16, jnp.bfloat16),
}


def _params(cases, slow):
  return [pytest.param(c, marks=pytest.mark.slow) if c in slow else c for c in cases]


@pytest.mark.parametrize("case", _params(GPU_CASES, {"bs16-mqa-head-dim-24", "bs128-query-tile-128", "bs16-bf16"}))
def test_pallas_gpu_interpret_matches_reference(case):
  B, T, H, G, D, E, bs, bq, dtype = GPU_CASES[case]
  q, k, v, w_out, w_lse = inputs(list(GPU_CASES).index(case), B, T, H, G, D, E, dtype)
  compare("pallas_gpu", q, k, v, w_out, w_lse, block_size=bs, block_q=bq)


@pytest.mark.parametrize("case", _params(TPU_CASES, {"bs128-head-dim-128", "bs16-bf16-batch2"}))
def test_pallas_tpu_interpret_matches_reference(case):
  B, T, H, G, D, E, bs, bq, dtype = TPU_CASES[case]
  q, k, v, w_out, w_lse = inputs(10 + list(TPU_CASES).index(case), B, T, H, G, D, E, dtype)
  compare("pallas_tpu", q, k, v, w_out, w_lse, block_size=bs, block_q=bq)


def _grad_fn(backend, config, block_size):
  def loss(q, k, v):
    call = api.make_call(q, k, v, block_size=block_size, scale=0.1)
    o, l = backend_lib.flash_vjp(backend, call, config, q, k, v)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(l)

  return jax.jit(jax.grad(loss, (0, 1, 2)))


_SPECS = lambda B, T, H, G, D: (jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16),
                                jax.ShapeDtypeStruct((B, T, G, D), jnp.bfloat16),
                                jax.ShapeDtypeStruct((B, T, G, D), jnp.bfloat16))


@pytest.mark.parametrize("bs,bq", [(64, 128), (128, 128)])
def test_gpu_lowers_to_triton_for_cuda(bs, bq):
  """Forward, dq and dk/dv become three Triton custom calls at real tile sizes (cross-lowering, no GPU needed)."""
  with backend_lib.use_platform("gpu"):  # build the kernels for the GPU (not interpret mode) on this CPU
    lowered = _grad_fn(pallas_gpu.BACKEND, PallasGpuConfig(block_q=bq), bs).trace(*_SPECS(1, 300, 4, 2, 128)).lower(
        lowering_platforms=("cuda",))
  assert lowered.as_text().count("xla.gpu.triton") == 3


@pytest.mark.parametrize("bs,bq", [(64, 256), (128, 256)])
def test_tpu_lowers_to_mosaic(bs, bq):
  """The three kernels lower to Mosaic custom calls for platform "tpu" (no TPU needed)."""
  with backend_lib.use_platform("tpu"):
    lowered = _grad_fn(pallas_tpu.BACKEND, PallasTpuConfig(block_q=bq), bs).trace(*_SPECS(1, 1000, 4, 2, 128)).lower(
        lowering_platforms=("tpu",))
  assert lowered.as_text().count("tpu_custom_call") == 3


@pytest.mark.parametrize("impl,config", [("pallas_gpu", PallasGpuConfig(block_q=32, num_warps=2, num_stages=1)),
                                         ("pallas_tpu", PallasTpuConfig(block_q=32))])
def test_config_runs(impl, config):
  """``implementation=(name, Config)`` runs the kernels with that config (two blocks per query tile, partial last)."""
  q, k, v, w_out, w_lse = inputs(20, 1, 40, 2, 1, 16, 8)
  compare((impl, config), q, k, v, w_out, w_lse, block_size=16)


def test_kernel_block_validation():
  with pytest.raises(ValueError, match="power of two >= 16"):
    gpu.check_blocks(48, 48)
  with pytest.raises(ValueError, match="power-of-two multiple"):
    gpu.check_blocks(16, 48)
  with pytest.raises(ValueError, match="multiple of 8"):
    tpu.check_blocks(12, 24, 100)
  with pytest.raises(ValueError, match="block_q=24 must be a multiple of block_size=16"):
    tpu.check_blocks(16, 24, 100)


def _hardware_case(impl, bs, dtype):
  q, k, v, w_out, w_lse = inputs(0, 2, 2048, 8, 2, 128, 128, dtype)
  compare(impl, q, k, v, w_out, w_lse, block_size=bs)


@pytest.mark.gpu
class TestOnGpu:
  """Compiled Triton kernels at real sizes against the f32 reference."""

  @pytest.mark.parametrize("bs", [64, 128])
  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_matches_reference(self, bs, dtype):
    if dtype == jnp.float32 and bs == 128:
      # D=128 f32 at one 128-token block needs > 232448 bytes of shared memory even at one stage
      # (pallas_kernels/landmark/budget.py): the backend refuses it up front instead of failing to compile.
      with pytest.raises(NotImplementedError, match="shared memory"):
        _hardware_case("pallas_gpu", bs, dtype)
      return
    _hardware_case("pallas_gpu", bs, dtype)


@pytest.mark.tpu
class TestOnTpu:
  """Compiled Mosaic kernels at real sizes against the f32 reference."""

  @pytest.mark.parametrize("bs", [64, 128])
  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_matches_reference(self, bs, dtype):
    _hardware_case("pallas_tpu", bs, dtype)
