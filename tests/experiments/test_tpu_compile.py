"""``python -m experiments tpu_compile`` (issue 13 item 5): presets, builds, the HLO parsing, the report and the exit
status; with libtpu installed, the CI preset compiled for v5e (the real Mosaic kernels, forward and backward, their
scoped VMEM, and the all-gather strategy's reduce-scatter), and (slow) the default preset and the v4 overflow.

Without libtpu the compile tests skip with the reason; CI installs ``.[test,tpu]`` so they run there.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import tpu_compile as tc_configs
from experiments.tpu_compile import run

REPO = pathlib.Path(__file__).resolve().parents[2]
MIB = 1 << 20

needs_libtpu = pytest.mark.skipif(run.libtpu_missing() is not None, reason=str(run.libtpu_missing()))


def test_presets_validate():
  assert set(tc_configs.PRESETS) == {"default", "full", "tiles", "ci"}
  assert tc_configs.DEFAULT.generations == ("v4", "v5e", "v5p", "v6e")
  assert set(tc_configs.FULL.masks) == set(tc_configs.MASKS) and 4 in tc_configs.FULL.kv_heads
  assert tc_configs.parse_config("default") is None and tc_configs.parse_config("tiles=1024") == 1024
  for bad in (dict(generations=("v3",)), dict(families=("nope",)), dict(configs=("tiles=7",)), dict(kv_heads=(3,)),
              dict(strategies=("tree",)), dict(cp_chips=8), dict(masks=()), dict(block_size=12)):
    with pytest.raises(ValueError):
      dataclasses.replace(tc_configs.DEFAULT, **bad)


def test_builds_cover_families_modes_masks_and_gqa():
  default = run.builds(tc_configs.DEFAULT)
  assert len(default) == 4 * 2 * 3  # generations x modes x families
  full = run.builds(tc_configs.FULL)
  assert {(b.family, b.mode) for b in full} == {(f, m) for f in tc_configs.FAMILIES for m in tc_configs.MODES}
  assert {b.mask for b in full if b.family == "softmax"} == set(tc_configs.MASKS)
  assert {b.G for b in full} == {16, 4} and {b.config for b in full} == {"default", "tiles=256", "tiles=1024"}
  assert [b.strategy for b in run.cp_builds(tc_configs.DEFAULT)] == list(tc_configs.STRATEGIES)
  assert {b.generation for b in run.cp_builds(tc_configs.FULL)} == set(tc_configs.GENERATIONS)


_HLO = """\
HloModule jit_f, entry_computation_layout={()}

%all-reduce-scatter (input: bf16[1,2048,16,128]) -> bf16[1032,8,128] {
  %input = bf16[1,2048,16,128]{3,2,1,0} parameter(0)
  %all-reduce.1 = bf16[4128,8,128]{2,1,0:T(8,128)(2,1)} all-reduce(%input), channel_id=2, to_apply=%add
  ROOT %dynamic-slice.1 = bf16[1032,8,128]{2,1,0} dynamic-slice(%all-reduce.1, %c, %c, %c)
}

