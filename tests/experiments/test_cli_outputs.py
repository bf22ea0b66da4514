"""Where runs write: a git-ignored ``runs/`` folder by default; the reference results committed under
``experiments/results/`` are neither a resume point nor overwritten unless the user names them."""

import hashlib
import json
import pathlib
import shutil
import subprocess

import pytest

from experiments.common import paths

REPO = pathlib.Path(__file__).resolve().parents[2]


def _tracked_results_digest() -> dict[str, str]:
  return {str(p.relative_to(REPO)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(paths.RESULTS_DIR.rglob("*")) if p.is_file()}


def test_paths():
  assert paths.RESULTS_DIR == REPO / "experiments" / "results"
  assert paths.default_out_dir("bench", "cpu") == pathlib.Path("runs/bench/cpu")
  assert paths.is_reference_results(REPO / "experiments/results/mqar/results.json")
  assert paths.is_reference_results(paths.RESULTS_DIR)
  assert not paths.is_reference_results(REPO / "runs/mqar")
  assert not paths.is_reference_results(REPO / "experiments/results_old")
  with pytest.raises(ValueError):
    paths.default_out_dir("..", "x")


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_runs_folder_is_ignored_and_references_are_tracked():
  ignored = subprocess.run(["git", "check-ignore", "-q", "runs/mqar/results.json"], cwd=REPO)
  assert ignored.returncode == 0, "runs/ must be git-ignored"
  tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "experiments/results/mqar/results.json"], cwd=REPO,
                           capture_output=True)
  assert tracked.returncode == 0


def test_mqar_default_is_runs_and_never_reads_committed_results(tmp_path, monkeypatch, capsys):
  from experiments.mqar import run as mqar_run
  assert (paths.RESULTS_DIR / "mqar" / "results.json").exists()  # the reference a resume must not pick up
  before = _tracked_results_digest()
  monkeypatch.chdir(tmp_path)
  assert mqar_run.main(["--report", "--no-progress"]) == 0  # the default preset, training nothing
  out = capsys.readouterr().out
  written = json.loads((tmp_path / "runs" / "mqar" / "results.json").read_text())
  assert written["runs"] == [], "committed reference results were read as finished runs"
  assert "runs/mqar" in out
  assert _tracked_results_digest() == before


def test_bench_default_is_runs(tmp_path, monkeypatch):
  from experiments.bench import run as bench_run
  before = _tracked_results_digest()
  monkeypatch.chdir(tmp_path)
  assert bench_run.main(["--preset", "smoke", "--modes", "fwd", "--impls", "xla", "--repeats", "1", "--warmup", "0",
                         "--no-progress"]) == 0
  rows = [json.loads(line) for line in (tmp_path / "runs/bench/smoke/bench.jsonl").read_text().splitlines()]
  assert rows and all(r["impl"] == "xla" for r in rows) and any(r["status"] == "ok" for r in rows)
  assert _tracked_results_digest() == before


def test_cp_model_and_passkey_default_to_runs(tmp_path, monkeypatch):
  from experiments.cp_model import run as cp_run
  from experiments.passkey import run as passkey_run
  assert passkey_run.DEFAULT_OUT == pathlib.Path("runs/passkey")
  before = _tracked_results_digest()
  monkeypatch.chdir(tmp_path)
  assert cp_run.main(["--preset", "tiny", "--no-plot"]) == 0
  assert (tmp_path / "runs/cp_model/cp_model.jsonl").stat().st_size > 0
  assert _tracked_results_digest() == before
