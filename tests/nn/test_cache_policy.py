"""KV cache policies in the NNX ``MultiHeadAttention`` decode path against numpy simulations of each policy.

The module is run as a model would run it (prefill of ``P`` tokens, then one token per call); the simulations
recompute the module's queries, keys and values with its own projections and RoPE, apply each policy's rule with
sets (:mod:`jaxattn.cache.reference`), attend with :func:`jaxattn.cache.reference.masked_attention` and project
the heads out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import masks, testing
from jaxattn.cache import policy as cp
from jaxattn.cache import reference as ref
from jaxattn.nn import MultiHeadAttention
from jaxattn.nn.rope import apply_rope

B, H, G, D, F = 2, 4, 2, 8, 32
P, STEPS, L = 24, 8, 32


def _module():
  return MultiHeadAttention(H, F, num_kv_heads=G, head_dim=D, use_rope=True, mask=masks.Causal(),
                            rngs=nnx.Rngs(0))


def _x():
  return jax.random.normal(jax.random.key(3), (B, P + STEPS, F), jnp.float32)


def _run(policy):
  """Module outputs of the decode steps ``[B, STEPS, F]``."""
  m, x = _module(), _x()
  m.init_cache(B, L, policy=policy)
  m(x[:, :P], decode=True)
  return m, np.stack([np.asarray(m(x[:, P + i:P + i + 1], decode=True))[:, 0] for i in range(STEPS)], 1)


def _qkv(m):
  x = _x()
  pos = jnp.arange(P + STEPS)
  q = apply_rope(m.query(x), pos, m.rope_base)
  k = apply_rope(m.key(x), pos, m.rope_base)
  return np.asarray(q, np.float64), np.asarray(k, np.float64), np.asarray(m.value(x), np.float64)


def _attend_sets(m, q, k, v, n, sets):
  """One decode query (position ``n - 1``) over ``sets[b][g]`` -> ``[B, F]`` after the output projection."""
  allowed = np.zeros((B, H, 1, n), bool)
  for b in range(B):
    for h in range(H):
      allowed[b, h, 0, sorted(sets[b][h // (H // G)])] = True
  o = ref.masked_attention(q[:, n - 1:n], k[:, :n], v[:, :n], allowed)
  return np.asarray(m.out(jnp.asarray(o, jnp.float32)))[:, 0]


def _check(policy, rule):
  """``rule(step, n, q, k, v, state) -> sets`` (state: a dict the rule may keep between steps)."""
  m, got = _run(policy)
  q, k, v = _qkv(m)
  state = {}
  for i in range(STEPS):
    n = P + i + 1
    want = _attend_sets(m, q, k, v, n, rule(i, n, q, k, v, state))
    testing.assert_close(got[:, i], want, dtype=jnp.float32, name=f"{type(policy).__name__} step {i}")


def test_dense_policy_matches_the_plain_cache():
  m = _module()
  x = _x()
  m.init_cache(B, L)
  m(x[:, :P], decode=True)
  plain = np.stack([np.asarray(m(x[:, P + i:P + i + 1], decode=True))[:, 0] for i in range(STEPS)], 1)
  _, got = _run(cp.Dense())
  np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5)


def test_streaming_llm():
  _check(cp.StreamingLLM(window=6, sinks=2), lambda i, n, q, k, v, s: ref.streaming_llm([n] * B, G, 2, 6))


def test_h2o_accumulates_and_never_readmits():
  budget = 10

  def rule(i, n, q, k, v, s):
    if i == 0:  # after the prompt: scores of every prompt query, then the first eviction
      s["scores"] = ref.h2o_scores(q[:, :P], k[:, :P], [P] * B, G)
      s["alive"] = ref.h2o([P] * B, s["scores"], budget)
    sets = [[s["alive"][b][g] | {n - 1} for g in range(G)] for b in range(B)]
    allowed = np.zeros((B, H, 1, n), bool)
    for b in range(B):
      for h in range(H):
        allowed[b, h, 0, sorted(sets[b][h // (H // G)])] = True
    # probabilities of this step over the retained slots, accumulated, then evict among the alive
    pr = np.zeros((B, H, n))
    for b in range(B):
      for h in range(H):
        js = np.nonzero(allowed[b, h, 0])[0]
        sc = k[b, js, h // (H // G)] @ q[b, n - 1, h] * D ** -0.5
        e = np.exp(sc - sc.max())
        pr[b, h, js] = e / e.sum()
    scores = np.zeros((B, G, n))
    scores[:, :, :s["scores"].shape[2]] = s["scores"][:, :, :n]
    scores += np.stack([ref.reduce_group(pr[b], G, "max") for b in range(B)])
    masked = np.where([[[j in sets[b][g] for j in range(n)] for g in range(G)] for b in range(B)], scores, -np.inf)
    s["scores"], s["alive"] = scores, ref.h2o([n] * B, masked, budget)
    for b in range(B):  # never readmitted: the new set lies inside the old one plus the new token
      for g in range(G):
        assert s["alive"][b][g] <= sets[b][g]
    return sets

  _check(cp.H2O(budget=budget), rule)


def test_snapkv_and_ada_snapkv():
  def snap(i, n, q, k, v, s):
    if i == 0:
      s["sel"] = ref.snapkv(q[:, P - 8:P], k[:, :P], [P] * B, 12, 5, 2, 4)
    return [[s["sel"][b][g] | set(range(P, n)) for g in range(G)] for b in range(B)]

  _check(cp.SnapKV(capacity=12, window=8, pool=5, keep_first=2, keep_last=4), snap)

  def ada(i, n, q, k, v, s):
    if i == 0:
      s["sel"] = ref.ada_snapkv(q[:, P - 8:P], k[:, :P], [P] * B, 12, 5, 2, 4, 0.3)
    return [[s["sel"][b][g] | set(range(P, n)) for g in range(G)] for b in range(B)]

  _check(cp.AdaSnapKV(capacity=12, window=8, pool=5, keep_first=2, keep_last=4, min_ratio=0.3), ada)


def test_quest():
  def rule(i, n, q, k, v, s):
    pages = ref.quest(q[:, n - 1], k[:, :n], [n] * B, 8, 4, True)  # [b][g] -> page ids
    return [[{j for p in pages[b][g] for j in range(4 * p, min(n, 4 * p + 4))} for g in range(G)] for b in range(B)]

  _check(cp.Quest(budget=8, page_size=4), rule)


def test_recycled_fixed_schedule():
  k_keep, stride = 6, 3

  def rule(i, n, q, k, v, s):
    if i % stride == 0:  # a dense step re-selects from its own attention
      pr = ref.probs(q[:, n - 1:n], k[:, :n], [n] * B)[:, 0]  # [B, H, n]
      s["sel"] = [[ref.top(ref.max_pool(ref.reduce_group(pr[b], G, "max")[g], 3), k_keep, [True] * n)
                   for g in range(G)] for b in range(B)]
      s["since"] = n
      return [[set(range(n)) for _ in range(G)] for _ in range(B)]
    return [[s["sel"][b][g] | set(range(s["since"], n)) for g in range(G)] for b in range(B)]

  _check(cp.Recycled(k=k_keep, stride=stride, pool=3), rule)


def test_policy_under_jit_updates_its_state():
  m, x = _module(), _x()
  m.init_cache(B, L, policy=cp.H2O(budget=10))
  m(x[:, :P], decode=True)

  @nnx.jit
  def step(m, xt):
    return m(xt, decode=True)

  eager = _module()
  eager.init_cache(B, L, policy=cp.H2O(budget=10))
  eager(x[:, :P], decode=True)
  for i in range(3):
    got = step(m, x[:, P + i:P + i + 1])
    want = eager(x[:, P + i:P + i + 1], decode=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(m.policy_keep[...]), np.asarray(eager.policy_keep[...]))
  assert int(np.asarray(m.policy_keep[...]).sum(-1).max()) == 10


@pytest.mark.parametrize("policy, match", [
    (cp.Quest(budget=8, page_size=5), "page_size 5 does not divide"),
    (cp.Quest(budget=6, page_size=4), "budget 6 must be a multiple"),
    (cp.H2O(budget=64), "H2O.budget 64 is larger"),
    (cp.H2O(budget=1), "must be >= 2"),
    (cp.SnapKV(capacity=0), "capacity must be >= 1"),
    (cp.StreamingLLM(window=0), "window must be >= 1"),
    (cp.Recycled(k=40), "Recycled.k 40 is larger"),
])
def test_bad_settings(policy, match):
  with pytest.raises(ValueError, match=match):
    _module().init_cache(B, L, policy=policy)


def test_refusals():
  m = _module()
  with pytest.raises(ValueError, match="policy must be a jaxattn.cache.policy setting"):
    m.init_cache(B, L, policy="snapkv")
  m.init_cache(B, L, policy=cp.StreamingLLM(window=4))
  with pytest.raises(ValueError, match="needs the plain causal mask"):
    m(_x()[:, :4], decode=True, mask=masks.Local(3, 0))
  m.init_cache(B, L, policy=cp.SnapKV(capacity=8, window=16))
  with pytest.raises(ValueError, match="fewer than the observation window 16"):
    m(_x()[:, :4], decode=True)
