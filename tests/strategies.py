"""Hypothesis strategies for masks, shared by the mask and attention test suites."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from jaxattn import masks

KINDS = ("full", "causal", "inv_causal", "bi_causal")


@st.composite
def slices(draw, T: int, S: int, max_slices: int = 4):
  out = []
  for _ in range(draw(st.integers(1, max_slices))):
    qs = draw(st.integers(0, T - 1))
    qe = draw(st.integers(qs + 1, T))
    ks = draw(st.integers(0, S - 1))
    ke = draw(st.integers(ks + 1, S))
    out.append((qs, qe, ks, ke, draw(st.sampled_from(KINDS))))
  return masks.Slices(tuple(out))


@st.composite
def documents(draw, T: int):
  cuts = sorted(draw(st.sets(st.integers(1, T - 1), max_size=4))) if T > 1 else []
  bounds = [0, *cuts, T]
  lens = [b - a for a, b in zip(bounds, bounds[1:])]
  kind = draw(st.sampled_from(["causal", "full", "block_causal", "prefix"]))
  if kind == "causal":
    return masks.causal_document(lens)
  if kind == "full":
    return masks.full_document(lens)
  if kind == "block_causal":
    return masks.block_causal_document(lens, draw(st.integers(1, 8)))
  return masks.prefix_lm_document(lens, [draw(st.integers(0, n)) for n in lens])


@st.composite
def block_sparse(draw, T: int, S: int):
  bq, bk = draw(st.sampled_from([4, 8, 16])), draw(st.sampled_from([4, 8, 16]))
  nq, nk = -(-T // bq) + draw(st.integers(0, 1)), -(-S // bk) + draw(st.integers(0, 1))
  seed = draw(st.integers(0, 2**16))
  density = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
  layout = np.random.default_rng(seed).random((nq, nk)) < density
  return masks.BlockSparse(layout, bq, bk)


@st.composite
def base_mask(draw, T: int, S: int):
  kind = draw(st.sampled_from(["full", "causal", "local", "slices", "docs", "block"]))
  if kind == "full":
    return masks.Full()
  if kind == "causal":
    return masks.Causal(draw(st.integers(-T, S)))
  if kind == "local":
    return masks.Local(draw(st.integers(0, 12)), draw(st.integers(0, 12)), draw(st.integers(-T // 2, S)))
  if kind == "slices":
    return draw(slices(T, S))
  if kind == "docs" and T == S:
    return draw(documents(T))
  return draw(block_sparse(T, S))


@st.composite
def any_mask(draw, T: int, S: int):
  """A base mask, or an ``&`` / ``|`` combination of two (rows with no allowed key happen often)."""
  a = draw(base_mask(T, S))
  op = draw(st.sampled_from([None, "and", "or"]))
  if op is None:
    return a
  b = draw(base_mask(T, S))
  return a & b if op == "and" else a | b


def brute_force(mask, T: int, S: int) -> np.ndarray:
  """The mask evaluated pair by pair from the definitions in design.md section 4 (independent of masks.py)."""
  out = np.zeros((T, S), bool)
  for i in range(T):
    for j in range(S):
      out[i, j] = _allowed(mask, i, j)
  return out


def _allowed(m, i, j) -> bool:
  if isinstance(m, masks.Full):
    return True
  if isinstance(m, masks.Causal):
    return j <= i + m.offset
  if isinstance(m, masks.Local):
    return i + m.offset - m.left <= j <= i + m.offset + m.right
  if isinstance(m, masks.Slices):
    for qs, qe, ks, ke, kind in m.slices:
      if not (qs <= i < qe and ks <= j < ke):
        continue
      a, b, lq, lk = i - qs, j - ks, qe - qs, ke - ks
      ok = True
      if kind in ("causal", "bi_causal"):
        ok &= b - lk <= a - lq
      if kind in ("inv_causal", "bi_causal"):
        ok &= b >= a
      if ok:
        return True
    return False
  if isinstance(m, masks.BlockSparse):
    bi, bj = i // m.block_q, j // m.block_k
    return bool(bi < m.layout.shape[0] and bj < m.layout.shape[1] and m.layout[bi, bj])
  if isinstance(m, masks.And):
    return _allowed(m.a, i, j) and _allowed(m.b, i, j)
  if isinstance(m, masks.Or):
    return _allowed(m.a, i, j) or _allowed(m.b, i, j)
  raise TypeError(m)
