r"""Multi-query associative recall (MQAR), Zoology's synthetic recall task (Arora et al. 2023, arXiv:2312.04927).

Each example of length ``N`` starts with ``D`` key-value pairs ``k_1 v_1 ... k_D v_D``: keys are ``D`` distinct
tokens from ``[1, V/2)``, values ``D`` distinct tokens from ``[V/2, V)``. Every key re-appears once in the rest of
the sequence, at an even offset ``2 g_i`` after the context, with the gaps ``g_i`` drawn without replacement from
``{0, ..., (N - 2D)/2 - 1}`` with probabilities ``p(g) \propto a (g+1)^{a-1}`` (a power law; ``a = 0.01`` strongly
favours early queries). The model must predict ``v_i`` at the position of the re-appeared ``k_i`` (the label at
that position); every other label is ``-100`` (ignored). All other positions hold token 0, or uniform random
tokens from ``[0, V)`` with ``random_non_queries`` (which may collide with keys, as in Zoology).

:func:`generate` draws exactly as Zoology's ``multiquery_ar`` does (one legacy ``np.random.RandomState(seed)``
consumed row by row: all key rows, then all value rows, then all gap rows), so with ``random_non_queries=False``
its arrays are bit-for-bit Zoology's for the same seed. Zoology draws the random non-query tokens with torch's
generator; here they continue the same numpy stream (same distribution, different numbers).
"""

from __future__ import annotations

import numpy as np

from experiments.common.data import GeneratedSource

__all__ = ["IGNORE_INDEX", "generate", "example", "MQARSource", "power_law_gap_probs"]

IGNORE_INDEX = -100


def _check_int(name: str, value, lo: int) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
    raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
  return int(value)


def _validate(vocab_size, seq_len, num_kv_pairs, num_examples, seed, power_a) -> tuple[int, int, int, int, int]:
  V = _check_int("vocab_size", vocab_size, 4)
  N = _check_int("seq_len", seq_len, 2)
  D = _check_int("num_kv_pairs", num_kv_pairs, 1)
  n = _check_int("num_examples", num_examples, 1)
  seed = _check_int("seed", seed, 0)
  if N % 2:
    raise ValueError(f"seq_len must be even, got {N}")
  if V <= N:
    raise ValueError(f"vocab_size ({V}) must be larger than seq_len ({N})")
  if 4 * D > N:
    raise ValueError(f"num_kv_pairs={D} needs seq_len >= 4 * num_kv_pairs = {4 * D} (a context of 2D tokens and "
                     f"D distinct query slots), got seq_len={N}")
  if D > V // 2 - 1:
    raise ValueError(f"num_kv_pairs={D} distinct keys do not fit in the key range [1, {V // 2})")
  if not (isinstance(power_a, (int, float)) and not isinstance(power_a, bool) and power_a > 0):
    raise ValueError(f"power_a must be a positive float, got {power_a!r}")
  return V, N, D, n, seed


def power_law_gap_probs(space: int, power_a: float = 0.01) -> np.ndarray:
  r"""``p[g] = a (g+1)^{a-1} / Z`` for ``g = 0 .. space-1`` (float64): the query-gap distribution."""
  p = power_a * np.arange(1, space + 1) ** (power_a - 1)
  return p / p.sum()


