"""The linear-attention family of ``python -m experiments bench`` (presets ``linear_*``).

Times ``jaxattn.linear_attention`` (causal, with a decay) for every implementation in
``jaxattn.ops.linear.api.BACKENDS`` side by side, for each shape and decay kind of a
:class:`configs.bench.LinearBenchPreset`, in the modes ``fwd`` (the output) and ``fwd+bwd`` (gradients of
``sum(out)`` w.r.t. q, k, v and the log decay). The ratio column is against our own ``"xla"`` path (the issue's
"at least 5x faster than our xla path"); flash-linear-attention is PyTorch and runs in its own process from the
device scripts. Rules as the softmax family: Pallas kernels for another platform (on CPU: interpret mode) are
recorded as skipped unless named in ``--impls``; ``"reference"`` (a per-token ``lax.scan``) only with
``--include-reference``; ``NotImplementedError`` is a skip, other exceptions are recorded and the run goes on.

FLOPs (a convention, so TFLOP/s compares across implementations and chunk sizes): the recurrent form's
``fwd = 4 B T H D E`` (per token and head, the state update ``k v^T`` and the read ``q^T S``), and
``fwd+bwd = 3 x fwd`` (the backward has twice the forward's products: dq, dk, dv and the state cotangent).
Chunked kernels execute more (their intra-chunk ``C x C`` products), so TFLOP/s here measures useful work.

Example::

  python -m experiments bench --preset linear_gpu --impls xla,pallas_gpu --budget-s 300
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from tqdm import tqdm

import jaxattn
from configs.bench import LINEAR_PRESETS, LinearBenchPreset, LinearBenchShape
from jaxattn import backend as backend_lib
from jaxattn.ops.linear import api as linear_api

from experiments.bench import report, timing

FAMILY = "linear"
ANCHOR = "xla"
BWD_FACTOR = 2.0
FLOPS_NOTE = "FLOPs: recurrent form, fwd = 4 B T H D E, fwd+bwd = 3 x fwd."

__all__ = ["FAMILY", "ANCHOR", "LinearCase", "linear_flops", "cases", "available_impls", "run_bench", "main"]


@dataclasses.dataclass(frozen=True)
class LinearCase:
  """One timed problem: a shape and a decay kind."""

  shape: LinearBenchShape
  decay: str

  @property
  def name(self) -> str:
    """``<shape>_<decay>``, e.g. ``b2_t8192_head``."""
    return f"{self.shape.name}_{self.decay}"


def linear_flops(B: int, T: int, H: int, D: int, E: int | None = None, mode: str = "fwd") -> float:
  """Recurrent-form FLOPs of one causal linear-attention call (see the module docstring)."""
  if mode not in timing.MODES:
    raise ValueError(f"mode must be one of {timing.MODES}, got {mode!r}")
  fwd = 4.0 * B * T * H * D * (D if E is None else E)
  return fwd if mode == "fwd" else fwd * (1.0 + BWD_FACTOR)


def cases(preset: LinearBenchPreset) -> list[LinearCase]:
  """Every (shape, decay kind) pair of ``preset`` in order."""
  return [LinearCase(s, d) for s in preset.shapes for d in s.decays]


@dataclasses.dataclass(frozen=True)
class Impl:
  """One timed implementation: ``build(case) -> fn(q, k, v, log_decay) -> out`` (may raise NotImplementedError)."""

  name: str
  source: str
  build: Callable


def _ours(name: str, case: LinearCase) -> Callable:
  return functools.partial(jaxattn.linear_attention, implementation=name)


def available_impls(include_reference: bool = False, requested: Sequence[str] | None = None) -> list[Impl]:
  """Our implementations in registry order (see the module docstring for what is skipped).

  Raises:
    ValueError: for a requested name that is not registered.
  """
  plat = backend_lib.platform()
  impls = []
  for name in linear_api.BACKENDS:
    asked = bool(requested) and name in requested
    if name == "reference" and not include_reference and not asked:
      continue
    kernel_plat = name.split("_", 1)[1] if name.startswith("pallas_") else None
    if kernel_plat is not None and kernel_plat != plat and not asked:
      why = (f"{name} on a {plat} backend would run in interpret mode (timings meaningless); "
             f"name it in --impls to time it anyway")
      impls.append(Impl(name, "jaxattn", functools.partial(timing.refuse, why)))
    else:
      impls.append(Impl(name, "jaxattn", functools.partial(_ours, name)))
  if requested:
    by_name = {i.name: i for i in impls}
    unknown = [n for n in requested if n not in by_name]
    if unknown:
      raise ValueError(f"unknown implementation(s) {unknown}; available here: {list(by_name)}")
    impls = [by_name[n] for n in requested]
  return impls


def _inputs(case: LinearCase, seed: int = 0):
  """q, k, v (normal, the shape's dtype) and the log decay of the case's kind (f32, <= 0) or None."""
  s = case.shape
  dtype = jnp.dtype(s.dtype)
  kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (s.B, s.T, s.H, s.D), dtype)
  k = jax.random.normal(kk, (s.B, s.T, s.G, s.D), dtype)
  v = jax.random.normal(kv, (s.B, s.T, s.G, s.E), dtype)
  if case.decay == "none":
    g = None
  elif case.decay == "head":
    g = -(2.0 ** (-8.0 * (jnp.arange(s.H, dtype=jnp.float32) + 1) / s.H))
  else:
    g = jax.nn.log_sigmoid(jax.random.normal(kg, (s.B, s.T, s.H), jnp.float32)) / 16
  return q, k, v, g


def _make_step(fn: Callable, mode: str, has_decay: bool) -> Callable:
  """Jits ``fn(q, k, v, log_decay=...)``: the output, or the gradients of ``sum(out)`` (incl. the log decay)."""
  call = lambda q, k, v, g: fn(q, k, v, log_decay=g)
  if mode == "fwd":
    return jax.jit(call)
  argnums = (0, 1, 2, 3) if has_decay else (0, 1, 2)
  return jax.jit(jax.grad(lambda q, k, v, g: jnp.sum(call(q, k, v, g).astype(jnp.float32)), argnums=argnums))


def run_bench(preset: LinearBenchPreset, *, modes: Sequence[str] = timing.MODES, impls: Sequence[Impl] | None = None,
              repeats: int | None = None, warmup: int | None = None, budget_s: float | None = None,
              progress: bool = True) -> list[dict]:
  """Times every case of ``preset`` with every implementation (arguments as ``run.run_bench``).

  Returns:
    The rows (:data:`report.ROW_FIELDS`, ``family="linear"``, ``S = T``, the decay kind in ``mask``).
  """
  for m in modes:
    if m not in timing.MODES:
      raise ValueError(f"mode must be one of {timing.MODES}, got {m!r}")
  impls = available_impls() if impls is None else list(impls)
  repeats = preset.repeats if repeats is None else repeats
  warmup = preset.warmup if warmup is None else warmup
  env = report.environment()
  rows = []
  t_start = time.perf_counter()
  bar = tqdm(cases(preset), desc=f"bench[{preset.name}]", unit="case", disable=not progress, file=sys.stderr)
  for case in bar:
    s = case.shape
    over_budget = budget_s is not None and time.perf_counter() - t_start > budget_s
    inputs = None if over_budget else _inputs(case)
    for mode in modes:
      fl = linear_flops(s.B, s.T, s.H, s.D, s.E, mode=mode)
      base = None
      for impl in impls:
        row = dict(family=FAMILY, impl=impl.name, source=impl.source, case=case.name, B=s.B, T=s.T, S=s.T, H=s.H,
                   G=s.G, D=s.D, dtype=s.dtype, mask=f"decay={case.decay}", mode=mode, status="ok", ms=None,
                   q20_ms=None, q80_ms=None, tflops=None, flops=fl, compile_s=None, samples=None, inner=None,
                   relerr=None, error=None, **env, preset=preset.name)
        if over_budget:
          row.update(status="skipped", error=f"time budget of {budget_s:g} s exhausted")
        else:
          bar.set_postfix_str(f"{mode} {impl.name}")
          out = timing.measure_into(row, impl.build, case, mode, inputs, flops=fl, repeats=repeats, warmup=warmup,
                                    step_fn=functools.partial(_make_step, has_decay=inputs[3] is not None))
          if out is not None and mode == "fwd":
            if base is None:
              base = out
            else:
              row["relerr"] = timing.relative_error(out, base)
          del out
        row["timestamp"] = report.now()
        rows.append(row)
    del inputs
  bar.close()
  return rows


def write_outputs(rows: Sequence[dict], out_dir, title: str | None = None) -> str:
  """``bench.jsonl``, ``bench.md`` (ratio to ``"xla"``) and ``bench.png`` in ``out_dir``; returns the markdown."""
  import pathlib
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  report.write_jsonl(rows, out_dir / "bench.jsonl")
  table = report.markdown_table(rows, anchor=ANCHOR, title=title, flops_note=FLOPS_NOTE)
  (out_dir / "bench.md").write_text(table)
  report.plot(rows, out_dir / "bench.png", title=title)
  return table


def main(args, parser) -> int:
  """Runs a ``linear_*`` preset with the parsed ``python -m experiments bench`` arguments."""
  import pathlib
  preset = LINEAR_PRESETS[args.preset]
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  try:
    impls = available_impls(args.include_reference,
                            [x.strip() for x in args.impls.split(",") if x.strip()] if args.impls else None)
  except ValueError as e:
    parser.error(str(e))
  out_dir = pathlib.Path(args.out) if args.out else pathlib.Path("experiments/results/bench") / preset.name
  t0 = time.perf_counter()
  rows = run_bench(preset, modes=modes, impls=impls, repeats=args.repeats, warmup=args.warmup,
                   budget_s=args.budget_s, progress=not args.no_progress)
  wall = time.perf_counter() - t0
  title = f"{FAMILY} attention, preset {preset.name}, {rows[0]['device_kind'] if rows else '?'}"
  print(write_outputs(rows, out_dir, title=title))
  n_ok = sum(r["status"] == "ok" for r in rows)
  print(f"{n_ok}/{len(rows)} measurements in {wall:.1f} s; outputs in {out_dir}/ (bench.jsonl, bench.md, "
        f"bench.png)")
  return 0
