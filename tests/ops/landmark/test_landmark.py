"""landmark_attention: the reference against an explicit per-block formula, xla against the reference (forward, lse
and gradients), rows summing to one, equality with causal softmax attention when no landmark is in range, block
sizes 64 and 128 with a last block without landmark, GQA/MQA, bf16, fuzzed shapes, bad inputs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings, strategies as st

import jaxattn
from jaxattn import masks, testing
from tests.ops.landmark.suite import compare, inputs, run


def _per_block_formula(q, k, v, bs, scale):
  """The definition written out per query (float64 numpy loops): TOP(i) softmax, then per-block softmaxes."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, H, _ = q.shape
  R = H // k.shape[2]
  out = np.zeros((B, T, H, v.shape[-1]))
  for b in range(B):
    for h in range(H):
      kk, vv = k[b, :, h // R], v[b, :, h // R]
      for i in range(T):
        c = i // bs
        s = kk @ q[b, i, h] * scale
        logits, values = [], []
        for j in range(c * bs, i + 1):  # regular keys of the current block (its landmark, if any, excluded)
          if (j + 1) % bs:
            logits.append(s[j])
            values.append(vv[j])
        for blk in range(c):  # earlier blocks: the landmark's logit, the block's softmax-weighted value
          lm = blk * bs + bs - 1
          reg = np.arange(blk * bs, lm)
          p = np.exp(s[reg] - s[reg].max())
          logits.append(s[lm])
          values.append(p @ vv[reg] / p.sum())
        w = np.exp(np.array(logits) - max(logits))
        out[b, i, h] = w @ np.array(values) / w.sum()
  return out


@pytest.mark.parametrize("T,bs,H,G", [(37, 8, 4, 2), (24, 2, 2, 1), (20, 4, 2, 2)])
def test_reference_matches_per_block_formula(T, bs, H, G):
  q, k, v = testing.random_qkv(T, B=2, T=T, H=H, G=G, D=8, E=6)
  ref = jaxattn.landmark_attention(q, k, v, block_size=bs, implementation="reference")
  testing.assert_close(ref, _per_block_formula(q, k, v, bs, 8 ** -0.5).astype(np.float32), name="reference")


# id: (B, T, H, G, D, E, block_size, block_q, block_k, dtype)
CASES = {
    "bs64-last-block-without-landmark-gqa": (1, 160, 4, 2, 16, 16, 64, None, None, jnp.float32),
    "bs128-mqa-tiles-128": (1, 300, 2, 1, 16, 8, 128, 128, 128, jnp.float32),
    "bs8-wide-key-tiles": (2, 75, 2, 2, 8, 12, 8, 16, 40, jnp.float32),
    "bs16-query-tile-one-block": (1, 64, 3, 1, 8, 8, 16, 16, 32, jnp.float32),
    "bs64-bf16": (1, 192, 2, 1, 32, 32, 64, 64, 128, jnp.bfloat16),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "bs16-query-tile-one-block" else c
                                  for c in CASES])
def test_xla_matches_reference(case):
  B, T, H, G, D, E, bs, bq, bk, dtype = CASES[case]
  q, k, v, w_out, w_lse = inputs(list(CASES).index(case), B, T, H, G, D, E, dtype)
  compare("xla", q, k, v, w_out, w_lse, block_size=bs, block_q=bq, block_k=bk)


@settings(max_examples=3)
@given(T=st.integers(1, 70), bs=st.sampled_from([2, 3, 5, 8, 16]), heads=st.sampled_from([(2, 2), (4, 2), (2, 1)]),
       nq=st.integers(1, 3), nk=st.integers(1, 3), seed=st.integers(0, 100))
