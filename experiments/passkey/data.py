"""The passkey retrieval task of Landmark Attention (Mohtashami & Jaggi 2023, ``llama/run_test.py``), word-level.

A prompt is::

    <bos> there is an important info hidden inside a lot of irrelevant text . find it and memorize it . i will quiz
    you about the important information there . [filler] the pass key is D D D D D . remember it . D D D D D is the
    pass key . [filler] what is the pass key ? the pass key is D D D D D

with the key ``K`` drawn uniformly from ``[1, 50000]`` and written as 5 zero-padded digit tokens, filler made of
sentences drawn at random from the paper's garbage text ("the grass is green .", "the sky is blue .", "the sun is
yellow .", "here we go .", "there and back again ."), cut to length, and the key line inserted at a uniformly random
depth of the filler. The answer is the last 5 tokens: a prompt counts as solved when all 5 greedy (teacher-forced
argmax) predictions are right, which is exactly greedy decoding's exact match.

Lengths are *augmented* lengths (landmarks included): a length-``L`` sample (``L`` a multiple of ``block_size``) has
``L - L // block_size`` regular tokens, so with landmarks inserted it is exactly ``L`` tokens long.
"""

from __future__ import annotations

import numpy as np

__all__ = ["VOCAB", "TOKEN", "PAD", "LANDMARK", "BOS", "ANSWER_LEN", "regular_length", "make_batch", "decode"]

_INTRO = ("there is an important info hidden inside a lot of irrelevant text . find it and memorize it . "
          "i will quiz you about the important information there .").split()
_GARBAGE = [s.split() for s in ("the grass is green .", "the sky is blue .", "the sun is yellow .", "here we go .",
                                "there and back again .")]
_KEY_PRE = "the pass key is".split()
_KEY_MID = ". remember it .".split()
_KEY_POST = "is the pass key .".split()
_QUESTION = "what is the pass key ? the pass key is".split()
ANSWER_LEN = 5
MAX_KEY = 50000

_WORDS = sorted({w for seq in [_INTRO, *_GARBAGE, _KEY_PRE, _KEY_MID, _KEY_POST, _QUESTION] for w in seq})
VOCAB: tuple[str, ...] = ("<pad>", "<landmark>", "<bos>") + tuple(str(d) for d in range(10)) + tuple(_WORDS)
TOKEN = {w: i for i, w in enumerate(VOCAB)}
PAD, LANDMARK, BOS = TOKEN["<pad>"], TOKEN["<landmark>"], TOKEN["<bos>"]
_DIGIT0 = TOKEN["0"]
_FIXED = 1 + len(_INTRO) + len(_KEY_PRE) + len(_KEY_MID) + len(_KEY_POST) + 3 * ANSWER_LEN + len(_QUESTION)


def _ids(words):
  return [TOKEN[w] for w in words]


def regular_length(length: int, block_size: int) -> int:
  """Regular tokens of a sample whose augmented length is ``length`` (a multiple of ``block_size``)."""
  if length % block_size:
    raise ValueError(f"length {length} must be a multiple of block_size {block_size}")
  n = length - length // block_size
  if n < _FIXED:
    raise ValueError(f"length {length} leaves {n} regular tokens, fewer than the {_FIXED} the prompt needs")
  return n


def _filler(rng: np.random.Generator, n: int) -> list[int]:
  out: list[int] = []
  while len(out) < n:
    out += _ids(_GARBAGE[rng.integers(len(_GARBAGE))])
  return out[:n]


def make_batch(rng: np.random.Generator, batch_size: int, length: int, block_size: int):
  """A batch of passkey prompts.

  Args:
    rng: numpy generator.
    batch_size: samples.
    length: augmented length (multiple of ``block_size``).
    block_size: landmark block length.

  Returns:
    ``(tokens int32 [B, N], keys int32 [B], depth float32 [B])``: regular tokens (no landmarks) ending with the 5
    answer digits, the keys, and the relative depth of the key line in the filler (0 = start, 1 = end).
  """
  n = regular_length(length, block_size)
  n_fill = n - _FIXED
  toks = np.zeros((batch_size, n), np.int32)
  keys = rng.integers(1, MAX_KEY + 1, size=batch_size).astype(np.int32)
  depth = np.zeros(batch_size, np.float32)
  for b in range(batch_size):
    digits = [_DIGIT0 + int(c) for c in f"{keys[b]:0{ANSWER_LEN}d}"]
    filler = _filler(rng, n_fill)
    cut = int(rng.integers(0, n_fill + 1))
    depth[b] = cut / max(n_fill, 1)
    seq = ([BOS] + _ids(_INTRO) + filler[:cut] + _ids(_KEY_PRE) + digits + _ids(_KEY_MID) + digits
           + _ids(_KEY_POST) + filler[cut:] + _ids(_QUESTION) + digits)
    toks[b] = seq
  return toks, keys, depth


def decode(tokens) -> str:
  """Token ids -> text (for inspection)."""
  return " ".join(VOCAB[int(t)] for t in tokens)
