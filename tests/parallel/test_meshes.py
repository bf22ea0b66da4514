"""Context-parallel ops on every kind of mesh, eagerly and under jit, forward and gradient; mesh-axis validation.

``jax.make_mesh`` gives Explicit axes by default in recent jax, ``Mesh(...)`` Auto axes; both must work outside a
``jax.set_mesh`` context (issue 12). Duplicate or unknown axis names raise a ``ValueError`` naming them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxattn
from jaxattn import masks, testing
from jaxattn.parallel import _compat, context_parallel_attention, context_parallel_linear_attention

B, T, H, G, D = 2, 32, 4, 2, 8


def _mesh(kind: str, shape=(8,), names=("seq",)):
  if kind == "make_mesh":
    return jax.make_mesh(shape, names)  # Explicit axes by default where jax has axis types
  return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


@functools.lru_cache(maxsize=None)
def _inputs():
  q, k, v = testing.random_qkv(0, B=B, T=T, H=H, G=G, D=D)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, H, D)), jnp.float32)
  decay = -jnp.abs(jnp.asarray(np.random.default_rng(2).standard_normal((B, T, H)), jnp.float32)) * 0.3
  return q, k, v, w, decay


def _ops(mesh):
  _, _, _, _, decay = _inputs()
  return {
      "ring": (lambda q, k, v: context_parallel_attention(q, k, v, mesh=mesh, seq_axis="seq", mask=masks.Causal()),
               lambda q, k, v: jaxattn.softmax_attention(q, k, v, mask=masks.Causal(), implementation="reference")),
      "all_gather": (lambda q, k, v: context_parallel_attention(q, k, v, mesh=mesh, seq_axis="seq",
                                                                strategy="all_gather", mask=masks.Causal()),
                     lambda q, k, v: jaxattn.softmax_attention(q, k, v, mask=masks.Causal(),
                                                               implementation="reference")),
      "linear": (lambda q, k, v: context_parallel_linear_attention(q, k, v, mesh=mesh, seq_axis="seq",
                                                                   log_decay=decay, chunk_size=4),
                 lambda q, k, v: jaxattn.linear_attention(q, k, v, log_decay=decay, implementation="reference")),
  }


CASES = [(kind, op, mode) for kind in ("make_mesh", "Mesh") for op in ("ring", "all_gather", "linear")
         for mode in ("eager", "jit") if not (op == "all_gather" and mode == "eager")]  # all_gather: same path


@pytest.mark.parametrize("kind,op,mode", CASES)
def test_forward_and_grad_on_any_mesh(kind, op, mode):
  assert jax.device_count() == 8
  mesh = _mesh(kind)
  fn, ref_fn = _ops(mesh)[op]
  q, k, v, w, _ = _inputs()
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)
  grad = jax.grad(loss(fn), (0, 1, 2))
  if mode == "jit":
    fn, grad = jax.jit(fn), jax.jit(grad)
  out = fn(q, k, v)
  grads = grad(q, k, v)
  testing.assert_close(out, ref_fn(q, k, v), name=f"{kind}/{op}/{mode} out")
  for name, g, r in zip("qkv", grads, jax.grad(loss(ref_fn), (0, 1, 2))(q, k, v)):
    testing.assert_close(g, r, kind="grad", name=f"{kind}/{op}/{mode} d{name}")
  # eager follow-up work on the outputs (what failed with Explicit axes outside a mesh context)
  assert np.isfinite(float(jnp.sum(out ** 2))) and np.isfinite(float(sum(jnp.sum(g) for g in grads)))


def test_explicit_mesh_kept_under_set_mesh():
  """Under ``jax.set_mesh`` with arrays sharded over Explicit axes, the caller's mesh is used as given."""
  if not hasattr(jax, "set_mesh") or not hasattr(jax.sharding, "AxisType"):
    pytest.skip("this jax has no explicit sharding")
  mesh = _mesh("make_mesh", (2, 4), ("data", "seq"))
  q, k, v, w, _ = _inputs()
  spec = NamedSharding(mesh, P("data", "seq"))
  with jax.set_mesh(mesh):
    qs, ks, vs = (jax.device_put(x, spec) for x in (q, k, v))
    f = jax.jit(lambda q, k, v: jnp.sum(context_parallel_attention(q, k, v, mesh=mesh, seq_axis="seq",
                                                                   batch_axis="data", mask=masks.Causal()) * w))
    val, grads = jax.jit(jax.value_and_grad(f, (0, 1, 2)))(qs, ks, vs)
  ref_f = lambda q, k, v: jnp.sum(jaxattn.softmax_attention(q, k, v, mask=masks.Causal()) * w)
  r_val, r_grads = jax.value_and_grad(ref_f, (0, 1, 2))(q, k, v)
  testing.assert_close(val, r_val, name="set_mesh loss")
  for g, r in zip(grads, r_grads):
    testing.assert_close(g, r, kind="grad", name="set_mesh grad")


