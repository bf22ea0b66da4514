"""Matplotlib (Agg) plots written to PNG: one panel per group, one line per series."""

from __future__ import annotations

import pathlib
from typing import Mapping, Sequence

__all__ = ["line_panels"]


def line_panels(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
                path: str | pathlib.Path, *, xlabel: str, ylabel: str, log2_x: bool = False,
                ylim: tuple[float, float] | None = None, title: str | None = None) -> pathlib.Path:
  """Draws ``panels[panel_title][series_label] = (xs, ys)`` side by side and saves a PNG.

  Args:
    panels: ordered panels, each an ordered mapping of series to x/y values.
    path: the PNG file (parent folders are created).
    xlabel, ylabel: axis labels (shared).
    log2_x: logarithmic x axis in base 2, ticks at the data's x values.
    ylim: y range (None: automatic).
    title: a figure title.

  Returns:
    The path written.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  n = max(len(panels), 1)
  fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False, sharey=True)
  for ax, (name, series) in zip(axes[0], panels.items()):
    xs_all = set()
    for label, (xs, ys) in series.items():
      ax.plot(list(xs), list(ys), marker="o", label=label)
      xs_all.update(xs)
    if log2_x:
      ax.set_xscale("log", base=2)
      ticks = sorted(xs_all)
      ax.set_xticks(ticks)
      ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.set_title(name)
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)
    if ylim is not None:
      ax.set_ylim(*ylim)
  axes[0][0].set_ylabel(ylabel)
  with_lines = [ax for ax in axes[0] if ax.get_lines()]
  if with_lines:
    with_lines[-1].legend(fontsize="small")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
