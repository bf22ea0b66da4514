"""``python -m experiments gpu_compile`` (issue 13 item 6): presets, targets, the report and the exit status; with the
CUDA plugin installed, the CI build compiled for sm_90 and the H200's landmark failure reproduced byte for byte.

Without the plugin (CI installs only ``.[test]``) the compile tests skip with the reason.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import gpu_compile as gc_configs
from experiments.gpu_compile import run

REPO = pathlib.Path(__file__).resolve().parents[2]


def _plugin_reason():
  return run.plugin_missing()


needs_plugin = pytest.mark.skipif(_plugin_reason() is not None, reason=str(_plugin_reason()))


def test_presets_validate():
  assert gc_configs.PRESETS["default"].dtypes == ("bfloat16",)
  assert set(gc_configs.PRESETS["full"].head_dims) == {64, 128, 256}
  assert set(gc_configs.PRESETS["full"].targets) == {"h100", "a100"}
  for bad in (dict(families=("nope",)), dict(head_dims=(512,)), dict(block_sizes=(48,)), dict(dtypes=()),
              dict(H=6, G=4), dict(targets=("v100",))):
    with pytest.raises(ValueError):
      dataclasses.replace(gc_configs.DEFAULT, **bad)


def test_builds_cover_every_family_dtype_and_mode():
  full = run.builds(gc_configs.FULL)
  # per target: (softmax + linear + 2 landmark block sizes) x 3 head dims x 2 dtypes x 2 modes
  assert len(full) == 2 * 4 * 3 * 2 * 2
  assert {(b.family, b.mode, b.dtype) for b in full} == {
      (f, m, d) for f in gc_configs.FAMILIES for m in gc_configs.MODES for d in gc_configs.DTYPES}
  assert [b.dtype for b in full[:len(full) // 4]] == ["bfloat16"] * (len(full) // 4)  # cheap builds first


def test_targets():
  h100, a100 = run.target_config("h100"), run.target_config("a100")
  assert "shared_memory_per_block_optin: 232448" in h100 and "major: 9" in h100
  assert "shared_memory_per_block_optin: 166912" in a100 and "major: 8" in a100 and "major: 9" not in a100
  assert "ACCELERATED_FEATURES" not in a100  # sm_80 has no sm_90a features
  assert run.smem_limits() == {"h100": 232448, "a100": 166912}
  with pytest.raises(ValueError, match="unknown target"):
    run.target_config("v100")


def _row(status, smem, message=""):
  return dict(family="landmark", mode="fwd_bwd", D=128, dtype="bfloat16", target="h100", block_size=64, B=1, T=1024,
              H=4, G=4, limit=232448, status=status, message=message, max_smem=smem, lower_s=1.0, compile_s=2.0,
              kernels=[dict(name="jaxattn_landmark_bwd_dkv", smem=smem, num_warps=8, num_stages=2, triton_s=1.0,
                            error="")])


@pytest.mark.parametrize("status, code", [("ok", 0), ("refused", 0), ("overflow", 1), ("error", 1)])
def test_exit_status_and_report(status, code, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(run, "plugin_missing", lambda: None)
  monkeypatch.setattr(run, "make_shardings", lambda targets: {t: None for t in targets})
  monkeypatch.setattr(run, "compile_build", lambda b, preset, sh: _row(status, 246784 if status == "overflow"
                                                                      else 114688, "requested 246784"))
  assert run.main(["--preset", "ci", "--out", str(tmp_path)]) == code
  rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert [r["status"] for r in rows] == [status]
  table = (tmp_path / "results.md").read_text()
  assert f"| landmark fwd_bwd D=128 bfloat16 bs=64 [h100] | {status} |" in table
  assert "jaxattn_landmark_bwd_dkv" in table and "| 8 | 2 |" in table
  assert f"'{status}': 1" in capsys.readouterr().out


def test_missing_plugin_is_one_line(monkeypatch, capsys, tmp_path):
  monkeypatch.setattr(run, "plugin_missing", lambda: "the CUDA plugin is not installed (x missing): pip install y")
  assert run.main(["--preset", "ci", "--out", str(tmp_path)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "CUDA plugin is not installed" in err[0]


def test_bad_flags_exit_2():
  with pytest.raises(SystemExit) as e:
    run.main(["--head-dims", "512"])
  assert e.value.code == 2


_SCRIPT = r"""
import json, os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
from configs import gpu_compile as gc
from experiments.gpu_compile import run
from jaxattn.ops.landmark import PallasGpuConfig
code = run.main(["--preset", "ci", "--out", sys.argv[1]])
sh = run.make_shardings(["h100"])
b = run.Build("landmark", "fwd_bwd", 128, "bfloat16", "h100", 64)
old = run.compile_build(b, gc.CI, sh, implementation=("pallas_gpu", PallasGpuConfig(block_q=128, num_stages=2)))
print("RESULT", json.dumps(dict(code=code, old=old)))
"""


@needs_plugin
def test_ci_build_compiles_for_sm90_and_the_old_tiles_overflow(tmp_path):
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads(proc.stdout.split("RESULT ", 1)[1])
  assert res["code"] == 0
  [row] = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert row["status"] == "ok" and row["compile_s"] > 0
  smem = {k["name"]: k["smem"] for k in row["kernels"]}
  assert set(smem) == {"jaxattn_landmark_fwd", "jaxattn_landmark_bwd_dq", "jaxattn_landmark_bwd_dkv"}
  assert 0 < max(smem.values()) <= 232448
  # the H200 failure, byte for byte: the old default tiles (block_q 128, 2 stages)
  old = res["old"]
  assert old["status"] == "overflow"
  assert "requested 246784, available: 232448" in old["message"]
  assert {k["name"]: k["smem"] for k in old["kernels"]}["jaxattn_landmark_bwd_dkv"] == 246784
