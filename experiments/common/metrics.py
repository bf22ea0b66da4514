"""Metric logging: JSONL always (dependency-free, what tests and plots read), TensorBoard via tensorboardX when it
is installed and asked for. Only process 0 writes (multi-host runs).

Each JSONL row is ``{"run": ..., "step": ..., "time": ..., <metric>: <float>, ...}``.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any, Mapping

import jax
import numpy as np

__all__ = ["MetricWriter", "read_jsonl", "tensorboard_available"]


def tensorboard_available() -> bool:
  try:
    import tensorboardX  # noqa: F401
  except ImportError:
    return False
  return True


def _scalar(v: Any):
  v = np.asarray(jax.device_get(v))
  if v.shape != ():
    raise ValueError(f"metrics must be scalars, got shape {v.shape}")
  v = v.item()
  return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricWriter:
  """Appends metric rows to ``path`` (JSONL) and, with ``tensorboard_dir``, to TensorBoard event files.

  Args:
    path: the JSONL file (parent folders are created).
    tensorboard_dir: a folder for tensorboardX events, or None. Ignored (with one note on stdout) when
      tensorboardX is not installed.
    run: a tag added to every row (and the TensorBoard sub-folder).
  """

  def __init__(self, path: str | pathlib.Path, *, tensorboard_dir: str | pathlib.Path | None = None,
               run: str = ""):
    self.path = pathlib.Path(path)
    self.run = run
    self._active = jax.process_index() == 0
    self._tb = None
    if self._active:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard_dir is not None and tensorboard_available():
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(pathlib.Path(tensorboard_dir) / run if run else tensorboard_dir))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs scalar ``metrics`` (arrays are fetched from the device) at ``step``."""
    if not self._active:
      return
    values = {k: _scalar(v) for k, v in metrics.items()}
    row = {"run": self.run, "step": int(step), "time": round(time.time(), 3), **values}
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
  """All rows of a JSONL file (empty list if it does not exist)."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
