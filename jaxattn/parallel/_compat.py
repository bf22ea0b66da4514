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
  """The size of a bound mesh axis (or the product over a tuple of axes), as a Python int."""
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  n = 1
  for a in names:
    n *= int(lax.axis_size(a)) if hasattr(lax, "axis_size") else int(lax.psum(1, a))
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
  """Checks that every named axis is in ``mesh`` and that ``B`` and ``H``, ``G`` split over the batch and head axes.

  Returns:
    ``(axis name -> size, head-axis size)``.
  """
  shape = dict(zip(mesh.axis_names, mesh.devices.shape))
  for name, ax in (("seq_axis", seq_axes), ("batch_axis", as_tuple(batch_axis)), ("head_axis", as_tuple(head_axis))):
    for a in ax:
      if a not in shape:
        raise ValueError(f"{name} {a!r} is not an axis of the mesh {tuple(mesh.axis_names)}")
  pb = math.prod(shape[a] for a in as_tuple(batch_axis))
  ph = math.prod(shape[a] for a in as_tuple(head_axis))
  if B % pb:
    raise ValueError(f"batch B={B} is not a multiple of the batch_axis {batch_axis!r} size {pb}")
  if H % ph or G % ph:
    raise ValueError(f"heads H={H}, G={G} must be multiples of the head_axis {head_axis!r} size {ph}")
  return shape, ph
