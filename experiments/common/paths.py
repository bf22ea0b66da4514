"""Where experiment outputs go.

Runs write under ``runs/`` (relative to the working directory; ``/runs/`` is git-ignored at the repository root,
where ``python -m experiments`` runs) unless the user names a folder (``--out`` / ``--workdir``). The reference
results committed under ``experiments/results/`` are never a default output or a resume point: they are read or
overwritten only when the user passes that folder explicitly.
"""

from __future__ import annotations

import os
import pathlib

__all__ = ["RUNS_DIR", "RESULTS_DIR", "default_out_dir", "is_reference_results"]

RUNS_DIR = pathlib.Path("runs")
RESULTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "results"  # experiments/results (committed)


def default_out_dir(*parts: str) -> pathlib.Path:
  """``runs/<parts...>``: the default output folder of an experiment (``default_out_dir("bench", "cpu")``)."""
  if not parts or any(not p or os.sep in p or p in (".", "..") for p in parts):
    raise ValueError(f"default_out_dir needs plain folder names, got {parts!r}")
  return RUNS_DIR.joinpath(*parts)


def is_reference_results(path: str | os.PathLike) -> bool:
  """True when ``path`` is ``experiments/results/`` or inside it (the committed reference results)."""
  p = pathlib.Path(path).resolve()
  return p == RESULTS_DIR or RESULTS_DIR in p.parents
