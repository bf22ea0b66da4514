"""CAB's measures and the mini benchmark's synthetic tasks (``../shared/papers/efficient.md`` §5a).

- :func:`compositional_index`: per task ``z = sign (x - mu) / sigma`` over the models scored on it, averaged over a
  pattern's tasks (CAB hard-codes ``mu, sigma`` from its own model pool; here they come from the models run).
- :func:`crossing`: the efficiency length — a quadratic fitted to dense attention, a line to the efficient one,
  their first intersection (CAB's method) — and the measured crossing (where the efficient curve goes below dense
  for good, interpolated in log-log).
- :func:`spearman`: rank correlation of two score vectors (ties averaged).
- :class:`TaskSource`: Grain source of one synthetic task (records ``x``, ``src``, ``y``; ``y = -1`` is ignored).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from experiments.common.data import GeneratedSource

__all__ = ["compositional_index", "crossing", "spearman", "TaskSource", "num_classes", "input_vocab",
           "COUNT_CLASSES"]

COUNT_CLASSES = 8  # count tasks predict min(count, 7)


def compositional_index(scores: Mapping[str, Mapping[str, float]], groups: Mapping[str, Sequence[str]],
                        signs: Mapping[str, float] | None = None) -> dict[str, dict[str, float]]:
  """CAB's compositional index.

  Args:
    scores: ``scores[task][model]``: the metric of ``model`` on ``task``.
    groups: ``groups[pattern]``: the tasks of each pattern.
    signs: ``+1`` (higher is better, the default) or ``-1`` per task.

  Returns:
    ``ci[pattern][model]``: the mean over the pattern's tasks of ``sign (x - mu) / sigma`` (``mu, sigma``: mean and
    population standard deviation over the models scored on the task; ``sigma = 0`` gives 0), for models scored on
    every task of the pattern.
  """
  signs = signs or {}
  ci = {}
  for pattern, tasks in groups.items():
    tasks = [t for t in tasks if t in scores and scores[t]]
    if not tasks:
      continue
    models = set.intersection(*(set(scores[t]) for t in tasks))
    z = {m: [] for m in models}
    for t in tasks:
      vals = np.array(list(scores[t].values()), np.float64)
      mu, sd = float(vals.mean()), float(vals.std())
      for m in models:
        z[m].append(0.0 if sd == 0 else signs.get(t, 1.0) * (scores[t][m] - mu) / sd)
    ci[pattern] = {m: float(np.mean(v)) for m, v in sorted(z.items())}
  return ci


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
  """Spearman's rank correlation (average ranks for ties); NaN when either side is constant or n < 2."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if len(a) != len(b):
    raise ValueError(f"spearman needs equal lengths, got {len(a)} and {len(b)}")

  def ranks(x):
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=np.float64)
    for val in np.unique(x):  # average ties
      r[x == val] = r[x == val].mean()
    return r
  if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
    return float("nan")
  return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def crossing(lengths: Sequence[int], dense: Sequence[float], efficient: Sequence[float]) -> dict:
  """Where ``efficient`` becomes cheaper than ``dense`` (time or memory against length).

  Returns:
    ``{"fit": N or None, "measured": N or None, "below_at_min": bool}``. ``fit``: CAB's efficiency length, the
    smallest intersection above 0 of a least-squares quadratic in ``N`` through ``dense`` and a line through
    ``efficient`` after which the line stays below (None: none). ``measured``: the length from which every measured
    ``efficient`` value is below ``dense``, interpolated in log-log between the two lengths around it (None: never
    below at the largest length; ``lengths[0]`` with ``below_at_min`` when already below at the smallest).
  """
  n = np.asarray(lengths, np.float64)
  d, e = np.asarray(dense, np.float64), np.asarray(efficient, np.float64)
  ok = np.isfinite(d) & np.isfinite(e)
  n, d, e = n[ok], d[ok], e[ok]
  out = {"fit": None, "measured": None, "below_at_min": False}
  if len(n) < 3:
    return out
  qd = np.polyfit(n, d, 2)
  le = np.polyfit(n, e, 1)
  diff = qd - np.array([0.0, le[0], le[1]])  # dense - efficient as a quadratic
  roots = [float(r.real) for r in np.roots(diff) if abs(r.imag) < 1e-9 and r.real > 0]
  for r in sorted(roots):
    if np.polyval(diff, r * 1.01 + 1.0) > 0:  # dense above efficient just after the root
      out["fit"] = r
      break
  below = e < d
  if below[-1]:
    k = len(n) - 1
    while k > 0 and below[k - 1]:
      k -= 1
    if k == 0:
      out.update(measured=float(n[0]), below_at_min=True)
    else:  # log(e/d) crosses 0 between n[k-1] and n[k]
      r0, r1 = math.log(e[k - 1] / d[k - 1]), math.log(e[k] / d[k])
      f = r0 / (r0 - r1)
      out["measured"] = float(math.exp(math.log(n[k - 1]) + f * (math.log(n[k]) - math.log(n[k - 1]))))
  return out


