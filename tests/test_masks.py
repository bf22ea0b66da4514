"""Mask algebra: dense masks against the definitions, exact areas, block layouts, hashing, generators."""

import jax
import numpy as np
import pytest
from hypothesis import given, strategies as st

from jaxattn import masks
from tests import strategies as mst

SHAPES = st.tuples(st.integers(1, 40), st.integers(1, 40))


@given(data=st.data(), shape=SHAPES)
def test_to_dense_matches_definition(data, shape):
  T, S = shape
  m = data.draw(mst.any_mask(T, S))
  np.testing.assert_array_equal(m.to_dense(T, S), mst.brute_force(m, T, S), err_msg=repr(m))


@given(data=st.data(), shape=SHAPES)
def test_area_is_exact(data, shape):
  T, S = shape
  m = data.draw(mst.any_mask(T, S))
  assert m.area(T, S) == int(m.to_dense(T, S).sum()), repr(m)


@given(data=st.data(), shape=SHAPES, bq=st.integers(1, 16), bk=st.integers(1, 16))
def test_block_layout_consistent_with_dense(data, shape, bq, bk):
  T, S = shape
  m = data.draw(mst.any_mask(T, S))
  dense = m.to_dense(T, S)
  layout = m.block_layout(T, S, bq, bk)
  assert layout.dtype == np.int8 and layout.shape == (-(-T // bq), -(-S // bk))
  for qb in range(layout.shape[0]):
    for kb in range(layout.shape[1]):
      tile = dense[qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
      want = masks.FULL if tile.all() else masks.PARTIAL if tile.any() else masks.EMPTY
      assert layout[qb, kb] == want, (repr(m), qb, kb)


def test_area_large_without_dense():
  T = 1 << 20  # a dense mask would be 2**40 booleans
  assert masks.Causal().area(T, T) == T * (T + 1) // 2
  assert masks.sliding_window(1024).area(T, T) == sum(min(i + 1, 1024) for i in range(1024)) + (T - 1024) * 1024
  docs = [1 << 19, 1 << 19]
  assert masks.causal_document(docs).area(T, T) == 2 * ((1 << 19) * ((1 << 19) + 1) // 2)


def test_hashable_static_args_and_equality():
  a = masks.Causal() & masks.Local(4)
  b = masks.Causal() & masks.Local(4)
  assert a == b and hash(a) == hash(b)
  layout = np.eye(3, dtype=bool)
  assert masks.BlockSparse(layout, 4, 4) == masks.BlockSparse(layout.copy(), 4, 4)
  assert hash(masks.BlockSparse(layout, 4, 4)) == hash(masks.BlockSparse(layout.copy(), 4, 4))
  assert masks.BlockSparse(layout, 4, 4) != masks.BlockSparse(~layout, 4, 4)
  calls = []
  g = jax.jit(lambda x, m: (calls.append(m), x)[1], static_argnums=1)
  g(1.0, a)
  g(1.0, b)  # equal mask: cached, no retrace
  assert len(calls) == 1


def test_repr_is_helpful():
  assert repr(masks.Causal(3)) == "Causal(offset=3)"
  assert "&" in repr(masks.Causal() & masks.Local(2))
  r = repr(masks.causal_document([1] * 20))
  assert "20 slices" in r
  assert "density" in repr(masks.random_block_sparse(4, 4, 0.5, 8, 8))


def test_generators():
  m = masks.share_question(3, [2, 2])
  d = m.to_dense(7, 7)
  assert d[3:5, 0:3].all() and not d[5:7, 3:5].any() and d[5:7, 0:3].all()
  p = masks.prefix_lm_causal(3, 6).to_dense(6, 6)
  assert p[:3, :3].all() and not p[:3, 3:].any() and p[5, :6].all() and not p[3, 4]
  w = masks.sliding_window(3, causal=True).to_dense(6, 6)
  assert w.sum(1).tolist() == [1, 2, 3, 3, 3, 3]
  w2 = masks.sliding_window(4, causal=False).to_dense(6, 6)
  assert w2[3].tolist() == [False, True, True, True, True, True]
  g = masks.global_sliding_window(2, 3).to_dense(8, 8)
  assert g[:, :2].all() and g[:2, :].all() and not g[7, 3]
  gc = masks.global_sliding_window(2, 3, causal=True).to_dense(8, 8)
  assert not np.triu(gc, 1).any() and gc[7, :2].all()
  b = masks.block_causal_document([5, 3], 2).to_dense(8, 8)
  assert b[0, 1] and not b[0, 2] and b[4, 0] and not b[5, 4] and b[7, 5]
  ids = masks.document_segment_ids([2, 3])
  assert ids.tolist() == [0, 0, 1, 1, 1]
  lens = masks.sample_document_lengths(1000, 100, seed=1)
  assert sum(lens) == 1000 and min(lens) >= 1
  rb = masks.random_block_sparse(8, 10, 0.2, 16, 16, seed=3)
  assert rb.layout.sum(1).tolist() == [2] * 8


@pytest.mark.parametrize("bad, match", [
    (lambda: masks.Local(-1), "left"),
    (lambda: masks.Causal(1.5), "offset"),
    (lambda: masks.Slices(((0, 0, 0, 1, "full"),)), "non-empty"),
    (lambda: masks.Slices(((0, 1, 0, 1, "diagonal"),)), "kind"),
    (lambda: masks.BlockSparse(np.zeros((2,), bool), 4, 4), "2-D"),
    (lambda: masks.BlockSparse(np.zeros((2, 2), bool), 0, 4), "block_q"),
    (lambda: masks.causal_document([3, 0]), "doc_lens"),
    (lambda: masks.prefix_lm_document([3], [4]), "prefix length 4"),
    (lambda: masks.random_block_sparse(2, 2, 1.5, 4, 4), "density"),
    (lambda: masks.Causal().to_dense(0, 3), "T must be"),
    (lambda: masks.Causal().block_layout(4, 4, 0, 2), "block_q"),
])
def test_bad_values_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    bad()
