"""The whole command with a damaged checkpoint on disk: ``python -m experiments mqar`` after a kill whose newest
checkpoint has a flipped bit (one Orbax alone restores silently, with other values) warns naming that step, resumes
from the previous one ("resumed from step N of M") and finishes with exit status 0."""

import itertools
import json
import pathlib
import shutil
import warnings

import orbax.checkpoint as ocp
import pytest

from experiments import __main__ as cli
from experiments.common.checkpoint import CheckpointWarning
from experiments.common.train import Interrupted, tree_equal


def _silent_flip(step_dir: pathlib.Path, tmp: pathlib.Path) -> pathlib.Path:
  """Flips one bit of an array-data file of ``step_dir`` such that Orbax alone restores the state without an error
  but with different values (found by trying positions on copies); returns the file."""
  ref = ocp.StandardCheckpointer().restore(step_dir / "state")
  files = sorted((p.relative_to(step_dir) for p in (step_dir / "state").rglob("*") if p.is_file() and
                  p.parent.name == "d"), key=lambda r: -(step_dir / r).stat().st_size)
  for n, (rel, where) in enumerate(itertools.product(files, (0.5, 0.25, 0.1, 0.75))):
    copy = tmp / f"probe{n}"
    shutil.copytree(step_dir, copy)
    _flip(copy / rel, where)
    try:
      silent = not tree_equal(ocp.StandardCheckpointer().restore(copy / "state"), ref)
    except Exception:  # noqa: BLE001 - Orbax noticed this one itself
      silent = False
    if silent:
      _flip(step_dir / rel, where)
      return step_dir / rel
  raise AssertionError("no bit flip changed the restored values silently")


def _flip(f: pathlib.Path, where: float) -> None:
  b = bytearray(f.read_bytes())
  b[int(len(b) * where)] ^= 0x20
  f.write_bytes(bytes(b))


def test_mqar_command_falls_back_from_a_bit_flipped_checkpoint(tmp_path, capsys):
  from experiments.mqar import run as mqar_run
  argv = ["mqar", "--preset", "test", "--keep_checkpoints", "true", "--train.checkpoint_every", "6",
          "--no-progress", "--workdir", str(tmp_path)]
  cfg, _ = mqar_run.parse(argv[1:])
  with pytest.raises(Interrupted):
    mqar_run.run_sweep(cfg, tmp_path, interrupt_after=14, progress=False)  # checkpoints at 6 and 12
  (run_dir,) = (tmp_path / "checkpoints").iterdir()
  assert sorted(int(p.name) for p in run_dir.iterdir() if p.name.isdigit()) == [6, 12]
  _silent_flip(run_dir / "12", tmp_path / "probes")
  capsys.readouterr()
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    assert cli.main(argv) == 0
  msgs = [str(w.message) for w in rec if issubclass(w.category, CheckpointWarning)]
  assert any("checkpoint step 12" in m and "SHA-256 digest" in m and "falling back to step 6" in m for m in msgs), msgs
  out = capsys.readouterr().out
  assert "resumed from step 6 of 32" in out
  rows = json.loads((tmp_path / "results.json").read_text())["runs"]
  assert len(rows) == 1 and rows[0]["steps"] == 32
  assert (run_dir / "12.corrupt").is_dir()
