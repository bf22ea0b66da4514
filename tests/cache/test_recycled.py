"""Recycled Attention / RefreshKV: decoding with the fixed and query-similarity schedules (with and without
eviction) against a set-based numpy simulation, step by step (outputs, full/partial decisions, recycled sets);
jit == eager; clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import cache, testing
from jaxattn.cache import reference as ref
from tests.cache.common import B, D, G, H

N_MAX = 80
LENGTHS = (60, 45)
K = 8


def _setup(seed, steps):
  q, k, v = testing.random_qkv(seed, B=B, T=steps + 1, S=N_MAX, H=H, G=G, D=D)
  c = cache.prefill(cache.init(B, N_MAX, G, D), k, v, np.asarray(LENGTHS, np.int32))
  new_k = np.stack([np.asarray(k)[b, LENGTHS[b]:LENGTHS[b] + steps] for b in range(B)], 1)  # [steps, B, G, D]
  new_v = np.stack([np.asarray(v)[b, LENGTHS[b]:LENGTHS[b] + steps] for b in range(B)], 1)
  # k, v: the prompt then the decoded tokens at their positions (what the reference reads)
  return c, np.asarray(q), np.asarray(k), np.asarray(v), new_k, new_v


def _state_sets(state):
  pos, ok = np.asarray(state.partial.positions), np.asarray(state.partial.valid)
  return [[set(pos[b, :, g][ok[b, :, g]].tolist()) for g in range(G)] for b in range(B)]


def _run(seed, qs, steps, step_fn=None, **kw):
  c, q, k, v, new_k, new_v = _setup(seed, steps)
  init_kw = dict(k=K, room=kw.get("room", 0))
  out0, state = cache.recycled_init(c, jnp.asarray(q[:, :1]), **init_kw)
  want_outs, want_full, want_sets = ref.recycled(q[:, 0], qs, k, v, LENGTHS, k=K, **kw)
  step_kw = {x: y for x, y in kw.items() if x != "room"}
  step = step_fn or (lambda s, qq, kk, vv: cache.recycled_decode_step(s, qq, kk, vv, k=K, **step_kw))
  for i in range(steps):
    out, state, full = step(state, jnp.asarray(qs[i][:, None]), jnp.asarray(new_k[i]), jnp.asarray(new_v[i]))
    assert bool(full) == want_full[i], f"step {i}: full={bool(full)}, reference {want_full[i]}"
    if not want_full[i]:
      assert _state_sets(state) == want_sets[i], f"step {i}: recycled set differs"
    testing.assert_close(out[:, 0], want_outs[i], name=f"out[step {i}]")
  return want_full


def test_fixed_schedule_grows_partial():
  steps = 7
  qs = np.asarray(testing.random_qkv(30, B=B, T=steps, H=H, G=G, D=D)[0]).transpose(1, 0, 2, 3)
  flags = _run(31, qs, steps, stride=3, room=4)
  assert flags == [False, False, True, False, False, True, False]


def test_partial_room_forces_full_step():
  steps = 5
  qs = np.asarray(testing.random_qkv(32, B=B, T=steps, H=H, G=G, D=D)[0]).transpose(1, 0, 2, 3)
  flags = _run(33, qs, steps, stride=10, room=2)
  assert flags == [False, False, True, False, False]


def test_refreshkv_query_similarity_with_eviction():
  """Queries equal to the last full step's query keep partial steps; a fresh random query triggers a refresh at
  the next check (every qc_stride = 2 steps); eviction keeps |C_p| = K."""
  steps = 6
  base = _setup(35, steps)[1][:, 0]  # the last prompt token's query (the first full step)
  other = np.asarray(testing.random_qkv(36, B=B, T=2, H=H, G=G, D=D)[0])
  qs = np.stack([base, base, other[:, 0], other[:, 0], other[:, 1], other[:, 1]])
  flags = _run(35, qs, steps, schedule="query_similarity", qc_stride=2, threshold=0.85, evict=True)
  assert flags == [False, False, False, True, False, True]


def test_jit_equals_eager():
  steps = 4
  qs = np.asarray(testing.random_qkv(37, B=B, T=steps, H=H, G=G, D=D)[0]).transpose(1, 0, 2, 3)
  step = jax.jit(lambda s, qq, kk, vv: cache.recycled_decode_step(s, qq, kk, vv, k=K, stride=2, evict=True))
  flags = _run(38, qs, steps, step_fn=step, stride=2, evict=True)
  assert flags == [False, True, False, True]


def test_bad_input():
  c, q, _, _, new_k, new_v = _setup(39, 1)
  with pytest.raises(ValueError, match="k 81 is larger than the context"):
    cache.recycled_init(c, jnp.asarray(q[:, :1]), k=81)
  with pytest.raises(ValueError, match="k must be >= 1, got 0"):
    cache.recycled_init(c, jnp.asarray(q[:, :1]), k=0)
  _, st = cache.recycled_init(c, jnp.asarray(q[:, :1]), k=K)
  args = (st, jnp.asarray(q[:, :1]), jnp.asarray(new_k[0]), jnp.asarray(new_v[0]))
  with pytest.raises(ValueError, match="schedule must be one of"):
    cache.recycled_decode_step(*args, k=K, schedule="every")
  with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
    cache.recycled_decode_step(*args, k=K, stride=0)
  with pytest.raises(ValueError, match="threshold must be a cosine similarity in \\[-1, 1\\], got 2"):
    cache.recycled_decode_step(*args, k=K, threshold=2)
  with pytest.raises(ValueError, match="k 9 does not match"):
    cache.recycled_decode_step(*args, k=9)
