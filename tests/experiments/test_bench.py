"""Tests for ``python -m experiments bench``: end-to-end smoke run, FLOP counts, skipping and the dispatcher."""

import ast
import dataclasses
import pathlib
import subprocess
import sys

import pytest

from configs import bench as bench_configs
from experiments.bench import flops, registry, report, run
from jaxattn import backend as backend_lib
from jaxattn import masks
from jaxattn.ops.softmax import api as softmax_api

REPO = pathlib.Path(__file__).resolve().parents[2]
_TINY = bench_configs.BenchPreset(
    "tiny", (bench_configs.BenchShape("b1_t32", 1, 32, 32, 2, 2, 8, "float32", (bench_configs.CAUSAL,)),),
    repeats=1, warmup=0)


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench_smoke")
  assert run.main(["--preset", "smoke", "--out", str(out), "--no-progress", "--repeats", "2"]) == 0
  return out


def test_smoke_writes_jsonl_rows(smoke_out):
  rows = report.read_jsonl(smoke_out / "bench.jsonl")
  cases = registry.cases(registry.get_preset("smoke"))
  assert {r["case"] for r in rows} == {c.name for c in cases}
  assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
  for r in rows:
    assert set(report.ROW_FIELDS) <= set(r), set(report.ROW_FIELDS) - set(r)
    assert r["family"] == "softmax" and r["platform"] == "cpu" and r["git_sha"]
    assert r["status"] in ("ok", "skipped", "error", "oom")
    if r["status"] == "ok":
      assert 0 < r["q20_ms"] <= r["ms"] <= r["q80_ms"]
      assert r["tflops"] > 0 and r["flops"] > 0
    else:
      assert r["ms"] is None and r["error"]
  ok = {(r["case"], r["mode"], r["impl"]) for r in rows if r["status"] == "ok"}
  for c in cases:  # our xla path serves every case; the jax.nn anchor every mask it can express
    for mode in ("fwd", "fwd+bwd"):
      assert (c.name, mode, "xla") in ok
      assert ((c.name, mode, "jax.nn/xla") in ok) == (c.mask_spec.kind != "block_sparse")
  cudnn = [r for r in rows if r["impl"] == "cudnn"]  # CPU backend: cudnn refuses with NotImplementedError
  assert cudnn and all(r["status"] == "skipped" for r in cudnn)
  # forward outputs agree with the first measured implementation (f32)
  assert all(r["relerr"] < 1e-4 for r in rows if r["relerr"] is not None)


