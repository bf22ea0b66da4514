"""experiments.common.report: the run-directory rules and the report files every experiment writes."""

import json

import pytest

from experiments.common.config import ConfigError
from experiments.common.paths import RESULTS_DIR, RUNS_DIR
from experiments.common.report import environment, prepare_out_dir, preset_main, verdict_line, write_json, write_report


def test_prepare_new_resume_report_and_mismatch(tmp_path):
  out = tmp_path / "run"
  assert prepare_out_dir(out, fingerprint="a") is None and out.is_dir()
  with pytest.raises(ConfigError, match="--report: no results.json"):
    prepare_out_dir(tmp_path / "other", fingerprint="a", report=True)
  write_json(out / "results.json", {"fingerprint": "a", "rows": [1]})
  with pytest.raises(ConfigError, match="--resume"):
    prepare_out_dir(out, fingerprint="a")
  assert prepare_out_dir(out, fingerprint="a", resume=True)["rows"] == [1]
  assert prepare_out_dir(out, fingerprint="a", report=True)["rows"] == [1]
  with pytest.raises(ConfigError, match="other settings"):
    prepare_out_dir(out, fingerprint="b", resume=True)


def test_reference_folder_is_never_a_default():
  with pytest.raises(ConfigError, match="committed reference"):
    prepare_out_dir(RESULTS_DIR / "some_experiment" / "default", fingerprint="a", explicit_out=False)


def test_verdict_line_and_report_files(tmp_path, capsys):
  with pytest.raises(ValueError, match="must be one of"):
    verdict_line("kind of", "x")
  with pytest.raises(ValueError, match="reason"):
    verdict_line("partly", " ")
  line = verdict_line("partly", "half of it matches")
  write_report(tmp_path, {"fingerprint": "f", "environment": environment()}, title="T", table="| a |\n|---|\n| 1 |",
               verdict=line, notes=["n1"], plots=["p.png"])
  printed = capsys.readouterr().out.rstrip()
  assert printed.endswith(line)
  assert (tmp_path / "verdict.txt").read_text().strip() == line
  assert (tmp_path / "table.md").read_text().startswith("# T\n")
  data = json.loads((tmp_path / "results.json").read_text())
  assert data["verdict"] == line and data["notes"] == ["n1"] and data["environment"]["backend"] == "cpu"
  with pytest.raises(ValueError, match="verdict_line"):
    write_report(tmp_path, {}, title="T", table="t", verdict="reproduced")


def test_preset_main_passes_flags_and_defaults(tmp_path, capsys):
  class Preset:
    def __init__(self, name):
      self.name = name
  calls = []
  presets = {"cpu": Preset("cpu"), "smoke": Preset("smoke")}
  run = lambda cfg, out, **kw: calls.append((cfg.name, out, kw))
  assert preset_main("toy", "Toy experiment.\n\nDetails.", presets, run, []) == 0
  assert calls[-1] == ("cpu", RUNS_DIR / "toy" / "cpu",
                       dict(resume=False, report=False, progress=True, explicit_out=False))
  preset_main("toy", None, presets, run, ["--preset", "smoke", "--out", str(tmp_path), "--resume", "--no-progress",
                                          "--model-root", "m"], model_root=True)
  assert calls[-1] == ("smoke", tmp_path, dict(resume=True, report=False, progress=False, explicit_out=True,
                                                model_root="m"))
  with pytest.raises(SystemExit) as e:
    preset_main("toy", None, presets, run, ["--model-root", "m"])
  assert e.value.code == 2 and "python -m experiments toy: error" in capsys.readouterr().err


def test_run_experiment_computes_resumes_and_reports(tmp_path, capsys):
  import dataclasses

  from experiments.common.report import run_experiment

  @dataclasses.dataclass(frozen=True)
  class Cfg:
    name: str = "toy"
    n: int = 3

  seen = []

  def compute(out, payload):
    rows = payload.setdefault("rows", [])
    for i in range(len(rows), Cfg.n):
      rows.append(i * i)
      seen.append(i)
      write_json(out / "results.json", payload)
      if i == 0 and len(seen) == 1:
        raise KeyboardInterrupt  # killed after the first finished cell

  kw = dict(title="Toy", compute=compute, table=lambda p: (f"| rows |\n|---|\n| {p['rows']} |", ["a note"]),
            verdict=lambda p: verdict_line("partly", f"{len(p['rows'])} rows"), plots=lambda out, p: [])
  out = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt):
    run_experiment(Cfg(), out, **kw)
  with pytest.raises(ConfigError, match="--resume"):
    run_experiment(Cfg(), out, **kw)
  res = run_experiment(Cfg(), out, resume=True, verbose=False, **kw)
  assert res["rows"] == [0, 1, 4] and seen == [0, 1, 2] and res["verdict"].endswith("3 rows")
  rep = run_experiment(Cfg(), out, report=True, verbose=True, **kw)
  assert seen == [0, 1, 2] and rep["rows"] == [0, 1, 4]  # --report computes nothing
  saved = json.loads((out / "results.json").read_text())
  assert saved["preset"] == "toy" and saved["notes"] == ["a note"] and "VERDICT: partly" in capsys.readouterr().out
  with pytest.raises(ConfigError, match="other settings"):
    run_experiment(Cfg(n=4), out, resume=True, **kw)
