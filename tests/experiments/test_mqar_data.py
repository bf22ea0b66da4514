"""MQAR generator invariants, bit-exactness with Zoology's sampling procedure, the per-record sampler and the Grain
source."""

import pickle

import numpy as np
import pytest

from experiments.data.mqar import IGNORE_INDEX, MQARSource, example, generate, power_law_gap_probs

V, N, D = 64, 32, 4


def _check_example(inputs, labels, V, N, D, random_non_queries=False):
  assert inputs.shape == labels.shape == (N,)
  keys, values = inputs[0:2 * D:2], inputs[1:2 * D:2]
  assert len(set(keys)) == D and len(set(values)) == D
  assert np.all((1 <= keys) & (keys < V // 2)) and np.all((V // 2 <= values) & (values < V))
  # labels only at the D query positions (even offsets after the context); each holds the value of the key there
  pos = np.flatnonzero(labels != IGNORE_INDEX)
  assert len(pos) == D
  assert np.all(pos >= 2 * D) and np.all((pos - 2 * D) % 2 == 0)
  assert sorted(inputs[pos]) == sorted(keys)  # every key re-appears exactly once as a query
  kv = dict(zip(keys, values))
  for p in pos:
    assert labels[p] == kv[inputs[p]]
  rest = np.ones(N, bool)
  rest[:2 * D] = False
  rest[pos] = False
  if random_non_queries:
    assert np.all((0 <= inputs[rest]) & (inputs[rest] < V))
  else:
    assert np.all(inputs[rest] == 0)


def _zoology_reference(vocab_size, seq_len, num_kv_pairs, num_examples, seed, power_a=0.01):
  """Zoology's multiquery_ar procedure (numpy part) written against the global numpy RNG, as the original is."""
  np.random.seed(seed)
  context = 2 * num_kv_pairs
  half = vocab_size // 2
  keys = np.apply_along_axis(np.random.choice, 1, np.tile(np.arange(1, half), (num_examples, 1)), replace=False,
                             size=num_kv_pairs)
  values = np.apply_along_axis(np.random.choice, 1, np.tile(np.arange(half, vocab_size), (num_examples, 1)),
                               replace=False, size=num_kv_pairs)
  kvs = np.zeros((num_examples, context), np.int64)
  kvs[:, 0::2], kvs[:, 1::2] = keys, values
  space = (seq_len - context) // 2
  p = power_a * np.arange(1, space + 1) ** (power_a - 1)
  p = p / p.sum()
  gaps = np.apply_along_axis(np.random.choice, 1, np.stack([np.arange(space)] * num_examples), replace=False, p=p,
                             size=num_kv_pairs)
  queries = np.zeros((num_examples, seq_len - context + 1), np.int64)
  np.put_along_axis(queries, gaps * 2, values=keys, axis=1)
  examples = np.concatenate([kvs, queries], axis=1)
  labels = np.full((num_examples, seq_len + 1), -100, np.int64)
  np.put_along_axis(labels, gaps * 2 + context + 1, values=values, axis=1)
  return examples[:, :-1], labels[:, 1:]


def test_generate_invariants():
  inputs, labels = generate(V, N, D, 50, seed=3)
  assert inputs.shape == labels.shape == (50, N) and inputs.dtype == labels.dtype == np.int64
  for x, y in zip(inputs, labels):
    _check_example(x, y, V, N, D)


def test_generate_is_bit_exact_with_zoology_and_leaves_global_rng_alone():
  state = np.random.get_state()
  ours = generate(8192, 64, 4, 20, seed=7)
  assert np.random.get_state()[1].tolist() == state[1].tolist()
  ref = _zoology_reference(8192, 64, 4, 20, seed=7)
  np.testing.assert_array_equal(ours[0], ref[0])
  np.testing.assert_array_equal(ours[1], ref[1])


def test_generate_is_deterministic_and_seeded():
  a, b, c = generate(V, N, D, 10, 1), generate(V, N, D, 10, 1), generate(V, N, D, 10, 2)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])


def test_random_non_queries():
  inputs, labels = generate(V, N, D, 30, seed=0, random_non_queries=True)
  for x, y in zip(inputs, labels):
    _check_example(x, y, V, N, D, random_non_queries=True)
  assert np.mean(inputs[:, 2 * D:] == 0) < 0.2  # the zeros were replaced by random tokens


def test_gap_distribution_follows_the_power_law():
  # one key per example: the query gap is then a single draw from p
  n, N1 = 4000, 20
  inputs, labels = generate(V, N1, 1, n, seed=0, power_a=0.5)
  gaps = (np.argmax(labels != IGNORE_INDEX, axis=1) - 2) // 2
  p = power_law_gap_probs((N1 - 2) // 2, 0.5)
  freq = np.bincount(gaps, minlength=len(p)) / n
  np.testing.assert_allclose(freq, p, atol=0.03)
  assert p[0] > p[-1]


def test_per_record_example_invariants_and_distribution():
  rows = [example(V, N, D, seed=5, index=i) for i in range(300)]
  for x, y in rows:
    _check_example(x, y, V, N, D)
  np.testing.assert_array_equal(example(V, N, D, 5, 17)[0], example(V, N, D, 5, 17)[0])
  # same query-gap distribution as generate (first-query gap histogram, coarse)
  first_gap_pr = np.mean([(np.flatnonzero(y != IGNORE_INDEX)[0] - 2 * D) // 2 == 0 for _, y in rows])
  _, lab = generate(V, N, D, 300, seed=5)
  first_gap_gen = np.mean((np.argmax(lab != IGNORE_INDEX, axis=1) - 2 * D) // 2 == 0)
  assert abs(first_gap_pr - first_gap_gen) < 0.15


@pytest.mark.parametrize("per_record", [False, True])
def test_source(per_record):
  src = MQARSource(V, N, D, 12, seed=3, per_record=per_record)
  assert len(src) == 12
  rec = src[4]
  assert set(rec) == {"inputs", "labels"} and rec["inputs"].dtype == np.int32
  _check_example(rec["inputs"], rec["labels"], V, N, D)
  if not per_record:
    inputs, _ = generate(V, N, D, 12, 3)
    np.testing.assert_array_equal(rec["inputs"], inputs[4])
  else:
    np.testing.assert_array_equal(rec["inputs"], example(V, N, D, 3, 4)[0])
  clone = pickle.loads(pickle.dumps(src))
  assert "_arrays" not in clone.__dict__
  np.testing.assert_array_equal(clone[4]["inputs"], rec["inputs"])
  assert "MQARSource(vocab_size=64, seq_len=32, num_kv_pairs=4, num_examples=12, seed=3" in repr(src)
  with pytest.raises(IndexError):
    src[12]


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=31), "seq_len must be even"),
    (dict(vocab_size=32), r"vocab_size \(32\) must be larger than seq_len \(32\)"),
    (dict(num_kv_pairs=9), "num_kv_pairs=9 needs seq_len >= 4"),
    (dict(num_examples=0), "num_examples must be an int >= 1, got 0"),
    (dict(power_a=0.0), "power_a must be a positive float"),
])
def test_bad_arguments(kwargs, match):
  args = dict(vocab_size=V, seq_len=N, num_kv_pairs=D, num_examples=2, seed=0) | kwargs
  with pytest.raises(ValueError, match=match):
    generate(**args)