def generate(vocab_size: int, seq_len: int, num_kv_pairs: int, num_examples: int, seed: int,
             power_a: float = 0.01, random_non_queries: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Zoology's MQAR examples.

  Args:
    vocab_size: ``V`` (Zoology's Figure 2: 8192); must exceed ``seq_len``.
    seq_len: ``N``, even, at least ``4 * num_kv_pairs``.
    num_kv_pairs: ``D`` key-value pairs (= queries) per example.
    num_examples: how many examples.
    seed: seeds one ``np.random.RandomState`` (the global numpy state is not touched).
    power_a: the gap power-law exponent ``a``.
    random_non_queries: fill non-query positions with uniform random tokens instead of 0.

  Returns:
    ``(inputs, labels)``, int64 ``[num_examples, seq_len]`` each; labels are ``-100`` except the ``D`` query
    positions, which hold the value of the key found there.

  Raises:
    ValueError: on sizes that cannot hold the task, naming the offending values.
  """
  V, N, D, n, seed = _validate(vocab_size, seq_len, num_kv_pairs, num_examples, seed, power_a)
  rs = np.random.RandomState(seed)
  context = 2 * D
  half = V // 2
  # rs.choice(arr, size=D, replace=False) is arr[rs.permutation(len(arr))[:D]]: one permutation per row, in row
  # order, exactly like Zoology's apply_along_axis(np.random.choice, ...).
  keys = np.stack([rs.choice(np.arange(1, half), size=D, replace=False) for _ in range(n)])  # [n, D]
  values = np.stack([rs.choice(np.arange(half, V), size=D, replace=False) for _ in range(n)])  # [n, D]
  space = (N - context) // 2
  p = power_law_gap_probs(space, power_a)
  gaps = np.stack([rs.choice(np.arange(space), size=D, replace=False, p=p) for _ in range(n)])  # [n, D]

  kvs = np.zeros((n, context), np.int64)
  kvs[:, 0::2] = keys
  kvs[:, 1::2] = values
  queries = np.zeros((n, N - context + 1), np.int64)
  np.put_along_axis(queries, 2 * gaps, keys, axis=1)
  examples = np.concatenate([kvs, queries], axis=1)  # [n, N + 1]
  labels = np.full((n, N + 1), IGNORE_INDEX, np.int64)
  np.put_along_axis(labels, 2 * gaps + context + 1, values, axis=1)
  inputs, labels = examples[:, :-1], labels[:, 1:]  # next-token shift: predict v_i at the re-appeared k_i
  if random_non_queries:
    noise = rs.randint(0, V, size=inputs.shape)
    inputs = np.where(inputs == 0, noise, inputs)
  return np.ascontiguousarray(inputs), np.ascontiguousarray(labels)


def example(vocab_size: int, seq_len: int, num_kv_pairs: int, seed: int, index: int, power_a: float = 0.01,
            random_non_queries: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """One MQAR example drawn by Zoology's rules from its own generator ``np.random.default_rng([seed, index])``.

  Same distribution as a row of :func:`generate` (keys, values and gaps drawn without replacement, the same
  power law), but each example is a pure function of ``(seed, index)``: any record of an arbitrarily large data
  set costs O(N) to produce, in any order. (The numbers differ from :func:`generate`'s, which consumes one
  sequential stream.)

  Returns:
    ``(inputs, labels)``, int64 ``[seq_len]`` each.
  """
  V, N, D, _, seed = _validate(vocab_size, seq_len, num_kv_pairs, 1, seed, power_a)
  index = _check_int("index", index, 0)
  rng = np.random.default_rng([seed, index])
  half, context = V // 2, 2 * D
  keys = rng.choice(half - 1, size=D, replace=False) + 1  # D distinct from [1, V/2)
  values = rng.choice(V - half, size=D, replace=False) + half  # D distinct from [V/2, V)
  space = (N - context) // 2
  gaps = rng.choice(space, size=D, replace=False, p=power_law_gap_probs(space, power_a))
  seq = np.zeros(N + 1, np.int64)
  seq[0:context:2], seq[1:context:2] = keys, values
  seq[context + 2 * gaps] = keys
  labels = np.full(N + 1, IGNORE_INDEX, np.int64)
  labels[context + 2 * gaps + 1] = values
  inputs, labels = seq[:-1], labels[1:]
  if random_non_queries:
    inputs = np.where(inputs == 0, rng.integers(0, V, size=N), inputs)
  return inputs, labels


class MQARSource(GeneratedSource):
  """Grain source of MQAR records ``{"inputs": int32 [N], "labels": int32 [N]}``.

  Two ways to draw the records, both pure functions of ``(parameters, seed, index)``:

  - ``per_record=False`` (default): record ``i`` is row ``i`` of :func:`generate` with the same arguments, i.e.
    exactly Zoology's data set; the arrays are generated on first access in each process (about a second per
    10K examples of length 128).
  - ``per_record=True``: record ``i`` is :func:`example` ``(seed, i)``, made on access; no start-up cost whatever
    ``num_examples`` is, so a training set can be far larger than the number of examples a run will see (fresh
    examples every step, no memorisation).

  Only the parameters are pickled.
  """

  PARAMS = ("vocab_size", "seq_len", "num_kv_pairs", "num_examples", "seed", "power_a", "random_non_queries",
            "per_record")

  def __init__(self, vocab_size: int, seq_len: int, num_kv_pairs: int, num_examples: int, seed: int,
               power_a: float = 0.01, random_non_queries: bool = False, per_record: bool = False):
    _validate(vocab_size, seq_len, num_kv_pairs, num_examples, seed, power_a)
    self.vocab_size, self.seq_len, self.num_kv_pairs = int(vocab_size), int(seq_len), int(num_kv_pairs)
    self.num_examples, self.seed = int(num_examples), int(seed)
    self.power_a, self.random_non_queries = float(power_a), bool(random_non_queries)
    self.per_record = bool(per_record)

  def generate(self):
    inputs, labels = generate(self.vocab_size, self.seq_len, self.num_kv_pairs, self.num_examples, self.seed,
                              self.power_a, self.random_non_queries)
    return {"inputs": inputs.astype(np.int32), "labels": labels.astype(np.int32)}

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not self.per_record:
      return super().__getitem__(index)
    if not -self.num_examples <= index < self.num_examples:
      raise IndexError(f"record {index} out of range for {self!r}")
    inputs, labels = example(self.vocab_size, self.seq_len, self.num_kv_pairs, self.seed,
                             int(index) % self.num_examples, self.power_a, self.random_non_queries)
    return {"inputs": inputs.astype(np.int32), "labels": labels.astype(np.int32)}
