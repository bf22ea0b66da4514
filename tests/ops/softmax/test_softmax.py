"""softmax_attention: fuzzed masks x implementations against the reference, options, CAB patterns, bad inputs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, strategies as st

import jaxattn
from jaxattn import masks, testing
from jaxattn.ops.softmax import mask_info as mi
from tests import strategies as mst
from tests.ops.softmax.suite import check_against_reference, make_inputs

HEADS = [(2, 2), (4, 2), (4, 1)]  # (H, G): MHA, GQA, MQA


@given(data=st.data(), T=st.integers(1, 48), S=st.integers(1, 48), heads=st.sampled_from(HEADS),
       bq=st.sampled_from([8, 16, 32]), bk=st.sampled_from([8, 16, 32]), segments=st.sampled_from([None, 3]),
       bias=st.sampled_from([None, "full", "heads", "batch"]), cap=st.sampled_from([None, 5.0]),
       seed=st.integers(0, 1000))
def test_xla_fuzzed_masks(data, T, S, heads, bq, bk, segments, bias, cap, seed):
  H, G = heads
  mask = data.draw(mst.any_mask(T, S))
  bias_shape = {None: None, "full": (2, H, T, S), "heads": (1, H, T, S), "batch": (2, 1, T, S)}[bias]
  q, k, v, seg, b = make_inputs(seed, B=2, T=T, S=S, H=H, G=G, D=8, E=4, num_segments=segments,
                                bias_shape=bias_shape)
  check_against_reference("xla", q, k, v, mask=mask, segment_ids=seg, bias=b, logits_soft_cap=cap,
                          block_sizes=jaxattn.BlockSizes(bq, bk), seed=seed)


@pytest.mark.parametrize("blocks", [None, jaxattn.BlockSizes(16, 32, block_q_dq=32, block_k_dq=8,
                                                             block_q_dkv=8, block_k_dkv=16)])
def test_xla_separate_backward_tiles_and_2d_bias(blocks):
  q, k, v, _, b = make_inputs(1, B=1, T=40, S=56, H=4, G=2, D=16, bias_shape=(40, 56))
  check_against_reference("xla", q, k, v, mask=masks.Causal(16) & masks.Local(20, 4, 16), bias=b,
                          block_sizes=blocks)


def test_bf16_long_sequence_relative_rms():
  q, k, v, _, _ = make_inputs(2, B=1, T=1024, S=1024, H=2, G=1, D=32, dtype=jnp.bfloat16)
  out = jaxattn.softmax_attention(q, k, v, mask=masks.Causal(), implementation="xla",
                                  block_sizes=jaxattn.BlockSizes(128, 256))
  ref = jaxattn.softmax_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask=masks.Causal(),
                                  implementation="reference")
  assert testing.relative_rms(out, ref) <= testing.RMS_TOLERANCES["bfloat16"]
  check_against_reference("xla", q[:, :96], k[:, :96], v[:, :96], mask=masks.Causal(),
                          block_sizes=jaxattn.BlockSizes(32, 32))


def test_fully_masked_rows_are_zero_without_nan():
  q, k, v, _, _ = make_inputs(3, B=1, T=24, S=24, H=2, G=2, D=8)
  mask = masks.Slices(((0, 10, 0, 24, "full"),))  # rows 10.. see nothing
  for impl in ("reference", "xla"):
    out, lse = jaxattn.softmax_attention(q, k, v, mask=mask, return_lse=True, implementation=impl,
                                         **({"block_sizes": jaxattn.BlockSizes(8, 8)} if impl == "xla" else {}))
    assert np.all(np.asarray(out[:, 10:]) == 0) and np.all(np.isneginf(np.asarray(lse[:, :, 10:])))
    grads = jax.grad(lambda q, k, v: jaxattn.softmax_attention(q, k, v, mask=mask, implementation=impl).sum(),
                     (0, 1, 2))(q, k, v)
    testing.assert_no_nan(grads, impl)
    assert np.all(np.asarray(grads[0][:, 10:]) == 0)
  # all keys masked everywhere (empty mask) still works
  empty = masks.BlockSparse(np.zeros((3, 3), bool), 8, 8)
  out = jaxattn.softmax_attention(q, k, v, mask=empty, implementation="xla")
  assert np.all(np.asarray(out) == 0)


def test_xla_skips_empty_blocks_and_builds_no_txs_array():
  T = 4096
  info = mi.mask_info(masks.Causal(), T, T, 512, 512)
  assert info.num_visited == 8 * 9 // 2 and info.tiles.shape[0] == 2  # one shared diagonal pattern
  sparse = masks.random_block_sparse(32, 32, 0.1, 128, 128)
  assert mi.mask_info(sparse, T, T, 128, 128).num_visited == 32 * 3
  q, k, v = testing.random_qkv(jax.random.key(0), B=1, T=T, H=2, D=16)
  f = jax.grad(lambda q, k, v: jaxattn.softmax_attention(q, k, v, mask=masks.Causal(), implementation="xla").sum(),
               (0, 1, 2))
  biggest = max(_array_sizes(jax.make_jaxpr(f)(q, k, v).jaxpr))
  assert biggest < T * T // 4, f"an intermediate of {biggest} elements exists (T*S = {T * T})"


def _array_sizes(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield int(np.prod(var.aval.shape)) if hasattr(var.aval, "shape") else 0
    for sub in _subjaxprs(eqn):
      yield from _array_sizes(sub)


def _subjaxprs(eqn):
  for p in eqn.params.values():
    for x in (p if isinstance(p, (list, tuple)) else [p]):
      if hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
        yield x.jaxpr
      elif hasattr(x, "eqns"):
        yield x


# ---------------------------------------------------------------------------------------- CAB patterns, decoding
def _impl_fn(impl, mask=None):
  return lambda q, k, v: jaxattn.softmax_attention(q, k, v, mask=mask, implementation=impl)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_cab_patterns(impl):
  q, k, v = testing.random_qkv(jax.random.key(5), B=2, T=20, S=20, H=2, D=8)
  _, kc, vc = testing.random_qkv(jax.random.key(6), B=2, T=30, S=30, H=2, D=8)
  testing.check_causal_prefix(_impl_fn(impl, masks.Causal()), q, k, v)  # CS
  testing.check_causal_cross_prefix(_impl_fn(impl, masks.Causal(30 - 20)), q, kc, vc)  # CC
  testing.check_causal_cross_prefix(_impl_fn(impl), q, kc, vc)  # NC: queries never mix
  ns = _impl_fn(impl)(q, k, v)  # NS: every output depends on the last key
  assert not np.allclose(ns, _impl_fn(impl)(q, k, v.at[:, -1].add(1.0)))


def test_decode_with_cache_equals_full_pass():
  B, T, H, D = 2, 6, 4, 8
  x = jax.random.normal(jax.random.key(7), (B, T, 3, H, D))
  full = lambda x: jaxattn.softmax_attention(x[:, :, 0], x[:, :, 1], x[:, :, 2], mask=masks.Causal(),
                                             implementation="xla")

  def step(cache, xt):
    k = jnp.concatenate([cache[0], xt[:, :, 1]], 1)
    v = jnp.concatenate([cache[1], xt[:, :, 2]], 1)
    # one new query against the whole cache: causal cross-attention aligned bottom right
    o = jaxattn.softmax_attention(xt[:, :, 0], k, v, mask=masks.Causal(k.shape[1] - 1), implementation="xla")
    return (k, v), o

  testing.check_decode_matches_full(full, lambda: (jnp.zeros((B, 0, H, D)), jnp.zeros((B, 0, H, D))), step, x)


# ------------------------------------------------------------------------------------------------ dispatch, errors
def test_default_on_cpu_is_xla_and_cudnn_refuses():
  q, k, v = testing.random_qkv(jax.random.key(0), B=1, T=16, H=2, D=8)
  np.testing.assert_allclose(jaxattn.softmax_attention(q, k, v),
                             jaxattn.softmax_attention(q, k, v, implementation="xla"))
  with pytest.raises(NotImplementedError, match="GPU"):
    jaxattn.softmax_attention(q, k, v, implementation="cudnn")
  # a sequence falls back in order
  out = jaxattn.softmax_attention(q, k, v, implementation=("cudnn", "xla"))
  chex.assert_shape(out, q.shape)


def test_under_jit_with_static_mask():
  q, k, v = testing.random_qkv(jax.random.key(0), B=1, T=16, H=2, D=8)
  f = jax.jit(jaxattn.softmax_attention, static_argnames=("mask", "implementation"))
  testing.assert_close(f(q, k, v, mask=masks.Causal(), implementation="xla"),
                       jaxattn.softmax_attention(q, k, v, mask=masks.Causal(), implementation="reference"))


_q = jnp.ones((2, 8, 4, 16))
_k = jnp.ones((2, 10, 2, 16))


@pytest.mark.parametrize("kwargs, match", [
    (dict(q=jnp.ones((8, 4, 16))), "q must have rank 4"),
    (dict(k=jnp.ones((2, 10, 3, 16)), v=jnp.ones((2, 10, 3, 16))), "q has 4 heads, not a multiple of k's 3"),
    (dict(k=jnp.ones((3, 10, 2, 16)), v=jnp.ones((3, 10, 2, 16))), "batch sizes differ"),
    (dict(v=jnp.ones((2, 9, 2, 16))), "k has length 10 but v has length 9"),
    (dict(k=jnp.ones((2, 10, 2, 8))), "head dim 16 but k has 8"),
    (dict(q=jnp.ones((2, 8, 4, 16), jnp.int32)), "must be float32"),
    (dict(q=jnp.ones((2, 8, 4, 16), jnp.bfloat16)), "share a dtype"),
    (dict(bias=jnp.ones((2, 3, 8, 10))), r"bias shape \(2, 3, 8, 10\)"),
    (dict(bias=jnp.ones((8, 11))), "bias shape"),
    (dict(segment_ids=jnp.ones((2, 8), jnp.int32)), "needs T == S"),
    (dict(segment_ids=(jnp.ones((2, 8), jnp.int32), jnp.ones((2, 9), jnp.int32))), "kv segment ids must have"),
    (dict(segment_ids=(jnp.ones((2, 8)), jnp.ones((2, 10)))), "must be integers"),
    (dict(mask=np.ones((8, 10), np.float32)), "mask array must be boolean"),  # bool arrays are masks now
    (dict(mask="causal"), "mask must be a jaxattn.masks.Mask"),
    (dict(scale=float("nan")), "scale"),
    (dict(logits_soft_cap=-1.0), "logits_soft_cap"),
    (dict(implementation="flash"), "unknown implementation 'flash'"),
    (dict(block_sizes=(16, 16)), "block_sizes must be a BlockSizes"),
])
def test_bad_inputs_raise_value_error(kwargs, match):
  args = dict(q=_q, k=_k, v=jnp.ones((2, 10, 2, 16)))
  args.update(kwargs)
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  with pytest.raises(ValueError, match=match):
    jaxattn.softmax_attention(q, k, v, **args)


def test_block_sizes_validation():
  with pytest.raises(ValueError, match="block_q"):
    jaxattn.BlockSizes(0, 16)
  with pytest.raises(ValueError, match="block_k_dq"):
    jaxattn.BlockSizes(16, 16, block_k_dq=-2)


def test_xla_memory_at_16k_stays_under_1gib():
  """B=1, H=4, T=16K, D=64: XLA's buffer assignment for forward and forward+backward (compile only)."""
  q = k = v = jax.ShapeDtypeStruct((1, 16384, 4, 64), jnp.float32)
  fwd = lambda q, k, v: jaxattn.softmax_attention(q, k, v, mask=masks.Causal(), implementation="xla")
  for fn in (fwd, jax.grad(lambda q, k, v: fwd(q, k, v).sum(), (0, 1, 2))):
    mem = jax.jit(fn).lower(q, k, v).compile().memory_analysis()
    total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    assert total < 1 << 30, f"{total / 2**20:.0f} MiB"


class TestJitAndEager(chex.TestCase):
  """``xla`` equals ``reference`` with and without ``jit`` (``chex.variants``): outputs, lse and gradients."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("causal_gqa", masks.Causal(), 2), ("window_mqa", masks.sliding_window(8), 1))
  def test_xla_matches_reference(self, mask, G):
    q, k, v = testing.random_qkv(11, B=2, T=40, H=4, G=G, D=16, E=8)
    w = jnp.asarray(np.random.default_rng(11).normal(size=(2, 40, 4, 8)), jnp.float32)

    def run(impl):
      def loss(q, k, v):
        out, lse = jaxattn.softmax_attention(q, k, v, mask=mask, return_lse=True, implementation=impl)
        return jnp.sum(out * w), (out, lse)

      (_, (out, lse)), grads = self.variant(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
      chex.assert_shape(out, (2, 40, 4, 8))
      chex.assert_shape(lse, (2, 4, 40))
      return out, lse, grads

    for name, got, want in zip(("out", "lse", "grads"), run("xla"), run("reference")):
      testing.assert_close(got, want, kind="grad" if name == "grads" else "out", name=name)
