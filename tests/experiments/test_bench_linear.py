"""The linear-attention family of ``python -m experiments bench``: presets, FLOP convention, a CPU smoke run."""

import dataclasses

import pytest

from configs import bench as bench_configs
from experiments.bench import linear, report, run


def test_presets_match_the_issue():
  gpu = linear.cases(bench_configs.LINEAR_PRESETS["linear_gpu"])
  assert {(c.shape.B, c.shape.T) for c in gpu} == {(8, 2048), (2, 8192), (1, 32768), (1, 131072)}
  assert {(c.shape.H, c.shape.D, c.shape.E, c.shape.dtype) for c in gpu} == {(16, 128, 128, "bfloat16")}
  assert {c.decay for c in gpu} == {"head", "token"} and len(gpu) == 8
  assert [c.name for c in linear.cases(bench_configs.LINEAR_PRESETS["linear_cpu"])] == [
      "b1_t1024_head", "b1_t1024_token", "b1_t4096_head", "b1_t4096_token"]
  with pytest.raises(ValueError, match="decays"):
    bench_configs.LinearBenchShape("x", 1, 8, 2, 2, 4, 4, "float32", ("sometimes",))
  with pytest.raises(dataclasses.FrozenInstanceError):
    gpu[0].shape.T = 1


def test_flops_convention():
  assert linear.linear_flops(2, 8192, 16, 128) == 4 * 2 * 8192 * 16 * 128 * 128
  assert linear.linear_flops(1, 10, 2, 4, 8, mode="fwd+bwd") == 3 * 4 * 10 * 2 * 4 * 8
  with pytest.raises(ValueError, match="mode"):
    linear.linear_flops(1, 1, 1, 1, mode="bwd")


def test_smoke_run_and_interpret_kernel(tmp_path):
  assert run.main(["--preset", "linear_smoke", "--out", str(tmp_path), "--no-progress", "--repeats", "1"]) == 0
  rows = report.read_jsonl(tmp_path / "bench.jsonl")
  assert {r["family"] for r in rows} == {"linear"}
  ok = {(r["case"], r["mode"], r["impl"]) for r in rows if r["status"] == "ok"}
  assert ok == {(c, m, "xla") for c in ("b1_t64_g2_none", "b1_t64_g2_token") for m in ("fwd", "fwd+bwd")}
  skipped = [r for r in rows if r["impl"].startswith("pallas_")]
  assert skipped and all(r["status"] == "skipped" and "interpret" in r["error"] for r in skipped)
  table = (tmp_path / "bench.md").read_text()
  assert "Ratio = `xla` ms / ms" in table and "fwd = 4 B T H D E" in table
  # a kernel named explicitly runs (interpret mode on CPU) and agrees with the xla path
  preset = dataclasses.replace(bench_configs.LINEAR_PRESETS["linear_smoke"], repeats=1)
  rows = linear.run_bench(preset, modes=("fwd",), impls=linear.available_impls(requested=["xla", "pallas_gpu"]),
                          progress=False)
  kernel = [r for r in rows if r["impl"] == "pallas_gpu"]
  assert kernel and all(r["status"] == "ok" and r["relerr"] < 1e-5 for r in kernel), kernel
  with pytest.raises(ValueError, match="unknown implementation"):
    linear.available_impls(requested=["cudnn"])
