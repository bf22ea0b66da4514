"""The stdlib byte corpus (experiments/textlm/corpus.py) and the LM training helpers (experiments/textlm/train.py)."""

import zlib

import numpy as np
import pytest

from configs.textlm import CorpusConfig
from experiments.textlm import corpus as corpus_lib
from experiments.textlm import train as train_lib

CFG = CorpusConfig(seq_len=16, max_train_bytes=20_000, max_test_bytes=1_000)


def test_split_is_by_file_disjoint_and_deterministic():
  tr, te = corpus_lib.split_files(CFG, "train"), corpus_lib.split_files(CFG, "test")
  assert tr and te and not set(tr) & set(te)
  assert all(zlib.crc32(p.name.encode()) % CFG.test_every == 0 for p in te)
  assert all(zlib.crc32(p.name.encode()) % CFG.test_every != 0 for p in tr)
  a = corpus_lib.ByteWindows(CFG, "test").arrays["tokens"]
  corpus_lib.corpus_bytes.cache_clear()
  b = corpus_lib.ByteWindows(CFG, "test").arrays["tokens"]
  assert np.array_equal(a, b)


def test_windows_are_the_split_bytes():
  src = corpus_lib.ByteWindows(CFG, "train")
  tok = src.arrays["tokens"]
  data = corpus_lib.corpus_bytes(CFG, "train")
  assert len(data) == CFG.max_train_bytes
  assert tok.shape == (CFG.max_train_bytes // 17, 17) and tok.dtype == np.int32
  assert bytes(tok[3].astype(np.uint8)) == data[3 * 17:4 * 17]
  assert 0 <= tok.min() and tok.max() < corpus_lib.VOCAB_SIZE
  d = corpus_lib.describe(CFG)
  assert d["test"]["bytes"] == CFG.max_test_bytes and d["train"]["files"] >= 1 and len(d["train"]["sha256"]) == 16


@pytest.mark.parametrize("kw, match", [
    (dict(seq_len=0), "corpus.seq_len must be a positive int"),
    (dict(test_every=1), "test_every must be >= 2"),
    (dict(seq_len=64, max_test_bytes=10), "max_test_bytes \\(10\\) must hold at least one window"),
])
def test_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    CorpusConfig(**kw)


def test_bad_split_and_subdir():
  with pytest.raises(ValueError, match="split must be one of"):
    corpus_lib.ByteWindows(CFG, "valid")
  with pytest.raises(ValueError, match="is not a folder"):
    corpus_lib.split_files(CorpusConfig(subdir="no_such_folder_here"), "train")


def test_unigram_baseline_is_a_sane_entropy():
  u = train_lib.unigram_loss(CFG)
  assert 1.5 < u < np.log(256)


def test_next_byte_loss_of_a_uniform_model_is_log256():
  import jax.numpy as jnp

  def model(tokens):
    return jnp.zeros(tokens.shape + (256,))
  tok = jnp.asarray(corpus_lib.ByteWindows(CFG, "test").arrays["tokens"][:3])
  loss, ce = train_lib.next_byte_loss(model, tok)
  assert ce.shape == (3, 16)
  np.testing.assert_allclose(float(loss), np.log(256), rtol=1e-6)
