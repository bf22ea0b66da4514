"""Retrieval heads (Wu et al., 2024): the retrieval score as the official code computes it, a needle task, head search.

Retrieval score (the official detection script's loop): greedy decoding after the prompt; at every decode
step ``t`` that generates token ``w_t``, for every (layer, head) take ``j* = argmax_j`` of the head's attention row of
that step's query (top-1 only); if ``j*`` lies in the needle span ``[s0, s1)`` of the prompt and ``prompt[j*] ==
w_t`` (the head copied the token being generated), the head gains ``1 / (s1 - s0)``. A sample's scores are kept only
when the response recalls the needle (ROUGE-1 recall of the answer > 50%); a head's retrieval score is the mean over
kept samples. Retrieval heads: score > 0.1.

Capture the per-step argmax with ``analysis.capture(model, stats=("argmax",))`` around the decode loop (the jaxattn
module's decode path reports absolute cache positions), turn it into ``[N, steps, L, H]`` with :func:`argmax_steps`
and call :func:`retrieval_scores`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Callable, Iterable

import numpy as np

__all__ = ["argmax_steps", "NeedleBatch", "needle_task", "rouge1_recall", "RetrievalScores", "retrieval_scores",
           "rank_heads", "top_heads", "random_heads", "HeadSearch", "search_heads"]


@dataclasses.dataclass(frozen=True)
class NeedleBatch:
  """A batch of needle-in-a-haystack copy prompts (numpy).

  Attributes:
    tokens: ``[N, P]`` int32 prompts: ``bos``, haystack with ``mark, needle..., mark`` inserted at a depth, and
      ``query`` as the last token (the model should answer with the needle).
    answer: ``[N, K]`` int32 needle tokens (the expected response).
    needle_start, needle_end: ``[N]`` int32: the needle span ``[s0, s1)`` in ``tokens`` (markers excluded).
    depth: ``[N]`` float: the relative insertion depth in ``[0, 1]``.
  """

  tokens: np.ndarray
  answer: np.ndarray
  needle_start: np.ndarray
  needle_end: np.ndarray
  depth: np.ndarray


def needle_task(n: int, *, length: int, needle_len: int, vocab: int, seed: int, depths=None, bos: int = 0,
                mark: int = 1, query: int = 2, reserved: int = 4) -> NeedleBatch:
  """A deterministic (by ``seed``) batch of synthetic needle-copy prompts.

  Haystack and needle tokens are drawn uniformly from ``[reserved, vocab)``; the ids below ``reserved`` are special
  (``bos``, ``mark``, ``query``; one more is free for an end-of-answer token). The needle block ``mark, needle,
  mark`` starts at ``1 + round(depth * (length - needle_len - 4))``.

  Args:
    n: number of prompts.
    length: prompt length ``P`` (>= ``needle_len + 4``).
    needle_len: needle tokens ``K``.
    vocab: vocabulary size (> ``reserved``).
    seed: numpy seed (same seed, same batch).
    depths: ``[n]`` depths in ``[0, 1]`` (default: uniform random).
    bos, mark, query, reserved: special ids.

  Returns:
    A :class:`NeedleBatch`.
  """
  for name, val, lo in (("n", n, 1), ("needle_len", needle_len, 1), ("length", length, needle_len + 4),
                        ("vocab", vocab, reserved + 1)):
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo:
      raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
  rng = np.random.default_rng(seed)
  if depths is None:
    depths = rng.uniform(0.0, 1.0, n)
  depths = np.asarray(depths, np.float64)
  if depths.shape != (n,) or np.any((depths < 0) | (depths > 1)):
    raise ValueError(f"depths must be [n={n}] floats in [0, 1], got {depths!r}")
  tokens = rng.integers(reserved, vocab, size=(n, length)).astype(np.int32)
  answer = rng.integers(reserved, vocab, size=(n, needle_len)).astype(np.int32)
  room = length - needle_len - 4
  start = 1 + np.round(depths * room).astype(np.int32)  # position of the opening mark
  tokens[:, 0] = bos
  tokens[:, -1] = query
  for i in range(n):
    s = start[i]
    tokens[i, s] = mark
    tokens[i, s + 1:s + 1 + needle_len] = answer[i]
    tokens[i, s + 1 + needle_len] = mark
  return NeedleBatch(tokens=tokens, answer=answer, needle_start=(start + 1).astype(np.int32),
                     needle_end=(start + 1 + needle_len).astype(np.int32), depth=depths)


def rouge1_recall(reference: Iterable[int], response: Iterable[int]) -> float:
  """ROUGE-1 recall over token ids: ``sum_w min(count_ref(w), count_resp(w)) / len(reference)`` (0 for empty)."""
  ref, resp = Counter(int(t) for t in reference), Counter(int(t) for t in response)
  total = sum(ref.values())
  return 0.0 if total == 0 else sum(min(c, resp[w]) for w, c in ref.items()) / total


@dataclasses.dataclass(frozen=True)
class RetrievalScores:
  """Retrieval scores.

  Attributes:
    score: ``[L, H]`` mean of the per-sample scores over the kept (successful) samples (0 when none is kept).
    per_sample: ``[N, L, H]`` each sample's score (sum over its steps of ``1 / (s1 - s0)`` per copy hit).
    kept: ``[N]`` bool: the samples whose response recalled the needle.
  """

  score: np.ndarray
  per_sample: np.ndarray
  kept: np.ndarray

  def fraction_above(self, threshold: float = 0.1) -> float:
    """The fraction of heads whose score exceeds ``threshold`` (the paper: retrieval heads score > 0.1)."""
    return float(np.mean(self.score > threshold))


def retrieval_scores(argmax, prompt, generated, needle_start, needle_end, *, valid=None, answer=None,
                     kept=None, min_recall: float = 0.5) -> RetrievalScores:
  """Retrieval scores of every (layer, head), exactly as the official detection loop (module docstring).

  Args:
    argmax: ``[N, steps, L, H]`` int: the key index each (layer, head) attends most at decode step ``t`` (the
      step whose output is ``generated[:, t]``), in absolute positions of the sequence (prompt first).
    prompt: ``[N, P]`` int prompt tokens.
    generated: ``[N, steps]`` int tokens generated at each step.
    needle_start, needle_end: ``[N]`` the needle span ``[s0, s1)`` in the prompt.
    valid: ``[N, steps]`` bool: steps actually taken (the official loop stops at a newline); default all.
    answer: ``[N, K]`` needle tokens: a sample is kept when ``rouge1_recall(answer, response) > min_recall`` (the
      official ``> 50``) with ``response`` its valid generated tokens.
    kept: ``[N]`` bool, given instead of ``answer`` (default: every sample kept when ``answer`` is None too).
    min_recall: the recall threshold, in ``[0, 1]``.

  Returns:
    :class:`RetrievalScores`.
  """
  am = np.asarray(argmax)
  if am.ndim != 4:
    raise ValueError(f"argmax must have shape [N, steps, L, H], got {am.shape}")
  N, steps, L, H = am.shape
  prompt = np.asarray(prompt)
  gen = np.asarray(generated)
  s0, s1 = np.asarray(needle_start).astype(np.int64), np.asarray(needle_end).astype(np.int64)
  if prompt.ndim != 2 or prompt.shape[0] != N:
    raise ValueError(f"prompt must have shape [N={N}, P], got {prompt.shape}")
  if gen.shape != (N, steps):
    raise ValueError(f"generated must have shape [N, steps] = {(N, steps)}, got {gen.shape}")
  P = prompt.shape[1]
  if s0.shape != (N,) or s1.shape != (N,) or np.any(s0 < 0) or np.any(s1 <= s0) or np.any(s1 > P):
    raise ValueError(f"needle spans must satisfy 0 <= start < end <= P={P}, got start {s0!r}, end {s1!r}")
  valid = np.ones((N, steps), bool) if valid is None else np.asarray(valid, bool)
  if valid.shape != (N, steps):
    raise ValueError(f"valid must have shape [N, steps] = {(N, steps)}, got {valid.shape}")
  if kept is not None and answer is not None:
    raise ValueError("pass either answer (kept = ROUGE-1 recall > min_recall) or kept, not both")
  if answer is not None:
    answer = np.asarray(answer)
    kept = np.array([rouge1_recall(answer[i], gen[i][valid[i]]) > min_recall for i in range(N)])
  kept = np.ones(N, bool) if kept is None else np.asarray(kept, bool)
  if kept.shape != (N,):
    raise ValueError(f"kept must have shape [N={N}], got {kept.shape}")
  in_span = (am >= s0[:, None, None, None]) & (am < s1[:, None, None, None])
  tok = prompt[np.arange(N)[:, None, None, None], np.clip(am, 0, P - 1)]  # [N, steps, L, H]
  hit = in_span & (tok == gen[:, :, None, None]) & valid[:, :, None, None]
  per_sample = hit.sum(1) / (s1 - s0)[:, None, None].astype(np.float64)
  score = per_sample[kept].mean(0) if kept.any() else np.zeros((L, H))
  return RetrievalScores(score=score, per_sample=per_sample, kept=kept)


def argmax_steps(records, *, skip: int = 0) -> np.ndarray:
  """``[B, steps, L, H]`` argmax of the last query row of every recorded call, from a capture of a decode loop.

  ``records`` is a :class:`jaxattn.analysis.Capture` / :class:`jaxattn.analysis.Records` whose layers were called
  once per step (``stats`` including ``"argmax"``); the first ``skip`` calls of each layer (e.g. the prefill) are
  left out. Every layer must have the same number of heads and of calls.
  """
  per_layer = []
  for path in records.paths:
    calls = records.calls(path)[skip:]
    if not calls:
      raise ValueError(f"layer {path!r} has no recorded calls after skipping {skip}")
    per_layer.append(np.stack([np.asarray(c["argmax"])[:, :, -1] for c in calls], axis=1))  # [B, steps, H]
  shapes = {p: a.shape for p, a in zip(records.paths, per_layer)}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"layers differ in batch, steps or heads: {shapes}")
  return np.stack(per_layer, axis=2)  # [B, steps, L, H]


def rank_heads(scores) -> list[tuple[int, int]]:
  """All ``(layer, head)`` pairs by decreasing score (ties: lower layer, then lower head first)."""
  s = np.asarray(scores)
  if s.ndim != 2:
    raise ValueError(f"scores must have shape [L, H], got {s.shape}")
  order = np.lexsort((np.arange(s.size), -s.ravel()))
  return [tuple(int(i) for i in np.unravel_index(o, s.shape)) for o in order]


def top_heads(scores, k: int) -> frozenset:
  """The ``k`` best heads as a frozenset of ``(layer, head)`` (for :class:`jaxattn.analysis.HeadMask`)."""
  ranked = rank_heads(scores)
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= len(ranked):
    raise ValueError(f"k must be an int in [0, {len(ranked)}], got {k!r}")
  return frozenset(ranked[:k])


def random_heads(scores, k: int, *, seed: int, exclude_top: int = 0) -> frozenset:
  """``k`` random heads, excluding the ``exclude_top`` best ones (the paper's control: random heads outside the
  top 100), deterministic by ``seed``."""
  ranked = rank_heads(scores)
  pool = ranked[exclude_top:]
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= len(pool):
    raise ValueError(f"k must be an int in [0, {len(pool)}] ({len(ranked)} heads, {exclude_top} excluded), "
                     f"got {k!r}")
  pick = np.random.default_rng(seed).choice(len(pool), size=k, replace=False)
  return frozenset(pool[i] for i in pick)


@dataclasses.dataclass(frozen=True)
class HeadSearch:
  """Result of :func:`search_heads`.

  Attributes:
    baseline: ``eval_fn(frozenset())``.
    ranked: ``((layer, head), gain)`` for every candidate, best gain first.
    kept: the candidates whose gain is positive (the ACT search's selection).
  """

  baseline: float
  ranked: tuple
  kept: frozenset


def search_heads(eval_fn: Callable[[frozenset], float], candidates) -> HeadSearch:
  """Single-head search: evaluates ``eval_fn({(layer, head)})`` for every candidate against ``eval_fn(set())``.

  ``eval_fn`` takes a frozenset of heads (enable an intervention on them, e.g. ACT or a head mask, and return a
  metric where higher is better). The ACT paper keeps the heads whose calibration alone improves calibration-set
  accuracy.
  """
  cands = [tuple(c) for c in candidates]
  if not cands or any(len(c) != 2 for c in cands):
    raise ValueError(f"candidates must be a non-empty sequence of (layer, head) pairs, got {candidates!r}")
  base = float(eval_fn(frozenset()))
  gains = [(c, float(eval_fn(frozenset([c]))) - base) for c in cands]
  ranked = tuple(sorted(gains, key=lambda cg: -cg[1]))
  return HeadSearch(baseline=base, ranked=ranked, kept=frozenset(c for c, g in ranked if g > 0))
