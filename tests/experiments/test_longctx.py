"""The tiny long-context LM: task generators (labels recoverable, deterministic records, clear errors), inference
with a sparse prefill / decode policy against the dense model, and resume of its cached training."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.longctx import PRESETS, TASKS, DataConfig, LongCtxConfig, ModelConfig, TrainConfig
from experiments.longctx import infer, tasks
from experiments.longctx.model import TinyLM
from jaxattn import sparse

SMOKE = PRESETS["smoke"]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("preset,length", [("smoke", 128), ("cpu", 256), ("cpu", 512)])
def test_every_answer_is_one_retrieval_hop(task, preset, length):
  d = PRESETS[preset].data
  n_answers = {"niah_single": 1, "niah_multi": 1, "mqar": d.mqar_queries, "vt": d.vt_hops, "cok": d.cok_hops}[task]
  for seed in range(3):
    toks, ans = tasks.make_example(task, np.random.default_rng(seed), length, d)
    assert toks.shape == ans.shape == (length,) and toks.dtype == np.int32
    assert toks[0] == tasks.BOS and toks[1] == tasks.TASK_TOKEN[task]
    assert 0 <= toks.min() and toks.max() < tasks.VOCAB_SIZE
    assert ans.sum() == n_answers and not ans[:length - d.query_len].any()
    assert tasks.check_example(toks, ans)
    rep, rans = tasks.make_example(task, np.random.default_rng(seed), length, d, repeats=3)
    assert rans.sum() == n_answers + 3 and tasks.check_example(rep, rans)
    bad = toks.copy()
    i = int(np.flatnonzero(ans)[-1])
    bad[i] = tasks.VALUES[0] if bad[i] != tasks.VALUES[0] else tasks.VALUES[1]
    assert not tasks.check_example(bad, ans)  # the checker can fail


def test_source_records_are_pure_functions_of_their_index():
  d = SMOKE.data
  a = tasks.LongCtxSource(128, 6, 3, d)
  b = tasks.LongCtxSource(128, 6, 3, d)
  for i in (5, 0, 3):
    for k in ("tokens", "answer", "task"):
      np.testing.assert_array_equal(a[i][k], b[i][k])
  other = tasks.LongCtxSource(128, 6, 4, d)
  assert not np.array_equal(a[0]["tokens"], other[0]["tokens"])
  assert "seed=3" in repr(a) and "length=128" in repr(a)
  only = tasks.LongCtxSource(128, 4, 3, d, tasks=("vt",))
  assert set(only.arrays["task"].tolist()) == {TASKS.index("vt")}


def test_bad_inputs_raise_clear_errors():
  d = PRESETS["cpu"].data
  with pytest.raises(ValueError, match="unknown task 'x'"):
    tasks.make_example("x", np.random.default_rng(0), 256, d)
  with pytest.raises(ValueError, match="do not fit a context"):
    tasks.make_example("cok", np.random.default_rng(0), 128, d)
  with pytest.raises(ValueError, match="query_len"):
    DataConfig(query_len=4)
  with pytest.raises(ValueError, match="head_dim"):
    ModelConfig(d_model=12, num_heads=4)
  with pytest.raises(ValueError, match="kind"):
    infer.DecodePolicy("snap", 16)
  with pytest.raises(ValueError, match="multiple of page_size"):
    infer.DecodePolicy("quest", 20, 16)


@pytest.fixture(scope="module")
def model_and_batch():
  model = TinyLM(SMOKE.model, tasks.VOCAB_SIZE, rngs=nnx.Rngs(0))
  src = tasks.LongCtxSource(64, 3, 0, SMOKE.data)
  return model, src.arrays["tokens"], src.arrays["answer"]


def test_dense_prefill_and_dense_decode_match_the_model(model_and_batch):
  model, toks, ans = model_and_batch
  ref = model(jnp.asarray(toks))
  logits, rec, sp = infer._prefill(model, jnp.asarray(toks), infer.PrefillPattern())
  np.testing.assert_allclose(logits, ref, atol=2e-5, rtol=2e-5)
  A = SMOKE.data.query_len
  P = toks.shape[1] - A
  dl, drec, dsp = infer._decode(model, jnp.asarray(toks), P, infer.DecodePolicy(page_size=8))
  np.testing.assert_allclose(dl[:, :A], ref[:, P - 1:-1], atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(drec, np.ones(SMOKE.model.num_layers))
  want = infer.answer_metrics(ref, toks, ans)
  for got in (infer.prefill_eval(model, toks, ans), infer.decode_eval(model, toks, ans, query_len=A,
                                                                      policy=infer.DecodePolicy(page_size=8))):
    for g, w in zip((got["correct"], got["count"], got["exact"]), want):
      np.testing.assert_array_equal(g, w)


@pytest.mark.slow
def test_full_budgets_are_dense_and_small_budgets_are_not(model_and_batch):
  model, toks, ans = model_and_batch
  A = SMOKE.data.query_len
  dense = infer._decode(model, jnp.asarray(toks), 64 - A, infer.DecodePolicy(page_size=8))[0]
  for kind in ("quest", "topk", "sink_window"):
    full = infer._decode(model, jnp.asarray(toks), 64 - A, infer.DecodePolicy(kind, 64, 8))
    np.testing.assert_allclose(full[0], dense, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(full[1], 1.0, atol=1e-5)
    small = infer._decode(model, jnp.asarray(toks), 64 - A, infer.DecodePolicy(kind, 8, 8))
    assert np.all(small[1] < 0.999) and np.all(small[2] > 0.8)  # recall drops, realised sparsity ~ 1 - 8/60
  ref = infer._prefill(model, jnp.asarray(toks), infer.PrefillPattern())[0]
  vs0 = sparse.VerticalSlash.for_sparsity(0.0, 64, last_q=16, force_first=1, force_local=2)
  got, rec, sp = infer._prefill(model, jnp.asarray(toks), infer.PrefillPattern(vs0))
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(rec, 1.0, atol=1e-5)
  np.testing.assert_allclose(sp, 0.0, atol=1e-6)
  vs = sparse.VerticalSlash.for_sparsity(0.8, 64, last_q=16, force_first=1, force_local=2)
  _, rec, sp = infer._prefill(model, jnp.asarray(toks), infer.PrefillPattern(vs))
  assert np.all(rec < 0.999) and np.all(sp > 0.5)


@pytest.mark.slow
def test_decode_recall_matches_a_numpy_reference(model_and_batch):
  """Layer-0 recall of a top-k decode step equals the dense probability mass on the k keys with the largest
  probability maxed over the group (the smoke model: 2 query heads share 1 kv head), recomputed in numpy from the
  layer's q and k."""
  model, toks, _ = model_and_batch
  P, k_budget = 63, 8  # decode exactly one token: the last one
  _, rec, _ = infer._decode(model, jnp.asarray(toks), P, infer.DecodePolicy("topk", k_budget, 8))
  block = model.blocks[0]
  x = model.embed(jnp.asarray(toks))
  q, k, _ = block.qkv(x, jnp.arange(64))
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  G = k.shape[2]
  total = 0.0
  for b in range(q.shape[0]):
    assert G == 1
    s = np.einsum("hd,sgd->hs", q[b, -1], k[b]) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    keep = np.argsort(-p.max(0))[:k_budget]
    total += p[:, keep].sum(-1).mean()
  np.testing.assert_allclose(rec[0], total / q.shape[0], rtol=1e-4)