def test_xla_fuzzed_shapes(T, bs, heads, nq, nk, seed):
  H, G = heads
  q, k, v, w_out, w_lse = inputs(seed, 1, T, H, G, 4, 4)
  compare("xla", q, k, v, w_out, w_lse, block_size=bs, block_q=nq * bs, block_k=nk * bs)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_rows_sum_to_one(impl):
  """With v = 1 every output is 1: the weights of each row sum to one (landmark values never enter)."""
  q, k, _ = testing.random_qkv(3, B=2, T=90, H=4, G=2, D=16)
  v = jnp.ones((2, 90, 2, 5), jnp.float32)
  for bs in (4, 16):
    out = jaxattn.landmark_attention(q * 3.0, k, v, block_size=bs, implementation=impl)
    np.testing.assert_allclose(np.asarray(out), 1.0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("T,bs", [(63, 64), (100, 128), (1, 2)])
def test_no_landmark_in_range_is_causal_softmax(impl, T, bs):
  """T < block_size: no landmark exists, so the grouped softmax is plain causal softmax attention."""
  q, k, v = testing.random_qkv(T, B=1, T=T, H=4, G=2, D=16, E=8)
  out, lse = jaxattn.landmark_attention(q, k, v, block_size=bs, implementation=impl, return_lse=True)
  r_out, r_lse = jaxattn.softmax_attention(q, k, v, mask=masks.Causal(), implementation="reference",
                                           return_lse=True)
  testing.assert_close(out, r_out, name="out")
  testing.assert_close(lse, r_lse, name="lse")


def test_landmark_values_and_current_landmark_key_do_not_matter():
  """Landmark values never enter; a landmark key only matters to later blocks (not to its own block's queries)."""
  bs, T = 8, 40
  q, k, v = testing.random_qkv(5, B=1, T=T, H=2, D=8)
  lm = (np.arange(T) + 1) % bs == 0
  v2 = v.at[:, lm].set(100.0)
  base = jaxattn.landmark_attention(q, k, v, block_size=bs, implementation="xla")
  testing.assert_close(jaxattn.landmark_attention(q, k, v2, block_size=bs, implementation="xla"), base)
  k2 = k.at[:, 15].set(50.0)  # the landmark of block 1
  moved = np.asarray(jaxattn.landmark_attention(q, k2, v, block_size=bs, implementation="xla"))
  np.testing.assert_array_equal(moved[:, :16], np.asarray(base)[:, :16])
  assert np.abs(moved[:, 16:] - np.asarray(base)[:, 16:]).max() > 1e-3


def test_bf16_long_sequence_relative_rms():
  q, k, v = testing.random_qkv(9, B=1, T=1024, H=2, G=1, D=32, dtype=jnp.bfloat16)
  out = jaxattn.landmark_attention(q, k, v, block_size=64, implementation="xla")
  ref = jaxattn.landmark_attention(*(x.astype(jnp.float32) for x in (q, k, v)), block_size=64,
                                   implementation="reference")
  assert out.dtype == jnp.bfloat16
  assert testing.relative_rms(out, ref) <= testing.RMS_TOLERANCES["bfloat16"]


def test_default_implementation_on_cpu_is_xla_and_jits():
  q, k, v, w_out, w_lse = inputs(4, 1, 50, 2, 1, 8, 8)
  out = jax.jit(lambda q, k, v: jaxattn.landmark_attention(q, k, v, block_size=16))(q, k, v)
  testing.assert_close(out, run(q, k, v, w_out, w_lse, impl="xla", block_size=16)[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=1), "block_size must be an int >= 2"),
    (dict(block_size=8, scale=float("nan")), "scale must be a finite"),
    (dict(block_size=8, block_q=12), "block_q must be a positive multiple of block_size=8"),
    (dict(block_size=8, implementation="nope"), "unknown implementation"),
])
def test_bad_options(kwargs, match):
  q, k, v = testing.random_qkv(0, B=1, T=16, H=2, D=8)
  with pytest.raises(ValueError, match=match):
    jaxattn.landmark_attention(q, k, v, **kwargs)


def test_bad_shapes():
  q, k, v = testing.random_qkv(0, B=1, T=16, S=12, H=2, D=8)
  with pytest.raises(ValueError, match="must share the length"):
    jaxattn.landmark_attention(q, k, v, block_size=4)
  q, k, v = testing.random_qkv(0, B=1, T=16, H=3, G=2, D=8)
  with pytest.raises(ValueError, match="3 heads, not a multiple of k's 2 kv heads"):
    jaxattn.landmark_attention(q, k, v, block_size=4)


def test_explicit_kernel_refuses_unsupported_block():
  q, k, v = testing.random_qkv(0, B=1, T=16, H=2, D=8)
  with pytest.raises(NotImplementedError, match="power of two >= 16"):
    jaxattn.landmark_attention(q, k, v, block_size=12, implementation="pallas_gpu")
  with pytest.raises(NotImplementedError, match="multiple of 8"):
    jaxattn.landmark_attention(q, k, v, block_size=12, implementation="pallas_tpu")
  # a chain falls back, with one warning naming the skipped backend and its reason
  with pytest.warns(jaxattn.backend.FallbackWarning, match="skipping 'pallas_gpu'.*power of two >= 16"):
    out = jaxattn.landmark_attention(q, k, v, block_size=12, implementation=("pallas_gpu", "xla"))
  testing.assert_close(out, jaxattn.landmark_attention(q, k, v, block_size=12, implementation="reference"))


def test_xla_memory_is_linear_at_16k():
  """B=1, H=4, T=16K, D=64 (one dense logit matrix would be 4 GiB): XLA's buffer assignment for forward and
  forward+backward stays under 256 MiB (compile only)."""
  q = k = v = jax.ShapeDtypeStruct((1, 16384, 4, 64), jnp.float32)
  fwd = lambda q, k, v: jaxattn.landmark_attention(q, k, v, block_size=64, implementation="xla")
  for fn in (fwd, jax.grad(lambda q, k, v: fwd(q, k, v).sum(), (0, 1, 2))):
    mem = jax.jit(fn).lower(q, k, v).compile().memory_analysis()
    total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    assert total < 256 << 20, f"{total / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------- the protocol's configs
