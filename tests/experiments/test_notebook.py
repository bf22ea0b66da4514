"""The quickstart notebook: valid notebook JSON, and its code cells run top to bottom as one script on CPU (the
install cell, tagged ``skip-execution``, is skipped)."""

import json
import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "notebooks" / "quickstart.ipynb"


def _load():
  return json.loads(NOTEBOOK.read_text())


def _code_cells(nb):
  cells = []
  for cell in nb["cells"]:
    if cell["cell_type"] != "code" or "skip-execution" in cell.get("metadata", {}).get("tags", []):
      continue
    cells.append("".join(cell["source"]))
  return cells


def test_notebook_is_valid():
  nb = _load()
  assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["language"] == "python"
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None  # committed without outputs
  install = [c for c in nb["cells"] if "skip-execution" in c.get("metadata", {}).get("tags", [])]
  assert len(install) == 1 and "pip install" in "".join(install[0]["source"])
  assert "colab.research.google.com" in "".join(nb["cells"][0]["source"])
  for src in _code_cells(nb):
    assert not any(line.lstrip().startswith(("!", "%")) for line in src.splitlines()), src
    compile(src, "<cell>", "exec")


def test_notebook_runs_as_a_script(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__main__"}
  for i, src in enumerate(_code_cells(_load())):
    exec(compile(src, f"<quickstart cell {i}>", "exec"), namespace)  # noqa: S102 - the notebook is ours
  out = capsys.readouterr().out
  assert "| attention |" in out and "| baseconv |" in out
  assert (tmp_path / "mqar_tiny" / "results.json").exists() and (tmp_path / "mqar_tiny" / "mqar_accuracy.png").exists()
  rows = namespace["results"]["runs"]
  assert {r["mixer"] for r in rows} == {"attention", "baseconv"}


ANALYSIS = NOTEBOOK.with_name("analysis.ipynb")


def test_analysis_notebook_is_valid():
  nb = json.loads(ANALYSIS.read_text())
  assert nb["nbformat"] == 4 and "colab.research.google.com" in "".join(nb["cells"][0]["source"])
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None
  for src in _code_cells(nb):
    compile(src, "<cell>", "exec")


@pytest.mark.slow  # ~25 CPU-seconds (every intervention retraces the model eagerly)
def test_analysis_notebook_runs_as_a_script(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__main__"}
  for i, src in enumerate(_code_cells(json.loads(ANALYSIS.read_text()))):
    exec(compile(src, f"<analysis cell {i}>", "exec"), namespace)  # noqa: S102 - the notebook is ours
  out = capsys.readouterr().out
  assert "rows still sum to 1: True" in out and (tmp_path / "analysis_maps.png").stat().st_size > 0
  assert namespace["probs"].shape == (2, 2, 4, 12, 12)