@pytest.mark.slow
def test_training_resumes_to_the_uninterrupted_parameters(tmp_path):
  from experiments.common.train import Interrupted, tree_equal
  from experiments.longctx.train import load_or_train

  cfg = LongCtxConfig("micro", data=dataclasses.replace(SMOKE.data, num_train=32, num_eval=4),
                      model=ModelConfig(num_layers=1, d_model=16, num_heads=2, num_kv_heads=1, mlp_ratio=1),
                      train=TrainConfig(train_len=64, batch_size=4, steps=4, eval_every=2, log_every=2,
                                        eval_batch_size=4, warmup_steps=1))
  whole = load_or_train(cfg, root=tmp_path / "a", progress=False)
  with pytest.raises(Interrupted):
    load_or_train(cfg, root=tmp_path / "b", progress=False, interrupt_after=3)
  resumed = load_or_train(cfg, root=tmp_path / "b", progress=False)
  assert not resumed.cached
  assert tree_equal(nnx.to_pure_dict(nnx.state(whole.model)), nnx.to_pure_dict(nnx.state(resumed.model)))
  again = load_or_train(cfg, root=tmp_path / "b", progress=False)
  assert again.cached and again.train_seconds == 0.0
  assert tree_equal(nnx.to_pure_dict(nnx.state(whole.model)), nnx.to_pure_dict(nnx.state(again.model)))
