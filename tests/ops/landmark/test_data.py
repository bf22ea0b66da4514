"""Landmark data helpers: insertion layout, mapping outputs back, next-token targets (numpy and jax)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.ops.landmark import data


def test_insert_layout_small():
  toks = np.arange(10, 17)  # 7 regular tokens, block 4 -> landmark after every 3
  out = data.insert_landmarks(toks, 4, -1)
  np.testing.assert_array_equal(out, [10, 11, 12, -1, 13, 14, 15, -1, 16])
  assert isinstance(out, np.ndarray) and out.dtype == toks.dtype


@pytest.mark.parametrize("N,bs", [(0, 4), (1, 2), (15, 16), (30, 16), (100, 8), (47, 5)])
def test_landmarks_sit_where_the_kernels_expect_them(N, bs):
  toks = np.arange(1, N + 1)[None].repeat(2, 0)
  out = data.insert_landmarks(toks, bs, 0)
  M = data.augmented_length(N, bs)
  assert out.shape == (2, M)
  np.testing.assert_array_equal(out == 0, np.broadcast_to(data.is_landmark(M, bs), (2, M)))
  np.testing.assert_array_equal(data.remove_landmarks(out, bs, N), toks)
  np.testing.assert_array_equal(out[:, data.regular_positions(N, bs)], toks)


def test_jax_arrays_and_jit():
  toks = jnp.arange(20, dtype=jnp.int32).reshape(2, 10)
  out = jax.jit(lambda t: data.insert_landmarks(t, 4, 99))(toks)
  np.testing.assert_array_equal(np.asarray(out), data.insert_landmarks(np.asarray(toks), 4, 99))
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, out.shape[1], 7)))
  back = data.remove_landmarks(logits, 4, 10)
  assert back.shape == (2, 10, 7)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(logits)[:, data.regular_positions(10, 4)])


def test_next_token_targets_skip_landmarks():
  toks = np.arange(1, 8)[None]  # 7 tokens, block 4
  w = np.array([[0, 0, 0, 0, 2.0, 3.0, 4.0]])
  inputs, targets, weights = data.next_token_targets(toks, 4, 0, weights=w)
  np.testing.assert_array_equal(inputs, [[1, 2, 3, 0, 4, 5, 6, 0, 7]])
  # regular token t predicts t + 1 (the token after a landmark too); landmarks and the last token: weight 0
  np.testing.assert_array_equal(targets, [[2, 3, 4, 0, 5, 6, 7, 0, 0]])
  np.testing.assert_array_equal(weights, [[0, 0, 0, 0, 2, 3, 4, 0, 0]])  # weight of the target token
  _, _, ones = data.next_token_targets(toks, 4, 0)
  np.testing.assert_array_equal(ones, [[1, 1, 1, 0, 1, 1, 1, 0, 0]])


def test_bad_arguments():
  with pytest.raises(ValueError, match="block_size must be an int >= 2"):
    data.insert_landmarks(np.arange(4), 1, 0)
  with pytest.raises(ValueError, match="9 regular tokens need 12 positions"):
    data.remove_landmarks(np.zeros((1, 10)), 4, 9)
  with pytest.raises(ValueError, match="weights must have the shape"):
    data.next_token_targets(np.arange(4)[None], 4, 0, weights=np.ones(4))
