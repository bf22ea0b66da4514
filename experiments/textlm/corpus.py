"""Byte-level corpus from the Python standard library's ``.py`` sources (``configs/textlm.py`` describes it).

- :func:`split_files`: the deterministic train / test file lists (by ``crc32`` of the file name);
- :func:`corpus_bytes`: a split's bytes (files in ``crc32`` order, capped), cached per process;
- :class:`ByteWindows`: a Grain source of non-overlapping ``[seq_len + 1]`` byte windows (``tokens`` int32);
- :func:`describe`: sizes, file counts and a digest of both splits (recorded in ``results.json``).
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
import sysconfig
import zlib

import numpy as np

from configs.textlm import CorpusConfig
from experiments.common.data import GeneratedSource

__all__ = ["stdlib_dir", "split_files", "corpus_bytes", "ByteWindows", "describe", "VOCAB_SIZE"]

VOCAB_SIZE = 256  # bytes
SPLITS = ("train", "test")


def stdlib_dir() -> pathlib.Path:
  """The running interpreter's standard library folder."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@functools.lru_cache(maxsize=None)
def split_files(cfg: CorpusConfig, split: str) -> tuple[pathlib.Path, ...]:
  """The ``.py`` files of ``split``, in ``crc32(name)`` order (ties by name); disjoint across splits."""
  _check_split(split)
  root = stdlib_dir() / cfg.subdir
  if not root.is_dir():
    raise ValueError(f"corpus.subdir {cfg.subdir!r} is not a folder of the standard library ({stdlib_dir()})")
  files = sorted((p for p in root.glob("*.py") if p.is_file()), key=lambda p: (zlib.crc32(p.name.encode()), p.name))
  held = [p for p in files if zlib.crc32(p.name.encode()) % cfg.test_every == 0]
  keep = held if split == "test" else [p for p in files if zlib.crc32(p.name.encode()) % cfg.test_every != 0]
  if not keep:
    raise ValueError(f"the {split} split of {root} is empty (test_every={cfg.test_every})")
  return tuple(keep)


@functools.lru_cache(maxsize=None)
def corpus_bytes(cfg: CorpusConfig, split: str) -> bytes:
  """The split's bytes: its files concatenated (each followed by a NUL byte), capped at the split's maximum."""
  cap = cfg.max_test_bytes if split == "test" else cfg.max_train_bytes
  parts, n = [], 0
  for p in split_files(cfg, split):
    b = p.read_bytes() + b"\0"
    parts.append(b[:cap - n])
    n += len(parts[-1])
    if n >= cap:
      break
  data = b"".join(parts)
  if len(data) < cfg.seq_len + 1:
    raise ValueError(f"the {split} split has only {len(data)} bytes, fewer than one window of {cfg.seq_len + 1}")
  return data


class ByteWindows(GeneratedSource):
  """Non-overlapping windows ``tokens int32 [seq_len + 1]`` of a split (inputs ``[:-1]``, targets ``[1:]``)."""

  PARAMS = ("corpus", "split")

  def __init__(self, corpus: CorpusConfig, split: str):
    _check_split(split)
    self.corpus, self.split = corpus, split

  def generate(self):
    w = self.corpus.seq_len + 1
    data = np.frombuffer(corpus_bytes(self.corpus, self.split), np.uint8)
    n = len(data) // w
    return {"tokens": data[:n * w].reshape(n, w).astype(np.int32)}


def describe(cfg: CorpusConfig) -> dict:
  """Bytes, files, windows and a sha256 prefix of each split, plus the stdlib folder."""
  out = {"stdlib": str(stdlib_dir())}
  for split in SPLITS:
    data = corpus_bytes(cfg, split)
    used = sum(1 for _ in _files_used(cfg, split))
    out[split] = {"bytes": len(data), "files": used, "windows": len(data) // (cfg.seq_len + 1),
                  "sha256": hashlib.sha256(data).hexdigest()[:16]}
  return out


def _files_used(cfg: CorpusConfig, split: str):
  cap = cfg.max_test_bytes if split == "test" else cfg.max_train_bytes
  n = 0
  for p in split_files(cfg, split):
    if n >= cap:
      return
    n += p.stat().st_size + 1
    yield p
