"""Executors: gathering the kept tokens and the segment-id form give the same downstream output (and gradients),
across single- and multi-stage schedules; order is kept; no NaN from fully pruned rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import masks, prune, testing

V, T, F, H = 12, 5, 16, 2


def _weights(seed=0, layers=3):
  ks = jax.random.split(jax.random.key(seed), layers)
  return [jax.random.normal(k, (3, F, H, F // H)) * 0.3 for k in ks]


def _layer(x, w, segment_ids=None):
  q, k, v = (jnp.einsum("blf,fhd->blhd", x, wi) for wi in w)
  o = jaxattn.softmax_attention(q, k, v, mask=masks.Causal(), segment_ids=segment_ids, implementation="xla")
  return x + o.reshape(x.shape)


def run_gather(x, ws, stages):
  """``stages``: {layer: kept indices into the ORIGINAL visual tokens}; returns the text outputs."""
  n = V
  cur = None
  for l, w in enumerate(ws):
    if l in stages:
      idx = stages[l]
      local = idx
      if cur is not None:  # positions of the new survivors inside the current (already pruned) block
        local = jnp.stack([jnp.searchsorted(c, i) for c, i in zip(cur, idx)])
      x = prune.gather_keep(x, local, start=0, num=n)
      cur, n = idx, idx.shape[1]
    x = _layer(x, w)
  return x[:, n:]


def run_mask(x, ws, stages):
  ids = None
  for l, w in enumerate(ws):
    if l in stages:
      ids = prune.prune_segment_ids(prune.keep_mask(stages[l], V), num_text=T)
    x = _layer(x, w, None if ids is None else (ids, ids))
  return x[:, V:]


def _stages(x_key):
  s1 = prune.topk_keep_order(jax.random.normal(x_key, (2, V)), 6)
  pick = prune.topk_keep_order(jax.random.normal(jax.random.fold_in(x_key, 1), (2, 6)), 3)
  return {1: s1, 2: prune.compose(s1, pick)}


@pytest.mark.parametrize("multi", [False, True])
def test_gather_and_mask_executors_agree(multi):
  x = jax.random.normal(jax.random.key(1), (2, V + T, F))
  ws = _weights()
  st = _stages(jax.random.key(2))
  if not multi:
    st = {1: st[1]}
  a, b = run_gather(x, ws, st), run_mask(x, ws, st)
  testing.assert_close(a, b)
  full = run_mask(x, ws, {})
  assert float(jnp.abs(full - a).max()) > 1e-3  # pruning changed something
  ga = jax.grad(lambda x: run_gather(x, ws, st).sum())(x)
  gb = jax.grad(lambda x: run_mask(x, ws, st).sum())(x)
  testing.assert_close(ga, gb, kind="grad")


def test_gather_keeps_order_prefix_and_suffix():
  x = jnp.arange(2 * 10).reshape(2, 10).astype(jnp.float32)[..., None]
  idx = jnp.asarray([[0, 3, 4], [1, 2, 5]])
  out = prune.gather_keep(x, idx, start=2, num=6)
  np.testing.assert_array_equal(out[0, :, 0], [0, 1, 2, 5, 6, 8, 9])
  np.testing.assert_array_equal(out[1, :, 0], [10, 11, 13, 14, 17, 18, 19])
  np.testing.assert_array_equal(prune.compose(jnp.asarray([[2, 5, 7, 9]]), jnp.asarray([[1, 3]])), [[5, 9]])
  np.testing.assert_array_equal(prune.keep_mask(idx, 6)[0], [1, 0, 0, 1, 1, 0])
  ids = prune.prune_segment_ids(prune.keep_mask(idx, 6), 2, num_prefix=1)
  np.testing.assert_array_equal(ids[1], [0, 1, 0, 0, 1, 1, 0, 0, 0])
  with pytest.raises(ValueError, match="exceed the 2 tokens"):
    prune.gather_keep(x, idx, start=2, num=2)
  with pytest.raises(ValueError, match="does not fit"):
    prune.gather_keep(x, idx, start=8, num=6)


def test_mask_executor_pruning_everything_but_one_is_finite():
  x = jax.random.normal(jax.random.key(3), (2, V + T, F))
  ids = prune.prune_segment_ids(prune.keep_mask(jnp.asarray([[V - 1], [0]]), V), num_text=T)
  out = _layer(x, _weights()[0], (ids, ids))
  testing.assert_no_nan(out, "out")
