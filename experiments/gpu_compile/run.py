"""``python -m experiments gpu_compile``: compile every GPU kernel for sm_90 (and sm_80) without a GPU.

Each build is one public op (``softmax_attention`` causal, ``linear_attention`` with a per-head decay,
``landmark_attention`` per block size) with ``implementation="pallas_gpu"`` and its default config (family
``softmax_mosaic``: ``softmax_attention`` causal with the explicit-only ``implementation="mosaic_gpu"``, Hopper
targets only), forward or
forward+backward, traced for the GPU (``jaxattn.backend.use_platform("gpu")``: the real Triton kernels, not interpret
mode) and compiled ahead of time by XLA for a target card described by a ``GpuTargetConfigProto``
(``h100_sxm.txtpb`` in this folder; the A100's is derived from it with the sm_80 limits). This needs the CUDA
plugin (``pip install "jax-cuda12-plugin==<jax version>" "jax-cuda12-pjrt==<jax version>"``, ~1.1 GB) and runs
with ``JAX_PLATFORMS=cpu`` (set here when jax has not started yet).

Reported per build: the status (``ok``; ``overflow`` when a kernel needs more shared memory than the card has, from
XLA's ``RESOURCE_EXHAUSTED`` or from the kernel's own allocation; ``refused`` when the backend's ``supports``
declines the call, which dispatch turns into a fallback; ``error`` for anything else), the XLA compile time, and
per Triton kernel its shared memory (bytes, from compiling the kernel's Triton module with the plugin's Triton
compiler — a private jax API, ``jax._src.lib.triton``), warps and stages; per Mosaic GPU kernel (fwd, dq, dk/dv in
lowering order) the shared memory its lowering allocates (read from jax's Mosaic GPU lowering, a private API; the
kernel itself stays MLIR in the executable and is compiled to SASS only when loaded on a GPU, see
:func:`mosaic_gpu_probe`). Outputs in ``--out`` (default
``runs/gpu_compile/<preset>``): ``results.jsonl`` (one row per build) and ``results.md`` (the table, also printed).
Exit status 1 when any build overflows or fails.

Example::

  python -m experiments gpu_compile                       # fast subset (bf16, D=128), H100
  python -m experiments gpu_compile --preset full         # everything, H100 and A100 (long: f32 backward builds)
  python -m experiments gpu_compile --families landmark --dtypes float32 --head-dims 64,128
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import sys
import time
from typing import Sequence

from configs import gpu_compile as gc_configs
from experiments.common import config as config_lib
from experiments.common.paths import default_out_dir

HERE = pathlib.Path(__file__).resolve().parent
TARGET_FILE = HERE / "h100_sxm.txtpb"
ARCH = {"h100": "9.0", "a100": "8.0"}
_OVERFLOW = re.compile(r"requested (\d+), available:? (\d+)")
_MOSAIC_OVERFLOW = re.compile(r"smem_bytes=(\d+) > max_smem_bytes=(\d+)")
_PLUGIN_MODULES = ("jax_plugins.xla_cuda12", "jax_cuda12_plugin")


def plugin_missing() -> str | None:
  """None when the CUDA plugin is installed, else the one-line reason (with the install command)."""
  missing = [m for m in _PLUGIN_MODULES if _find_spec(m) is None]
  if not missing:
    return None
  import jax
  v = jax.__version__
  return (f"the CUDA plugin is not installed ({', '.join(missing)} missing): pip install "
          f"\"jax-cuda12-plugin=={v}\" \"jax-cuda12-pjrt=={v}\"")


def _find_spec(name):
  try:
    return importlib.util.find_spec(name)
  except (ImportError, ValueError):
    return None


def smem_limits() -> dict[str, int]:
  """Target -> shared memory per block (bytes)."""
  from pallas_kernels.common.smem import AMPERE_SMEM_BYTES, HOPPER_SMEM_BYTES
  return {"h100": HOPPER_SMEM_BYTES, "a100": AMPERE_SMEM_BYTES}


def target_config(target: str) -> str:
  """The ``GpuTargetConfigProto`` text of ``target``.

  ``h100``: the H100 SXM spec (``h100_sxm.txtpb``; its 232448-byte opt-in limit is the H200's too). ``a100``: the
  same file with the A100 SXM's compute capability (8.0), SM count (108), FP32 units per SM (64) and shared memory
  (166912 bytes per block opt-in, 167936 per SM), from NVIDIA's A100 datasheet / CUDA programming guide.
  """
  text = TARGET_FILE.read_text()
  if target == "h100":
    return text
  if target != "a100":
    raise ValueError(f"unknown target {target!r}; choose from {tuple(ARCH)}")
  subs = [
      (r"shared_memory_per_block_optin: \d+", f"shared_memory_per_block_optin: {smem_limits()['a100']}"),
      (r"shared_memory_per_core: \d+", "shared_memory_per_core: 167936"),
      (r"core_count: \d+", "core_count: 108"),
      (r"fpus_per_core: \d+", "fpus_per_core: 64"),
      (r"cuda_compute_capability \{[^}]*\}", "cuda_compute_capability {\n    major: 8\n  }"),
      (r'platform_version: "[^"]*"', 'platform_version: "Compute Capability 8.0"'),
      (r'model_str: "[^"]*"', 'model_str: "sm_8.0"'),
      (r'name: "[^"]*"', 'name: "NVIDIA A100-SXM4-80GB"'),
      (r'device_description_str: "[^"]*"', 'device_description_str: "NVIDIA A100-SXM4-80GB"'),
  ]
  for pattern, repl in subs:
    text, n = re.subn(pattern, repl, text, count=1)
    if n != 1:
      raise RuntimeError(f"h100_sxm.txtpb has no field matching {pattern!r}")
  return text


# ------------------------------------------------------------------------------------------------------ builds
@dataclasses.dataclass(frozen=True)
class Build:
  """One compile: an op, forward or forward+backward, at one head dim / dtype (/ landmark block), for a target."""

  family: str
  mode: str
  D: int
  dtype: str
  target: str
  block_size: int | None = None

  @property
  def label(self) -> str:
    bs = f" bs={self.block_size}" if self.block_size else ""
    return f"{self.family} {self.mode} D={self.D} {self.dtype}{bs} [{self.target}]"


def builds(preset: gc_configs.GpuCompilePreset) -> list[Build]:
  """Every build of a preset, cheapest first (bf16 before f32, forward before backward)."""
  out = []
  for target in preset.targets:
    for dtype in preset.dtypes:
      for mode in preset.modes:
        for D in preset.head_dims:
          for family in preset.families:
            if family == "softmax_mosaic" and target != "h100":
              continue  # Hopper-only kernels (wgmma, TMA)
            for bs in (preset.block_sizes if family == "landmark" else (None,)):
              out.append(Build(family, mode, D, dtype, target, bs))
  return out


def op_fn(build: Build, preset: gc_configs.GpuCompilePreset, implementation="pallas_gpu"):
  """``(f, shapes)``: the function of a build (``implementation=``: the op's argument, default ``"pallas_gpu"``
  with its default config) and its argument shapes."""
  import jax
  import jax.numpy as jnp

  import jaxattn

  B, T, H, G, D = preset.B, preset.T, preset.H, preset.G, build.D
  if build.family == "softmax_mosaic":
    impl = "mosaic_gpu" if implementation == "pallas_gpu" else implementation
    op = lambda q, k, v: jaxattn.softmax_attention(q, k, v, mask=jaxattn.masks.Causal(), implementation=impl)
  elif build.family == "softmax":
    op = lambda q, k, v: jaxattn.softmax_attention(q, k, v, mask=jaxattn.masks.Causal(),
                                                          implementation=implementation)
  elif build.family == "linear":
    decay = -jnp.linspace(0.01, 0.5, H, dtype=jnp.float32)  # per-head log decay (TransNormer / RetNet)
    op = lambda q, k, v: jaxattn.linear_attention(q, k, v, log_decay=decay, implementation=implementation)
  else:
    op = lambda q, k, v: jaxattn.landmark_attention(q, k, v, block_size=build.block_size,
                                                    implementation=implementation)
  if build.mode == "fwd":
    f = op
  else:
    f = jax.grad(lambda q, k, v: jnp.sum(op(q, k, v).astype(jnp.float32) ** 2), argnums=(0, 1, 2))
  return f, ((B, T, H, D), (B, T, G, D), (B, T, G, D))


# ------------------------------------------------------------------------------------------------ triton kernels
def triton_kernels(lowered) -> list[dict]:
  """The Triton kernels in a lowered module: ``[{"name", "ir" (bytecode), "num_warps", "num_stages"}]``.

  Reads the ``__gpu$xla.gpu.triton`` custom calls' backend config (jax 0.10's Pallas Triton lowering; later
  versions compile the kernel at lowering time and this finds nothing).
  """
  from jax._src.lib.mlir import ir

  found = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for o in block.operations:
          attrs = o.attributes
          if (o.operation.name == "stablehlo.custom_call"
              and ir.StringAttr(attrs["call_target_name"]).value == "__gpu$xla.gpu.triton"):
            key = "mhlo.backend_config" if "mhlo.backend_config" in attrs else "backend_config"
            try:
              d = ir.DictAttr(attrs[key])
              found.append(dict(name=ir.StringAttr(d["name"]).value, ir=ir.StringAttr(d["ir"]).value_bytes,
                                num_warps=ir.IntegerAttr(d["num_warps"]).value,
                                num_stages=ir.IntegerAttr(d["num_stages"]).value))
            except (ValueError, KeyError, TypeError):
              pass
          walk(o.operation)

  walk(lowered.compiler_ir("stablehlo").operation)
  return found


_SMEM_CACHE: dict[tuple, tuple[int | None, str, float]] = {}


def kernel_smem(kernel: dict, arch: str) -> tuple[int | None, str, float]:
  """``(bytes or None, error, seconds)``: shared memory of one Triton kernel compiled for ``arch`` (cached)."""
  from jax._src.lib import triton

  key = (hashlib.sha1(kernel["ir"]).hexdigest(), kernel["num_warps"], kernel["num_stages"], arch)
  if key not in _SMEM_CACHE:
    t0 = time.perf_counter()
    try:
      res = triton.compile("CUDA", kernel["ir"], arch, num_warps=kernel["num_warps"], num_ctas=1,
                           num_stages=kernel["num_stages"])
      _SMEM_CACHE[key] = (int(res.smem_bytes), "", time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 — reported per kernel
      _SMEM_CACHE[key] = (None, _first_line(e), time.perf_counter() - t0)
  return _SMEM_CACHE[key]


def _first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  pick = [l for l in lines if "RESOURCE_EXHAUSTED" in l or "requested" in l] or lines or [type(e).__name__]
  return pick[0][:300]


# ------------------------------------------------------------------------------------------------------ compile
def compile_build(build: Build, preset: gc_configs.GpuCompilePreset, shardings: dict, *,
                  kernel_smem_check: bool = True, implementation="pallas_gpu") -> dict:
  """Compiles one build; returns its result row (see the module docstring).

  ``implementation`` replaces the op's ``"pallas_gpu"`` (e.g. ``("pallas_gpu", Config(...))`` to check a config).
  """
  import jax

  from jaxattn import backend
  from pallas_kernels.common.smem import use_smem_limit

  limit = smem_limits()[build.target]
  row = dict(dataclasses.asdict(build), B=preset.B, T=preset.T, H=preset.H, G=preset.G, limit=limit, status="ok",
             message="", kernels=[], max_smem=None, lower_s=None, compile_s=None)
  f, shapes = op_fn(build, preset, implementation)
  specs = [jax.ShapeDtypeStruct(s, build.dtype, sharding=shardings[build.target]) for s in shapes]
  t0 = time.perf_counter()
  mosaic_smem = []
  try:
    with backend.use_platform("gpu"), use_smem_limit(limit), _record_mosaic_smem(mosaic_smem):
      lowered = jax.jit(f).trace(*specs).lower()  # default configs chosen for the target card
  except NotImplementedError as e:  # the backend's supports() refused: dispatch falls back
    row.update(status="refused", message=_first_line(e))
    return row
  except Exception as e:  # noqa: BLE001
    m = _MOSAIC_OVERFLOW.search(str(e))
    if m:  # jax's Mosaic GPU lowering checks its shared-memory allocation against sm_90's limit
      row.update(status="overflow", message=f"Mosaic GPU kernel: requested {m.group(1)}, available {m.group(2)}",
                 max_smem=int(m.group(1)))
    else:
      row.update(status="error", message=f"lowering: {_first_line(e)}")
    return row
  row["lower_s"] = round(time.perf_counter() - t0, 2)
  names = ("fwd", "dq", "dkv") if len(mosaic_smem) in (1, 3) else tuple(str(i) for i in range(len(mosaic_smem)))
  for name, smem in zip(names, mosaic_smem):
    row["kernels"].append(dict(name=f"mosaic_gpu_{name}", smem=smem, num_warps=None, num_stages=None, triton_s=0.0,
                               error=""))
  if kernel_smem_check:
    for k in triton_kernels(lowered):
      smem, err, secs = kernel_smem(k, ARCH[build.target])
      row["kernels"].append(dict(name=k["name"], smem=smem, num_warps=k["num_warps"], num_stages=k["num_stages"],
                                 triton_s=round(secs, 2), error=err))
  t0 = time.perf_counter()
  try:
    lowered.compile()
  except Exception as e:  # noqa: BLE001
    msg = _first_line(e)
    row.update(status="overflow" if _OVERFLOW.search(msg) or "Shared memory" in msg else "error", message=msg)
  row["compile_s"] = round(time.perf_counter() - t0, 2)
  known = [k["smem"] for k in row["kernels"] if k["smem"] is not None]
  row["max_smem"] = max(known) if known else None
  if row["status"] == "ok" and row["max_smem"] is not None and row["max_smem"] > limit:
    row.update(status="overflow", message=f"a kernel needs {row['max_smem']} bytes of shared memory > {limit}")
  if row["status"] == "overflow" and row["max_smem"] is None:
    m = _OVERFLOW.search(row["message"])
    row["max_smem"] = int(m.group(1)) if m else None
  return row


@contextlib.contextmanager
def _record_mosaic_smem(sizes: list):
  """Appends the shared memory (bytes) of every Mosaic GPU kernel lowered inside to ``sizes`` (a private jax API:
  without it nothing is recorded)."""
  try:
    from jax.experimental.mosaic.gpu import core
    original = core._smem_tree_size
  except (ImportError, AttributeError):
    yield
    return

  def record(tree):
    n = original(tree)
    sizes.append(int(n))
    return n

  core._smem_tree_size = record
  try:
    yield
  finally:
    core._smem_tree_size = original


def make_shardings(targets: Sequence[str]) -> dict:
  """Target -> a replicated sharding over the one device of a deviceless CUDA topology for that card."""
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  out = {}
  for t in targets:
    topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=target_config(t))
    out[t] = NamedSharding(Mesh(topo.devices, ("x",)), PartitionSpec())
  return out


# ------------------------------------------------------------------------------------------------ mosaic probe
def mosaic_gpu_probe(sharding) -> dict:
  """What the deviceless path checks of a Mosaic GPU (``plgpu``) kernel.

  Compiles a tiny kernel with 64 KiB of shared-memory scratch, and the same with 512 KiB. Found with jax 0.10.2:
  the small one compiles, but the executable keeps the kernel as a ``mosaic_gpu_v2`` custom call holding its MLIR
  module (Mosaic GPU lowers it to PTX / SASS when the program is loaded on a device), so ptxas never runs here; the
  oversized one is rejected by jax's Mosaic GPU lowering (its shared-memory check against sm_90's 232448 bytes).
  Returns ``{"small": status, "oversized": status, "kernel_kept_as_mlir": bool, "message": ...}``.
  """
  import jax
  import jax.numpy as jnp
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  def build(rows):
    def kernel(x_ref, o_ref, s_ref):
      s_ref[...] = jnp.zeros(s_ref.shape, jnp.float32)
      o_ref[...] = x_ref[...] * 2.0 + s_ref[0:128, :]

    return lambda x: pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    scratch_shapes=[plgpu.SMEM((rows, 128), jnp.float32)],
                                    compiler_params=plgpu.CompilerParams())(x)

  x = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=sharding)
  out = dict(small="error", oversized="error", kernel_kept_as_mlir=False, message="")
  for key, rows in (("small", 128), ("oversized", 1024)):
    try:
      compiled = jax.jit(build(rows)).trace(x).lower().compile()
      out[key] = "compiled"
      if key == "small":
        out["kernel_kept_as_mlir"] = 'custom_call_target="mosaic_gpu' in compiled.as_text()
    except Exception as e:  # noqa: BLE001
      out[key] = "rejected" if "shared memory" in str(e) else "error"
      out["message"] += f"{key}: {_first_line(e)} "
  return out


# ------------------------------------------------------------------------------------------------------ report
def markdown(rows: list[dict]) -> str:
  """The per-build table, then one row per kernel."""
  lines = ["| build | status | max smem (bytes) | limit | lower s | compile s | note |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    b = Build(r["family"], r["mode"], r["D"], r["dtype"], r["target"], r["block_size"])
    lines.append(f"| {b.label} | {r['status']} | {r['max_smem'] if r['max_smem'] is not None else '-'} | "
                 f"{r['limit']} | {r['lower_s'] if r['lower_s'] is not None else '-'} | "
                 f"{r['compile_s'] if r['compile_s'] is not None else '-'} | {r['message'][:120]} |")
  lines += ["", "| build | kernel | smem (bytes) | warps | stages | triton s |", "|---|---|---|---|---|---|"]
  for r in rows:
    b = Build(r["family"], r["mode"], r["D"], r["dtype"], r["target"], r["block_size"])
    for k in r["kernels"]:
      smem = k["smem"] if k["smem"] is not None else f"error: {k['error'][:80]}"
      dash = lambda x: "-" if x is None else x
      lines.append(f"| {b.label} | {k['name']} | {smem} | {dash(k['num_warps'])} | {dash(k['num_stages'])} | "
                   f"{k['triton_s']} |")
  return "\n".join(lines) + "\n"


def _csv(kind, what):
  def parse(text: str):
    try:
      return tuple(kind(x) for x in text.split(",") if x)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
  return parse


def main(argv: Sequence[str] | None = None) -> int:
  parser = config_lib.ArgumentParser(prog="python -m experiments gpu_compile",
                                     description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="default", choices=sorted(gc_configs.PRESETS),
                      help="; ".join(f"{p.name}: {p.description}" for p in gc_configs.PRESETS.values()))
  parser.add_argument("--families", type=_csv(str, "family names"), help="override the preset's families")
  parser.add_argument("--head-dims", type=_csv(int, "ints"), help="override the preset's head dims")
  parser.add_argument("--dtypes", type=_csv(str, "dtype names"), help="override the preset's dtypes")
  parser.add_argument("--modes", type=_csv(str, "modes (fwd, fwd_bwd)"), help="override the preset's modes")
  parser.add_argument("--block-sizes", type=_csv(int, "ints"), help="override the preset's landmark block sizes")
  parser.add_argument("--targets", type=_csv(str, "targets (h100, a100)"), help="override the preset's targets")
  parser.add_argument("--mosaic-probe", action="store_true",
                      help="also try a tiny Mosaic GPU kernel (does the deviceless path cover plgpu?)")
  parser.add_argument("--out", default=None, help="output directory (default: runs/gpu_compile/<preset>)")
  args = parser.parse_args(argv)
  preset = gc_configs.PRESETS[args.preset]
  overrides = {f: getattr(args, a) for f, a in (("families", "families"), ("head_dims", "head_dims"),
                                                 ("dtypes", "dtypes"), ("modes", "modes"),
                                                 ("block_sizes", "block_sizes"), ("targets", "targets"))
               if getattr(args, a) is not None}
  try:
    preset = dataclasses.replace(preset, **overrides)
  except ValueError as e:
    parser.error(str(e))
  out = pathlib.Path(args.out) if args.out else default_out_dir("gpu_compile", preset.name)

  if "jax" not in sys.modules:
    os.environ["JAX_PLATFORMS"] = "cpu"  # the CUDA plugin's driver check would fail on a machine without a GPU
  missing = plugin_missing()
  if missing:
    print(f"python -m experiments gpu_compile: error: {missing}", file=sys.stderr)
    return 1
  try:
    shardings = make_shardings(preset.targets)
  except Exception as e:  # noqa: BLE001
    print(f"python -m experiments gpu_compile: error: no deviceless CUDA topology ({_first_line(e)}); run it in a "
          f"fresh process with JAX_PLATFORMS=cpu", file=sys.stderr)
    return 1

  out.mkdir(parents=True, exist_ok=True)
  rows, t_all = [], time.perf_counter()
  todo = builds(preset)
  with open(out / "results.jsonl", "w") as fh:
    for i, b in enumerate(todo):
      row = compile_build(b, preset, shardings)
      rows.append(row)
      fh.write(json.dumps(row) + "\n")
      fh.flush()
      smem = ", ".join(f"{k['name'].removeprefix('jaxattn_')}={k['smem']}" for k in row["kernels"])
      print(f"[{i + 1}/{len(todo)}] {b.label}: {row['status']} ({row['compile_s']} s){' ' + smem if smem else ''}"
            f"{' -- ' + row['message'] if row['message'] else ''}", flush=True)
    if args.mosaic_probe:
      probe = mosaic_gpu_probe(shardings[preset.targets[0]])
      fh.write(json.dumps(dict(mosaic_gpu_probe=probe)) + "\n")
      print(f"mosaic gpu probe: {probe}")
  text = markdown(rows)
  (out / "results.md").write_text(text)
  print(text)
  bad = [r for r in rows if r["status"] in ("overflow", "error")]
  counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "refused", "overflow", "error")}
  print(f"{len(rows)} builds in {time.perf_counter() - t_all:.0f} s: {counts} -> {out}")
  return 1 if bad else 0
