"""The op protocol every attention family implements, the one flash ``custom_vjp``, and dispatch.

A *family* (softmax incl. block-sparse, linear, landmark, ...) describes one call of its public op by a frozen,
hashable *call* dataclass: the semantics (mask, scale, soft cap, which optional inputs are present) and the static
shapes and dtype. Each way of computing it is a :class:`Backend`:

- ``name``: the id users pass as ``implementation=`` (``"reference"``, ``"xla"``, ``"pallas_gpu"``, ...);
- ``supports(call) -> None | reason``: whether it can serve the call (shape, dtype, options, platform);
- ``Config``: a frozen dataclass of its tuning knobs only (tiles; warps and stages on GPU; VMEM limit on TPU), with
  ``default_config(call)`` and ``validate_config(call, config)`` (``ValueError`` naming the field and value);
- ``fwd(call, config, args) -> (outputs, residuals)`` and ``bwd(call, config, residuals, cotangents, needs) ->
  gradients`` (one per argument, ``None`` where there is none).

:func:`flash_vjp` turns any backend into a differentiable op with one ``jax.custom_vjp`` (the forward kernel saves
its residuals, the backward kernels consume them); context parallelism calls ``fwd`` / ``bwd`` per ring step
directly, so a ring over Pallas kernels runs Pallas in both directions.

:func:`dispatch` resolves ``implementation=`` (a name, ``(name, Config)``, a sequence of those, or None for the
platform's chain) to a backend and a config and runs it. With a chain, a backend whose ``supports`` refuses the call,
or whose kernels fail to compile for lack of a resource (shared memory, VMEM), is skipped with one warning naming it
and the reason; an explicitly named backend raises instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
import re
import warnings
from typing import Any, Callable, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

__all__ = ["Backend", "NoConfig", "Shapes", "FallbackWarning", "flash_vjp", "dispatch", "resolve", "platform", "use_platform",
           "interpret_mode", "is_resource_error", "is_pair", "static_implementation", "with_config_fields",
           "config_error", "PLATFORMS"]

PLATFORMS = ("cpu", "gpu", "tpu")


class FallbackWarning(UserWarning):
  """Issued when ``implementation=None`` (or a sequence) skips a backend; filter it to silence fallbacks."""


def config_error(owner: str, field: str, value, rule: str) -> ValueError:
  """The one message shape of an invalid tuning value: ``"<owner>.<field>=<value> <rule>"``.

  ``owner`` is the config class, prefixed by the backend (``"pallas_gpu: PallasGpuConfig"``) when a backend's
  ``validate_config`` rejects it.
  """
  return ValueError(f"{owner}.{field}={value!r} {rule}")


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The static shapes every attention call carries (its family's call dataclass extends it).

  Attributes:
    B, T, S, H, G, D, E: batch, query length, key length, query heads, kv heads, qk dim, v dim.
    dtype: q's dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``).
  """

  B: int
  T: int
  S: int
  H: int
  G: int
  D: int
  E: int
  dtype: str


@dataclasses.dataclass(frozen=True)
class NoConfig:
  """The config of a backend without tuning knobs."""