# ================================================================================================ tasks
def input_vocab(vocab: int) -> int:
  """Input tokens: ``vocab`` keys / symbols, ``vocab`` values and one padding token."""
  return 2 * vocab + 1


def num_classes(task: str, vocab: int) -> int:
  """Output classes of a task: counts are capped at ``COUNT_CLASSES - 1``; the rest predict a symbol or value."""
  return COUNT_CLASSES if "count" in task else vocab


class TaskSource(GeneratedSource):
  """``n`` examples of one synthetic task; record ``i`` depends only on the parameters and ``seed``.

  Tasks (``V = vocab``; ``y = -1`` where nothing is asked):

  - NS ``reverse``: ``x`` uniform over ``V`` symbols, ``y_i = x_{T-1-i}``; ``count``: ``y_i = min(#{j: x_j = x_i}, 7)``.
  - CS ``recall`` (associative recall): ``K = min(V, T // 4)`` key-value pairs then queried keys, ``y`` = the value
    at query positions; ``count_prefix``: ``y_i = min(#{j <= i: x_j = x_i}, 7)``.
  - NC ``lookup``: the source holds ``V`` key-value pairs (then padding), the target keys, ``y_i`` = value of
    ``t_i``; ``src_count``: ``y_i = min(#{j: s_j = t_i}, 7)``.
  - CC ``lookup_prev``: the value of the previous target token ``t_{i-1}`` (``y_0 = -1``), so the target side must
    be mixed causally before the cross-attention; and ``src_count`` again (with the causal model).
  """

  PARAMS = ("task", "n", "seq_len", "src_len", "vocab", "seed")

  def __init__(self, task: str, n: int, seq_len: int, src_len: int, vocab: int, seed: int):
    self.task, self.n, self.seq_len, self.src_len, self.vocab, self.seed = task, n, seq_len, src_len, vocab, seed

  def generate(self):
    task, n, T, S, V = self.task, self.n, self.seq_len, self.src_len, self.vocab
    rng = np.random.default_rng([self.seed, sum(map(ord, task))])
    src = np.full((n, S), 2 * V, np.int32)
    y = np.full((n, T), -1, np.int32)
    cap = COUNT_CLASSES - 1
    if task in ("reverse", "count", "count_prefix"):
      x = rng.integers(0, V, (n, T)).astype(np.int32)
      if task == "reverse":
        y = x[:, ::-1].copy()
      elif task == "count":
        y = np.minimum((x[:, :, None] == x[:, None, :]).sum(-1), cap)
      else:
        y = np.minimum(np.cumsum(x[:, :, None] == x[:, None, :], axis=1)[:, np.arange(T), np.arange(T)], cap)
    elif task == "recall":
      K = min(V, T // 4)
      x = np.zeros((n, T), np.int32)
      for r in range(n):
        keys = rng.permutation(V)[:K]
        vals = rng.integers(0, V, K)
        x[r, 0:2 * K:2], x[r, 1:2 * K:2] = keys, V + vals
        qi = rng.integers(0, K, T - 2 * K)
        x[r, 2 * K:] = keys[qi]
        y[r, 2 * K:] = vals[qi]
    elif task in ("lookup", "lookup_prev"):
      x = rng.integers(0, V, (n, T)).astype(np.int32)
      vals = rng.integers(0, V, (n, V))
      for r in range(n):
        keys = rng.permutation(V)
        src[r, 0:2 * V:2], src[r, 1:2 * V:2] = keys, V + vals[r, keys]
      ans = np.take_along_axis(vals, x, axis=1)
      y = ans if task == "lookup" else np.concatenate([np.full((n, 1), -1), ans[:, :-1]], 1)
    elif task == "src_count":
      x = rng.integers(0, V, (n, T)).astype(np.int32)
      src = rng.integers(0, V, (n, S)).astype(np.int32)
      y = np.minimum((x[:, :, None] == src[:, None, :]).sum(-1), cap)
    else:
      raise ValueError(f"unknown task {task!r}")
    return {"x": x.astype(np.int32), "src": src.astype(np.int32), "y": np.asarray(y, np.int32)}
