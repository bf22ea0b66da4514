"""Implementation registry, platform detection and ordered fallback (design.md section 3).

Each op family registers its implementations by id (``"reference"``, ``"xla"``, ``"pallas_tpu"``,
``"pallas_gpu"``, ``"cudnn"``). ``implementation=None`` tries the platform's default chain in order and moves on
when an implementation raises ``NotImplementedError`` (it cannot serve this call); an explicitly requested
implementation that cannot serve the call raises.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax

IMPLEMENTATIONS = ("reference", "xla", "pallas_tpu", "pallas_gpu", "cudnn")


def platform() -> str:
  """The default backend's platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
  p = jax.default_backend()
  return "gpu" if p in ("gpu", "cuda", "rocm") else p


def dispatch(op: str, registry: Mapping[str, Callable], implementation: str | Sequence[str] | None,
             defaults: Mapping[str, Sequence[str]], *args, **kwargs):
  """Calls the requested implementation, or the first of the platform's defaults that serves the call.

  Args:
    op: the public op's name, for error messages.
    registry: implementation id -> callable(*args, **kwargs).
    implementation: an id, a sequence of ids tried in order, or None for ``defaults[platform()]``.
    defaults: platform -> ordered ids.
  """
  if implementation is None:
    chain, explicit = tuple(defaults.get(platform(), defaults["cpu"])), False
  elif isinstance(implementation, str):
    chain, explicit = (implementation,), True
  else:
    chain, explicit = tuple(implementation), False
  for impl in chain:
    if impl not in registry:
      raise ValueError(f"{op}: unknown implementation {impl!r}; choose from {sorted(registry)}")
  errors = []
  for impl in chain:
    try:
      return registry[impl](*args, **kwargs)
    except NotImplementedError as e:
      if explicit:
        raise
      errors.append(f"{impl}: {e}")
  raise NotImplementedError(f"{op}: no implementation in {chain} serves this call:\n  " + "\n  ".join(errors))


def pallas_interpret(kernel: str):
  """The ``interpret`` argument for a Pallas kernel family on this platform.

  ``"pallas_tpu"``: False on TPU, ``pltpu.InterpretParams()`` (TPU interpret mode) on CPU. ``"pallas_gpu"``: False
  on GPU, True on CPU. Any other platform raises ``NotImplementedError`` (so dispatch falls through).
  """
  own = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}[kernel]
  p = platform()
  if p == own:
    return False
  if p == "cpu":
    if kernel == "pallas_tpu":
      from jax.experimental.pallas import tpu as pltpu
      return pltpu.InterpretParams()
    return True
  raise NotImplementedError(f"{kernel} runs on {own.upper()} (or in interpret mode on CPU), not on {p!r}")