ENTRY %main.1 (q.1: bf16[1,8192,16,128]) -> bf16[1,8192,16,128] {
  %q.1 = bf16[1,8192,16,128]{3,2,1,0:T(8,128)(2,1)} parameter(0)
  %copy.3 = bf16[1,8192,2048]{2,1,0:T(8,128)(2,1)} copy(%q.1)
  %jaxattn_flash_fwd.1 = (bf16[1,8192,2048]{2,1,0}, f32[1,16,8192,128]{3,2,1,0}) custom-call(%copy.3), custom_call_target="tpu_custom_call", backend_config={"body":"x"},"used_scoped_memory_configs":[{"memory_space":"1","offset":"0","size":"3596288"}]}
  %all-gather-start = (bf16[1,512,16,128]{3,2,1,0}, bf16[1,2048,16,128]{3,2,1,0}) all-gather-start(%q.1), dimensions={1}
  %all-gather-done = bf16[1,2048,16,128]{3,2,1,0} all-gather-done(%all-gather-start)
  %fusion = bf16[1032,8,128]{2,1,0:T(8,128)(2,1)S(1)} fusion(%q.1), kind=kCustom, calls=%all-reduce-scatter, backend_config={"collective_algorithm_config":{"emitter":"SingleInputAllReduceScatterFusion"}}
  %all-reduce.6 = (bf16[1,2048,4,128]{3,2,1,0}, bf16[1,2048,4,128]{3,2,1,0}) all-reduce(%a, %b), channel_id=3, to_apply=%add
  %small = f32[16]{0} copy(%x)
  ROOT %out = bf16[1,8192,16,128]{3,2,1,0} copy(%q.1)
}
"""


def test_hlo_parsing():
  [k] = run.kernels_in(_HLO)
  assert k == dict(name="jaxattn_flash_fwd", vmem=3596288)
  cs = {(c["op"], c["shape"]) for c in run.collectives_in(_HLO)}
  assert cs == {("all-gather", "bf16[1,2048,16,128]"), ("reduce-scatter", "bf16[1032,8,128]"),
                ("all-reduce", "bf16[1,2048,4,128] bf16[1,2048,4,128]")}  # the all-reduce inside the fusion: no
  around = {o["name"]: o["bytes"] for o in run.xla_ops_around(_HLO)}
  assert around == {"copy.3": 2 * 8192 * 2048 * 2, "out": 2 * 8192 * 2048 * 2}  # read + write; small ones skipped
  assert "reduce-scatter x1" in run.collective_summary(run.collectives_in(_HLO))


def _kernel_row(b, status):
  return dict(dataclasses.asdict(b), kind="kernel", B=1, T=1024, H=16, D=128, vmem_capacity=128 * MIB,
              status=status, message="" if status == "ok" else "Used 16.66M of 16.00M vmem", config_used="",
              kernels=[dict(name="jaxattn_flash_fwd", vmem=3 * MIB)] if status == "ok" else [],
              max_vmem=3 * MIB, lower_s=0.1, compile_s=1.0, around=[], around_bytes=0, around_s=0.0)


def _cp_row(b):
  coll = [dict(op="reduce-scatter", shape="bf16[1032,8,128]", bytes=2113536, emitter="X")]
  return dict(dataclasses.asdict(b), kind="cp", B=1, T=2048, H=16, D=128, chips=4, status="ok", message="",
              fwd=None, fwd_bwd=dict(compile_s=1.0, kernels=["jaxattn_flash_bwd_dq"], max_vmem=1, collectives=coll))


@pytest.mark.parametrize("status, code", [("ok", 0), ("refused", 0), ("overflow", 1), ("error", 1)])
def test_exit_status_and_report(status, code, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(run, "libtpu_missing", lambda: None)
  monkeypatch.setattr(run, "_clear_caches", lambda: None)
  monkeypatch.setattr(run, "chip_devices", lambda gens: {g: [] for g in gens})
  monkeypatch.setattr(run, "compile_build", lambda b, preset, devices, hlo_dir: _kernel_row(b, status))
  monkeypatch.setattr(run, "compile_cp", lambda b, preset, devices, hlo_dir: _cp_row(b))
  assert run.main(["--preset", "ci", "--out", str(tmp_path)]) == code
  rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert [r["kind"] for r in rows] == ["kernel", "cp"] and rows[0]["status"] == status
  table = (tmp_path / "results.md").read_text()
  assert "| v5e | softmax | fwd_bwd | default | causal | 16 |" in table
  assert "| v5e | all_gather | 4 | 2048 |" in table and "reduce-scatter x1" in table
  summary = capsys.readouterr().out.strip().splitlines()[-1]
  assert ("'ok': 2" if status == "ok" else "'ok': 1, ") in summary and f"'{status}': " in summary


def test_missing_libtpu_is_one_line(monkeypatch, capsys, tmp_path):
  monkeypatch.setattr(run, "libtpu_missing", lambda: 'libtpu is not installed: pip install -e ".[tpu]"')
  assert run.main(["--preset", "ci", "--out", str(tmp_path)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "libtpu is not installed" in err[0]


def test_bad_flags_exit_2():
  for bad in (["--generations", "v3"], ["--configs", "tiles=x"], ["--strategies", "tree"]):
    with pytest.raises(SystemExit) as e:
      run.main(bad)
    assert e.value.code == 2


def _run_cli(tmp_path, *args, timeout=900):
  proc = subprocess.run([sys.executable, "-m", "experiments", "tpu_compile", "--out", str(tmp_path), *args], cwd=REPO,
                        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=timeout)
  rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()] if (
      tmp_path / "results.jsonl").exists() else []
  return proc, rows


@needs_libtpu
def test_ci_preset_builds_the_mosaic_kernels_and_reduce_scatters(tmp_path):
  proc, rows = _run_cli(tmp_path, "--preset", "ci")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  kernel, cp = rows
  # the real Mosaic kernels (tpu_custom_call), forward and backward, each with its scoped VMEM, within v5e's VMEM
  vmem = {k["name"]: k["vmem"] for k in kernel["kernels"]}
  assert set(vmem) == {"jaxattn_flash_fwd", "jaxattn_flash_bwd_dq", "jaxattn_flash_bwd_dkv"}, kernel
  assert all(0 < v <= 64 * MIB for v in vmem.values()), vmem
  assert "vmem_limit_bytes=100663296" in kernel["config_used"]  # v5e's default: 96 MiB (3/4 of 128)
  # all-gather context parallelism: K/V gathered forward, dK/dV reduce-scattered backward (no all-reduce of them)
  ops = {c["op"] for c in cp["fwd_bwd"]["collectives"]}
  assert {"all-gather", "reduce-scatter"} <= ops and "all-reduce" not in ops, cp["fwd_bwd"]["collectives"]
  assert {"jaxattn_flash_fwd", "jaxattn_flash_bwd_dq", "jaxattn_flash_bwd_dkv"} <= set(cp["fwd_bwd"]["kernels"])


@needs_libtpu
@pytest.mark.slow
def test_v4_overflows_at_1024_tiles(tmp_path):
  """The v4 default stays at 512: 1024 tiles do not fit its 16 MiB of VMEM (the dk/dv kernel)."""
  proc, [row] = _run_cli(tmp_path, "--preset", "tiles", "--generations", "v4", "--configs", "tiles=1024")
  assert proc.returncode == 1 and row["status"] == "overflow", row
  assert row["max_vmem"] > 16 * MIB


@needs_libtpu
@pytest.mark.slow
def test_default_preset_compiles_everything(tmp_path):
  """Every family on every generation, forward and backward, and every context-parallel strategy (tens of minutes on
  2 cores): all compile, every strategy's backward holds the Pallas dq / dk,dv kernels (ring and USP included)."""
  proc, rows = _run_cli(tmp_path, "--preset", "default", timeout=7200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  kernels = [r for r in rows if r["kind"] == "kernel"]
  assert len(kernels) == 24 and all(r["status"] == "ok" and r["kernels"] for r in kernels)
  for r in kernels:
    assert all(k["vmem"] <= r["vmem_capacity"] // 2 for k in r["kernels"]), r
  cps = {r["strategy"]: r for r in rows if r["kind"] == "cp"}
  assert set(cps) == set(tc_configs.STRATEGIES)
  for name, r in cps.items():
    assert r["status"] == "ok" and any("bwd" in k for k in r["fwd_bwd"]["kernels"]), (name, r)
  for name in ("all_gather", "linear"):
    ops = {c["op"] for c in cps[name]["fwd_bwd"]["collectives"]}
    assert "reduce-scatter" in ops and "all-reduce" not in ops, (name, cps[name]["fwd_bwd"]["collectives"])
