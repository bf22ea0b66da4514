"""Synthetic long-context tasks (token level) and their Grain source.

Every sequence has a fixed length ``L`` and three parts::

    [BOS, <task>]  context (L - 2 - query_len tokens)  query segment (query_len tokens, ends the sequence)

Facts live in the context as 3-token *statements* ``S a b`` ("a maps to b") at random non-overlapping positions
among random filler tokens; the query segment is filler followed by the questions and their answers (teacher
forced). Every answer is one retrieval hop: the token after the statement ``S x _`` whose ``x`` is the token
before the answer. The tasks (after RULER and the Recycled Attention paper, see ``../shared/papers/efficient.md``
§2 and §8):

===============  ====================================================================================  ==========
task             context                                                                               query
===============  ====================================================================================  ==========
``niah_single``  one needle ``S k v`` in a haystack of filler                                          ``Q k v``
``niah_multi``   ``niah_needles`` needles (distinct keys), one asked                                    ``Q k v``
``mqar``         ``mqar_pairs`` pairs, ``mqar_queries`` asked                                           ``(Q k v)*``
``vt``           ``vt_chains`` chains ``S x a1, S a1 a2, ...`` in order, interleaved (variable tracking) ``Q x a1..aH``
``cok``          ``cok_keys`` keys in one random cycle, all ``S k next(k)`` statements shuffled           ``Q k0 k1..kH``
===============  ====================================================================================  ==========

``answer[i]`` marks the tokens the model must predict (from position ``i - 1``). Records are pure functions of
``(length, data config, seed, index)`` (:class:`LongCtxSource`).
"""

from __future__ import annotations

import numpy as np

from configs.longctx import TASKS, DataConfig
from experiments.common.data import GeneratedSource

__all__ = ["PAD", "BOS", "Q", "S", "TASK_TOKEN", "FILLER", "KEYS", "VALUES", "VOCAB_SIZE", "make_example",
           "LongCtxSource", "check_example"]

PAD, BOS, Q, S = 0, 1, 2, 3
TASK_TOKEN = {t: 4 + i for i, t in enumerate(TASKS)}
FILLER = np.arange(16, 80)
KEYS = np.arange(80, 208)
VALUES = np.arange(208, 336)
VOCAB_SIZE = 336


def _place(rng: np.random.Generator, n_ctx: int, n_items: int, width: int) -> np.ndarray:
  """Sorted, non-overlapping start offsets of ``n_items`` items of ``width`` tokens in ``n_ctx`` slots."""
  free = n_ctx - n_items * width
  if free < 0:
    raise ValueError(f"{n_items} statements of {width} tokens do not fit a context of {n_ctx} tokens; use a longer "
                     f"sequence or fewer statements")
  gaps = np.sort(rng.choice(free + n_items, size=n_items, replace=False))
  return gaps - np.arange(n_items) + np.arange(n_items) * width


