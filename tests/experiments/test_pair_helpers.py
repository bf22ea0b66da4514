"""``experiments.pair``: ranking metrics and BM25 against plain loops, and the training loop's exact resume."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.common import AdamWConfig
from experiments.pair import metrics as M
from experiments.pair import train as T


def test_bm25_matches_loop():
  rng = np.random.default_rng(0)
  V = 12
  docs = rng.integers(1, V, (5, 9))
  dl = np.array([9, 4, 6, 9, 2])
  qs = rng.integers(1, V, (3, 4))
  ql = np.array([4, 2, 3])
  got = M.bm25(qs, ql, docs, dl, V, k1=1.2, b=0.75, ignore=(1,))
  avg = dl.mean()
  for i in range(3):
    for j in range(5):
      d = list(docs[j, :dl[j]])
      s = 0.0
      for w in qs[i, :ql[i]]:
        if w == 1:
          continue
        df = sum(w in list(docs[k, :dl[k]]) for k in range(5))
        idf = math.log(1 + (5 - df + 0.5) / (df + 0.5))
        tf = d.count(w)
        s += idf * tf * 2.2 / (tf + 1.2 * (1 - 0.75 + 0.75 * dl[j] / avg))
      assert got[i, j] == pytest.approx(s, rel=1e-5)


def test_rank_metrics_and_spearman():
  scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.5, 0.5, 0.5]])
  r = M.ranks(scores, np.array([0, 0, 2]))
  assert r.tolist() == [1, 2, 3]  # ties count against the positive
  assert M.recall_at(r, 1) == pytest.approx(1 / 3) and M.mrr(r) == pytest.approx((1 + 0.5 + 1 / 3) / 3)
  from scipy.stats import spearmanr
  x = np.array([1, 2, 2, 5, 3.0])
  y = np.array([0.1, 0.4, 0.3, 0.9, 0.2])
  assert M.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
  assert M.spearman(np.ones(4), y[:4]) == 0.0
  t = M.best_threshold(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]))
  assert 0.2 < t < 0.8
  prof, cnt = M.position_profile([1.0, 0.0, 0.5], [0, 0, 1], [0, 1, 1], 2, 2)
  assert cnt.tolist() == [[1, 1], [0, 1]] and np.isnan(prof[1, 0]) and prof[1, 1] == 0.5
  a = np.array([[3, 4, 5, 0]])
  assert M.jaccard(a, [3], np.array([[4, 5, 6, 0]]), [3])[0] == pytest.approx(2 / 4)


def _model_fn(rngs):
  return nnx.Linear(3, 2, rngs=rngs)


def _loss(model, b, key):
  del key
  return jnp.mean((model(b["x"]) - b["y"]) ** 2), {}


def _batch(step):
  rng = np.random.default_rng([7, step])
  x = rng.normal(size=(8, 3)).astype(np.float32)
  return {"x": x, "y": (x[:, :2] * 2).astype(np.float32)}


def test_train_loop_resumes_bit_exactly(tmp_path, capsys):
  settings = AdamWConfig(steps=10, batch_size=8, lr=0.05, warmup_steps=2)
  full = T.train(_model_fn, _loss, _batch, steps=10, settings=settings, ckpt_path=tmp_path / "a.npz", ckpt_every=3,
                 progress=False, log_every=5)
  with pytest.raises(T.Interrupted):
    T.train(_model_fn, _loss, _batch, steps=10, settings=settings, ckpt_path=tmp_path / "b.npz", ckpt_every=3,
            progress=False, interrupt_after=7, log_every=5)  # killed after step 7: the checkpoint holds step 6
  res = T.train(_model_fn, _loss, _batch, steps=10, settings=settings, ckpt_path=tmp_path / "b.npz", ckpt_every=3,
                progress=False, log_every=5, desc="lin")
  assert res.resumed_from == 6 and "lin: resumed from step 6 of 10" in capsys.readouterr().out
  for a, b in zip(jax.tree.leaves(nnx.state(full.model, nnx.Param)), jax.tree.leaves(nnx.state(res.model, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert full.history[-1]["loss"] < full.history[0]["loss"]
  done = T.train(_model_fn, _loss, _batch, steps=10, settings=settings, ckpt_path=tmp_path / "b.npz",
                 progress=False)  # finished: returns at once
  assert done.resumed_from == 10
  m = _model_fn(nnx.Rngs(3))
  T.save_params(tmp_path / "p.npz", res.model)
  T.load_params(tmp_path / "p.npz", m)
  np.testing.assert_array_equal(np.asarray(m.kernel[...]), np.asarray(res.model.kernel[...]))
  with pytest.raises(ValueError, match="does not match the model"):
    T.load_params(tmp_path / "p.npz", nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
