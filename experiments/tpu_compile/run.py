"""``python -m experiments tpu_compile``: compile every TPU kernel for v4, v5e, v5p and v6e without a TPU.

Each kernel build is one public op (``softmax_attention`` with a static mask, ``linear_attention`` with a per-head
decay, ``landmark_attention``) with ``implementation="pallas_tpu"`` and the default config of the generation (or a
user config: ``tiles=N``), forward or forward+backward, traced for the TPU (``jaxattn.backend.use_platform("tpu")``:
the real Mosaic kernels, not interpret mode; :func:`pallas_kernels.common.vmem.use_tpu_generation` picks the
generation's defaults) and compiled ahead of time by XLA:TPU for one chip of a deviceless topology
(``jax.experimental.topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")``). Each context-parallel
build is one strategy (``ring``, ``all_gather``, ``ulysses``, ``usp`` over a 2 x 2 mesh, ``linear``) over the
topology's 4 chips, compiled in the preset's modes. This needs libtpu (``pip install -e ".[tpu]"``: a 210 MB wheel)
and runs with ``JAX_PLATFORMS=cpu`` (set here when jax has not started yet).

Reported per kernel build: the status (``ok``; ``overflow`` when a kernel needs more VMEM than there is, from XLA's
``Ran out of memory in memory space vmem``, with the VMEM it asked for; ``refused`` when the backend's ``supports``
declines the call; ``error`` for anything else, including a compile without a ``tpu_custom_call``, i.e. without the
real Mosaic kernel, or a gradient without a backward kernel), the resolved config, compile seconds, per Mosaic
kernel its scoped VMEM (bytes; XLA's ``used_scoped_memory_configs`` of the custom call), and the XLA work around the
kernels (:func:`xla_ops_around`: relayouts of q, k, v and the output into and out of the kernels' layout, copies
into VMEM, fusions such as the non-finite input guard) with the HBM bytes they move and that time at the
generation's bandwidth: traffic the kernels' cost models do not count. Per context-parallel build: the collectives of
the compiled HLO (op, largest shape, XLA:TPU emitter; :func:`collectives_in`) and the Mosaic kernels, per mode (the
backward must hold the dq and dk/dv kernels). Outputs in ``--out`` (default ``runs/tpu_compile/<preset>``):
``results.jsonl`` (one row per build), ``results.md`` (the tables, also printed) and, with ``--save-hlo``, each
compiled module. Exit status 1 when any build overflows or fails.

Example::

  python -m experiments tpu_compile                      # every family and generation, default configs (minutes)
  python -m experiments tpu_compile --preset tiles       # the softmax tile sweep behind the default tiles
  python -m experiments tpu_compile --preset full        # + user tiles, GQA, masks, strategies everywhere (long)
  python -m experiments tpu_compile --generations v4 --families softmax --configs tiles=1024 --strategies ""
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import sys
import time
from typing import Sequence

from configs import tpu_compile as tc_configs
from experiments.common import config as config_lib
from experiments.common.paths import default_out_dir

KERNEL_CALL = 'custom_call_target="tpu_custom_call"'
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
BIG_OP_BYTES = 1 << 20  # XLA instructions reported around the kernels: results of at least 1 MiB
_VMEM_OVERFLOW = re.compile(r"Used ([\d.]+)([KMG]?) of ([\d.]+)([KMG]?) vmem")
_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f(?:16|32|64))\[([\d,]*)\]")


def _cpu_backend() -> None:
  """Run jax on CPU when its backends have not started yet: with libtpu installed, jax would otherwise look for a
  TPU (and log warnings) on a machine without one. The TPU topology is deviceless either way."""
  if "jax" not in sys.modules:
    os.environ["JAX_PLATFORMS"] = "cpu"
    return
  try:
    import jax
    from jax._src import xla_bridge  # private; only decides whether the flag can still change
    if not xla_bridge.backends_are_initialized():
      jax.config.update("jax_platforms", "cpu")
  except Exception:  # noqa: BLE001 -- best effort: the compile works on any default backend
    pass


def libtpu_missing() -> str | None:
  """None when libtpu is installed, else the one-line reason (with the install command)."""
  try:
    found = importlib.util.find_spec("libtpu") is not None
  except (ImportError, ValueError):
    found = False
  if found:
    return None
  return 'libtpu is not installed: pip install -e ".[tpu]" (or pip install "jax[tpu]==<your jax version>")'


# ------------------------------------------------------------------------------------------------------ builds
@dataclasses.dataclass(frozen=True)
class Build:
  """One kernel compile: an op, forward or forward+backward, with a config, mask and kv heads, for a generation."""

  family: str
  mode: str
  generation: str
  config: str = "default"
  mask: str = "causal"
  G: int = 16
  dtype: str = "bfloat16"

  @property
  def label(self) -> str:
    mask = f" {self.mask}" if self.family == "softmax" else ""
    return f"{self.family} {self.mode} {self.config}{mask} G={self.G} {self.dtype} [{self.generation}]"


@dataclasses.dataclass(frozen=True)
class CpBuild:
  """One context-parallel compile (forward, then forward+backward) over the topology's chips."""

  strategy: str
  generation: str

  @property
  def label(self) -> str:
    return f"cp {self.strategy} [{self.generation}]"


