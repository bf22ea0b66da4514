"""The shared tiny text-LM substrate (``experiments/textlm``): a byte-level corpus cut from the Python standard
library's own ``.py`` sources, with a deterministic train / test split by file.

A file goes to the test split when ``crc32(file name) % test_every == 0`` and to training otherwise, so no test
byte comes from a file seen in training. Files are read in ``crc32`` order (a fixed mix of modules) until the split
has ``max_bytes``; the bytes are cut into non-overlapping windows of ``seq_len + 1`` (inputs and next-byte targets).
The stdlib differs between Python versions: the corpus digest and the Python version are recorded with every run.
"""

from __future__ import annotations

import dataclasses

__all__ = ["CorpusConfig"]


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """Byte-level stdlib corpus.

  Attributes:
    seq_len: bytes per training example (the model sees ``seq_len`` inputs, predicts ``seq_len`` next bytes).
    max_train_bytes: cap on the training split's bytes.
    max_test_bytes: cap on the test split's bytes.
    test_every: one file in ``test_every`` (by ``crc32`` of its name) is held out for testing.
    subdir: a folder inside the stdlib to read (``""``: the top level, ``*.py`` only, not recursive).
  """

  seq_len: int = 128
  max_train_bytes: int = 2_000_000
  max_test_bytes: int = 65_536
  test_every: int = 8
  subdir: str = ""

  def __post_init__(self):
    for f in ("seq_len", "max_train_bytes", "max_test_bytes", "test_every"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"corpus.{f} must be a positive int, got {v!r}")
    if self.test_every < 2:
      raise ValueError(f"corpus.test_every must be >= 2 (1 would put every file in the test split), got "
                       f"{self.test_every}")
    for f in ("max_train_bytes", "max_test_bytes"):
      if getattr(self, f) < self.seq_len + 1:
        raise ValueError(f"corpus.{f} ({getattr(self, f)}) must hold at least one window of seq_len + 1 = "
                         f"{self.seq_len + 1} bytes")