def test_call_mesh_makes_explicit_axes_auto():
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is None:
    pytest.skip("this jax has no axis types")
  mesh = jax.make_mesh((8,), ("seq",), axis_types=(axis_type.Explicit,))
  auto = _compat.call_mesh(mesh)
  assert tuple(auto.axis_types) == (axis_type.Auto,) and auto.axis_names == mesh.axis_names
  assert (auto.devices == mesh.devices).all()
  plain = _mesh("Mesh")
  assert _compat.call_mesh(plain) is plain


# -------------------------------------------------------------------------------------- axis validation
@pytest.mark.parametrize("kw,msg", [
    (dict(seq_axis="b", head_axis="b"), r"mesh axis 'b' is named in both seq_axis and head_axis"),
    (dict(seq_axis="b", batch_axis="b"), r"mesh axis 'b' is named in both seq_axis and batch_axis"),
    (dict(seq_axis="b", batch_axis=("a", "a")), r"mesh axis 'a' is named twice in batch_axis"),
    (dict(seq_axis="b", batch_axis="a", head_axis=("a",)), r"mesh axis 'a' is named in both batch_axis and head_axis"),
    (dict(seq_axis="b", head_axis=("x", "y")), r"head_axis 'x', 'y' are not axes of the mesh"),
    (dict(seq_axis="nope"), r"seq_axis 'nope' is not an axis of the mesh \('a', 'b'\)"),
    (dict(seq_axis="b", head_axis=("a", "x")), r"head_axis 'x' is not an axis of the mesh"),
    (dict(seq_axis="b", batch_axis="y"), r"batch_axis 'y' is not an axis"),
])
@pytest.mark.parametrize("kind", ["make_mesh", "Mesh"])
@pytest.mark.parametrize("op", ["softmax", "linear"])
def test_duplicate_or_unknown_axes_raise(kw, msg, kind, op):
  mesh = _mesh(kind, (2, 4), ("a", "b"))
  q, k, v, _, _ = _inputs()
  fn = context_parallel_attention if op == "softmax" else context_parallel_linear_attention
  with pytest.raises(ValueError, match=msg):
    fn(q, k, v, mesh=mesh, **kw)


def test_usp_duplicate_axes_raise():
  mesh = _mesh("Mesh", (2, 4), ("a", "b"))
  q, k, v, _, _ = _inputs()
  with pytest.raises(ValueError, match=r"usp needs two different axes in seq_axis.* 'a' twice"):
    context_parallel_attention(q, k, v, mesh=mesh, seq_axis=("a", "a"), strategy="usp")


def test_unbound_axis_name_inside_shard_map_raises():
  mesh = _mesh("Mesh")
  q, k, v, _, _ = _inputs()
  spec = P(None, "seq")
  fn = _compat.shard_map(lambda q, k, v: context_parallel_attention(q, k, v, axis_name="sequence"), mesh=mesh,
                         in_specs=(spec,) * 3, out_specs=spec)
  with pytest.raises(ValueError, match=r"axis_name 'sequence' is not a bound mesh axis"):
    fn(q, k, v)