class Backend:
  """One implementation of one family (subclass per backend; instances are module-level singletons).

  Subclasses set ``name`` and ``Config`` and implement ``fwd`` / ``bwd``; ``supports``, ``default_config`` and
  ``validate_config`` have permissive defaults. ``kernel = True`` marks compiled kernels that can run out of shared
  memory or VMEM (dispatch then compiles them once before committing to them, see :func:`dispatch`);
  ``autodiff = True`` marks backends whose ``fwd`` JAX differentiates directly (the references: their ``bwd`` is
  ``jax.vjp`` of the definition, used only where a caller composes ``fwd`` / ``bwd`` itself).
  """

  name: ClassVar[str] = ""
  Config: ClassVar[type] = NoConfig
  kernel: ClassVar[bool] = False
  autodiff: ClassVar[bool] = False  # fwd is plain differentiable JAX (the references): dispatch runs it without the
  # custom_vjp, so JAX differentiates the definition itself (any order, inside shard_map with check_vma=True)

  def supports(self, call) -> str | None:
    """None if this backend can serve ``call``, else a one-line reason."""
    del call
    return None

  def default_config(self, call):
    """The tuning for ``call`` (per platform / GPU generation / TPU generation where it matters)."""
    del call
    return self.Config()

  def validate_config(self, call, config) -> None:
    """Raises ``ValueError`` naming the field and value when ``config`` cannot run ``call``."""
    del call, config

  def fwd(self, call, config, args: tuple) -> tuple[Any, Any]:
    """``-> (outputs, residuals)``; ``args`` are the family's array arguments (None where absent)."""
    raise NotImplementedError

  def bwd(self, call, config, residuals, cotangents, needs: tuple[bool, ...]) -> tuple:
    """Gradients for every argument of ``fwd`` (None for integer / absent / unneeded ones).

    ``needs[i]`` is False when argument ``i`` is not being differentiated (its gradient may be skipped).
    """
    raise NotImplementedError

  def residual_extra(self, call, config):
    """The ``extra`` residuals ``fwd`` saves (e.g. static visiting lists), built without running the kernels.

    Context parallelism rebuilds a block's residuals in the backward from the block's inputs and the *global*
    outputs (``res = Residuals(*inputs, *global_outputs, residual_extra(call, config))``) and calls ``bwd``.
    Backends whose ``extra`` depends on the data must not be used there. Default: None.
    """
    del call, config
    return None

  def __repr__(self):
    return f"<{type(self).__name__} {self.name!r}>"


# --------------------------------------------------------------------------------------------- the custom_vjp
@dataclasses.dataclass(frozen=True)
class _Op:
  backend: Backend
  call: Any
  config: Any


def flash_vjp(backend: Backend, call, config, *args):
  """Runs ``backend.fwd`` under the one ``custom_vjp`` whose backward is ``backend.bwd``.

  Args:
    backend: the backend.
    call: the family's frozen call description (static).
    config: the backend's ``Config`` instance (static).
    *args: the family's array arguments (None where absent; integer arrays are not differentiated).

  Returns:
    The backend's outputs.
  """
  return _flash(_Op(backend, call, config), *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(op: _Op, *args):
  return op.backend.fwd(op.call, op.config, args)[0]


def _flash_fwd(op: _Op, *args):
  # symbolic_zeros=True: each argument arrives as CustomVJPPrimal(value, perturbed), so the backward can skip the
  # gradients nobody asked for (bias, decay, initial state). ``needs`` travels as pytree structure (() = needed).
  values = tuple(None if a is None else a.value for a in args)
  needs = tuple(() if (a is not None and a.perturbed) else None for a in args)
  outs, res = op.backend.fwd(op.call, op.config, values)
  return outs, (res, needs)


def _flash_bwd(op: _Op, saved, cts):
  res, needs = saved
  cts = jax.tree.map(lambda c: jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c, cts,
                     is_leaf=lambda c: isinstance(c, SymbolicZero))
  grads = op.backend.bwd(op.call, op.config, res, cts, tuple(n is not None for n in needs))
  return tuple(grads)


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)


# ------------------------------------------------------------------------------------------------- platform
_PLATFORM_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxattn_platform", default=None)


def platform() -> str:
  """The platform ops dispatch for: ``"cpu"``, ``"gpu"`` or ``"tpu"`` (the default backend's, or the override)."""
  override = _PLATFORM_OVERRIDE.get()
  if override is not None:
    return override
  p = jax.default_backend()
  return "gpu" if p in ("gpu", "cuda", "rocm") else p


@contextlib.contextmanager
def use_platform(name: str):
  """Dispatch (and build kernels) for ``name`` although the default backend differs.

  For ahead-of-time compilation without the hardware: inside ``with use_platform("tpu"):`` a traced op picks the TPU
  chain and the Mosaic kernels are built for real (not in interpret mode), so ``jax.jit(f).trace(...).lower(...)``
  with a TPU topology's shardings compiles them.
  """
  if name not in PLATFORMS:
    raise ValueError(f"platform must be one of {PLATFORMS}, got {name!r}")
  token = _PLATFORM_OVERRIDE.set(name)
  try:
    yield
  finally:
    _PLATFORM_OVERRIDE.reset(token)