def make_example(task: str, rng: np.random.Generator, length: int, cfg: DataConfig, repeats: int = 0):
  """One sequence of ``task``: ``(tokens int32 [length], answer bool [length])``.

  ``repeats`` statements are asked again later in the context (each after its original, a random one each time),
  written ``Q a b`` (``S a b`` when ``cfg.repeat_as_query`` is False) with their ``b`` marked as an answer: dense
  training signal for the retrieval hop the query segment needs (training data only).

  Raises:
    ValueError: for an unknown task or statements that do not fit the context, naming the values.
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
  A = cfg.query_len
  n_ctx = length - 2 - A
  if n_ctx < 8:
    raise ValueError(f"length {length} leaves {n_ctx} context tokens (query_len {A}); use a longer sequence")
  tokens = rng.choice(FILLER, size=length).astype(np.int32)
  tokens[0], tokens[1] = BOS, TASK_TOKEN[task]
  answer = np.zeros(length, bool)
  stmts: list[tuple[int, int]] = []
  query: list[tuple[int, bool]] = []  # (token, is_answer)
  if task in ("niah_single", "niah_multi", "mqar"):
    n = {"niah_single": 1, "niah_multi": cfg.niah_needles, "mqar": cfg.mqar_pairs}[task]
    asked = {"niah_single": 1, "niah_multi": 1, "mqar": cfg.mqar_queries}[task]
    keys = rng.choice(KEYS, size=n, replace=False)
    vals = rng.choice(VALUES, size=n, replace=True)
    stmts = list(zip(keys.tolist(), vals.tolist()))
    for i in rng.choice(n, size=asked, replace=False):
      query += [(Q, False), (int(keys[i]), False), (int(vals[i]), True)]
  elif task == "vt":
    H, C = cfg.vt_hops, cfg.vt_chains
    roots = rng.choice(VALUES, size=C, replace=False)
    names = rng.choice(KEYS, size=(C, H), replace=False)
    chains = [[(int(roots[c]), int(names[c, 0]))] + [(int(names[c, h - 1]), int(names[c, h])) for h in range(1, H)]
              for c in range(C)]
    order = rng.permutation(np.repeat(np.arange(C), H))  # interleave the chains, each in order
    pos = [0] * C
    for c in order:
      stmts.append(chains[c][pos[c]])
      pos[c] += 1
    c = int(rng.integers(C))
    query = [(Q, False), (int(roots[c]), False)] + [(int(names[c, h]), True) for h in range(H)]
  else:  # cok
    n = cfg.cok_keys
    cycle = rng.choice(KEYS, size=n, replace=False)
    succ = {int(cycle[i]): int(cycle[(i + 1) % n]) for i in range(n)}
    stmts = [(a, succ[a]) for a in rng.permutation(cycle).tolist()]
    k = int(rng.choice(cycle))
    query = [(Q, False), (k, False)]
    for _ in range(cfg.cok_hops):
      k = succ[k]
      query.append((k, True))
  items = [(a, b, False) for a, b in stmts]
  for _ in range(repeats):
    i = int(rng.integers(len(stmts)))
    j = items.index((*stmts[i], False))  # the original (statements are distinct)
    items.insert(int(rng.integers(j + 1, len(items) + 1)), (*stmts[i], True))
  starts = 2 + _place(rng, n_ctx, len(items), 3)
  for p, (a, b, rep) in zip(starts, items):
    tokens[p:p + 3] = (Q if rep and cfg.repeat_as_query else S, a, b)
    answer[p + 2] = rep
  if len(query) > A:
    raise ValueError(f"task {task}: the query ({len(query)} tokens) does not fit query_len={A}")
  q0 = length - len(query)
  for i, (t, is_answer) in enumerate(query):
    tokens[q0 + i] = t
    answer[q0 + i] = is_answer
  return tokens, answer


def check_example(tokens: np.ndarray, answer: np.ndarray) -> bool:
  """True when every answer token is what one retrieval hop gives: the ``b`` of the first statement ``S a b`` in
  the context whose ``a`` is the token before the answer (used by the tests: the label is recoverable)."""
  toks = tokens.tolist()
  for i in np.flatnonzero(answer):
    prev = toks[i - 1]
    found = None
    for p in range(2, len(toks) - 2):
      if toks[p] == S and toks[p + 1] == prev:
        found = toks[p + 2]
        break
    if found != toks[i]:
      return False
  return True


class LongCtxSource(GeneratedSource):
  """``num_records`` sequences of ``length`` tokens, the task drawn uniformly from ``data.tasks`` per record.

  Record ``i`` is drawn from ``numpy.random.default_rng([seed, length, i])``. Fields: ``tokens`` int32 ``[L]``,
  ``answer`` bool ``[L]``, ``task`` int32 (index into :data:`configs.longctx.TASKS`). ``repeats``: see
  :func:`make_example` (training data).
  """

  PARAMS = ("length", "num_records", "seed", "data", "repeats")

  def __init__(self, length: int, num_records: int, seed: int, data: DataConfig, tasks: tuple[str, ...] | None = None,
               repeats: int = 0):
    self.length, self.num_records, self.seed, self.data = int(length), int(num_records), int(seed), data
    self.repeats = int(repeats)
    self.tasks = data.tasks if tasks is None else tuple(tasks)
    if self.tasks != data.tasks:
      self.PARAMS = LongCtxSource.PARAMS + ("tasks",)

  def generate(self):
    n, L = self.num_records, self.length
    toks = np.zeros((n, L), np.int32)
    ans = np.zeros((n, L), bool)
    task = np.zeros(n, np.int32)
    for i in range(n):
      rng = np.random.default_rng([self.seed, L, i])
      name = self.tasks[int(rng.integers(len(self.tasks)))]
      toks[i], ans[i] = make_example(name, rng, L, self.data, self.repeats)
      task[i] = TASKS.index(name)
    return {"tokens": toks, "answer": ans, "task": task}
