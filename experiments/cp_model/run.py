"""``python -m experiments cp_model``: the context-parallel cost model over a preset (tables + plots, in seconds).

For every hardware, mask, sequence length ``T`` and device count ``P`` of the preset it writes one row per strategy
(ring with zigzag and with contiguous shards, all-gather with zigzag queries, Ulysses, USP) with the busiest device's
forward FLOPs (exact, from mask areas), the bytes one device sends forward and backward, the load imbalance, the ring
steps actually run, and the idealised forward and forward+backward times with their efficiency against perfectly
balanced, communication-free compute. Outputs in ``--out``: ``cp_model.jsonl``, ``cp_model.md`` (imbalance table,
a summary at the largest ``T``, the full table) and ``cp_model.png``.

**Multi-chip speed here is modelled, not measured** (see :mod:`experiments.cp_model.model` for the assumptions and
:mod:`experiments.cp_model.hardware` for every number's source).

Example::

  python -m experiments cp_model                      # default preset -> runs/cp_model/
  python -m experiments cp_model --preset tiny --out /tmp/cp
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Sequence

import numpy as np

from configs import cp_model as cp_configs
from jaxattn import masks as masks_lib

from experiments.common import config as config_lib
from experiments.cp_model import hardware as hw_lib
from experiments.cp_model import model

DEFAULT_OUT = pathlib.Path("runs/cp_model")  # git-ignored; the committed reference is experiments/results/cp_model/
# (strategy, layout) rows of every table
VARIANTS = (("ring", "zigzag"), ("ring", "contiguous"), ("all_gather", "zigzag"), ("ulysses", "-"), ("usp", "zigzag"))


def build_mask(kind: str, T: int, preset: cp_configs.CPModelPreset):
  """The static mask of ``kind`` for ``T`` tokens (None = full)."""
  if kind == "full":
    return None
  if kind == "causal":
    return masks_lib.Causal()
  if kind == "sliding_window":
    return masks_lib.sliding_window(preset.window)
  lens = masks_lib.sample_document_lengths(T, preset.doc_mean, seed=preset.seed)
  return masks_lib.causal_document(lens) if kind == "causal_document" else masks_lib.full_document(lens)


def compute_rows(preset: cp_configs.CPModelPreset) -> list[dict]:
  """All rows of the sweep (pure numpy; no jax device work)."""
  rows = []
  p_max = max(preset.devices)
  for T in preset.seq_lens:
    prob = model.Problem(preset.B, T, preset.H, preset.G, preset.D, preset.dtype_bytes)
    for kind in preset.masks:
      mask = build_mask(kind, T, preset)
      lo, hi = model.row_intervals(mask, T)
      fine = model.pair_areas(lo, hi, 2 * p_max)
      total = float(fine.sum())
      for P in preset.devices:
        A2P = model.coarsen(fine, 2 * P)
        imb = {lay: model.imbalance(model.device_pair_areas(A2P, P, lay).sum(1)) for lay in ("contiguous", "zigzag")}
        for hw_name in preset.hardware:
          hw = hw_lib.get(hw_name)
          ideal_fwd = model.ideal_seconds(prob, hw, total, P, "fwd")
          ideal_fb = model.ideal_seconds(prob, hw, total, P, "fwd+bwd")
          for strategy, layout in VARIANTS:
            est = model.estimate(strategy, prob, hw, A2P, P, "zigzag" if layout == "-" else layout)
            rows.append({
                "hardware": hw_name, "mask": kind, "T": T, "P": P, "strategy": strategy, "layout": layout,
                "feasible": est.feasible, "note": est.note, "area": total,
                "tflop_fwd_max": est.flops_fwd_max / 1e12, "gb_sent_fwd": est.bytes_fwd / 1e9,
                "gb_sent_bwd": est.bytes_bwd / 1e9, "imbalance": est.imbalance,
                "imbalance_contiguous": imb["contiguous"], "imbalance_zigzag": imb["zigzag"], "steps": est.steps,
                "ms_fwd": est.t_fwd * 1e3, "ms_fwd_bwd": est.t_fwd_bwd * 1e3, "ideal_ms_fwd": ideal_fwd * 1e3,
                "ideal_ms_fwd_bwd": ideal_fb * 1e3,
                "efficiency": (ideal_fb / est.t_fwd_bwd) if est.feasible and est.t_fwd_bwd > 0 else float("nan"),
                "kv_resident_mb": est.kv_resident / 1e6, "B": preset.B, "H": preset.H, "G": preset.G,
                "D": preset.D, "preset": preset.name})
  return rows


# ---------------------------------------------------------------------------------------------------- reports
def _tok(T: int) -> str:
  return f"{T // 1048576}M" if T % 1048576 == 0 else (f"{T // 1024}K" if T % 1024 == 0 else str(T))


def _num(x, spec) -> str:
  return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def _name(r) -> str:
  return r["strategy"] + ("" if r["layout"] in ("-", "zigzag") else f" ({r['layout']})")


def markdown(rows: Sequence[dict], preset: cp_configs.CPModelPreset) -> str:
  """The report: assumptions, imbalance table, summary at the largest T, full table."""
  T_max = max(preset.seq_lens)
  out = [f"# Context-parallel cost model (`{preset.name}` preset)", "",
         "**Modelled, not measured.** Multi-chip speed in this project comes from this model (exact per-device work "
         "from mask areas, bandwidth + latency links, sustained kernel rates); no multi-device run was timed.", "",
         f"Problem: B={preset.B}, H={preset.H} query heads, G={preset.G} kv heads, D={preset.D}, "
         f"{8 * preset.dtype_bytes}-bit inputs; sliding window {preset.window}; documents log-normal around "
         f"{preset.doc_mean} tokens. Times are one attention layer, forward and forward+backward (backward = 2.5x "
         "forward FLOPs). Efficiency = perfectly balanced communication-free compute / modelled time.", "",
         "| hardware | fwd TF/s | bwd TF/s | links | source |", "|---|---|---|---|---|"]
  for h in preset.hardware:
    hw = hw_lib.get(h)
    links = (f"ICI {hw.intra_gbps:g} GB/s x {hw.links} (torus)" if hw.torus else
             f"NVLink {hw.intra_gbps:g} GB/s, {hw.node_size}/node; IB {hw.inter_gbps:g} GB/s")
    out.append(f"| {hw.name} | {hw.attn_tflops_fwd:g} | {hw.attn_tflops_bwd:g} | {links} | {hw.source} |")

  out += ["", f"## Load imbalance (max / mean attended area per device), T = {_tok(T_max)}", "",
          "| mask | " + " | ".join(f"P={P} contiguous | P={P} zigzag" for P in preset.devices) + " |",
          "|---|" + "---|---|" * len(preset.devices)]
  for kind in preset.masks:
    cells = []
    for P in preset.devices:
      r = next(x for x in rows if x["mask"] == kind and x["P"] == P and x["T"] == T_max)
      cells += [f"{r['imbalance_contiguous']:.3f}", f"{r['imbalance_zigzag']:.3f}"]
    out.append(f"| {kind} | " + " | ".join(cells) + " |")

  for h in preset.hardware:
    out += ["", f"## {hw_lib.get(h).name}: forward+backward ms (efficiency), T = {_tok(T_max)}", "",
            "| mask | strategy | " + " | ".join(f"P={P}" for P in preset.devices) + " |",
            "|---|---|" + "---|" * len(preset.devices)]
    for kind in preset.masks:
      for strategy, layout in VARIANTS:
        cells = []
        for P in preset.devices:
          r = next(x for x in rows if (x["hardware"], x["mask"], x["T"], x["P"], x["strategy"], x["layout"])
                   == (h, kind, T_max, P, strategy, layout))
          cells.append(f"{r['ms_fwd_bwd']:.3g} ({100 * r['efficiency']:.0f}%)" if r["feasible"] else
                       f"n/a ({r['note']})")
        name = strategy + ("" if layout in ("-", "zigzag") else f" ({layout})")
        out.append(f"| {kind} | {name} | " + " | ".join(cells) + " |")

  out += ["", "## All rows", "",
          "| hardware | mask | T | P | strategy | TFLOP fwd (max dev) | GB sent fwd / bwd | imbalance | steps | "
          "ms fwd | ms fwd+bwd | ideal ms | eff. | K/V held MB | note |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['hardware']} | {r['mask']} | {_tok(r['T'])} | {r['P']} | {_name(r)} | "
               f"{_num(r['tflop_fwd_max'], '.3g')} | "
               f"{_num(r['gb_sent_fwd'], '.3g')} / {_num(r['gb_sent_bwd'], '.3g')} | "
               f"{_num(r['imbalance'], '.3f')} | {r['steps'] or '-'} | {_num(r['ms_fwd'], '.3g')} | "
               f"{_num(r['ms_fwd_bwd'], '.3g')} | {_num(r['ideal_ms_fwd_bwd'], '.3g')} | "
               f"{_num(100 * r['efficiency'], '.0f')}% | {_num(r['kv_resident_mb'], '.4g')} | {r['note']} |")
  return "\n".join(out) + "\n"


def plot(rows: Sequence[dict], preset: cp_configs.CPModelPreset, path) -> None:
  """Top: fwd+bwd time vs T (causal, middle P) per hardware. Bottom: efficiency vs P at the largest T (causal), and
  the imbalance with and without zigzag."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  hws = list(preset.hardware)
  P_mid = sorted(preset.devices)[len(preset.devices) // 2]
  T_max = max(preset.seq_lens)
  kind = "causal" if "causal" in preset.masks else preset.masks[0]
  fig, axes = plt.subplots(2, len(hws) + 1, figsize=(4.2 * (len(hws) + 1), 7.2), squeeze=False)
  for col, h in enumerate(hws):
    ax, ax2 = axes[0, col], axes[1, col]
    for strategy, layout in VARIANTS:
      sel = [r for r in rows if (r["hardware"], r["mask"], r["strategy"], r["layout"]) == (h, kind, strategy, layout)]
      style = "--" if layout == "contiguous" else "-"
      name = strategy + ("" if layout in ("-", "zigzag") else f" ({layout})")
      pts = sorted((r["T"], r["ms_fwd_bwd"]) for r in sel if r["P"] == P_mid and r["feasible"])
      if pts:
        ax.plot(*zip(*pts), style, marker="o", label=name)
      pts = sorted((r["P"], r["efficiency"]) for r in sel if r["T"] == T_max and r["feasible"])
      if pts:
        ax2.plot(*zip(*pts), style, marker="o", label=name)
    ideal = sorted({(r["T"], r["ideal_ms_fwd_bwd"]) for r in rows
                    if (r["hardware"], r["mask"], r["P"]) == (h, kind, P_mid)})
    ax.plot(*zip(*ideal), ":", color="gray", label="ideal")
    ax.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="fwd+bwd ms (modelled)",
           title=f"{hw_lib.get(h).name}\n{kind}, P={P_mid}")
    ax2.set(xscale="log", xlabel="P (devices)", ylabel="efficiency (modelled)", ylim=(0, 1.05),
            title=f"{kind}, T={_tok(T_max)}")
    for a in (ax, ax2):
      a.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  ax = axes[0, -1]
  kinds = [k for k in preset.masks if k != "full"]
  x = np.arange(len(kinds) * len(preset.devices))
  labels, cont, zig = [], [], []
  for k in kinds:
    for P in preset.devices:
      r = next(r for r in rows if r["mask"] == k and r["P"] == P and r["T"] == T_max)
      labels.append(f"{k}\nP={P}")
      cont.append(r["imbalance_contiguous"])
      zig.append(r["imbalance_zigzag"])
  ax.bar(x - 0.2, cont, 0.4, label="contiguous")
  ax.bar(x + 0.2, zig, 0.4, label="zigzag")
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.set_xticks(x)
  ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=6)
  ax.set(ylabel="max / mean area", title=f"load imbalance, T={_tok(T_max)}")
  ax.legend(fontsize=7)
  axes[1, -1].axis("off")
  axes[1, -1].text(0.0, 0.5, "Modelled, not measured:\nexact per-device FLOPs from mask areas,\nlinks = bandwidth + "
                   "latency,\nkernels at sustained rates\n(experiments/cp_model/hardware.py).", fontsize=9,
                   va="center")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  parser = config_lib.ArgumentParser(prog="python -m experiments cp_model", description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="default", choices=sorted(cp_configs.PRESETS),
                      help="; ".join(f"{p.name}: {p.description}" for p in cp_configs.PRESETS.values()))
  parser.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default: %(default)s)")
  parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
  args = parser.parse_args(argv)
  preset = cp_configs.PRESETS[args.preset]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  rows = compute_rows(preset)
  with open(out / "cp_model.jsonl", "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  text = markdown(rows, preset)
  (out / "cp_model.md").write_text(text)
  if not args.no_plot:
    plot(rows, preset, out / "cp_model.png")
  summary = text.split("## All rows")[0]
  print(summary)
  print(f"{len(rows)} rows in {time.perf_counter() - t0:.1f} s -> {out}")
  return 0
