"""Matplotlib (Agg) pictures of attention analyses, written to PNG: heat maps, per-head grids, profiles, histograms.

Reusable by any experiment that reads attention (``jaxattn.analysis``):

- :func:`heatmaps` — a grid of ``[T, S]`` maps (attention maps, rollout, saliency maps side by side);
- :func:`head_grid` — one value per ``(layer, head)`` as an annotated ``[L, H]`` grid (sink scores, search gains,
  retrieval scores);
- :func:`profiles` — lines of mass against (relative) position (``jaxattn.analysis.position_profile`` /
  ``distance_profile`` output);
- :func:`histogram` — distributions of scores with an optional threshold line (retrieval-score style: the paper's
  0.1, ACT's tau).

Inputs are numpy-convertible arrays; every function creates the parent folder and returns the path written.
"""

from __future__ import annotations

import math
import pathlib
from typing import Mapping, Sequence

import numpy as np

__all__ = ["heatmaps", "head_grid", "profiles", "histogram"]


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  _plt().close(fig)
  return path


def heatmaps(maps: Mapping[str, np.ndarray], path, *, title: str | None = None, xlabel: str = "key",
             ylabel: str = "query", xticks: Sequence[str] | None = None, yticks: Sequence[str] | None = None,
             cols: int = 4, vmin: float | None = 0.0, vmax: float | None = None,
             cmap: str = "viridis") -> pathlib.Path:
  """Draws ``maps[panel_title] = array [T, S]`` as a grid of heat maps (one colour bar per panel).

  Args:
    maps: ordered panels; each a 2-D array (rows: queries / output steps, columns: keys / input positions).
    path: the PNG file.
    title: figure title.
    xlabel, ylabel: axis labels of every panel.
    xticks, yticks: optional tick labels (e.g. the tokens), used when they match the panel's size.
    cols: panels per row.
    vmin, vmax: colour range (None: per panel).
    cmap: matplotlib colour map.
  """
  if not maps:
    raise ValueError("heatmaps needs at least one map")
  arrays = {k: np.asarray(v, np.float64) for k, v in maps.items()}
  for k, a in arrays.items():
    if a.ndim != 2:
      raise ValueError(f"map {k!r} must be 2-D [T, S], got shape {a.shape}")
  plt = _plt()
  n = len(arrays)
  cols = max(1, min(cols, n))
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False)
  for ax in axes.ravel()[n:]:
    ax.axis("off")
  for ax, (name, a) in zip(axes.ravel(), arrays.items()):
    im = ax.imshow(a, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_title(name, fontsize="small")
    ax.set_xlabel(xlabel, fontsize="small")
    ax.set_ylabel(ylabel, fontsize="small")
    if xticks is not None and len(xticks) == a.shape[1]:
      ax.set_xticks(range(a.shape[1]))
      ax.set_xticklabels(list(xticks), fontsize=6, rotation=90)
    if yticks is not None and len(yticks) == a.shape[0]:
      ax.set_yticks(range(a.shape[0]))
      ax.set_yticklabels(list(yticks), fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def head_grid(values, path, *, title: str | None = None, label: str = "", fmt: str = "{:.2f}",
              cmap: str = "magma", center: float | None = None) -> pathlib.Path:
  """One value per ``(layer, head)``: ``values [L, H]`` drawn as an annotated grid (layers as rows).

  ``center`` set: a diverging colour map symmetric around it (for gains that may be negative).
  """
  v = np.asarray(values, np.float64)
  if v.ndim != 2:
    raise ValueError(f"values must have shape [L, H], got {v.shape}")
  plt = _plt()
  L, H = v.shape
  fig, ax = plt.subplots(figsize=(1.0 + 0.7 * H, 0.9 + 0.5 * L))
  kw = {}
  if center is not None:
    span = float(np.nanmax(np.abs(v - center))) or 1.0
    kw = dict(vmin=center - span, vmax=center + span)
    cmap = "RdBu_r"
  im = ax.imshow(v, aspect="auto", interpolation="nearest", cmap=cmap, **kw)
  for l in range(L):
    for h in range(H):
      if np.isfinite(v[l, h]):
        ax.text(h, l, fmt.format(v[l, h]), ha="center", va="center", fontsize=7, color="gray")
  ax.set_xticks(range(H))
  ax.set_yticks(range(L))
  ax.set_xlabel("head")
  ax.set_ylabel("layer")
  fig.colorbar(im, ax=ax, label=label)
  if title:
    ax.set_title(title, fontsize="small")
  return _save(fig, path)


def profiles(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path, *, xlabel: str,
             ylabel: str, title: str | None = None, panels: Mapping[str, Mapping] | None = None) -> pathlib.Path:
  """Lines of mass against position: ``series[label] = (xs, ys)`` in one panel, or ``panels[title] = series``
  side by side (e.g. one panel per length bucket of ``position_profile``)."""
  groups = dict(panels) if panels is not None else {"": series}
  if not groups or not any(groups.values()):
    raise ValueError("profiles needs at least one series")
  plt = _plt()
  n = len(groups)
  fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 3.4), squeeze=False, sharey=True)
  for ax, (name, ser) in zip(axes[0], groups.items()):
    for label, (xs, ys) in ser.items():
      ax.plot(list(xs), list(ys), marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)
    if name:
      ax.set_title(name, fontsize="small")
  axes[0][0].set_ylabel(ylabel)
  axes[0][-1].legend(fontsize="small")
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def histogram(values: Mapping[str, Sequence[float]], path, *, bins: int = 20, threshold: float | None = None,
              xlabel: str = "score", title: str | None = None, log_y: bool = False,
              range_: tuple[float, float] | None = None) -> pathlib.Path:
  """Overlaid histograms ``values[label] = samples`` (shared bins), with a dashed line at ``threshold``."""
  arrays = {k: np.asarray(v, np.float64).ravel() for k, v in values.items()}
  arrays = {k: a[np.isfinite(a)] for k, a in arrays.items()}
  if not arrays or all(a.size == 0 for a in arrays.values()):
    raise ValueError("histogram needs at least one finite value")
  plt = _plt()
  allv = np.concatenate([a for a in arrays.values() if a.size])
  lo, hi = range_ if range_ is not None else (float(allv.min()), float(allv.max()))
  if threshold is not None and range_ is None:
    lo, hi = min(lo, threshold), max(hi, threshold)
  if hi <= lo:
    hi = lo + 1.0
  edges = np.linspace(lo, hi, bins + 1)
  fig, ax = plt.subplots(figsize=(5.2, 3.4))
  for label, a in arrays.items():
    if a.size:
      ax.hist(a, bins=edges, alpha=0.55, label=f"{label} (n={a.size})")
  if threshold is not None:
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
  if log_y:
    ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel("count")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small")
  if title:
    ax.set_title(title, fontsize="small")
  return _save(fig, path)
