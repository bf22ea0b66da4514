"""``python -m experiments``: errors are one line naming the flag the user typed, impossible values are refused, a
missing extra names the pip extra, and errors the user must act on (a diverged run, unusable checkpoints) print one
line instead of a traceback."""

import argparse
import dataclasses
import os
import re
import subprocess
import sys

import pytest

from experiments import SUBCOMMANDS
from experiments import __main__ as cli
from experiments.common import config as config_lib
from experiments.common.errors import CorruptCheckpointError, NonFiniteError

PIP_HINT = 'pip install -e ".[experiments]"'


def _one_line(err: str) -> str:
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1, err
  assert "usage:" not in err and "Traceback" not in err, err
  return lines[0]


@pytest.mark.parametrize("argv, flag, match", [
    (["--train.epochs", "-5"], "--train.epochs", "train.epochs must be a positive int, got -5"),
    (["--train.epochs=0"], "--train.epochs", "must be a positive int, got 0"),
    (["--train.batch_size", "-32"], "--train.batch_size", "must be a positive int"),
    (["--lrs", "-0.1"], "--lrs", r"must be a float in \(0, 10\], got -0.1"),
    (["--lrs", "nan"], "--lrs", "must be a float"),
    (["--data.vocab_size", "4"], "--data.vocab_size", r"vocab_size \(4\) must be larger"),  # the outer config's check
    (["--train.epochs", "two"], "--train.epochs", "expected int, got 'two'"),
    (["--preset", "huge"], "--preset", "invalid choice: 'huge'"),
])
def test_mqar_errors_are_one_line_naming_the_typed_flag(argv, flag, match, capsys):
  from experiments.mqar import run as mqar_run
  with pytest.raises(SystemExit) as e:
    mqar_run.parse(argv)
  assert e.value.code == 2
  line = _one_line(capsys.readouterr().err)
  assert line.startswith("python -m experiments mqar: error: ") and flag in line and re.search(match, line), line
  leaf = "--" + flag.rsplit(".", 1)[-1]
  if "." in flag:  # never the bare leaf name (--epochs) for a nested flag (--train.epochs)
    assert not re.search(rf"(?<![\w.]){re.escape(leaf)}\b", line), line


@dataclasses.dataclass(frozen=True)
class _Inner:
  epochs: int = 1

  def __post_init__(self):
    if self.epochs < 1:
      raise ValueError(f"epochs must be >= 1, got {self.epochs}")


@dataclasses.dataclass(frozen=True)
class _Outer:
  train: _Inner = _Inner()
  limit: int = 10

  def __post_init__(self):
    if self.train.epochs > self.limit:
      raise ValueError(f"train.epochs ({self.train.epochs}) exceeds limit ({self.limit})")


@pytest.mark.parametrize("path, value, match", [
    ("train.epochs", -5, r"^--train\.epochs: epochs must be >= 1, got -5$"),  # rejected by the inner dataclass
    ("train.epochs", 11, r"^--train\.epochs: train\.epochs \(11\) exceeds limit"),  # by the outer one
    ("train.nope", 1, r"unknown config field 'train\.nope'"),
])
def test_replace_path_names_the_whole_flag(path, value, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.replace_path(_Outer(), path, value)
  assert config_lib.replace_path(_Outer(), "train.epochs", 3) == _Outer(_Inner(3))


@pytest.mark.parametrize("fn, text, ok", [
    (config_lib.positive_int, "3", 3), (config_lib.positive_int, "-5", None), (config_lib.positive_int, "0", None),
    (config_lib.positive_int, "2.5", None), (config_lib.nonnegative_int, "0", 0),
    (config_lib.nonnegative_int, "-1", None), (config_lib.positive_float, "1e-3", 1e-3),
    (config_lib.positive_float, "-0.1", None), (config_lib.positive_float, "nan", None),
    (config_lib.positive_float, "inf", None), (config_lib.nonnegative_float, "0", 0.0),
    (config_lib.nonnegative_float, "-1e-9", None),
])
def test_argparse_value_types(fn, text, ok):
  if ok is None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"got {re.escape(repr(text))}"):
      fn(text)
  else:
    assert fn(text) == ok


