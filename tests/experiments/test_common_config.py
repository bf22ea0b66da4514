"""Typed configs: JSON round trip of every MQAR preset, command-line overrides, and clear errors for bad values."""

import argparse
import dataclasses
import json
import re
from typing import Literal

import pytest

from configs import mqar
from experiments.common import config as config_lib
from experiments.mqar import run as mqar_run


@pytest.mark.parametrize("name", sorted(mqar.PRESETS), ids=lambda n: f"preset_{n}")  # not "gpu": a marker name
def test_preset_round_trip(name):
  cfg = mqar.get_config(name)
  data = json.loads(json.dumps(config_lib.to_dict(cfg)))
  back = config_lib.from_dict(mqar.MQARConfig, data)
  assert back == cfg
  assert config_lib.fingerprint(back) == config_lib.fingerprint(cfg)


def test_from_dict_rejects_unknown_and_mistyped():
  data = config_lib.to_dict(mqar.get_config("test"))
  with pytest.raises(config_lib.ConfigError, match=r"unknown field\(s\) \['lr'\]"):
    config_lib.from_dict(mqar.MQARConfig, dict(data, lr=1.0))
  bad = json.loads(json.dumps(data))
  bad["train"]["batch_size"] = "32"
  with pytest.raises(config_lib.ConfigError, match="train.batch_size: expected int, got '32'"):
    config_lib.from_dict(mqar.MQARConfig, bad)
  bad = json.loads(json.dumps(data))
  bad["mixers"] = ["attention", "mamba"]
  with pytest.raises(config_lib.ConfigError, match=r"mixers\[1\]: 'mamba' is not one of"):
    config_lib.from_dict(mqar.MQARConfig, bad)


@dataclasses.dataclass(frozen=True)
class _Pair:
  a: int
  b: float = 1.0


@pytest.mark.parametrize("tp, text, want", [
    (int, "3", 3), (float, "1e-3", 1e-3), (bool, "yes", True), (bool, "False", False), (str, "x", "x"),
    (int | None, "none", None), (int | None, "4", 4), (float | None, "0.5", 0.5),
    (tuple[int, ...], "32,64", (32, 64)), (tuple[float, ...], "1e-3", (1e-3,)),
    (tuple[_Pair, ...], "1:2.5,3", (_Pair(1, 2.5), _Pair(3))), (Literal["a", "b"], "b", "b"),
    (tuple[tuple[int, int], ...], "64:4,128:8", ((64, 4), (128, 8))),
])
def test_parse_value(tp, text, want):
  assert config_lib.parse_value(tp, text) == want


@pytest.mark.parametrize("tp, text, match", [
    (int, "3.5", "expected int, got '3.5'"), (bool, "maybe", "expected a boolean"),
    (Literal["a", "b"], "c", r"'c' is not one of \['a', 'b'\]"), (tuple[int, int], "1", "expected 2"),
])
def test_parse_value_errors(tp, text, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.parse_value(tp, text, "--x")


def test_cli_overrides():
  cfg, args = mqar_run.parse(["--preset", "smoke", "--train.batch_size", "16", "--d_models", "32,64",
                              "--tasks", "64:4,128:8:256", "--mixers", "attention,based", "--lrs", "1e-3,1e-2",
                              "--train.early_stop", "none", "--model.window", "8", "--workdir", "/tmp/x"])
  assert cfg.name == "smoke" and args.workdir == "/tmp/x"
  assert cfg.train.batch_size == 16 and cfg.train.early_stop is None and cfg.model.window == 8
  assert cfg.d_models == (32, 64) and cfg.mixers == ("attention", "based") and cfg.lrs == (1e-3, 1e-2)
  assert cfg.tasks == (mqar.Task(64, 4), mqar.Task(128, 8, 256))
  assert cfg.data == mqar.SMOKE.data  # untouched fields keep the preset's values


@pytest.mark.parametrize("argv, match", [
    (["--train.batch_size", "0"], "train.batch_size must be a positive int, got 0"),
    (["--lrs", "0.001,-1"], r"lrs\[i\] must be a float in \(0, 10\], got -1.0"),
    (["--tasks", "63:4"], "Task.seq_len must be even, got 63"),
    (["--tasks", "64:20"], "MQAR needs N >= 4 D"),
    (["--mixers", "attention,mamba"], r"--mixers\[1\]: 'mamba' is not one of"),
    (["--train.early_stop", "1.5"], r"train.early_stop must be a float in \(0, 1\], got 1.5"),
    (["--data.vocab_size", "4"], r"--data.vocab_size: data.vocab_size \(4\) must be larger than the task's seq_len"),
    (["--d_models", "32,32"], "d_models has duplicates"),
    (["--train.epochs", "two"], "--train.epochs: expected int, got 'two'"),
    (["--model.embed_dropout", "1"], r"model.embed_dropout must be a float in \[0, 1\), got 1"),
])
def test_bad_values_give_clear_errors(argv, match, capsys):
  with pytest.raises(SystemExit) as e:
    mqar_run.parse(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert re.search(match, err), err


def test_unknown_flag_and_preset(capsys):
  with pytest.raises(SystemExit):
    mqar_run.parse(["--train.nope", "1"])
  assert "unrecognized arguments: --train.nope" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    mqar_run.parse(["--preset", "huge"])
  assert "invalid choice: 'huge'" in capsys.readouterr().err
  with pytest.raises(ValueError, match="unknown MQAR preset 'huge'"):
    mqar.get_config("huge")


def test_print_config(capsys):
  assert mqar_run.main(["--preset", "test", "--train.epochs", "3", "--print-config"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["name"] == "test" and out["train"]["epochs"] == 3


def test_add_flags_help_lists_every_leaf():
  parser = argparse.ArgumentParser()
  config_lib.add_flags(parser, dataclasses.replace(mqar.DEFAULT, tasks=(mqar.Task(32, 4), mqar.Task(64, 8))))
  text = parser.format_help()
  for flag in ("--tasks", "--d_models", "--train.batch_size", "--data.vocab_size", "--model.window", "--lrs"):
    assert flag in text
  assert "preset: 32:4:None,64:8:None" in text
