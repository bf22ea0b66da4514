"""Shared helpers for the jaxattn.cache tests: tiny shapes, a ragged filled cache, tie-tolerant set comparison."""

import numpy as np

from jaxattn import cache, testing

B, G, H, D = 2, 2, 4, 16
L = 64
LENGTHS = (64, 45)  # ragged batch: the second sequence is shorter than the capacity


def filled(seed=0, lengths=LENGTHS, capacity=L, page_size=0, T_q=1):
  """A cache holding ``lengths[b]`` random tokens per sequence, its k / v and ``T_q`` queries per sequence (the
  queries of the last ``T_q`` tokens), all f32."""
  q, k, v = testing.random_qkv(seed, B=B, T=T_q, S=capacity, H=H, G=G, D=D)
  c = cache.init(B, capacity, G, D, page_size=page_size)
  c = cache.prefill(c, k, v, np.asarray(lengths, np.int32))
  return c, q, np.asarray(k), np.asarray(v)


def assert_same_selection(got, want, scores=None, name="selection", tol=1e-5):
  """``got`` / ``want`` as ``[b][head] -> set``: equal, or differing only on near-ties of ``scores[b, head]``."""
  for b in range(len(want)):
    for x in range(len(want[b])):
      g, w = got[b][x], want[b][x]
      if g == w:
        continue
      assert scores is not None and len(g) == len(w), f"{name}[{b}][{x}]: got {sorted(g)}, want {sorted(w)}"
      s = scores[b, x]
      kept = np.asarray(sorted(w))
      finite = s[kept][np.isfinite(s[kept])]
      threshold = finite.min() if finite.size else np.inf
      for e in g ^ w:
        assert abs(s[e] - threshold) <= tol * max(1.0, abs(threshold)), (
            f"{name}[{b}][{x}]: {sorted(g ^ w)} differ; score {s[e]} vs threshold {threshold}")