def interpret_mode(kernel_platform: str):
  """The ``interpret`` argument of a Pallas kernel built for ``kernel_platform`` (``"gpu"`` / ``"tpu"``) here.

  False on its own platform; on CPU, True (GPU kernels) or ``pltpu.InterpretParams()`` (TPU kernels). Any other
  platform raises ``NotImplementedError``.
  """
  p = platform()
  if p == kernel_platform:
    return False
  if p == "cpu":
    if kernel_platform == "tpu":
      from jax.experimental.pallas import tpu as pltpu
      return pltpu.InterpretParams()
    return True
  raise NotImplementedError(f"pallas_{kernel_platform} runs on {kernel_platform.upper()} (or in interpret mode on "
                            f"CPU), not on {p!r}")


# ------------------------------------------------------------------------------------------------- dispatch
_RESOURCE = re.compile(r"RESOURCE_EXHAUSTED|shared memory|out of resource|vmem|Ran out of memory", re.IGNORECASE)


def is_resource_error(e: BaseException) -> bool:
  """Whether a compile error means the kernel does not fit (shared memory, VMEM, registers)."""
  return bool(_RESOURCE.search(str(e)))


def is_pair(implementation) -> bool:
  """Whether ``implementation`` is one ``(name, Config)`` pair (a Config is a dataclass instance), not a chain."""
  return (isinstance(implementation, tuple) and len(implementation) == 2 and isinstance(implementation[0], str)
          and dataclasses.is_dataclass(implementation[1]) and not isinstance(implementation[1], type))


def static_implementation(implementation):
  """``implementation=`` with lists (from users or configs) turned into tuples, so it can be a static jit argument."""
  if implementation is None or isinstance(implementation, str) or is_pair(implementation):
    return implementation
  return tuple(tuple(i) if isinstance(i, list) else i for i in implementation)


def with_config_fields(op: str, backends: Mapping[str, Backend], defaults: Mapping[str, Sequence[str]],
                       implementation, call, **fields):
  """``implementation`` with a public op's tuning shorthands applied (``block_sizes=``, ``chunk_size=``, ...).

  Each named backend whose Config has some of ``fields`` becomes ``(name, its default config with those replaced)``
  (its ``validate_config`` then checks them); backends without them, and backends that refuse the call, keep their
  defaults. A single name stays explicit; None becomes the platform's chain as a sequence (still falling back).
  Combining a shorthand with an explicit ``(name, Config)`` raises ``ValueError``.
  """

  def one(item, pair: bool = True):
    if not isinstance(item, str):
      raise ValueError(f"{op}: pass {', '.join(f'{k}=' for k in fields)} either as a keyword or inside the "
                       f"(name, Config) implementation, not both (got {item!r})")
    b = backends.get(item)
    if b is None:
      return item  # unknown names raise in dispatch
    names = {f.name for f in dataclasses.fields(b.Config)}
    given = {k: v for k, v in fields.items() if k in names}
    if given and b.supports(call) is None:
      return item, dataclasses.replace(b.default_config(call), **given)
    return (item, b.default_config(call)) if pair else item  # refusing backends keep their reason

  if implementation is None:
    return tuple(one(n) for n in defaults.get(platform(), defaults["cpu"]))
  if isinstance(implementation, str) or is_pair(implementation):
    return one(implementation, pair=False)
  return tuple(one(i) for i in implementation)


def _parse(op: str, backends: Mapping[str, Backend], implementation, defaults: Mapping[str, Sequence[str]]):
  """``-> ([(backend, config or None)], explicit)``."""

  def one(item):
    if isinstance(item, str):
      name, config = item, None
    elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
      name, config = item
    else:
      raise ValueError(f"{op}: implementation entries are a name or (name, Config), got {item!r}")
    if name not in backends:
      raise ValueError(f"{op}: unknown implementation {name!r}; choose from {sorted(backends)}")
    backend = backends[name]
    if config is not None and type(config) is not backend.Config:
      raise ValueError(f"{op}: the config of {name!r} must be a {backend.Config.__module__}."
                       f"{backend.Config.__qualname__}, got {type(config).__name__}")
    return backend, config

  if implementation is None:
    return [one(n) for n in defaults.get(platform(), defaults["cpu"])], False
  if isinstance(implementation, str) or is_pair(implementation):
    return [one(implementation)], True
  return [one(i) for i in implementation], False