def test_smoke_writes_table_and_plot(smoke_out):
  table = (smoke_out / "bench.md").read_text()
  assert "ratio to anchor" in table and "| b1_t64_causal | fwd | xla |" in table
  assert "| b1_t64_causal | fwd | jax.nn/xla |" in table and " 1.00 |" in table
  assert "Not measured" in table and "cudnn" in table
  assert (smoke_out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flops_causal_equals_dense_count():
  B, T, H, D = 3, 96, 2, 16
  dense = int(masks.Causal().to_dense(T, T).sum())
  assert dense == T * (T + 1) // 2
  fwd = flops.attention_flops(masks.Causal(), B, T, T, H, D)
  assert fwd == 4 * dense * D * H * B
  assert flops.attention_flops(masks.Causal(), B, T, T, H, D, mode="fwd+bwd") == 3.5 * fwd
  assert flops.attention_flops(None, B, T, T, H, D) == 4 * T * T * D * H * B
  for m in (masks.sliding_window(17, causal=True), masks.random_block_sparse(6, 6, 0.5, 16, 16)):
    assert flops.attention_flops(m, B, T, T, H, D) == 4 * int(m.to_dense(T, T).sum()) * D * H * B


def test_not_implemented_is_skipped_and_errors_recorded(monkeypatch):
  class Refuses(backend_lib.Backend):
    name = "refuses"

    def fwd(self, call, config, args):
      raise NotImplementedError("no such luck")

  class Breaks(backend_lib.Backend):
    name = "breaks"

    def fwd(self, call, config, args):
      raise RuntimeError("kernel exploded")

  monkeypatch.setitem(softmax_api.BACKENDS, "refuses", Refuses())
  monkeypatch.setitem(softmax_api.BACKENDS, "breaks", Breaks())
  rows = run.run_bench(_TINY, modes=("fwd",), progress=False)
  by_impl = {r["impl"]: r for r in rows}
  assert by_impl["refuses"]["status"] == "skipped" and "no such luck" in by_impl["refuses"]["error"]
  assert by_impl["breaks"]["status"] == "error" and "kernel exploded" in by_impl["breaks"]["error"]
  assert by_impl["xla"]["status"] == "ok" and by_impl["jax.nn/xla"]["status"] == "ok"
  assert "reference" not in by_impl
  table = report.markdown_table(rows)
  assert "`refuses` skipped: NotImplementedError: no such luck" in table


def test_budget_skips_remaining_cases():
  rows = run.run_bench(_TINY, modes=("fwd",), impls=run.available_impls(requested=["xla"]), budget_s=-1.0,
                       progress=False)
  assert [r["status"] for r in rows] == ["skipped"] and "budget" in rows[0]["error"]


def test_available_impls(monkeypatch):
  monkeypatch.setitem(softmax_api.BACKENDS, "pallas_gpu", softmax_api.BACKENDS["pallas_gpu"])
  names = [i.name for i in run.available_impls()]
  assert names[-1] == "jax.nn/xla" and "reference" not in names and "pallas_gpu" in names
  case = registry.cases(_TINY)[0]
  pallas = {i.name: i for i in run.available_impls()}["pallas_gpu"]
  with pytest.raises(NotImplementedError, match="interpret mode"):  # never timed on CPU unless asked for
    pallas.build(case)
  asked = run.available_impls(include_reference=True, requested=["pallas_gpu", "reference"])
  assert [i.name for i in asked] == ["pallas_gpu", "reference"]
  asked[0].build(case)
  with pytest.raises(ValueError, match="unknown implementation"):
    run.available_impls(requested=["nope"])


def test_anchor_masks():
  assert run._jax_nn_mask_kwargs(masks.Full()) == {}
  assert run._jax_nn_mask_kwargs(masks.Causal()) == {"is_causal": True}
  assert run._jax_nn_mask_kwargs(masks.sliding_window(1024, causal=True)) == {
      "is_causal": True, "local_window_size": (1023, 0)}
  with pytest.raises(NotImplementedError):
    run._jax_nn_mask_kwargs(masks.random_block_sparse(2, 2, 0.5, 8, 8))


def test_presets():
  gpu = registry.cases(registry.get_preset("gpu"))
  assert {(c.shape.B, c.shape.T) for c in gpu} == {(8, 2048), (2, 8192), (1, 32768)}
  assert {c.mask_spec.name for c in gpu} == {"full", "causal", "swa1024", "bs0.1", "bs0.2", "bs0.5"}
  bs = [c for c in gpu if c.mask_spec.kind == "block_sparse" and c.shape.T == 2048]
  assert [round(float(c.mask.layout.mean()), 2) for c in bs] == [0.12, 0.19, 0.5]  # 16 blocks per row
  cpu = registry.cases(registry.get_preset("cpu"))
  assert [c.name for c in cpu] == ["b1_t1024_full", "b1_t1024_causal", "b1_t4096_full", "b1_t4096_causal"]
  with pytest.raises(dataclasses.FrozenInstanceError):
    cpu[0].shape.T = 1
  with pytest.raises(ValueError, match="unknown preset"):
    registry.get_preset("nope")


def test_report_ratio():
  base = dict(case="c", mode="fwd", status="ok")
  rows = [dict(base, impl="xla", ms=2.0), dict(base, impl="jax.nn/xla", ms=4.0),
          dict(base, impl="cudnn", ms=None, status="skipped")]
  assert report.anchor_ratios(rows) == [2.0, 1.0, None]


def test_configs_do_not_import_experiments():
  for path in (REPO / "configs").glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
          [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      assert not any(n.split(".")[0] == "experiments" for n in names), path


def test_cli_lists_subcommands():
  res = subprocess.run([sys.executable, "-m", "experiments"], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert res.returncode == 0 and "bench" in res.stdout
  res = subprocess.run([sys.executable, "-m", "experiments", "nope"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
  assert res.returncode == 2 and "bench" in res.stderr
