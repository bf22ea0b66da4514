"""Additive bias in the pallas_gpu and pallas_tpu softmax kernels (interpret mode on CPU) against the f32 reference.

Forward out / lse and the gradients of q, k, v and the bias, for the four bias shapes ``[B, H, T, S]``,
``[1, H, T, S]``, ``[B, 1, T, S]``, ``[1, 1, T, S]`` (broadcast dims summed by the op), with causal and document
masks (skipped blocks: their dbias is 0), segment ids, soft cap, GQA/MQA, rows with no allowed key and a whole query
block with none (count 0: the TPU dq kernel writes no dbias block there). A traced-jaxpr check shows that no dbias
kernel runs when the bias is not differentiated, and that differentiating only the bias runs the dq kernel alone.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.extend import core as jax_core

import jaxattn
from jaxattn import masks, testing
from jaxattn.ops.softmax import api as softmax_api
from jaxattn.ops.softmax import pallas_tpu
from jaxattn.ops.softmax.config import PallasTpuConfig
from tests.kernels.softmax import common

BS = jaxattn.BlockSizes


@functools.partial(jax.jit, static_argnames=("impl", "mask", "cap", "blocks"))
def _run(q, k, v, bias, seg, w_out, w_lse, *, impl, mask, cap, blocks):
  """(out, lse) and the gradients of (q, k, v, bias) of a loss that uses out and lse."""
  kw = dict(mask=mask, segment_ids=seg, logits_soft_cap=cap, return_lse=True, implementation=impl)
  if impl != "reference":
    kw["block_sizes"] = blocks

  def loss(q, k, v, bias):
    o, l = jaxattn.softmax_attention(q, k, v, bias=bias, **kw)
    return jnp.sum(o.astype(jnp.float32) * w_out) + jnp.sum(jnp.where(jnp.isfinite(l), l * w_lse, 0.0)), (o, l)

  (_, (o, l)), grads = jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)(q, k, v, bias)
  return o, l, grads


def _doc_ids(B, n, lens, empty_at=()):
  ids = np.repeat(np.arange(len(lens)), lens)[None].repeat(B, 0)[:, :n].astype(np.int32)
  ids[:, list(empty_at)] = 99  # no key carries id 99: these query rows have no allowed key
  return jnp.asarray(ids)


_BIAS_DIMS = {"full": lambda B, H: (B, H), "heads": lambda B, H: (1, H), "batch": lambda B, H: (B, 1),
              "shared": lambda B, H: (1, 1)}

# id: (impl, B, T, H, G, D, bias kind, mask, segments, cap, blocks); T == S.
CASES = {
    # GPU: per-(batch, head) bias, causal (skipped upper blocks), MQA, soft cap, different dk/dv tiles.
    "gpu-full-causal-mqa-softcap": ("pallas_gpu", 2, 64, 2, 1, 32, "full", masks.Causal(), None, 5.0,
                                    BS(16, 16, block_q_dkv=32, block_k_dkv=16)),
    # GPU: one bias for every batch and head, documents as a static mask and as segment ids with empty rows.
    "gpu-shared-documents-empty-rows": ("pallas_gpu", 2, 64, 2, 2, 32, "shared", masks.causal_document([20, 30, 14]),
                                        "docs", None, BS(16, 32)),
    # GPU: per-head bias shared over the batch, a whole query block with no allowed key; head dim 64, T = 128.
    "gpu-heads-empty-block": ("pallas_gpu", 1, 128, 2, 2, 64, "heads",
                              masks.Slices(((0, 64, 0, 128, "causal"), (96, 128, 0, 40, "full"))), None, None,
                              BS(32, 32)),
    # GPU: per-batch bias shared over heads, GQA 4:2, soft cap.
    "gpu-batch-causal-gqa-softcap": ("pallas_gpu", 2, 64, 4, 2, 32, "batch", masks.Causal(), None, 3.0, BS(16, 16)),
    # TPU: per-head bias, causal on 2 x 2 blocks of 128 (the upper block is skipped), MQA.
    "tpu-heads-causal-mqa": ("pallas_tpu", 1, 256, 2, 1, 64, "heads", masks.Causal(), None, None, BS(128, 128)),
    # TPU: per-(batch, head) bias, query block 1 (rows 128-255) has no allowed key (count 0), head dim 128 (fused
    # layout), soft cap.
    "tpu-full-empty-block-softcap": ("pallas_tpu", 2, 256, 2, 2, 128, "full",
                                     masks.Slices(((0, 100, 0, 256, "causal"),)), None, 5.0, BS(128, 128)),
    # TPU: per-batch bias, documents as a static mask and as segment ids with empty rows, soft cap; query tile 64.
    "tpu-batch-documents-segments-softcap": ("pallas_tpu", 2, 128, 2, 2, 64, "batch",
                                             masks.causal_document([50, 78]), "docs", 5.0,
                                             BS(64, 128, block_q_dkv=128)),
    # TPU: one shared bias, causal, GQA 4:2 over 2 x 2 blocks.
    "tpu-shared-causal-gqa": ("pallas_tpu", 1, 256, 4, 2, 64, "shared", masks.Causal(), None, None, BS(128, 128)),
}
# The default run keeps two cases per kernel family (an unreduced and a reduced dbias, skipped blocks, empty rows,
# soft cap, segment ids); the rest are slow.
FAST = ("gpu-full-causal-mqa-softcap", "gpu-shared-documents-empty-rows", "tpu-full-empty-block-softcap",
        "tpu-batch-documents-segments-softcap")


def _params():
  return [pytest.param(c, marks=() if c in FAST else pytest.mark.slow) for c in CASES]


def _bias(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed + 100).normal(size=shape), dtype)


@pytest.mark.parametrize("case", _params())
def test_matches_reference_interpret(case):
  impl, B, T, H, G, D, kind, mask, segments, cap, blocks = CASES[case]
  seed = list(CASES).index(case)
  q, k, v, w_out, w_lse = common.inputs(seed, B, T, T, H, G, D, D)
  bias = _bias(seed, (*_BIAS_DIMS[kind](B, H), T, T))
  seg, empty_rows = None, []
  if segments == "docs":
    lens = [T // 4, T // 2, T - T // 4 - T // 2]
    empty_rows = [3, T // 2 + 1]
    seg = (_doc_ids(B, T, lens, empty_rows), _doc_ids(B, T, lens))
  out, lse, grads = _run(q, k, v, bias, seg, w_out, w_lse, impl=impl, mask=mask, cap=cap, blocks=blocks)
  r_out, r_lse, r_grads = _run(q, k, v, bias, seg, w_out, w_lse, impl="reference", mask=mask, cap=cap, blocks=None)
  testing.assert_close(out, r_out, name="out")
  testing.assert_close(lse, r_lse, name="lse")
  for name, g, r, x in zip(("dq", "dk", "dv", "dbias"), grads, r_grads, (q, k, v, bias)):
    assert g.dtype == x.dtype and g.shape == x.shape, name
    testing.assert_close(g, r, kind="grad", name=name)
  # Rows with no allowed key: output 0, lse -inf, zero gradients (also of the bias); pairs the mask excludes
  # (skipped blocks included) get exactly zero bias gradient wherever no batch / head that shares them attends.
  dense = np.asarray(mask.to_dense(T, T))
  empty = sorted({i for i in range(T) if not dense[i].any()} | set(empty_rows))
  if empty:
    assert np.all(np.asarray(out)[:, empty] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[:, :, empty]))
    assert np.all(np.asarray(grads[3])[:, :, empty] == 0)
  assert np.all(np.asarray(grads[3])[..., ~dense] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("impl,T,blocks", [("pallas_gpu", 64, BS(16, 16)), ("pallas_tpu", 256, BS(128, 128))])
def test_bf16_bias_and_inputs(impl, T, blocks):
  """bf16 q / k / v and bias: dbias comes back in bf16, within the bf16 tolerance of the f32 reference."""
  B, H, G, D = 1, 2, 1, 64
  q, k, v, w_out, w_lse = common.inputs(11, B, T, T, H, G, D, D, jnp.bfloat16)
  bias = _bias(11, (B, H, T, T), jnp.bfloat16)
  out, lse, grads = _run(q, k, v, bias, None, w_out, w_lse, impl=impl, mask=masks.Causal(), cap=None,
                         blocks=blocks)
  f32 = lambda x: x.astype(jnp.float32)
  r_out, r_lse, r_grads = _run(f32(q), f32(k), f32(v), f32(bias), None, w_out, w_lse, impl="reference",
                               mask=masks.Causal(), cap=None, blocks=None)
  testing.assert_close(out, r_out, dtype=jnp.bfloat16, name="out")
  testing.assert_close(lse, r_lse, dtype=jnp.bfloat16, name="lse")
  for name, g, r, x in zip(("dq", "dk", "dv", "dbias"), grads, r_grads, (q, k, v, bias)):
    assert g.dtype == x.dtype, name
    testing.assert_close(g, r, dtype=jnp.bfloat16, kind="grad", name=name)


# ------------------------------------------------------------------------------ which kernels run (traced only)
def _kernel_names(closed) -> list[str]:
  """The name of every ``pallas_call`` in a closed jaxpr (nested jaxprs included, kernel bodies not)."""
  names = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        n = eqn.params.get("name_and_src_info", eqn.params.get("name"))
        names.append(str(getattr(n, "name", n)))
        continue
      for p in eqn.params.values():
        for x in (p if isinstance(p, (tuple, list)) else (p,)):
          if isinstance(x, jax_core.ClosedJaxpr):
            walk(x.jaxpr)
          elif isinstance(x, jax_core.Jaxpr):
            walk(x)

  walk(closed.jaxpr)
  return names


@pytest.mark.parametrize("impl,T,blocks", [("pallas_gpu", 64, BS(16, 16)), ("pallas_tpu", 256, BS(128, 128))])
def test_dbias_kernel_only_when_differentiated(impl, T, blocks):
  B, H, G, D = 2, 2, 1, 32
  q, k, v, _, _ = common.inputs(0, B, T, T, H, G, D, D)
  bias = _bias(0, (1, H, T, T))

  def loss(q, k, v, bias):
    o = jaxattn.softmax_attention(q, k, v, bias=bias, mask=masks.Causal(), implementation=impl, block_sizes=blocks)
    return jnp.sum(o)

  fwd = "jaxattn_flash_fwd"
  dq, dq_db, dkv = "jaxattn_flash_bwd_dq", "jaxattn_flash_bwd_dq_dbias", "jaxattn_flash_bwd_dkv"
  # q, k, v differentiated, the bias not: no dbias kernel, no dbias buffer.
  names = _kernel_names(jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, k, v, bias))
  assert sorted(names) == sorted([fwd, dq, dkv]), names
  # Everything differentiated: the dq kernel writes dS too (no separate dbias pass).
  names = _kernel_names(jax.make_jaxpr(jax.grad(loss, (0, 1, 2, 3)))(q, k, v, bias))
  assert sorted(names) == sorted([fwd, dq_db, dkv]), names
  # Only the bias: the dq kernel alone (dS only), no dk/dv kernel.
  names = _kernel_names(jax.make_jaxpr(jax.grad(loss, 3))(q, k, v, bias))
  assert sorted(names) == sorted([fwd, dq_db]), names


# ------------------------------------------------------------------------------------------- supports / config
def test_supports_bias_and_tpu_lane_rule():
  q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.float32)
  plain = softmax_api.make_call(q, q, q)
  call = softmax_api.make_call(q, q, q, bias=jax.ShapeDtypeStruct((1, 2, 256, 256), jnp.float32))
  for impl in ("pallas_gpu", "pallas_tpu"):
    assert softmax_api.BACKENDS[impl].supports(call) is None, impl
  # With a bias the dk/dv kernel's block_k is also the lane dim of the bias block.
  be = pallas_tpu.BACKEND
  be.validate_config(plain, PallasTpuConfig(128, 128, block_k_dkv=64))
  be.validate_config(call, PallasTpuConfig(128, 128, block_k_dkv=256))
  with pytest.raises(ValueError, match=r"PallasTpuConfig\.block_k_dkv=64 breaks the TPU .* bias block"):
    be.validate_config(call, PallasTpuConfig(128, 128, block_k_dkv=64))