def resolve(op: str, backends: Mapping[str, Backend], implementation, defaults: Mapping[str, Sequence[str]], call,
            trial: Callable[[Backend, Any], BaseException | None] | None = None) -> tuple[Backend, Any]:
  """The backend and config that will serve ``call`` (see :func:`dispatch`); ``trial(backend, config)`` returns
  the exception of a trial compile, or None."""
  chain, explicit = _parse(op, backends, implementation, defaults)
  reasons = []
  for backend, config in chain:
    reason = backend.supports(call)
    if reason is None:
      if config is None:
        config = backend.default_config(call)
      backend.validate_config(call, config)
      if trial is not None and not explicit and backend.kernel and platform() != "cpu" and _trial_enabled():
        err = trial(backend, config)
        if err is not None:
          if not is_resource_error(err):
            raise err
          reason = f"its kernels do not fit ({_first_line(err)})"
    if reason is None:
      return backend, config
    if explicit:
      raise NotImplementedError(f"{op}: implementation {backend.name!r} cannot serve this call: {reason}")
    reasons.append(f"{backend.name}: {reason}")
    if len(reasons) < len(chain):
      warnings.warn(f"{op}: skipping {backend.name!r} ({reason})", FallbackWarning, stacklevel=4)
  raise NotImplementedError(f"{op}: no implementation in {[b.name for b, _ in chain]} serves this call:\n  "
                            + "\n  ".join(reasons))


def dispatch(op: str, backends: Mapping[str, Backend], implementation, defaults: Mapping[str, Sequence[str]], call,
             args: tuple, *, differentiable: bool = True):
  """Runs ``call`` on the requested backend or on the first of the platform's chain that serves it.

  Args:
    op: the public op's name, for messages.
    backends: name -> backend of this family.
    implementation: a name, ``(name, Config)``, a sequence of those (tried in order, like None), or None for
      ``defaults[platform()]``. Unknown names and configs of the wrong type raise ``ValueError``; so does a config
      the backend rejects (``validate_config``), whether named or not.
    defaults: platform -> ordered backend names.
    call: the family's call description.
    args: the array arguments.
    differentiable: run the backend under :func:`flash_vjp` (False: ``backend.fwd`` only, for ops without gradients).

  Kernel backends (``Backend.kernel``) reached through a chain on GPU / TPU are first compiled on their own,
  forward and backward, for these shapes (cached per call and config; ``JAXATTN_TRIAL_COMPILE=0`` turns this off):
  a resource error (shared memory, VMEM) skips them with a warning.
  """
  specs = tuple(None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)
  trial = lambda b, c: _trial_compile(b, call, c, specs, differentiable)
  backend, config = resolve(op, backends, implementation, defaults, call, trial)
  return _run(backend, call, config, args, differentiable)


def _run(backend, call, config, args, differentiable):
  if differentiable and not backend.autodiff:
    return flash_vjp(backend, call, config, *args)
  return backend.fwd(call, config, args)[0]


def _trial_enabled() -> bool:
  return os.environ.get("JAXATTN_TRIAL_COMPILE", "1") not in ("0", "false", "False")


def _first_line(e: BaseException) -> str:
  lines = [l for l in str(e).splitlines() if _RESOURCE.search(l)] or str(e).splitlines() or [type(e).__name__]
  return lines[0].strip()[:300]


@functools.lru_cache(maxsize=256)
def _trial_compile(backend, call, config, specs, differentiable) -> BaseException | None:
  """Compiles the backend (and its gradient) for ``specs`` on its own; returns the compile error or None."""
  diff = tuple(i for i, s in enumerate(specs) if s is not None and jnp.issubdtype(s.dtype, jnp.floating))

  def f(*args):
    if not differentiable:
      return _run(backend, call, config, args, False)

    def g(*d):
      full = list(args)
      for i, x in zip(diff, d):
        full[i] = x
      return _run(backend, call, config, tuple(full), True)

    out, vjp = jax.vjp(g, *(args[i] for i in diff))
    return vjp(jax.tree.map(jnp.ones_like, out))

  try:
    jax.jit(f).lower(*specs).compile()
  except Exception as e:  # noqa: BLE001 — any compile failure is reported to the caller
    return e
  return None
