"""Landmark attention kernel timing next to dense causal attention, in one process (for one GPU device call).

``python -m experiments.passkey.bench_kernels [--smoke] [--out DIR]`` times, for bf16, H = 16, D = 128,
``B x T in {2 x 8192, 1 x 32768}``, forward and forward+backward (jit, warm-up, median of repeats,
``block_until_ready``):

- ``landmark/pallas_gpu`` at block 64 and 128 (:func:`jaxattn.landmark_attention`),
- ``landmark/xla`` at block 64 (the pure-JAX path),
- ``dense-causal/cudnn``: ``jax.nn.dot_product_attention(is_causal=True, implementation="cudnn")``,
- ``dense-causal/pallas_gpu``: :func:`jaxattn.softmax_attention` with ``masks.Causal()``,

and writes ``landmark_bench.jsonl`` / ``landmark_bench.md`` (with the landmark / cuDNN time ratio) to ``--out``
(default ``runs/passkey``). ``--smoke`` runs tiny shapes with the xla paths only (a wiring check on
CPU; CPU timings mean nothing). Implementations that cannot run are recorded with their error.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn import masks

DEFAULT_OUT = pathlib.Path("runs/passkey")  # git-ignored; the committed reference is experiments/results/passkey/


def _impls(smoke: bool) -> dict[str, Callable]:
  lm = lambda impl, bs: (lambda q, k, v: jaxattn.landmark_attention(q, k, v, block_size=bs, implementation=impl))
  if smoke:
    return {"landmark/xla bs64": lm("xla", 64),
            "dense-causal/xla": lambda q, k, v: jaxattn.softmax_attention(q, k, v, mask=masks.Causal(),
                                                                         implementation="xla")}
  return {
      "landmark/pallas_gpu bs64": lm("pallas_gpu", 64),
      "landmark/pallas_gpu bs128": lm("pallas_gpu", 128),
      "landmark/xla bs64": lm("xla", 64),
      "dense-causal/cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                         implementation="cudnn"),
      "dense-causal/pallas_gpu": lambda q, k, v: jaxattn.softmax_attention(q, k, v, mask=masks.Causal(),
                                                                           implementation="pallas_gpu"),
  }


def _time(fn, args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm-up
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return statistics.median(ts) * 1e3


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.passkey.bench_kernels", description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny shapes, xla paths only (CPU wiring check)")
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  args = p.parse_args(argv)
  shapes = [(1, 256, 2, 32)] if args.smoke else [(2, 8192, 16, 128), (1, 32768, 16, 128)]
  device = jax.devices()[0].device_kind
  rows = []
  for B, T, H, D in shapes:
    key = jax.random.key(0)
    q, k, v = (jax.random.normal(kk, (B, T, H, D), jnp.bfloat16) for kk in jax.random.split(key, 3))
    for name, attn in _impls(args.smoke).items():
      for mode in ("fwd", "fwd+bwd"):
        if mode == "fwd":
          fn = jax.jit(attn)
        else:
          fn = jax.jit(jax.grad(lambda q, k, v, attn=attn: jnp.sum(attn(q, k, v).astype(jnp.float32)), (0, 1, 2)))
        row = dict(impl=name, B=B, T=T, H=H, D=D, dtype="bfloat16", mode=mode, device=device,
                   jax_version=jax.__version__)
        try:
          row["ms"] = round(_time(fn, (q, k, v), args.reps), 3)
        except Exception as e:  # noqa: BLE001 - record and go on (unsupported backend, OOM, ...)
          row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "landmark_bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  ref = {(r["B"], r["T"], r["mode"]): r.get("ms") for r in rows
         if r["impl"] in ("dense-causal/cudnn", "dense-causal/xla")}
  lines = [f"Device: {device}, jax {jax.__version__}, bf16, median of {args.reps}.", "",
           "| impl | B x T | mode | ms | / dense causal |", "|---|---|---|---|---|"]
  for r in rows:
    base = ref.get((r["B"], r["T"], r["mode"]))
    ratio = f"{r['ms'] / base:.2f}x" if "ms" in r and base else ""
    lines.append(f"| {r['impl']} | {r['B']} x {r['T']} | {r['mode']} | {r.get('ms', r.get('error', ''))} | {ratio} |")
  (args.out / "landmark_bench.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
