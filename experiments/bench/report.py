"""Benchmark outputs: JSONL rows, a markdown table with the anchor ratio, and a PNG plot.

Every measurement (or refusal) is one JSON row with the fields in :data:`ROW_FIELDS`. ``status`` is ``"ok"``
(timed), ``"skipped"`` (the implementation raised ``NotImplementedError`` or cannot be meaningfully timed here;
``error`` says why), ``"oom"`` or ``"error"`` (the exception message in ``error``).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import subprocess
from typing import Iterable, Sequence

import jax

from jaxattn import backend as backend_lib

ANCHOR = "jax.nn/xla"  # the ratio column divides this anchor's time by each row's time
ROW_FIELDS = (
    "family", "impl", "source", "case", "B", "T", "S", "H", "G", "D", "dtype", "mask", "mode", "status", "ms",
    "q20_ms", "q80_ms", "tflops", "flops", "compile_s", "samples", "inner", "relerr", "error", "device_kind",
    "platform", "jax_version", "git_sha", "preset", "timestamp",
)


def git_sha() -> str:
  """``git rev-parse HEAD`` of the checkout holding this file; ``$JAXATTN_GIT_SHA`` overrides (for copies of the
  tree without ``.git``, e.g. on a device machine); ``"unknown"`` when neither is available."""
  if os.environ.get("JAXATTN_GIT_SHA"):
    return os.environ["JAXATTN_GIT_SHA"]
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pathlib.Path(__file__).resolve().parent,
                         capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  sha = out.stdout.strip()
  return sha if out.returncode == 0 and sha else "unknown"


def environment() -> dict:
  """Fields shared by every row of a run: device kind, platform, jax version and git sha."""
  return {"device_kind": jax.devices()[0].device_kind, "platform": backend_lib.platform(),
          "jax_version": jax.__version__, "git_sha": git_sha()}


def now() -> str:
  """UTC timestamp, ISO 8601 to the second."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> None:
  """Writes one JSON object per line (overwriting ``path``)."""
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """Reads the rows written by :func:`write_jsonl`."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def anchor_ratios(rows: Sequence[dict], anchor: str = ANCHOR) -> list[float | None]:
  """For each row, the anchor's median time over the row's median time in the same case and mode (> 1: faster
  than the anchor); None when either was not measured."""
  ref = {(r["case"], r["mode"]): r["ms"] for r in rows if r["impl"] == anchor and r["status"] == "ok"}
  out = []
  for r in rows:
    a = ref.get((r["case"], r["mode"]))
    out.append(a / r["ms"] if a is not None and r["status"] == "ok" and r["ms"] else None)
  return out


def _fmt(x, spec: str, missing: str = "–") -> str:
  return missing if x is None else format(x, spec)


def markdown_table(rows: Sequence[dict], anchor: str = ANCHOR, title: str | None = None,
                   flops_note: str = "fwd+bwd FLOPs = 3.5 x fwd.") -> str:
  """A markdown report: the timed rows as a table, then what was skipped or failed.

  Columns: case (shape and mask name; the full mask repr is in the JSONL), mode, impl, median ms, 0.2-0.8
  quantiles, TFLOP/s (from the exact mask area), ratio to the anchor (``anchor ms / ms``, measured in the same run)
  and the relative error of the forward output against the case's first measured implementation.
  """
  lines = []
  if rows:
    r0 = rows[0]
    lines.append(f"## {title or 'Benchmark'}")
    lines.append("")
    lines.append(f"device `{r0['device_kind']}` ({r0['platform']}), jax {r0['jax_version']}, git "
                 f"`{r0['git_sha'][:12]}`, preset `{r0.get('preset')}`. Ratio = `{anchor}` ms / ms (same run; "
                 f"> 1 is faster than the anchor). {flops_note}")
    lines.append("")
  lines.append("| case | mode | impl | ms | q20–q80 ms | TFLOP/s | ratio to anchor | relerr |")
  lines.append("|---|---|---|---:|---:|---:|---:|---:|")
  for r, ratio in zip(rows, anchor_ratios(rows, anchor)):
    if r["status"] != "ok":
      continue
    lines.append(f"| {r['case']} | {r['mode']} | {r['impl']} | {r['ms']:.3f} | "
                 f"{r['q20_ms']:.3f}–{r['q80_ms']:.3f} | {_fmt(r['tflops'], '.3g')} | {_fmt(ratio, '.2f')} | "
                 f"{_fmt(r['relerr'], '.1e')} |")
  other = {}
  for r in rows:
    if r["status"] != "ok":
      err = (r.get("error") or "").strip()
      key = (r["impl"], r["status"], err.splitlines()[0][:200] if err else "")
      other.setdefault(key, []).append(f"{r['case']}/{r['mode']}")
  if other:
    lines.append("")
    lines.append("Not measured:")
    lines.append("")
    for (impl, status, err), where in other.items():
      shown = ", ".join(where[:4]) + (f", ... ({len(where)} in all)" if len(where) > 4 else "")
      lines.append(f"- `{impl}` {status}: {err} [{shown}]")
  return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> None:
  """Grouped bar chart of median ms (log scale, 0.2-0.8 quantiles as error bars) per case and implementation,
  one panel per mode."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  ok = [r for r in rows if r["status"] == "ok"]
  modes = list(dict.fromkeys(r["mode"] for r in rows)) or ["fwd"]
  cases = list(dict.fromkeys(r["case"] for r in rows))
  impls = list(dict.fromkeys(r["impl"] for r in ok))
  width = max(6.0, 0.9 * len(cases) * max(1, len(impls)) * 0.35 + 2)
  fig, axes = plt.subplots(len(modes), 1, figsize=(width, 3.6 * len(modes)), squeeze=False)
  bar = 0.8 / max(1, len(impls))
  x = np.arange(len(cases))
  for ax, mode in zip(axes[:, 0], modes):
    for n, impl in enumerate(impls):
      sel = {r["case"]: r for r in ok if r["mode"] == mode and r["impl"] == impl}
      ms = np.array([sel[c]["ms"] if c in sel else np.nan for c in cases])
      lo = np.array([sel[c]["ms"] - sel[c]["q20_ms"] if c in sel else 0.0 for c in cases])
      hi = np.array([sel[c]["q80_ms"] - sel[c]["ms"] if c in sel else 0.0 for c in cases])
      ax.bar(x + (n - (len(impls) - 1) / 2) * bar, ms, bar, yerr=np.stack([lo, hi]), label=impl, capsize=2)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median)")
    ax.set_title(f"{title + ': ' if title else ''}{mode}")
    ax.set_xticks(x)
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    if impls:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
