"""``python -m experiments decode_bench``: decode-step time against context length, dense vs ``K = L/8`` sparse.

For every cache length ``L`` of the preset it times one :func:`jaxattn.decode_attention` step (one query token per
sequence, GQA) over the whole cache and over ``K = L / sparse_ratio`` gathered keys (whole pages, as Quest selects,
and scattered tokens, as a top-k selection gives), for each backend of the platform (``xla`` everywhere; the Pallas
kernel of a GPU or TPU), next to ``jax.nn.dot_product_attention`` with a one-token query. Decode is memory-bound: the
Recycled Attention / Sparse Frontier claim is that a ``K``-key step costs about ``K / L`` of a dense one; the
verdict checks the issue's target ``sparse <= 1.5 * (K / L) * dense`` at the largest length. Outputs in ``--out``
(default ``runs/decode_bench/<preset>``): ``results.jsonl``, ``results.md`` (also printed), ``decode_time.png``.

Example::

  python -m experiments decode_bench                 # CPU preset -> runs/decode_bench/cpu/
  python -m experiments decode_bench --preset gpu    # on a GPU / TPU
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from configs import decode_bench as cfg_lib
from experiments.bench.timing import time_fn
from experiments.common import config as config_lib
from experiments.common.paths import default_out_dir
from jaxattn import backend as backend_lib
from jaxattn.ops.decode import decode_attention

TARGET = 1.5  # sparse <= TARGET * (K / L) * dense (issue 14; memory bound at L >= 32K on a GPU)


def backends() -> tuple[str, ...]:
  """The decode backends worth timing on this platform (interpret-mode kernels are not)."""
  kernel = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend_lib.platform())
  return ("xla",) if kernel is None else ("xla", kernel)


def make_case(p: cfg_lib.DecodeBenchPreset, L: int, seed: int = 0):
  """``(q [B, H, D], k, v [B, L, G, D], lengths [B], {layout: index [B, G, K]})`` with random, never-zero data."""
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  dt = jnp.dtype(p.dtype)
  q = jax.random.normal(kq, (p.B, p.H, p.D), dt)
  k = jax.random.normal(kk, (p.B, L, p.G, p.D), dt)
  v = jax.random.normal(kv, (p.B, L, p.G, p.D), dt)
  lengths = jnp.full((p.B,), L, jnp.int32)
  K = L // p.sparse_ratio
  rng = np.random.default_rng(seed)
  index = {}
  if "pages" in p.layouts:
    n_pages = L // p.page
    pages = np.sort(np.stack([[rng.choice(n_pages, K // p.page, replace=False) for _ in range(p.G)]
                              for _ in range(p.B)]), -1)  # [B, G, K / page]
    index["pages"] = jnp.asarray((pages[..., None] * p.page + np.arange(p.page)).reshape(p.B, p.G, K), jnp.int32)
  if "tokens" in p.layouts:
    index["tokens"] = jnp.asarray(np.sort(np.stack([[rng.choice(L, K, replace=False) for _ in range(p.G)]
                                                    for _ in range(p.B)]), -1), jnp.int32)
  return q, k, v, lengths, index


def _anchor(q, k, v):
  """``jax.nn.dot_product_attention`` with a one-token query (it takes GQA directly)."""
  return jax.nn.dot_product_attention(q[:, None], k, v)[:, 0]


def compute_rows(p: cfg_lib.DecodeBenchPreset, *, progress: bool = True) -> list[dict]:
  rows = []
  device = jax.devices()[0].device_kind
  names = backends()
  total = len(p.lengths) * (len(names) * (1 + len(p.layouts)) + 1)
  done, t0 = 0, time.perf_counter()
  for L in p.lengths:
    q, k, v, lengths, index = make_case(p, L)
    K = L // p.sparse_ratio
    cases = [("jax.nn", "dense", jax.jit(_anchor), (q, k, v), L)]
    for name in names:
      cases.append((name, "dense", jax.jit(lambda q, k, v, n, name=name: decode_attention(
          q, k, v, lengths=n, implementation=name)), (q, k, v, lengths), L))
      for lay, idx in index.items():
        cases.append((name, lay, jax.jit(lambda q, k, v, i, name=name: decode_attention(
            q, k, v, index=i, implementation=name)), (q, k, v, idx), K))
    for impl, layout, fn, args, keys in cases:
      timing, _ = time_fn(fn, *args, repeats=p.repeats, warmup=1)
      gb = 2 * p.B * keys * p.G * p.D * jnp.dtype(p.dtype).itemsize / 1e9  # K and V bytes read
      rows.append(dict(preset=p.name, device_kind=device, impl=impl, layout=layout, L=L, keys=keys, ms=timing.ms,
                       q20_ms=timing.q20_ms, q80_ms=timing.q80_ms, gb_per_s=gb / (timing.ms / 1e3)))
      done += 1
      if progress:
        el = time.perf_counter() - t0
        print(f"[{done}/{total}, {el:.0f} s, ETA {el / done * (total - done):.0f} s] L={L} {impl} {layout}: "
              f"{timing.ms:.3f} ms", flush=True)
  return rows


def verdict(rows: list[dict], p: cfg_lib.DecodeBenchPreset) -> str:
  L = max(p.lengths)
  parts = []
  for name in backends():
    dense = next(r["ms"] for r in rows if r["impl"] == name and r["L"] == L and r["layout"] == "dense")
    for lay in p.layouts:
      sp = next(r["ms"] for r in rows if r["impl"] == name and r["L"] == L and r["layout"] == lay)
      ratio = sp / dense
      ok = ratio <= TARGET / p.sparse_ratio
      parts.append(f"{name}/{lay}: sparse/dense = {ratio:.3f} ({'within' if ok else 'above'} "
                   f"{TARGET}*K/L = {TARGET / p.sparse_ratio:.3f})")
  hit = all("within" in s for s in parts)
  some = any("within" in s for s in parts)
  head = "reproduced" if hit else ("partly reproduced" if some else "not reproduced")
  return (f"verdict: {head} at L={L} on {rows[0]['device_kind']}: " + "; ".join(parts) +
          " (claim: a decode step over K keys costs ~K/L of a dense step, being memory bound)")


def markdown(rows: list[dict], p: cfg_lib.DecodeBenchPreset) -> str:
  layouts = ("dense",) + tuple(p.layouts)
  lines = [f"# Decode-step time, preset {p.name} ({rows[0]['device_kind']})", "", p.description, "",
           f"B={p.B}, H={p.H}, G={p.G}, D={p.D}, {p.dtype}; sparse: K = L/{p.sparse_ratio} keys per kv head "
           f"(pages of {p.page} tokens, or scattered tokens). Median ms (K/V read bandwidth, GB/s).", "",
           "| L | impl | " + " | ".join(layouts) + " | sparse / dense |", "|---|---|" + "---:|" * (len(layouts) + 1)]
  for L in p.lengths:
    for impl in ("jax.nn",) + backends():
      got = {r["layout"]: r for r in rows if r["L"] == L and r["impl"] == impl}
      cells = [f"{got[lay]['ms']:.3f} ({got[lay]['gb_per_s']:.0f})" if lay in got else "—" for lay in layouts]
      ratio = " / ".join(f"{got[lay]['ms'] / got['dense']['ms']:.2f}" for lay in p.layouts if lay in got)
      lines.append(f"| {L} | {impl} | " + " | ".join(cells) + f" | {ratio or '—'} |")
  lines += ["", f"Ideal sparse / dense = K/L = {1 / p.sparse_ratio:.3f}; target <= {TARGET / p.sparse_ratio:.3f}.",
            "", verdict(rows, p)]
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], p: cfg_lib.DecodeBenchPreset, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for impl in ("jax.nn",) + backends():
    for lay in ("dense",) + tuple(p.layouts):
      pts = sorted((r["L"], r["ms"]) for r in rows if r["impl"] == impl and r["layout"] == lay)
      if pts:
        ax.plot(*zip(*pts), "o-" if lay == "dense" else "s--", label=f"{impl} {lay}")
  ax.set(xscale="log", yscale="log", xlabel="cache length L", ylabel="ms per decode step",
         title=f"decode step, K = L/{p.sparse_ratio} sparse ({rows[0]['device_kind']})")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  parser = config_lib.ArgumentParser(prog="python -m experiments decode_bench", description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="cpu", choices=sorted(cfg_lib.PRESETS),
                      help="; ".join(f"{q.name}: {q.description}" for q in cfg_lib.PRESETS.values()))
  parser.add_argument("--out", default=None, help="output directory (default: runs/decode_bench/<preset>)")
  parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
  parser.add_argument("--no-progress", action="store_true", help="no per-case lines")
  args = parser.parse_args(argv)
  p = cfg_lib.PRESETS[args.preset]
  out = pathlib.Path(args.out) if args.out else default_out_dir("decode_bench", p.name)
  out.mkdir(parents=True, exist_ok=True)
  rows = compute_rows(p, progress=not args.no_progress)
  with open(out / "results.jsonl", "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  text = markdown(rows, p)
  (out / "results.md").write_text(text)
  if not args.no_plot:
    plot(rows, p, out / "decode_time.png")
  print(text)
  print(f"-> {out}")
  return 0