def builds(preset: tc_configs.TpuCompilePreset) -> list[Build]:
  """Every kernel build of a preset (generation by generation, forward before backward)."""
  out = []
  for gen in preset.generations:
    for dtype in preset.dtypes:
      for mode in preset.modes:
        for family in preset.families:
          for config in preset.configs:
            for G in preset.kv_heads:
              for mask in (preset.masks if family == "softmax" else ("causal",)):
                out.append(Build(family, mode, gen, config, mask, G, dtype))
  return out


def cp_builds(preset: tc_configs.TpuCompilePreset) -> list[CpBuild]:
  return [CpBuild(s, g) for g in preset.strategy_generations for s in preset.strategies]


def _user_config(build: Build, preset, call_defaults):
  """The ``(name, Config)`` of a ``tiles=N`` build: the generation's default config with the tiles replaced (what
  ``block_sizes=`` / ``chunk_size=`` do)."""
  n = tc_configs.parse_config(build.config)
  if n is None:
    return "pallas_tpu"
  if build.family == "softmax":
    tiles = dict(block_q=n, block_k=n, block_q_dq=None, block_k_dq=None, block_q_dkv=None, block_k_dkv=None)
  elif build.family == "linear":
    tiles = dict(chunk_size=n)
  else:
    tiles = dict(block_q=max(preset.block_size, n // preset.block_size * preset.block_size))
  return "pallas_tpu", dataclasses.replace(call_defaults, **tiles)


def op_fn(build: Build, preset: tc_configs.TpuCompilePreset):
  """``(f, shapes)``: the function of a build and its argument shapes ``[(shape, dtype)]``."""
  import jax
  import jax.numpy as jnp

  import jaxattn
  from jaxattn import masks

  B, T, H, G, D = preset.B, preset.T, preset.H, build.G, preset.D
  scale = D ** -0.5
  shapes = [((B, T, H, D), build.dtype), ((B, T, G, D), build.dtype), ((B, T, G, D), build.dtype)]
  if build.family == "softmax":
    from jaxattn.ops.softmax import pallas_tpu
    from jaxattn.ops.softmax.config import SoftmaxCall
    mask = {"causal": masks.Causal(), "full": None, "local": masks.Local(min(1024, T // 2), 0),
            "documents": masks.Causal()}[build.mask]
    seg = build.mask == "documents"
    call = SoftmaxCall(B, T, T, H, G, D, D, build.dtype, scale, mask=mask, segment_ids=seg)
    impl = _user_config(build, preset, pallas_tpu.BACKEND.default_config(call))
    if seg:
      shapes.append(((B, T), "int32"))
    def op(q, k, v, *ids):  # documents: one [B, T] id array for queries and keys
      return jaxattn.softmax_attention(q, k, v, mask=mask, segment_ids=(ids[0], ids[0]) if ids else None,
                                       implementation=impl)
  elif build.family == "linear":
    from jaxattn.ops.linear import pallas_tpu
    from jaxattn.ops.linear.config import LinearCall
    call = LinearCall(B, T, T, H, G, D, D, build.dtype, scale, decay="head")
    impl = _user_config(build, preset, pallas_tpu.BACKEND.default_config(call))
    decay = -jnp.linspace(0.01, 0.5, H, dtype=jnp.float32)  # per-head log decay (TransNormer / RetNet)
    op = lambda q, k, v: jaxattn.linear_attention(q, k, v, log_decay=decay, implementation=impl)
  else:
    from jaxattn.ops.landmark import pallas_tpu
    from jaxattn.ops.landmark.config import LandmarkCall
    call = LandmarkCall(B, T, H, G, D, D, build.dtype, preset.block_size, scale)
    impl = _user_config(build, preset, pallas_tpu.BACKEND.default_config(call))
    op = lambda q, k, v: jaxattn.landmark_attention(q, k, v, block_size=preset.block_size, implementation=impl)
  if build.mode == "fwd":
    f = op
  else:
    f = jax.grad(lambda q, k, v, *ids: jnp.sum(op(q, k, v, *ids).astype(jnp.float32) ** 2), argnums=(0, 1, 2))
  return f, shapes


# ------------------------------------------------------------------------------------------------ HLO analysis
def _bytes(type_text: str) -> int:
  total = 0
  for dt, dims in _ARRAY.findall(type_text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES[dt]
  return total


_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([a-z][\w\-]*)\(")


def instructions(hlo: str) -> list[dict]:
  """The instructions of the compiled module outside the computations that fusions and async ops call:
  ``{name, op, type, bytes, line, called}`` (``called``: the opcodes inside the computation the instruction calls,
  e.g. the all-gather inside an async collective fusion)."""
  fused = set(re.findall(r"calls=%([\w.\-]+)", hlo))
  bodies: dict[str, list[str]] = {}
  out, current = [], None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%([\w.\-]+) [(]", line)
    if head and not line.startswith(" "):
      current = head.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    if current in fused:
      bodies.setdefault(current, []).append(m.group(3))
    else:
      out.append(dict(name=m.group(1), type=m.group(2), op=m.group(3), bytes=_bytes(m.group(2)), line=line))
  for ins in out:
    called = re.search(r"calls=%([\w.\-]+)", ins["line"])
    ins["called"] = (called.group(1), bodies.get(called.group(1), [])) if called else ("", [])
  return out


def kernels_in(hlo: str) -> list[dict]:
  """The Mosaic kernels of a compiled module: ``[{name, vmem}]`` (scoped VMEM bytes; None if not reported)."""
  out = []
  for ins in instructions(hlo):
    if ins["op"] == "custom-call" and KERNEL_CALL in ins["line"]:
      m = re.search(r'"used_scoped_memory_configs":\[([^\]]*)\]', ins["line"])
      sizes = [int(s) for s in re.findall(r'"size":"(\d+)"', m.group(1))] if m else []
      out.append(dict(name=re.sub(r"\.\d+$", "", ins["name"]), vmem=sum(sizes) if m else None))
  return out


def _collective(ins: dict) -> str | None:
  """The collective an instruction starts (``"all-gather"``, ``"reduce-scatter"``, ...), or None.

  Besides the plain ops (and their async ``-start``), XLA:TPU wraps collectives into fusions / async ops that call a
  computation holding them; ``all-reduce-scatter`` fusions are its reduce-scatters.
  """
  op = ins["op"]
  name, body = ins["called"]
  # once per collective: at its start, not at its "-done" nor in the compute fused into its async window
  if op.endswith("-done") or "-done" in ins["name"] or name.startswith("async_collective_fusion"):
    return None
  op = op.removesuffix("-start")
  if name.startswith("all-reduce-scatter"):
    return "reduce-scatter"
  if op not in COLLECTIVES and body:
    inner = [o.removesuffix("-start") for o in body if o.removesuffix("-start") in COLLECTIVES]
    op = inner[0] if inner else op
  return op if op in COLLECTIVES else None


def collectives_in(hlo: str) -> list[dict]:
  """The collectives of a compiled module: ``[{op, shape, bytes, emitter}]`` (async pairs counted once, at their
  start).

  XLA:TPU emits a reduce-scatter as a fusion that calls a computation named ``all-reduce-scatter`` (an all-reduce
  and a dynamic slice in its body, run by the ``AllReduceScatterFusion`` emitter: each chip receives only its
  shard): it is reported as ``reduce-scatter`` with the scattered result's shape; the all-reduce inside its body is
  not a separate collective. A top-level ``all-reduce`` is a real all-reduce.
  """
  out = []
  for ins in instructions(hlo):
    op = _collective(ins)
    if op is not None:
      shapes = [f"{dt}[{dims}]" for dt, dims in _ARRAY.findall(ins["type"])]
      if ins["op"] not in COLLECTIVES:  # async / fused forms return (operands, results, contexts): the largest
        shapes = [max(shapes, key=_bytes)] if shapes else []
      emitter = re.search(r'"emitter":"(\w+)"', ins["line"])
      out.append(dict(op=op, shape=" ".join(shapes), bytes=sum(_bytes(x) for x in shapes),
                      emitter=emitter.group(1) if emitter else ""))
  return out


def xla_ops_around(hlo: str) -> list[dict]:
  """Non-kernel instructions with results of at least :data:`BIG_OP_BYTES`: ``[{name, op, kind, bytes}]``.

  ``kind``: ``"relayout"`` (``reshape`` / ``copy`` / ``transpose`` that move data: on TPU a reshape between tiled
  layouts is a copy; bytes = read + write), ``"prefetch"`` (an async copy into another memory space, e.g. VMEM:
  bytes = the HBM read), ``"fusion"`` (XLA fusions such as input checks, ``delta = rowsum(dO * O)`` and the lse
  broadcasts: bytes = 2 x the result, i.e. one read of a same-sized input and the write) or ``"other"``. HBM
  traffic the kernels' own cost model does not count.
  """
  out = []
  skip_ops = {"parameter", "custom-call", "tuple", "get-tuple-element", "bitcast", "constant"}
  for ins in instructions(hlo):
    op = ins["op"]
    if op in skip_ops or op.endswith("-done") or _collective(ins) is not None or ins["bytes"] < BIG_OP_BYTES:
      continue
    arrays = re.findall(r"\b(?:pred|[su](?:8|16|32|64)|bf16|f(?:16|32|64))\[[\d,]*\]\{[^}]*\}", ins["type"])
    if op.endswith("-start") and len(arrays) > 1:
      # async "-start" ops return (operand, result, context) or (result, operand, context)
      res = arrays[1] if ins["type"].startswith("((") else arrays[0]
      nbytes = _bytes(res)
      if op == "copy-start" and re.search(r"S\(\d\)\}$", res):
        kind, moved = "prefetch", nbytes
      else:
        kind, moved = ("relayout" if op == "copy-start" else "other"), 2 * nbytes
    else:
      nbytes = ins["bytes"]
      kind = ("relayout" if op in ("reshape", "copy", "transpose") else "fusion" if op == "fusion" else "other")
      moved = 2 * nbytes
    if nbytes >= BIG_OP_BYTES:
      out.append(dict(name=ins["name"], op=op, kind=kind, bytes=moved))
  return out


def around_summary(ops: list[dict]) -> dict:
  """Bytes per kind of :func:`xla_ops_around`'s ops."""
  out = {}
  for o in ops:
    out[o["kind"]] = out.get(o["kind"], 0) + o["bytes"]
  return out


def _first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  pick = [l for l in lines if "vmem" in l or "RESOURCE_EXHAUSTED" in l] or lines or [type(e).__name__]
  return pick[0][:300]


def _overflow(message: str) -> tuple[int, int] | None:
  m = _VMEM_OVERFLOW.search(message)
  if not m:
    return None
  return int(float(m.group(1)) * _UNIT[m.group(2)]), int(float(m.group(3)) * _UNIT[m.group(4)])


# ------------------------------------------------------------------------------------------------------ compile
def _compile(f, specs):
  import jax
  t0 = time.perf_counter()
  lowered = jax.jit(f).trace(*specs).lower()
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  return compiled.as_text(), lower_s, time.perf_counter() - t0


def _save_hlo(hlo_dir, label: str, text: str) -> None:
  if hlo_dir is not None:
    hlo_dir.mkdir(parents=True, exist_ok=True)
    (hlo_dir / (re.sub(r"[^\w.=-]+", "_", label).strip("_") + ".hlo.txt")).write_text(text)


def compile_build(build: Build, preset: tc_configs.TpuCompilePreset, devices: dict, hlo_dir=None) -> dict:
  """Compiles one kernel build on one chip of its generation; returns its result row (see the module docstring)."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from jaxattn import backend
  from pallas_kernels.common.vmem import TPU_GENERATIONS, use_tpu_generation

  gen = TPU_GENERATIONS[build.generation]
  row = dict(dataclasses.asdict(build), kind="kernel", B=preset.B, T=preset.T, H=preset.H, D=preset.D,
             vmem_capacity=gen.vmem_bytes, status="ok", message="", config_used="", kernels=[], max_vmem=None,
             lower_s=None, compile_s=None, around=[], around_bytes=0, around_by_kind={}, around_s=None)
  sharding = NamedSharding(Mesh(devices[build.generation][:1], ("x",)), PartitionSpec())
  try:
    with backend.use_platform("tpu"), use_tpu_generation(build.generation):
      f, shapes = op_fn(build, preset)
      row["config_used"] = _config_text(build, preset)
      specs = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
      text, lower_s, compile_s = _compile(f, specs)
  except NotImplementedError as e:  # the backend's supports() refused: dispatch would fall back
    row.update(status="refused", message=_first_line(e))
    return row
  except Exception as e:  # noqa: BLE001
    msg = _first_line(e)
    over = _overflow(str(e))
    row.update(status="overflow" if over else "error", message=msg)
    if over:
      row["max_vmem"] = over[0]
    return row
  _save_hlo(hlo_dir, build.label, text)
  row.update(lower_s=round(lower_s, 2), compile_s=round(compile_s, 2), kernels=kernels_in(text))
  known = [k["vmem"] for k in row["kernels"] if k["vmem"] is not None]
  row["max_vmem"] = max(known) if known else None
  row["around"] = xla_ops_around(text)
  row["around_bytes"] = sum(o["bytes"] for o in row["around"])
  row["around_by_kind"] = around_summary(row["around"])
  row["around_s"] = row["around_bytes"] / gen.hbm_bytes_per_s
  if not row["kernels"]:
    row.update(status="error", message="no tpu_custom_call in the compiled HLO: the Mosaic kernel was not built")
  elif build.mode == "fwd_bwd" and not any("bwd" in k["name"] for k in row["kernels"]):
    row.update(status="error", message="no backward Mosaic kernel in the compiled gradient")
  return row


def _config_text(build: Build, preset) -> str:
  """The config the build runs with (default_config for the generation, or the user tiles)."""
  from jaxattn.ops.landmark import pallas_tpu as landmark_tpu
  from jaxattn.ops.landmark.config import LandmarkCall
  from jaxattn.ops.linear import pallas_tpu as linear_tpu
  from jaxattn.ops.linear.config import LinearCall
  from jaxattn.ops.softmax import pallas_tpu as softmax_tpu
  from jaxattn.ops.softmax.config import SoftmaxCall

  B, T, H, G, D = preset.B, preset.T, preset.H, build.G, preset.D
  if build.family == "softmax":
    default = softmax_tpu.BACKEND.default_config(SoftmaxCall(B, T, T, H, G, D, D, build.dtype, 1.0))
  elif build.family == "linear":
    default = linear_tpu.BACKEND.default_config(LinearCall(B, T, T, H, G, D, D, build.dtype, 1.0, decay="head"))
  else:
    default = landmark_tpu.BACKEND.default_config(LandmarkCall(B, T, H, G, D, D, build.dtype, preset.block_size, 1.0))
  impl = _user_config(build, preset, default)
  cfg = default if isinstance(impl, str) else impl[1]
  return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items() if v is not None)


def cp_fn(build: CpBuild, preset: tc_configs.TpuCompilePreset, devices: list):
  """``(f_fwd, f_grad, specs)`` of a context-parallel build over ``devices`` (``cp_chips`` chips)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from jaxattn import masks
  from jaxattn.parallel import context_parallel_attention, context_parallel_linear_attention

  n = preset.cp_chips
  B, T, H, D = preset.B, preset.cp_T, preset.H, preset.D
  if build.strategy == "usp":
    if n != 4:
      raise ValueError("usp needs 4 chips (a 2 x 2 mesh)")
    mesh = Mesh(np.array(devices[:4]).reshape(2, 2), ("uly", "ring"))
    seq_axis, spec = ("uly", "ring"), PartitionSpec(None, ("ring", "uly"))
  else:
    mesh = Mesh(np.array(devices[:n]), ("seq",))
    seq_axis, spec = "seq", PartitionSpec(None, "seq")
  if build.strategy == "linear":
    decay = -jnp.linspace(0.01, 0.5, H, dtype=jnp.float32)
    op = lambda q, k, v: context_parallel_linear_attention(q, k, v, mesh=mesh, seq_axis=seq_axis, log_decay=decay,
                                                           implementation="pallas_tpu")
  else:
    op = lambda q, k, v: context_parallel_attention(q, k, v, mesh=mesh, seq_axis=seq_axis, strategy=build.strategy,
                                                    mask=masks.Causal(), implementation="pallas_tpu")
  grad = jax.grad(lambda q, k, v: jnp.sum(op(q, k, v).astype(jnp.float32) ** 2), argnums=(0, 1, 2))
  x = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16, sharding=NamedSharding(mesh, spec))
  return op, grad, (x, x, x)


def compile_cp(build: CpBuild, preset: tc_configs.TpuCompilePreset, devices: dict, hlo_dir=None) -> dict:
  """Compiles one strategy forward and forward+backward; returns its result row."""
  from jaxattn import backend
  from pallas_kernels.common.vmem import use_tpu_generation

  row = dict(dataclasses.asdict(build), kind="cp", B=preset.B, T=preset.cp_T, H=preset.H, D=preset.D,
             chips=preset.cp_chips, status="ok", message="", fwd=None, fwd_bwd=None)
  for mode in preset.modes:
    try:
      with backend.use_platform("tpu"), use_tpu_generation(build.generation):
        fwd, grad, specs = cp_fn(build, preset, devices[build.generation])
        text, lower_s, compile_s = _compile(fwd if mode == "fwd" else grad, specs)
    except Exception as e:  # noqa: BLE001
      msg = _first_line(e)
      row.update(status="overflow" if _overflow(str(e)) else "error", message=f"{mode}: {msg}")
      return row
    _save_hlo(hlo_dir, f"{build.label} {mode}", text)
    ks = kernels_in(text)
    row[mode] = dict(compile_s=round(compile_s, 2), kernels=sorted({k["name"] for k in ks}),
                     max_vmem=max((k["vmem"] or 0 for k in ks), default=None), collectives=collectives_in(text))
  if any(not row[m]["kernels"] for m in preset.modes):
    row.update(status="error", message="no tpu_custom_call in the compiled HLO: no Mosaic kernel was built")
  elif row["fwd_bwd"] is not None and not any("bwd" in k for k in row["fwd_bwd"]["kernels"]):
    row.update(status="error", message="no backward Mosaic kernel (dq / dk,dv) in the forward+backward")
  return row


def _clear_caches() -> None:
  import jax
  jax.clear_caches()


def chip_devices(generations: Sequence[str]) -> dict:
  """Generation -> one device per chip of its deviceless 4-chip topology (core 0 of two-core chips)."""
  from jax.experimental import topologies

  out = {}
  for g in generations:
    topo = topologies.get_topology_desc(topology_name=tc_configs.GENERATIONS[g], platform="tpu")
    devs = [d for d in topo.devices if getattr(d, "core_on_chip", 0) == 0]
    out[g] = devs
  return out


# ------------------------------------------------------------------------------------------------------ report
def _mib(x) -> str:
  return "-" if x is None else f"{x / (1 << 20):.2f}"


def collective_summary(collectives: list[dict]) -> str:
  """``"all-gather x2 (bf16[1,32768,16,128]), ..."``: each op with its count and largest result."""
  by_op: dict[str, list[dict]] = {}
  for c in collectives:
    by_op.setdefault(c["op"], []).append(c)
  parts = []
  for op, cs in sorted(by_op.items()):
    big = max(cs, key=lambda c: c["bytes"])
    parts.append(f"{op} x{len(cs)} (largest {big['shape']}{', ' + big['emitter'] if big['emitter'] else ''})")
  return ", ".join(parts) or "none"


def markdown(rows: list[dict]) -> str:
  """The kernel table (one row per build, one line per Mosaic kernel) and the context-parallel table."""
  lines = []
  kernel_rows = [r for r in rows if r.get("kind") == "kernel"]
  cp_rows = [r for r in rows if r.get("kind") == "cp"]
  if kernel_rows:
    lines += ["| generation | family | mode | config | mask | G | kernel | scoped VMEM (MiB) | VMEM (MiB) | "
              "compile s | status | XLA ops around the kernels (MB moved by kind, us at HBM bandwidth) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in kernel_rows:
      kinds = ", ".join(f"{k} {v / 1e6:.0f}" for k, v in sorted(r.get("around_by_kind", {}).items()))
      around = (f"{r['around_bytes'] / 1e6:.0f} MB ({kinds}), {r['around_s'] * 1e6:.0f} us"
                if r["around_s"] is not None else "-")
      ks = r["kernels"] or [dict(name="-", vmem=r["max_vmem"])]
      for k in ks:
        lines.append(f"| {r['generation']} | {r['family']} | {r['mode']} | {r['config']} | "
                     f"{r['mask'] if r['family'] == 'softmax' else '-'} | {r['G']} | {k['name']} | {_mib(k['vmem'])} "
                     f"| {_mib(r['vmem_capacity'])} | {r['compile_s'] if r['compile_s'] is not None else '-'} | "
                     f"{r['status']}{': ' + r['message'][:100] if r['message'] else ''} | {around} |")
    lines.append("")
  if cp_rows:
    lines += ["| generation | strategy | chips | T | fwd kernels | fwd collectives | fwd+bwd kernels | "
              "fwd+bwd collectives | status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in cp_rows:
      f, b = r["fwd"] or {}, r["fwd_bwd"] or {}
      lines.append(f"| {r['generation']} | {r['strategy']} | {r['chips']} | {r['T']} | "
                   f"{', '.join(f.get('kernels', [])) or '-'} | {collective_summary(f.get('collectives', []))} | "
                   f"{', '.join(b.get('kernels', [])) or '-'} | {collective_summary(b.get('collectives', []))} | "
                   f"{r['status']}{': ' + r['message'][:100] if r['message'] else ''} |")
    lines.append("")
  return "\n".join(lines)


def _csv(kind, what):
  def parse(text: str):
    try:
      return tuple(kind(x) for x in text.split(",") if x)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
  return parse


def main(argv: Sequence[str] | None = None) -> int:
  parser = config_lib.ArgumentParser(prog="python -m experiments tpu_compile", description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="default", choices=sorted(tc_configs.PRESETS),
                      help="; ".join(f"{p.name}: {p.description}" for p in tc_configs.PRESETS.values()))
  parser.add_argument("--generations", type=_csv(str, "generations (v4, v5e, v5p, v6e)"),
                      help="override the preset's generations")
  parser.add_argument("--families", type=_csv(str, "family names"), help="override the preset's families ('' = none)")
  parser.add_argument("--modes", type=_csv(str, "modes (fwd, fwd_bwd)"), help="override the preset's modes")
  parser.add_argument("--configs", type=_csv(str, "configs (default, tiles=N)"), help="override the preset's configs")
  parser.add_argument("--masks", type=_csv(str, "masks"), help="override the preset's softmax masks")
  parser.add_argument("--kv-heads", type=_csv(int, "ints"), help="override the preset's kv head counts")
  parser.add_argument("--dtypes", type=_csv(str, "dtype names"), help="override the preset's dtypes")
  parser.add_argument("--strategies", type=_csv(str, "strategies"), help="override the preset's context-parallel "
                                                                         "strategies ('' = none)")
  parser.add_argument("--head-dim", type=int, default=None, help="override the preset's head dim D (= E)")
  parser.add_argument("--cp-generations", type=_csv(str, "generations"), help="generations of the strategies")
  parser.add_argument("--save-hlo", action="store_true", help="also write each compiled module to <out>/hlo/")
  parser.add_argument("--out", default=None, help="output directory (default: runs/tpu_compile/<preset>)")
  args = parser.parse_args(argv)
  preset = tc_configs.PRESETS[args.preset]
  fields = ("generations", "families", "modes", "configs", "masks", "kv_heads", "dtypes", "strategies",
            "cp_generations")
  overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
  if args.head_dim is not None:
    overrides["D"] = args.head_dim
  try:
    preset = dataclasses.replace(preset, **overrides)
  except ValueError as e:
    parser.error(str(e))
  out = pathlib.Path(args.out) if args.out else default_out_dir("tpu_compile", preset.name)

  _cpu_backend()
  missing = libtpu_missing()
  if missing:
    print(f"python -m experiments tpu_compile: error: {missing}", file=sys.stderr)
    return 1
  kernel_todo, cp_todo = builds(preset), cp_builds(preset)
  gens = sorted({b.generation for b in kernel_todo} | {b.generation for b in cp_todo})
  try:
    devices = chip_devices(gens)
  except Exception as e:  # noqa: BLE001
    print(f"python -m experiments tpu_compile: error: no deviceless TPU topology ({_first_line(e)})",
          file=sys.stderr)
    return 1

  out.mkdir(parents=True, exist_ok=True)
  rows, t_all = [], time.perf_counter()
  n = len(kernel_todo) + len(cp_todo)
  last_generation = None
  with open(out / "results.jsonl", "w") as fh:
    for i, b in enumerate([*kernel_todo, *cp_todo]):
      if b.generation != last_generation:
        # the ops' inner jits cache their traces by platform, not by TPU generation: a trace made for one
        # generation's default tiles must not serve the next
        _clear_caches()
        last_generation = b.generation
      hlo_dir = out / "hlo" if args.save_hlo else None
      row = (compile_build(b, preset, devices, hlo_dir) if isinstance(b, Build)
             else compile_cp(b, preset, devices, hlo_dir))
      rows.append(row)
      fh.write(json.dumps(row) + "\n")
      fh.flush()
      if row["kind"] == "kernel":
        detail = ", ".join(f"{k['name'].removeprefix('jaxattn_')}={_mib(k['vmem'])} MiB" for k in row["kernels"])
      else:
        detail = "; ".join(f"{m}: {collective_summary(row[m]['collectives'])}" for m in ("fwd", "fwd_bwd")
                           if row[m])
      print(f"[{i + 1}/{n}] {b.label}: {row['status']}{' ' + detail if detail else ''}"
            f"{' -- ' + row['message'] if row['message'] else ''}", flush=True)
  text = markdown(rows)
  (out / "results.md").write_text(text)
  print(text)
  counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "refused", "overflow", "error")}
  print(f"{len(rows)} builds in {time.perf_counter() - t_all:.0f} s: {counts} -> {out}")
  return 1 if counts["overflow"] or counts["error"] else 0
