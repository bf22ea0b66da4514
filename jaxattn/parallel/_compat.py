"""Small shims over jax APIs that moved between the versions we run (0.10.2 on CPU machines, 0.11.x on GPUs).

- ``shard_map``: ``jax.shard_map`` (``check_vma``) where it exists, else ``jax.experimental.shard_map.shard_map``
  (``check_rep``).
- ``axis_size``: ``lax.axis_size`` where it exists, else ``lax.psum(1, name)`` (a concrete int under ``shard_map``).
- ``pvary``: mark a value created inside ``shard_map`` (zeros, constants) as varying over mesh axes, so that it can
  meet per-device values in ``lax.switch`` branches and loop carries when ``check_vma=True``; identity where the
  primitive does not exist.
"""

from __future__ import annotations

import inspect
import math

import jax
from jax import lax

from jaxattn._vma import pvary  # noqa: F401 - re-exported for the parallel modules


def shard_map(f, *, mesh, in_specs, out_specs, check: bool = False):
  """``shard_map(f)`` over every axis of ``mesh`` with the replication/vma check switched by ``check``."""
  sm = getattr(jax, "shard_map", None)
  if sm is not None:
    params = inspect.signature(sm).parameters
    kw = {"check_vma": check} if "check_vma" in params else {"check_rep": check}
    return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kw)
  from jax.experimental.shard_map import shard_map as legacy  # jax < 0.7
  return legacy(f, mesh, in_specs, out_specs, check_rep=check)


def axis_size(axis_name) -> int:
  """The size of a bound mesh axis (or the product over a tuple of axes), as a Python int.

  Raises:
    ValueError: naming an axis that is not bound (not an axis of the enclosing ``shard_map``'s mesh).
  """
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  n = 1
  for a in names:
    try:
      n *= int(lax.axis_size(a)) if hasattr(lax, "axis_size") else int(lax.psum(1, a))
    except NameError as e:
      raise ValueError(f"axis_name {a!r} is not a bound mesh axis here: call this inside a shard_map over a mesh "
                       f"with that axis ({e})") from None
  return n


def constrain(x, mesh, spec):
  """Lays ``x`` out as ``NamedSharding(mesh, spec)`` inside ``jit`` before a ``shard_map``.

  Explicit mesh axes (the default of ``jax.make_mesh`` in recent jax) need ``jax.sharding.reshard``; Auto axes need
  ``with_sharding_constraint``.
  """
  if x is None:
    return None
  from jax.sharding import NamedSharding
  used = set()
  for entry in spec:
    if entry is None:
      continue
    used |= set(entry) if isinstance(entry, tuple) else {entry}
  types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ()) or ()))
  explicit = any("Explicit" in str(types.get(a, "")) for a in used)
  if explicit and hasattr(jax.sharding, "reshard"):
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def as_tuple(ax) -> tuple:
  """A mesh-axis argument (None, one name, or several) as a tuple of names."""
  if ax is None:
    return ()
  return tuple(ax) if isinstance(ax, (tuple, list)) else (ax,)


def check_mesh_axes(mesh, seq_axes: tuple, batch_axis, head_axis, *, B: int, H: int, G: int) -> tuple[dict, int]:
  """Checks the mesh axes of a call: every named axis is an axis of ``mesh``, no axis is named twice (within or
  across ``seq_axis`` / ``batch_axis`` / ``head_axis``), and ``B`` and ``H``, ``G`` split over the batch and head axes.

  Returns:
    ``(axis name -> size, head-axis size)``.

  Raises:
    ValueError: naming the unknown or repeated axes.
  """
  if not isinstance(mesh, jax.sharding.Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh (e.g. from jax.make_mesh), got {type(mesh).__name__}")
  shape = dict(zip(mesh.axis_names, mesh.devices.shape))
  role: dict = {}
  for name, ax in (("seq_axis", seq_axes), ("batch_axis", as_tuple(batch_axis)), ("head_axis", as_tuple(head_axis))):
    unknown = [a for a in ax if not isinstance(a, str) or a not in shape]
    if unknown:
      verb = "is not an axis" if len(unknown) == 1 else "are not axes"
      raise ValueError(f"{name} {', '.join(map(repr, unknown))} {verb} of the mesh {tuple(mesh.axis_names)}")
    for a in ax:
      if a in role:
        where = f"twice in {name}" if role[a] == name else f"in both {role[a]} and {name}"
        raise ValueError(f"mesh axis {a!r} is named {where}; a mesh axis can shard only one dimension once "
                         f"(mesh axes {tuple(mesh.axis_names)})")
      role[a] = name
  pb = math.prod(shape[a] for a in as_tuple(batch_axis))
  ph = math.prod(shape[a] for a in as_tuple(head_axis))
  if B % pb:
    raise ValueError(f"batch B={B} is not a multiple of the batch_axis {batch_axis!r} size {pb}")
  if H % ph or G % ph:
    raise ValueError(f"heads H={H}, G={G} must be multiples of the head_axis {head_axis!r} size {ph}")
  return shape, ph


def call_mesh(mesh, *arrays):
  """The mesh a context-parallel call shard_maps over: ``mesh``, with its axes made Auto where that is safe.

  A mesh from ``jax.make_mesh`` has Explicit axes by default (jax >= 0.9); arrays sharded over Explicit axes carry
  their sharding in their type, and outside a ``jax.set_mesh`` context even ``jax.grad`` of an eager function of
  them fails ("enter your jit into a mesh context"). The call's sharding is internal (``shard_map`` in, ``shard_map``
  out), so it runs over the same devices and axis names with Auto axes and returns arrays with ordinary shardings:
  eager calls, ``jit`` and ``jax.grad`` then work alike for ``Mesh(...)`` and ``jax.make_mesh`` meshes. The mesh is
  kept as given when the caller works with Explicit sharding itself: under a ``jax.set_mesh`` context, or when an
  input array is already sharded over Explicit axes.
  """
  axis_type = getattr(jax.sharding, "AxisType", None)
  types = tuple(getattr(mesh, "axis_types", ()) or ())
  if axis_type is None or all(t == axis_type.Auto for t in types):
    return mesh
  get_abstract = getattr(jax.sharding, "get_abstract_mesh", None)
  if get_abstract is not None:
    ctx = get_abstract()
    if ctx is not None and not getattr(ctx, "empty", True) and ctx.axis_names:
      return mesh
  for x in arrays:
    sharding = getattr(x, "sharding", None) if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) \
        else None
    m = getattr(sharding, "mesh", None)
    if m is not None and any(t == axis_type.Explicit for t in (getattr(m, "axis_types", ()) or ())):
      return mesh
    aval_sharding = getattr(getattr(x, "aval", None), "sharding", None)  # a tracer typed with Explicit axes
    m = getattr(aval_sharding, "mesh", None)
    if m is not None and any(t == axis_type.Explicit for t in (getattr(m, "axis_types", ()) or ())):
      return mesh
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(axis_type.Auto,) * len(mesh.axis_names))
