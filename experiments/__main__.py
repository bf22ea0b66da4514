"""Dispatcher: ``python -m experiments <name> [args]``; without a name it lists the subcommands.

What reaches the user from a subcommand is one line, not a traceback, for the errors that are the user's to fix:

- a missing optional dependency (flax, optax, orbax, grain, tqdm, matplotlib) names the extra to install
  (``pip install -e ".[experiments]"``), exit status 1; the extra is checked before the subcommand starts, so a
  run does not fail at its end for want of matplotlib;
- an :class:`~experiments.common.errors.ExperimentError` (a diverged run, no usable checkpoint) or a
  :class:`~experiments.common.config.ConfigError` prints its message, exit status 1;
- bad flags are reported by the subcommand's parser in one line, exit status 2.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from experiments import SUBCOMMANDS
from experiments.common.config import ConfigError
from experiments.common.errors import ExperimentError, missing_dependency_message, missing_extra_modules


def usage() -> str:
  """The list of subcommands."""
  width = max(len(n) for n in SUBCOMMANDS)
  lines = ["usage: python -m experiments <name> [args]   (<name> --help for its options)", "", "subcommands:"]
  lines += [f"  {n:<{width}}  {desc}" for n, (_, desc) in sorted(SUBCOMMANDS.items())]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the named subcommand with the remaining arguments; returns its exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help", "list"):
    print(usage())
    return 0
  name, rest = argv[0], argv[1:]
  prog = f"python -m experiments {name}"
  if name not in SUBCOMMANDS:
    print(f"python -m experiments: error: unknown experiment {name!r}; choose one of {', '.join(sorted(SUBCOMMANDS))}"
          f" (python -m experiments --help lists them)", file=sys.stderr)
    return 2
  module, func = SUBCOMMANDS[name][0].split(":")
  missing = missing_extra_modules("experiments")
  if missing:
    also = f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""
    print(f"{prog}: error: {missing_dependency_message(missing[0])}{also}", file=sys.stderr)
    return 1
  try:
    return int(getattr(importlib.import_module(module), func)(rest) or 0)
  except ModuleNotFoundError as e:
    message = missing_dependency_message(e.name)
    if message is None:
      raise
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1
  except (ExperimentError, ConfigError) as e:
    print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