@pytest.mark.parametrize("module, argv, match", [
    ("experiments.bench.run", ["--repeats", "0"], "argument --repeats: expected a positive int, got '0'"),
    ("experiments.bench.run", ["--warmup", "-1"], "argument --warmup: expected an int >= 0, got '-1'"),
    ("experiments.bench.run", ["--budget-s", "-1"], "argument --budget-s: expected a finite float > 0, got '-1'"),
    ("experiments.passkey.run", ["--steps", "-5"], "argument --steps: expected a positive int, got '-5'"),
    ("experiments.passkey.run", ["--eval-samples", "0"], "argument --eval-samples: expected a positive int"),
    ("experiments.cp_model.run", ["--preset", "x"], "argument --preset: invalid choice: 'x'"),
])
def test_other_subcommands_refuse_impossible_values_in_one_line(module, argv, match, capsys):
  import importlib
  with pytest.raises(SystemExit) as e:
    importlib.import_module(module).main(argv)
  assert e.value.code == 2
  assert match in _one_line(capsys.readouterr().err)


def test_the_real_command_prints_one_line():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "experiments", "mqar", "--train.epochs", "-5"], capture_output=True,
                     text=True, env=env, timeout=300)
  assert p.returncode == 2 and p.stdout == ""
  assert "--train.epochs: train.epochs must be a positive int, got -5" in _one_line(p.stderr)


def test_unknown_experiment(capsys):
  assert cli.main(["mqar_typo"]) == 2
  line = _one_line(capsys.readouterr().err)
  assert "unknown experiment 'mqar_typo'" in line and "mqar" in line


@pytest.mark.parametrize("blocked", ["matplotlib", "optax", "orbax", "flax"])
def test_missing_extra_names_the_extra_before_anything_runs(blocked, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, blocked, None)  # `import <blocked>` now raises ModuleNotFoundError
  assert cli.main(["mqar", "--preset", "test", "--workdir", "/nonexistent/never-written"]) == 1
  line = _one_line(capsys.readouterr().err)
  assert f"missing optional dependency {blocked!r}" in line and PIP_HINT in line


def _needs(module):
  def run(argv):
    __import__(module)
    return 0
  return run


_needs_tqdm = _needs("tqdm.auto")
_needs_typo = _needs("experiments.common.no_such_module")


def _diverges(argv):
  raise NonFiniteError("mixer-x: non-finite loss at step 7 of 12 (loss nan, peak lr 10); training stopped\n"
                       "and the run is not recorded as finished", step=7)


def _no_checkpoint(argv):
  raise CorruptCheckpointError("no usable checkpoint in /tmp/x", reason="all steps failed")


def _fake(monkeypatch, name):
  monkeypatch.setitem(SUBCOMMANDS, name, (f"{__name__}:{name}", "test double"))


def test_missing_module_at_run_time_is_one_line_but_a_real_bug_keeps_its_traceback(monkeypatch, capsys):
  _fake(monkeypatch, "_needs_tqdm")
  _fake(monkeypatch, "_needs_typo")
  monkeypatch.setitem(sys.modules, "tqdm.auto", None)
  assert cli.main(["_needs_tqdm"]) == 1
  assert "missing optional dependency 'tqdm'" in _one_line(capsys.readouterr().err)
  with pytest.raises(ModuleNotFoundError, match="no_such_module"):
    cli.main(["_needs_typo"])


@pytest.mark.parametrize("name, match", [
    ("_diverges", r"^python -m experiments _diverges: error: mixer-x: non-finite loss at step 7 of 12 .* not "
                  r"recorded as finished$"),
    ("_no_checkpoint", r"^python -m experiments _no_checkpoint: error: no usable checkpoint in /tmp/x$"),
])
def test_user_facing_errors_are_one_line_with_status_1(name, match, monkeypatch, capsys):
  _fake(monkeypatch, name)
  assert cli.main([name]) == 1
  assert re.search(match, _one_line(capsys.readouterr().err))
