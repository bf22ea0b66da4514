"""Errors an experiment reports to its user in one line, and the optional-dependency message.

Dependency-free (no jax), so ``python -m experiments`` can catch and print these without importing anything heavy:
every :class:`ExperimentError` reaching the command line is printed as one ``error:`` line with exit status 1 (a
traceback is for bugs, not for a diverged run or a damaged checkpoint).
"""

from __future__ import annotations

__all__ = ["ExperimentError", "NonFiniteError", "CorruptCheckpointError", "CheckpointWarning", "EXTRAS",
           "EXTRA_MODULES", "missing_dependency_message", "missing_extra_modules"]


class ExperimentError(RuntimeError):
  """An error whose message is complete for the user (the command line prints it as one line)."""


class NonFiniteError(ExperimentError):
  """Training produced a non-finite loss or non-finite parameters; the run is stopped and not recorded as finished.

  Attributes:
    step: the optimizer step (1-based count of updates) whose loss or updated parameters are not finite.
    loss: that step's loss (may be finite when only the parameters are not).
  """

  def __init__(self, message: str, *, step: int, loss: float | None = None):
    super().__init__(message)
    self.step = step
    self.loss = loss


class CorruptCheckpointError(ExperimentError):
  """A checkpoint step that cannot be restored or does not match its stored digest.

  Attributes:
    step: the step (None: no step of the directory was usable).
    reason: what failed.
  """

  def __init__(self, message: str, *, step: int | None = None, reason: str = ""):
    super().__init__(message)
    self.step = step
    self.reason = reason


class CheckpointWarning(UserWarning):
  """A checkpoint step was skipped (corrupt, truncated or unverifiable) and an earlier one is used instead."""


# top-level module -> the pip extra that provides it (pyproject.toml [project.optional-dependencies])
EXTRAS: dict[str, str] = {
    "flax": "experiments", "optax": "experiments", "orbax": "experiments", "grain": "experiments",
    "tqdm": "experiments", "matplotlib": "experiments", "sklearn": "experiments",
}
# importable module name -> extra (what :func:`missing_extra_modules` probes)
EXTRA_MODULES: dict[str, str] = {"flax": "experiments", "optax": "experiments", "orbax.checkpoint": "experiments",
                                 "grain": "experiments", "tqdm": "experiments", "matplotlib": "experiments",
                                 "sklearn": "experiments"}


def missing_extra_modules(extra: str = "experiments") -> list[str]:
  """The modules of ``extra`` that cannot be imported here (checked without importing them, so it is cheap)."""
  import importlib.util
  import sys
  missing = []
  for name, needed_by in EXTRA_MODULES.items():
    if needed_by != extra:
      continue
    top = name.split(".")[0]
    try:
      found = sys.modules.get(top, ...) is not None and importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent that fails to import, or a module blocked in sys.modules
      found = False
    if not found:
      missing.append(top)
  return missing


def missing_dependency_message(module: str | None) -> str | None:
  """One line naming the extra to install for a missing ``module`` (a dotted name is fine), or None when the module
  is not an optional dependency (then the ``ModuleNotFoundError`` is a real bug and must not be hidden)."""
  top = (module or "").split(".")[0]
  extra = EXTRAS.get(top)
  if extra is None:
    return None
  return (f"missing optional dependency {top!r}: install the {extra} extra with "
          f"pip install -e \".[{extra}]\" (from the repository root)")