def test_xla_config_equals_tile_shorthand_and_reference():
  """``implementation=("xla", XlaConfig(...))`` runs with those tiles: equal to the ``block_q=`` / ``block_k=``
  shorthand and to the reference (forward, lse, gradients)."""
  from jaxattn.ops.landmark import XlaConfig
  q, k, v, w_out, w_lse = inputs(31, 1, 75, 2, 1, 8, 8)
  got = run(q, k, v, w_out, w_lse, impl=("xla", XlaConfig(block_q=16, block_k=24)), block_size=8)
  short = run(q, k, v, w_out, w_lse, impl="xla", block_size=8, block_q=16, block_k=24)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(short)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  compare(("xla", XlaConfig(block_q=16, block_k=24)), q, k, v, w_out, w_lse, block_size=8)


@pytest.mark.parametrize("impl,config,match", [
    ("xla", dict(block_q=12, block_k=8), r"xla: XlaConfig.block_q=12 must be a positive multiple of block_size=8"),
    ("xla", dict(block_q=8, block_k=0), r"xla: XlaConfig.block_k=0 must be a positive multiple of block_size=8"),
    ("pallas_gpu", dict(block_q=48), r"pallas_gpu: PallasGpuConfig.block_q=48 must be a power-of-two multiple of "
                                     r"block_size=16"),
    ("pallas_gpu", dict(block_q=32, num_warps=3), r"pallas_gpu: PallasGpuConfig.num_warps=3 must be None or one of"),
    ("pallas_gpu", dict(block_q=32, num_stages=0), r"pallas_gpu: PallasGpuConfig.num_stages=0 must be an int"),
    ("pallas_tpu", dict(block_q=24), r"pallas_tpu: PallasTpuConfig.block_q=24 must be a positive multiple of "
                                     r"block_size=16"),
])
def test_invalid_config_raises_value_error(impl, config, match):
  """Every backend rejects a bad Config with the same kind of ValueError (before any kernel is built); so does a
  chain (a bad tile is an error, not a reason to fall back)."""
  from jaxattn.ops import landmark
  bs = 8 if impl == "xla" else 16
  q, k, v = testing.random_qkv(0, B=1, T=32, H=2, D=8)
  cls = {"xla": landmark.XlaConfig, "pallas_gpu": landmark.PallasGpuConfig, "pallas_tpu": landmark.PallasTpuConfig}
  with pytest.raises(ValueError, match=match):
    jaxattn.landmark_attention(q, k, v, block_size=bs, implementation=(impl, cls[impl](**config)))
  with pytest.raises(ValueError, match=match):
    jaxattn.landmark_attention(q, k, v, block_size=bs, implementation=[(impl, cls[impl](**config)), "reference"])


def test_default_configs():
  """The GPU query tile is chosen in one place (``default_config``): 128 tokens, halved while it covers T."""
  from jaxattn.ops.landmark import api, pallas_gpu, pallas_tpu, xla
  call = lambda T, bs: api.make_call(*testing.random_qkv(0, B=1, T=T, H=2, D=8), block_size=bs)
  assert pallas_gpu.BACKEND.default_config(call(300, 16)).block_q == 128
  assert pallas_gpu.BACKEND.default_config(call(40, 16)).block_q == 64
  assert pallas_gpu.BACKEND.default_config(call(10, 16)).block_q == 16
  assert pallas_gpu.BACKEND.default_config(call(1000, 256)).block_q == 256
  assert pallas_tpu.BACKEND.default_config(call(1000, 64)).block_q == 256
  assert pallas_tpu.BACKEND.default_config(call(100, 64)).block_q == 128
  assert xla.BACKEND.default_config(call(1000, 24)) == xla.XlaConfig(block_q=240, block_k=240)
  assert api.resolve_backend(call(64, 16))[0].name == "xla"  # CPU chain


class TestJitAndEager(chex.TestCase):
  """``xla`` equals ``reference`` with and without ``jit`` (``chex.variants``; the suite above always jits):
  outputs, lse and gradients."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("bs8_gqa", 8, 2))
  def test_xla_matches_reference(self, block_size, G):
    q, k, v, w_out, w_lse = inputs(21, 2, 44, 4, G, 8, 6)  # 44 tokens: a last block without landmark

    def outputs_and_grads(impl):  # (``run`` is the suite's jitted runner)
      def loss(q, k, v):
        out, lse = jaxattn.landmark_attention(q, k, v, block_size=block_size, return_lse=True, implementation=impl)
        return jnp.sum(out * w_out) + jnp.sum(lse * w_lse), (out, lse)

      (_, (out, lse)), grads = self.variant(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
      chex.assert_shape(out, (2, 44, 4, 6))
      chex.assert_shape(lse, (2, 4, 44))
      return out, lse, grads

    for name, got, want in zip(("out", "lse", "grads"), outputs_and_grads("xla"), outputs_and_grads("reference")):
      testing.assert_close(got, want, kind="grad" if name == "grads" else "out", name=name)
