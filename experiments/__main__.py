"""Dispatcher: ``python -m experiments <name> [args]``; without a name it lists the subcommands."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from experiments import SUBCOMMANDS


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
  if name not in SUBCOMMANDS:
    print(f"unknown experiment {name!r}\n\n{usage()}", file=sys.stderr)
    return 2
  module, func = SUBCOMMANDS[name][0].split(":")
  return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
  sys.exit(main())
