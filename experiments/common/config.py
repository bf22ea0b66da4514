"""Typed configs: frozen dataclasses <-> JSON dicts and command-line overrides.

Presets live in ``configs/<experiment>.py`` as frozen dataclasses (validated in ``__post_init__``). This module
turns any such tree into command-line flags, one per leaf field, named by its dotted path::

    python -m experiments mqar --preset smoke --train.batch_size 32 --d_models 32,64 --tasks 64:4,128:8

Values are parsed by the field's annotation: ``int``, ``float``, ``str``, ``bool`` (``true/false/1/0/yes/no``),
``Literal[...]`` (must be one of the choices), ``X | None`` (``none`` gives None), ``tuple[X, ...]``
(comma-separated) and tuples of dataclasses or fixed tuples (fields separated by ``:``). Overrides are applied with
``dataclasses.replace``, so the preset's own validation runs on the result and a bad value is reported with its
flag. :func:`to_dict` / :func:`from_dict` round-trip a config through JSON (``from_dict`` rejects unknown keys).

Command-line errors are one line (:class:`ArgumentParser`: ``prog: error: --train.epochs: ... (prog --help lists
the options)``, exit status 2, no usage block first), and always name the flag as the user typed it. The argparse
types :func:`positive_int`, :func:`nonnegative_int`, :func:`positive_float` and :func:`nonnegative_float` reject
impossible values (``--steps -5``, a negative learning rate, NaN) in that line.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import types
import typing
from typing import Any, Literal, Mapping, Sequence, Union

__all__ = ["to_dict", "from_dict", "add_flags", "apply_flags", "parse_value", "replace_path", "fingerprint",
           "ConfigError", "ArgumentParser", "positive_int", "nonnegative_int", "positive_float",
           "nonnegative_float"]


class ConfigError(ValueError):
  """A config value that cannot be parsed or fails validation (the message names the field)."""


def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _optional_inner(tp):
  """``X`` for ``X | None`` / ``Optional[X]``, else None."""
  origin = typing.get_origin(tp)
  if origin in (Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and len(typing.get_args(tp)) == 2:
      return args[0]
  return None


# ------------------------------------------------------------------------------------------------- dict round trip
def to_dict(cfg) -> dict[str, Any]:
  """A JSON-ready dict of a dataclass tree (tuples become lists; dicts of dataclasses are converted too)."""
  def conv(v):
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
      return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (tuple, list)):
      return [conv(x) for x in v]
    if isinstance(v, dict):
      return {k: conv(x) for k, x in v.items()}
    return v
  return conv(cfg)


def _from_json(tp, value, where: str):
  inner = _optional_inner(tp)
  if inner is not None:
    return None if value is None else _from_json(inner, value, where)
  if _is_dataclass_type(tp):
    return from_dict(tp, value, _where=where)
  origin = typing.get_origin(tp)
  if origin is tuple:
    args = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where}: expected a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_from_json(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if len(args) != len(value):
      raise ConfigError(f"{where}: expected {len(args)} items, got {value!r}")
    return tuple(_from_json(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
  if origin is Literal:
    if value not in typing.get_args(tp):
      raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
    return value
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp in (int, float, str, bool) and not (type(value) is tp):
    raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
  return value


def from_dict(cls, data: Mapping[str, Any], *, _where: str = ""):
  """Builds a ``cls`` dataclass tree from :func:`to_dict` output, type-checking every value.

  Raises:
    ConfigError: on unknown or badly typed keys, or when the dataclass's own validation fails.
  """
  if not isinstance(data, Mapping):
    raise ConfigError(f"{_where or cls.__name__}: expected a mapping, got {data!r}")
  hints = _hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - names)
  if unknown:
    raise ConfigError(f"{_where or cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
  kwargs = {k: _from_json(hints[k], v, f"{_where}.{k}" if _where else k) for k, v in data.items()}
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{_where or cls.__name__}: {e}") from e


def fingerprint(cfg) -> str:
  """A short stable hash of a config (for checking that a work directory belongs to this config)."""
  return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------- string parsing
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_value(tp, text: str, where: str = "value"):
  """Parses a command-line string as type ``tp`` (see the module docstring for the accepted forms).

  Raises:
    ConfigError: naming ``where`` and the expected form.
  """
  inner = _optional_inner(tp)
  if inner is not None:
    return None if text.strip().lower() in ("none", "null", "") else parse_value(inner, text, where)
  origin = typing.get_origin(tp)
  if origin is Literal:
    choices = typing.get_args(tp)
    for c in choices:
      if str(c) == text:
        return c
    raise ConfigError(f"{where}: {text!r} is not one of {list(choices)}")
  if origin is tuple:
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
      items = [t for t in text.split(",") if t.strip()] if text.strip() else []
      return tuple(parse_value(args[0], t.strip(), f"{where}[{i}]") for i, t in enumerate(items))
    parts = text.split(":")
    if len(parts) != len(args):
      raise ConfigError(f"{where}: expected {len(args)} ':'-separated values, got {text!r}")
    return tuple(parse_value(a, p, f"{where}[{i}]") for i, (a, p) in enumerate(zip(args, parts)))
  if _is_dataclass_type(tp):
    fields = [f for f in dataclasses.fields(tp) if f.init]
    hints = _hints(tp)
    parts = text.split(":")
    required = [f for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if not len(required) <= len(parts) <= len(fields):
      raise ConfigError(f"{where}: expected {len(required)} to {len(fields)} ':'-separated values "
                        f"({':'.join(f.name for f in fields)}), got {text!r}")
    kwargs = {f.name: parse_value(hints[f.name], p, f"{where}.{f.name}") for f, p in zip(fields, parts)}
    try:
      return tp(**kwargs)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{where}: {e}") from e
  if tp is bool:
    t = text.strip().lower()
    if t in _TRUE:
      return True
    if t in _FALSE:
      return False
    raise ConfigError(f"{where}: expected a boolean (true/false), got {text!r}")
  if tp in (int, float):
    try:
      return tp(text)
    except ValueError:
      raise ConfigError(f"{where}: expected {tp.__name__}, got {text!r}") from None
  if tp is str:
    return text
  raise ConfigError(f"{where}: cannot parse type {tp!r} from the command line")


def _format_value(v) -> str:
  if dataclasses.is_dataclass(v) and not isinstance(v, type):
    return ":".join(_format_value(getattr(v, f.name)) for f in dataclasses.fields(v))
  if isinstance(v, tuple):
    return ",".join(_format_value(x) for x in v)
  return str(v)


def _leaves(cfg, prefix: str = ""):
  """``(dotted_path, annotation, value)`` for every leaf field (nested dataclass fields recurse)."""
  hints = _hints(type(cfg))
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    path = f"{prefix}{f.name}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and _is_dataclass_type(hints[f.name]):
      yield from _leaves(value, path + ".")
    else:
      yield path, hints[f.name], value


# ------------------------------------------------------------------------------------------------ overrides
def replace_path(cfg, path: str, value, *, _flag: str | None = None):
  """``cfg`` with the field at dotted ``path`` replaced (rebuilding every dataclass on the way, so each one's
  validation runs).

  Raises:
    ConfigError: for an unknown path or a value the dataclass rejects; the message starts with the whole flag
      (``--train.epochs: ...``), whichever dataclass on the way rejected it.
  """
  flag = _flag or f"--{path}"
  head, _, rest = path.partition(".")
  names = {f.name for f in dataclasses.fields(cfg)}
  if head not in names:
    raise ConfigError(f"unknown config field {flag[2:]!r} in {type(cfg).__name__}; known: {sorted(names)}")
  if rest:
    value = replace_path(getattr(cfg, head), rest, value, _flag=flag)
  try:
    return dataclasses.replace(cfg, **{head: value})
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{flag}: {e}") from e


def add_flags(parser: argparse.ArgumentParser, cfg, exclude: Sequence[str] = ()) -> None:
  """Adds ``--<dotted.path>`` for every leaf field of ``cfg`` (help shows the type and the preset's value)."""
  group = parser.add_argument_group("config overrides (default: the preset's value)")
  for path, tp, value in _leaves(cfg):
    if path in exclude:
      continue
    name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    group.add_argument(f"--{path}", dest=f"cfg:{path}", default=None, metavar="V",
                       help=f"{name} (preset: {_format_value(value)})")


def apply_flags(cfg, namespace: argparse.Namespace):
  """``cfg`` with every flag from :func:`add_flags` that was given applied.

  Raises:
    ConfigError: naming the flag when a value does not parse or the config rejects it.
  """
  leaves = {path: tp for path, tp, _ in _leaves(cfg)}
  for key, text in vars(namespace).items():
    if not key.startswith("cfg:") or text is None:
      continue
    path = key[4:]
    cfg = replace_path(cfg, path, parse_value(leaves[path], text, f"--{path}"))
  return cfg


# --------------------------------------------------------------------------------------------- command line
class ArgumentParser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` whose errors are one line on stderr (exit status 2)::

      python -m experiments mqar: error: --train.epochs: train.epochs must be a positive int, got -5 (python -m
      experiments mqar --help lists the options)

  instead of the whole usage block followed by the message.
  """

  def error(self, message: str):
    message = " ".join(str(message).split())
    self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def _number(kind: type, text: str, ok, what: str):
  try:
    value = kind(text)
  except (TypeError, ValueError):
    raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
  if isinstance(value, float) and not math.isfinite(value) or not ok(value):
    raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
  return value


def positive_int(text: str) -> int:
  """argparse ``type=``: an int >= 1 (``--steps -5`` gives ``argument --steps: expected a positive int, got
  '-5'``)."""
  return _number(int, text, lambda v: v >= 1, "a positive int")


def nonnegative_int(text: str) -> int:
  """argparse ``type=``: an int >= 0."""
  return _number(int, text, lambda v: v >= 0, "an int >= 0")


def positive_float(text: str) -> float:
  """argparse ``type=``: a finite float > 0 (learning rates, time budgets)."""
  return _number(float, text, lambda v: v > 0, "a finite float > 0")


def nonnegative_float(text: str) -> float:
  """argparse ``type=``: a finite float >= 0."""
  return _number(float, text, lambda v: v >= 0, "a finite float >= 0")
