"""Context parallelism runs the chosen softmax backend in both directions: a ring (and all-gather / USP) over the
Pallas kernels (interpret mode on 8 CPU devices) equals single-device attention, forward and gradients, and its
backward contains the Pallas dq / dk-dv kernels and no XLA attention block (checked on the jaxpr)."""

import functools

import jax
import jax.extend  # noqa: F401  (jax.extend.core.Jaxpr)
import jax.numpy as jnp
import pytest

from jaxattn import masks, testing
from jaxattn.ops.softmax.config import PallasGpuConfig
from jaxattn.parallel import context_parallel_attention
from tests.parallel import common

PALLAS = ("pallas_gpu", "pallas_tpu")
FWD, DQ, DKV = "jaxattn_flash_fwd", "jaxattn_flash_bwd_dq", "jaxattn_flash_bwd_dkv"


# ------------------------------------------------------------------------------------------------ jaxpr walking
def _subjaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _subjaxprs(v)


def _kernel_name(eqn) -> str:
  name = eqn.params.get("name")
  if name is None:  # older jax: NameAndSrcInfo
    name = getattr(eqn.params.get("name_and_src_info"), "name", "")
  return str(name)


def _is_matmul(eqn) -> bool:
  """A ``dot_general`` with free dimensions on both sides (``Q K^T``, ``P V``, ``dS K``, ...): an attention block
  product. Row-wise dots (``delta = rowsum(dO * O)``: no free dimension) do not count."""
  if eqn.primitive.name != "dot_general":
    return False
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs = (v.aval.ndim for v in eqn.invars)
  return lhs - len(lc) - len(lb) > 0 and rhs - len(rc) - len(rb) > 0


def census(jaxpr):
  """``(kernel name -> count of pallas_call equations, count of attention matmuls outside pallas_call)``."""
  kernels: dict[str, int] = {}
  matmuls = 0

  def walk(jp):
    nonlocal matmuls
    for eqn in jp.eqns:
      if eqn.primitive.name == "pallas_call":  # do not look inside the kernel
        name = _kernel_name(eqn)
        kernels[name] = kernels.get(name, 0) + 1
        continue
      matmuls += _is_matmul(eqn)
      for value in eqn.params.values():
        for sub in _subjaxprs(value):
          walk(sub)

  walk(jaxpr.jaxpr if isinstance(jaxpr, jax.extend.core.ClosedJaxpr) else jaxpr)
  return kernels, matmuls


def _attn(strategy, implementation, *, mask=masks.Causal(), seg=None):
  mesh, axis = (common.mesh_usp(), ("uly", "ring")) if strategy == "usp" else (common.mesh_1d(), "seq")
  return lambda q, k, v: context_parallel_attention(q, k, v, mesh=mesh, seq_axis=axis, strategy=strategy, mask=mask,
                                                    segment_ids=seg, return_lse=True, implementation=implementation)


def _census_fwd_bwd(attn, q, k, v, w_out, w_lse):
  """``(census of the forward, census of the backward)``: the backward's is that of ``vjp`` (forward + backward)
  less the forward's."""
  def fwd_bwd(q, k, v, w_out, w_lse):
    _, vjp = jax.vjp(attn, q, k, v)
    return vjp((w_out.astype(q.dtype), w_lse))

  kernels, matmuls = census(jax.make_jaxpr(fwd_bwd)(q, k, v, w_out, w_lse))
  fwd_kernels, fwd_matmuls = census(jax.make_jaxpr(attn)(q, k, v))
  bwd_kernels = {n: c - fwd_kernels.get(n, 0) for n, c in kernels.items() if c != fwd_kernels.get(n, 0)}
  return (fwd_kernels, fwd_matmuls), (bwd_kernels, matmuls - fwd_matmuls)


# ------------------------------------------------------------------------------------------------- the jaxpr
@pytest.mark.parametrize("implementation", PALLAS)
@pytest.mark.parametrize("strategy", ["ring", "all_gather", "ulysses", "usp"])
def test_backward_runs_the_pallas_kernels_only(strategy, implementation):
  q, k, v, w_out, w_lse = common.inputs(0)
  attn = _attn(strategy, implementation, seg=common.doc_ids())
  (fwd_kernels, fwd_matmuls), (bwd_kernels, bwd_matmuls) = _census_fwd_bwd(attn, q, k, v, w_out, w_lse)
  # the forward runs the forward kernel only; the backward the dq and dk/dv kernels (no forward recompute) and no
  # attention matmul of its own outside them
  assert set(fwd_kernels) == {FWD} and fwd_matmuls == 0, (fwd_kernels, fwd_matmuls)
  assert set(bwd_kernels) == {DQ, DKV} and min(bwd_kernels.values()) >= 1, bwd_kernels
  assert bwd_matmuls == 0, f"{bwd_matmuls} attention matmuls outside pallas_call in the {strategy} backward"


@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
def test_census_sees_xla_blocks(strategy):
  # the same check on implementation="xla" finds the XLA attention blocks (the test above can fail)
  q, k, v, w_out, w_lse = common.inputs(0)
  (fwd_kernels, fwd_matmuls), (bwd_kernels, bwd_matmuls) = _census_fwd_bwd(_attn(strategy, "xla"), q, k, v, w_out,
                                                                           w_lse)
  assert not fwd_kernels and not bwd_kernels, (fwd_kernels, bwd_kernels)
  assert fwd_matmuls >= 2 and bwd_matmuls >= 5, (fwd_matmuls, bwd_matmuls)  # Q K^T, P V; Q K^T, dO V^T, dS K, ...


# --------------------------------------------------------------------------------------------------- numerics
def _check(strategy, implementation, mask, docs, *, t):
  q, k, v, w_out, w_lse = common.inputs(7, t=t, h=4, g=2, d=16)
  seg = jnp.asarray(masks.document_segment_ids((t // 3, t // 2, t - t // 3 - t // 2))[None]) if docs else None
  (out, lse), grads = common.value_and_grads(_attn(strategy, implementation, mask=mask, seg=seg), q, k, v, w_out,
                                             w_lse)
  (r_out, r_lse), r_grads = common.reference(mask, seg, q, k, v, w_out, w_lse)
  name = f"{strategy}/{implementation if isinstance(implementation, str) else implementation[0]}"
  assert float(jnp.max(jnp.abs(r_out))) > 0.1 and all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in r_grads)
  testing.assert_close(out, r_out, name=f"{name} out")
  testing.assert_close(lse, r_lse, name=f"{name} lse")
  for n, a, b in zip(("dq", "dk", "dv"), grads, r_grads):
    testing.assert_close(a, b, kind="grad", name=f"{name} {n}")


@pytest.mark.parametrize("implementation", [("pallas_gpu", PallasGpuConfig(16, 16)), "pallas_tpu"],
                         ids=["pallas_gpu", "pallas_tpu"])
def test_ring_over_pallas_matches_single_device(implementation):
  # zigzag causal over 8 devices with documents (segment ids travel with K/V): skipped, full and partial blocks;
  # 32 tokens per device (two zigzag chunks of 16): 2 x 2 GPU tiles per step, one (covering) TPU tile
  _check("ring", implementation, masks.Causal(), True, t=256)


@pytest.mark.slow
@pytest.mark.parametrize("implementation", PALLAS)
@pytest.mark.parametrize("strategy", ["all_gather", "usp"])
def test_other_strategies_over_pallas(strategy, implementation):
  _check(strategy, implementation, masks.Causal(), False, t=128)
