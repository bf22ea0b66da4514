"""``python -m experiments bench``: time attention implementations side by side with the anchors.

For every case of a preset (a shape and a mask) and every mode (``fwd``, ``fwd+bwd``), each implementation that
can serve it is jitted, warmed up and timed (:mod:`timing`). Implementations are

- ours: every id in ``jaxattn.ops.softmax.api.BACKENDS`` at run time (``"reference"`` only with
  ``--include-reference``), called through ``jaxattn.softmax_attention(..., implementation=id)``. Pallas kernels
  for another platform (on CPU: both, which would run in interpret mode, whose timings mean nothing) are recorded
  as skipped unless named in ``--impls``;
- anchors: ``jax.nn.dot_product_attention`` with ``implementation="xla"`` everywhere and ``"cudnn"`` on GPU
  (plus ``tokamax.dot_product_attention`` on GPU where it is installed), for the masks they express (full,
  ``Causal(0)`` via ``is_causal``, ``Local(offset=0)`` via ``local_window_size``).

An implementation that raises ``NotImplementedError`` is recorded as skipped; out-of-memory and other errors are
recorded with their message and the run goes on. Outputs go to ``--out`` (default ``runs/bench/<preset>/``, which
git ignores; the committed reference tables in ``experiments/results/bench/`` are overwritten only when named with
``--out``): ``bench.jsonl``, ``bench.md`` and ``bench.png``; the markdown table is printed at the end.

Example::

  python -m experiments bench --preset gpu --modes fwd --impls xla,cudnn,jax.nn/xla --budget-s 300
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from tqdm import tqdm

import jaxattn
from jaxattn import backend as backend_lib
from jaxattn.masks import Causal, Full, Local
from jaxattn.ops.softmax import api as softmax_api

from configs.bench import LINEAR_PRESETS
from experiments.bench import flops as flops_lib
from experiments.bench import registry, report, timing
from experiments.common import config as config_lib
from experiments.common.paths import default_out_dir

FAMILY = "softmax"


@dataclasses.dataclass(frozen=True)
class Impl:
  """One timed implementation.

  Attributes:
    name: row id (``"xla"``, ``"jax.nn/cudnn"``, ...).
    source: ``"jaxattn"`` or ``"anchor"``.
    build: ``case -> fn(q, k, v) -> out``; raises ``NotImplementedError`` when it cannot serve the case (at
      build time or when traced).
  """

  name: str
  source: str
  build: Callable


# ------------------------------------------------------------------------------------------------ implementations
def _ours(name: str, case: registry.Case) -> Callable:
  mask = None if isinstance(case.mask, Full) else case.mask
  return functools.partial(jaxattn.softmax_attention, mask=mask, implementation=name)


def _jax_nn_mask_kwargs(mask) -> dict:
  """``is_causal`` / ``local_window_size`` for the masks ``jax.nn.dot_product_attention`` expresses."""
  if isinstance(mask, Full):
    return {}
  if isinstance(mask, Causal) and mask.offset == 0:
    return {"is_causal": True}
  if isinstance(mask, Local) and mask.offset == 0:
    return {"is_causal": mask.right == 0, "local_window_size": (mask.left, mask.right)}
  raise NotImplementedError(f"jax.nn.dot_product_attention anchor: no {mask!r} (full, Causal(0) and "
                            f"Local(offset=0) only)")


def _jax_nn(implementation: str, case: registry.Case) -> Callable:
  kwargs = _jax_nn_mask_kwargs(case.mask)
  if implementation == "cudnn" and case.shape.dtype == "float32":
    raise NotImplementedError("cuDNN attention needs bf16/f16")
  return functools.partial(jax.nn.dot_product_attention, implementation=implementation, **kwargs)


def _tokamax(case: registry.Case) -> Callable:
  import tokamax  # only listed when importable
  mask = case.mask
  if isinstance(mask, Full):
    causal = False
  elif isinstance(mask, Causal) and mask.offset == 0:
    causal = True
  else:
    raise NotImplementedError(f"tokamax anchor: full and Causal(0) only, not {mask!r}")
  return functools.partial(tokamax.dot_product_attention, is_causal=causal)


def _tokamax_installed() -> bool:
  try:
    import tokamax  # noqa: F401
  except Exception:  # noqa: BLE001 - any import failure means "not available"
    return False
  return True


def available_impls(include_reference: bool = False, requested: Sequence[str] | None = None) -> list[Impl]:
  """Implementations to time, in order: ours (registry order), then the anchors.

  Args:
    include_reference: also time the dense ``"reference"``.
    requested: names from ``--impls``; when given, only these, in this order, and a Pallas kernel for another
      platform is timed anyway (on CPU: interpret mode, never quote it).

  Raises:
    ValueError: for a requested name that does not exist here.
  """
  plat = backend_lib.platform()
  impls = []
  for name in softmax_api.BACKENDS:
    if name == "reference" and not include_reference and not (requested and name in requested):
      continue
    kernel_plat = {"pallas_gpu": "gpu", "pallas_tpu": "tpu", "mosaic_gpu": "gpu"}.get(name)  # kernels of a platform
    if kernel_plat is not None and kernel_plat != plat and not (requested and name in requested):
      why = (f"{name} on a {plat} backend would run in interpret mode (timings meaningless); "
             f"name it in --impls to time it anyway")
      impls.append(Impl(name, "jaxattn", functools.partial(timing.refuse, why)))
    else:
      impls.append(Impl(name, "jaxattn", functools.partial(_ours, name)))
  impls.append(Impl("jax.nn/xla", "anchor", functools.partial(_jax_nn, "xla")))
  if plat == "gpu":
    impls.append(Impl("jax.nn/cudnn", "anchor", functools.partial(_jax_nn, "cudnn")))
    if _tokamax_installed():
      impls.append(Impl("tokamax", "anchor", _tokamax))
  if requested:
    by_name = {i.name: i for i in impls}
    unknown = [n for n in requested if n not in by_name]
    if unknown:
      raise ValueError(f"unknown implementation(s) {unknown}; available here: {list(by_name)}")
    impls = [by_name[n] for n in requested]
  return impls


# ------------------------------------------------------------------------------------------------ running
def _inputs(case: registry.Case, seed: int = 0):
  s = case.shape
  dtype = jnp.dtype(s.dtype)
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (s.B, s.T, s.H, s.D), dtype)
  k = jax.random.normal(kk, (s.B, s.S, s.G, s.D), dtype)
  v = jax.random.normal(kv, (s.B, s.S, s.G, s.D), dtype)
  return q, k, v


def run_bench(preset: registry.BenchPreset, *, modes: Sequence[str] = ("fwd", "fwd+bwd"),
              impls: Sequence[Impl] | None = None, repeats: int | None = None, warmup: int | None = None,
              budget_s: float | None = None, progress: bool = True) -> list[dict]:
  """Times every case of ``preset`` with every implementation, in one process.

  Args:
    preset: shapes and masks (:mod:`configs.bench`).
    modes: subset of ``("fwd", "fwd+bwd")``.
    impls: what to time (default :func:`available_impls`).
    repeats: timed samples per measurement (default: the preset's).
    warmup: untimed calls after the compiling one (default: the preset's).
    budget_s: no new case starts after this many seconds; the cases left get ``skipped`` rows.
    progress: show a tqdm bar on stderr.

  Returns:
    The rows (dicts with :data:`report.ROW_FIELDS`), one per (case, mode, implementation).
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
  all_cases = registry.cases(preset)
  bar = tqdm(all_cases, desc=f"bench[{preset.name}]", unit="case", disable=not progress, file=sys.stderr)
  for case in bar:
    s = case.shape
    over_budget = budget_s is not None and time.perf_counter() - t_start > budget_s
    inputs = None if over_budget else _inputs(case)
    for mode in modes:
      fl = flops_lib.attention_flops(case.mask, s.B, s.T, s.S, s.H, s.D, mode=mode)
      base = None  # the first measured forward output of this case: every other impl is compared with it
      for impl in impls:
        row = dict(family=FAMILY, impl=impl.name, source=impl.source, case=case.name, B=s.B, T=s.T, S=s.S, H=s.H,
                   G=s.G, D=s.D, dtype=s.dtype, mask=repr(case.mask), mode=mode, status="ok", ms=None,
                   q20_ms=None, q80_ms=None, tflops=None, flops=fl, compile_s=None, samples=None, inner=None,
                   relerr=None, error=None, **env, preset=preset.name)
        if over_budget:
          row.update(status="skipped", error=f"time budget of {budget_s:g} s exhausted")
        else:
          bar.set_postfix_str(f"{mode} {impl.name}")
          out = timing.measure_into(row, impl.build, case, mode, inputs, flops=fl, repeats=repeats, warmup=warmup)
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


def write_outputs(rows: Sequence[dict], out_dir: str | pathlib.Path, title: str | None = None) -> str:
  """Writes ``bench.jsonl``, ``bench.md`` and ``bench.png`` into ``out_dir``; returns the markdown."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  report.write_jsonl(rows, out_dir / "bench.jsonl")
  table = report.markdown_table(rows, title=title)
  (out_dir / "bench.md").write_text(table)
  report.plot(rows, out_dir / "bench.png", title=title)
  return table


def _csv(s: str) -> list[str]:
  return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point (``python -m experiments bench --help``)."""
  p = config_lib.ArgumentParser(prog="python -m experiments bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="presets:\n" + "\n".join(
                                    f"  {n}: {pr.description}"
                                    for n, pr in {**registry.PRESETS, **LINEAR_PRESETS}.items()))
  p.add_argument("--preset", default=None, choices=sorted(registry.PRESETS) + sorted(LINEAR_PRESETS),
                 help="shape preset (default: cpu on a CPU backend, gpu otherwise); linear_* presets time "
                      "linear attention (experiments/bench/linear.py)")
  p.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated subset of fwd,fwd+bwd")
  p.add_argument("--impls", default=None,
                 help="comma-separated implementations (ours by registry id, anchors jax.nn/xla, jax.nn/cudnn, "
                      "tokamax); default: all that exist here")
  p.add_argument("--include-reference", action="store_true", help="also time the dense reference")
  p.add_argument("--out", default=None,
                 help="output folder (default runs/bench/<preset>/; the committed experiments/results/bench/ is "
                      "written only when named here)")
  p.add_argument("--repeats", type=config_lib.positive_int, default=None,
                 help="timed samples per measurement (default: preset's)")
  p.add_argument("--warmup", type=config_lib.nonnegative_int, default=None,
                 help="untimed calls after compiling (default: preset's)")
  p.add_argument("--budget-s", type=config_lib.positive_float, default=None,
                 help="start no new case after this many seconds")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = p.parse_args(argv)

  modes = _csv(args.modes)
  bad = [m for m in modes if m not in timing.MODES]
  if bad or not modes:
    p.error(f"--modes must be a comma-separated subset of {','.join(timing.MODES)}, got {args.modes!r}")
  preset_name = args.preset or registry.default_preset_name()
  if args.out is None:  # never the tracked experiments/results/bench/ unless asked for with --out
    args.out = str(default_out_dir("bench", preset_name))
  if args.preset in LINEAR_PRESETS:
    from experiments.bench import linear
    return linear.main(args, p)
  preset = registry.get_preset(preset_name)
  try:
    impls = available_impls(args.include_reference, _csv(args.impls) if args.impls else None)
  except ValueError as e:
    p.error(str(e))
  out_dir = pathlib.Path(args.out)

  t0 = time.perf_counter()
  rows = run_bench(preset, modes=modes, impls=impls, repeats=args.repeats, warmup=args.warmup,
                   budget_s=args.budget_s,
                   progress=not args.no_progress)
  wall = time.perf_counter() - t0
  title = f"{FAMILY} attention, preset {preset.name}, {rows[0]['device_kind'] if rows else '?'}"
  table = write_outputs(rows, out_dir, title=title)
  print(table)
  n_ok = sum(r["status"] == "ok" for r in rows)
  print(f"{n_ok}/{len(rows)} measurements in {wall:.1f} s; outputs in {out_dir}/ (bench.jsonl, bench.md, "
        f"bench.png)")
  return 0
