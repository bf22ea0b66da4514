"""Per-generation defaults of the pallas_tpu softmax backend (tiles and VMEM limit; issue 13 item 5), on CPU.

The table itself comes from ``python -m experiments tpu_compile --preset tiles`` (the compile check on a machine with
libtpu: tests/experiments/test_tpu_compile.py); here: the lookup, the fallbacks and the generation override.
"""

import pytest

from jaxattn.ops.softmax import pallas_tpu
from jaxattn.ops.softmax.config import PallasTpuConfig, SoftmaxCall
from pallas_kernels.common import TPU_SPECS
from pallas_kernels.common.vmem import TPU_GENERATIONS, generation_of, tpu_generation, use_tpu_generation

MIB = 1 << 20


def _call(D=128, dtype="bfloat16", T=8192):
  return SoftmaxCall(1, T, T, 16, 16, D, D, dtype, D ** -0.5)


def test_generation_table():
  assert {g: (TPU_GENERATIONS[g].vmem_bytes // MIB, TPU_GENERATIONS[g].vmem_limit // MIB) for g in TPU_GENERATIONS} \
      == {"v4": (16, 16), "v5e": (128, 96), "v5p": (64, 48), "v6e": (128, 96)}
  assert TPU_SPECS["v5e"] == (197e12, 819e9) and TPU_SPECS["v6e"] == (918e12, 1638e9)
  assert generation_of("TPU v5 lite") == "v5e" and generation_of("TPU v4") == "v4" and generation_of("TPU v2") is None


def test_default_tiles_per_generation():
  assert pallas_tpu.DEFAULT_TILES == {"v4": 512, "v5e": 1024, "v5p": 1024, "v6e": 1024}
  for gen, tile in pallas_tpu.DEFAULT_TILES.items():
    cfg = pallas_tpu.default_config_for(_call(), gen)
    assert cfg == PallasTpuConfig(tile, tile, vmem_limit_bytes=TPU_GENERATIONS[gen].vmem_limit)
    # wide rows halve the tile: on v4 f32 or D=256 (512-byte rows), elsewhere only f32 with D=256 (1 KiB rows)
    wide = 256 if gen == "v4" else 512
    assert TPU_GENERATIONS[gen].wide_row_bytes == wide
    for D, dtype in ((128, "float32"), (256, "bfloat16"), (256, "float32"), (64, "float32")):
      halve = D * (4 if dtype == "float32" else 2) > wide
      assert pallas_tpu.default_config_for(_call(D=D, dtype=dtype), gen).block_q == (tile // 2 if halve else tile)


def test_landmark_default_block_q_per_generation():
  from jaxattn.ops.landmark import pallas_tpu as landmark_tpu
  from jaxattn.ops.landmark.config import LandmarkCall

  call = LandmarkCall(1, 8192, 16, 16, 128, 128, "bfloat16", 128, 128 ** -0.5)
  assert landmark_tpu.BACKEND.default_config(call).block_q == 256  # no TPU: generation-independent
  for gen, want in (("v4", 512), ("v5e", 1024), ("v5p", 1024), ("v6e", 1024)):
    with use_tpu_generation(gen):
      assert landmark_tpu.BACKEND.default_config(call).block_q == want
      short = LandmarkCall(1, 300, 16, 16, 128, 128, "bfloat16", 128, 128 ** -0.5)
      assert landmark_tpu.BACKEND.default_config(short).block_q == 384  # the block-rounded sequence
      f32 = LandmarkCall(1, 8192, 16, 16, 128, 128, "float32", 64, 128 ** -0.5)
      assert landmark_tpu.BACKEND.default_config(f32).block_q == (256 if gen == "v4" else want)


def test_without_a_tpu_the_default_is_generation_independent():
  assert tpu_generation() is None  # CPU backend, no override
  assert pallas_tpu.BACKEND.default_config(_call()) == PallasTpuConfig(512, 512)
  with use_tpu_generation("v6e"):
    assert tpu_generation() == "v6e"
    assert pallas_tpu.BACKEND.default_config(_call()) == PallasTpuConfig(1024, 1024, vmem_limit_bytes=96 * MIB)
    # clamped to short sequences by resolve_tiles, as before
    cfg = pallas_tpu.BACKEND.default_config(_call(T=384))
    assert pallas_tpu.resolve_tiles(cfg, 384, 384).fwd == (384, 384)
  assert tpu_generation() is None
  with pytest.raises(ValueError, match="v3"):
    with use_tpu_generation("v3"):
      pass
