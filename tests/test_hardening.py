"""Hardening of the public ops (issue 12, item 4): option validation, block lists, wide segment ids, second-order
derivatives, the landmark reference at large logits, and no recompilation on repeated eager calls.

Context-parallel meshes (make_mesh / Mesh, duplicate or unknown axes) are in ``tests/parallel/test_meshes.py``.
"""

from __future__ import annotations

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import masks, testing
from jaxattn.parallel import context_parallel_attention, context_parallel_linear_attention

B, T, H, G, D = 1, 32, 4, 2, 8


@functools.lru_cache(maxsize=None)
def _qkv(seed=0, t=T):
  return testing.random_qkv(seed, B=B, T=t, H=H, G=G, D=D)


@functools.lru_cache(maxsize=None)
def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:2]), ("seq",))


def _blocks(bq=8, bk=8, K=2):
  nq, nk = T // bq, T // bk
  rng = np.random.default_rng(0)
  idx = np.stack([rng.permutation(nk)[:K] for _ in range(B * H * nq)]).reshape(B, H, nq, K).astype(np.int32)
  cnt = rng.integers(1, K + 1, size=(B, H, nq)).astype(np.int32)
  return idx, cnt


def _x64():
  """``jax.experimental.enable_x64()`` where it exists (jax 0.11), else ``jax.enable_x64(True)`` (jax 0.10)."""
  ctx = getattr(jax.experimental, "enable_x64", None)
  return ctx() if ctx is not None else jax.enable_x64(True)


# ------------------------------------------------------------------------------------ scale and soft cap
def _op_with(kw):
  """Every public op, called on tiny inputs with the extra keyword arguments ``kw``."""
  q, k, v = _qkv()
  idx, cnt = _blocks()
  state = jnp.zeros((B, H, D, D), jnp.float32)
  return {
      "softmax_attention": lambda: jaxattn.softmax_attention(q, k, v, **kw),
      "block_sparse_attention": lambda: jaxattn.block_sparse_attention(q, k, v, idx, cnt, block_q=8, block_k=8, **kw),
      "linear_attention": lambda: jaxattn.linear_attention(q, k, v, **kw),
      "linear_attention_step": lambda: jaxattn.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state, **kw),
      "landmark_attention": lambda: jaxattn.landmark_attention(q, k, v, block_size=8, **kw),
      "context_parallel_attention": lambda: context_parallel_attention(q, k, v, mesh=_mesh(), seq_axis="seq",
                                                                       mask=masks.Causal(), **kw),
      "context_parallel_linear_attention": lambda: context_parallel_linear_attention(q, k, v, mesh=_mesh(),
                                                                                     seq_axis="seq", **kw),
  }


OPS = tuple(_op_with({}))
BAD_NUMBERS = [
    (float("inf"), "inf"), (-float("inf"), "-inf"), (float("nan"), "nan"), (1e39, "1e+39"), (-1e39, "-1e+39"),
    (np.float64(3.5e38), "3.5e+38"), (1e-50, "1e-50"), (0.0, "0.0"), (0, "0"), (-0.5, "-0.5"), (-2, "-2"),
    (True, "True"), (np.float32(np.nan), "nan"), ("0.1", "'0.1'"), ([0.5], "[0.5]"),
    (10 ** 400, "1000000"),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("value,shown", BAD_NUMBERS, ids=[repr(b[0])[:12] for b in BAD_NUMBERS])
def test_bad_scale_raises_naming_the_value(op, value, shown):
  with pytest.raises(ValueError, match=r"scale must .*" + re.escape(shown)):
    _op_with({"scale": value})[op]()


@pytest.mark.parametrize("value,shown", BAD_NUMBERS, ids=[repr(b[0])[:12] for b in BAD_NUMBERS])
def test_bad_soft_cap_raises_naming_the_value(value, shown):
  with pytest.raises(ValueError, match=r"logits_soft_cap must .*" + re.escape(shown)):
    _op_with({"logits_soft_cap": value})["softmax_attention"]()


@pytest.mark.parametrize("op", OPS)
def test_good_scales_are_used(op):
  """Python ints, numpy scalars and 0-d arrays are accepted and change the result as a scale should."""
  base = _op_with({"scale": 0.25})[op]()
  base = base[0] if isinstance(base, tuple) else base
  for value in (np.float32(0.25), np.float64(0.25), np.asarray(0.25)):
    out = _op_with({"scale": value})[op]()
    testing.assert_close(out[0] if isinstance(out, tuple) else out, base, name=f"{op} scale={value!r}")
  other = _op_with({"scale": 2})[op]()
  other = other[0] if isinstance(other, tuple) else other
  assert float(jnp.max(jnp.abs(other - base))) > 1e-3  # the scale is really applied


def test_good_soft_cap_is_applied():
  q, k, v = (x * 4 for x in _qkv())  # logits large enough for a cap of 2 to matter
  capped = jaxattn.softmax_attention(q, k, v, logits_soft_cap=np.float32(2.0))
  ref = jaxattn.softmax_attention(q, k, v, logits_soft_cap=2.0, implementation="reference")
  testing.assert_close(capped, ref, name="capped")
  assert float(jnp.max(jnp.abs(capped - jaxattn.softmax_attention(q, k, v)))) > 1e-2


# ------------------------------------------------------------------------------------------- block lists
@pytest.mark.parametrize("what,value,msg", [
    ("index", 4, r"kv_block_indices must lie in \[0, 4\).* got 4 at \[b, h, qb, k\] = \[0, 1, 2, 0\]"),
    ("index", -1, r"kv_block_indices must lie in \[0, 4\).* got -1 at"),
    ("index", 2 ** 40, r"got 1099511627776 at"),
    ("count", 3, r"kv_block_counts must lie in \[0, K=2\], got 3 at \[b, h, qb\] = \[0, 1, 2\]"),
    ("count", -1, r"kv_block_counts must lie in \[0, K=2\], got -1"),
])
def test_block_lists_out_of_range_raise_eagerly(what, value, msg):
  q, k, v = _qkv()
  idx, cnt = _blocks()
  idx, cnt = idx.astype(np.int64), cnt.copy()
  cnt[0, 1, 2] = 2
  if what == "index":
    idx[0, 1, 2, 0] = value
  else:
    cnt[0, 1, 2] = value
  with pytest.raises(ValueError, match=msg):
    jaxattn.block_sparse_attention(q, k, v, idx, cnt, block_q=8, block_k=8)
  if value == 2 ** 40:
    return  # a jax array cannot hold it with x64 disabled
  with pytest.raises(ValueError, match=msg):  # concrete jax arrays too
    jaxattn.block_sparse_attention(q, k, v, jnp.asarray(idx.astype(np.int32)), jnp.asarray(cnt), block_q=8,
                                   block_k=8)


def test_block_lists_padding_past_the_count_is_ignored():
  q, k, v = _qkv()
  idx, cnt = _blocks()
  padded = np.where(np.arange(idx.shape[-1]) < cnt[..., None], idx, -1)
  testing.assert_close(jaxattn.block_sparse_attention(q, k, v, padded, cnt, block_q=8, block_k=8),
                       jaxattn.block_sparse_attention(q, k, v, idx, cnt, block_q=8, block_k=8), name="padded")


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_block_lists_under_jit_mask_bad_entries_and_clamp_counts(implementation):
  """The documented jit rule: a listed out-of-range entry is dropped (as if not listed), counts clamp to [0, K]."""
  q, k, v = _qkv()
  K = 3
  idx = np.zeros((B, H, 4, K), np.int32)
  cnt = np.full((B, H, 4), 2, np.int32)
  idx[..., 0], idx[..., 1], idx[..., 2] = 1, 2, 3
  bad_idx, bad_cnt = idx.copy(), cnt.copy()
  bad_idx[0, 0, 1, 0] = 7  # out of range: dropped -> row lists only block 2
  bad_idx[0, 1, 2, 1] = -5  # dropped -> only block 1
  bad_cnt[0, 2, 3] = 9  # clamped to K = 3 -> blocks 1, 2, 3
  bad_cnt[0, 3, 0] = -4  # clamped to 0 -> no key: output 0
  want_idx, want_cnt = idx.copy(), cnt.copy()
  want_idx[0, 0, 1, :2], want_cnt[0, 0, 1] = (2, 0), 1
  want_idx[0, 1, 2, :2], want_cnt[0, 1, 2] = (1, 0), 1
  want_cnt[0, 2, 3] = 3
  want_cnt[0, 3, 0] = 0
  run = jax.jit(lambda q, k, v, i, c: jaxattn.block_sparse_attention(q, k, v, i, c, block_q=8, block_k=8,
                                                                     implementation=implementation))
  got = run(q, k, v, bad_idx, bad_cnt)
  want = jaxattn.block_sparse_attention(q, k, v, want_idx, want_cnt, block_q=8, block_k=8, implementation="reference")
  testing.assert_close(got, want, name="jit bad lists")
  assert float(jnp.abs(got[0, 0:8, 3]).max()) == 0.0  # the clamped-to-0 row block of head 3 is empty
  assert float(jnp.abs(got[0, 8:16, 0]).min()) > 0.0
  # and this differs from clamping the bad index into range (block 3 instead of dropping it)
  clamped_idx = idx.copy()
  clamped_idx[0, 0, 1, 0] = 3
  clamped = jaxattn.block_sparse_attention(q, k, v, clamped_idx, cnt, block_q=8, block_k=8, implementation="reference")
  assert float(jnp.abs(clamped[0, 8:16, 0] - got[0, 8:16, 0]).max()) > 1e-3


# -------------------------------------------------------------------------------------- wide segment ids
def _expected(q, k, v):
  ids = np.where(np.arange(T) < 13, 0, 1)[None].astype(np.int32)
  return jaxattn.softmax_attention(q, k, v, segment_ids=ids, mask=masks.Causal(), implementation="reference")


def test_numpy_int64_ids_x64_disabled():
  q, k, v = _qkv()
  ids = np.where(np.arange(T) < 13, 5, 5 + 2 ** 32)[None].astype(np.int64)
  with pytest.raises(ValueError, match=r"q segment ids must fit in int32.* max value 4294967301"):
    jaxattn.softmax_attention(q, k, v, segment_ids=ids)
  with pytest.raises(ValueError, match=r"kv segment ids must fit in int32.* min value -4294967296"):
    jaxattn.softmax_attention(q, k, v, segment_ids=(np.zeros((B, T), np.int64), 5 - ids))
  with pytest.raises(ValueError, match=r"max value 4294967301"):
    context_parallel_attention(q, k, v, mesh=_mesh(), seq_axis="seq", segment_ids=ids)
  ok = np.where(np.arange(T) < 13, 5, 2 ** 31 - 1)[None].astype(np.int64)  # in range: works, same as int32
  testing.assert_close(jaxattn.softmax_attention(q, k, v, segment_ids=ok, mask=masks.Causal()), _expected(q, k, v),
                       name="int64 in range")
  ok_list = (ok.tolist(), ok.tolist())  # python ints
  testing.assert_close(jaxattn.softmax_attention(q, k, v, segment_ids=ok_list, mask=masks.Causal()),
                       _expected(q, k, v), name="list ids")


def test_int64_ids_with_x64():
  q, k, v = _qkv()
  want = _expected(q, k, v)
  with _x64():
    ids = jnp.asarray(np.where(np.arange(T) < 13, 5, 5 + 2 ** 32)[None], jnp.int64)
    assert ids.dtype == jnp.int64
    with pytest.raises(ValueError, match=r"must fit in int32.* max value 4294967301"):
      jaxattn.softmax_attention(q, k, v, segment_ids=ids, mask=masks.Causal())
    # traced: renumbered exactly (truncation would merge the two documents)
    for impl in ("xla", "reference"):
      f = jax.jit(lambda q, k, v, ids: jaxattn.softmax_attention(q, k, v, segment_ids=ids, mask=masks.Causal(),
                                                                 implementation=impl))
      testing.assert_close(f(q, k, v, ids), want, name=f"traced int64 ids {impl}")
    g = jax.jit(lambda q, k, v, ids: context_parallel_attention(q, k, v, mesh=_mesh(), seq_axis="seq",
                                                                mask=masks.Causal(), segment_ids=ids))
    testing.assert_close(g(q, k, v, ids), want, name="cp traced int64 ids")
    small = jnp.asarray(np.where(np.arange(T) < 13, -7, 2 ** 31 - 1)[None], jnp.int64)
    testing.assert_close(jaxattn.softmax_attention(q, k, v, segment_ids=small, mask=masks.Causal()), want,
                         name="int64 in range (x64)")
  merged = jaxattn.softmax_attention(q, k, v, segment_ids=np.zeros((B, T), np.int32), mask=masks.Causal())
  assert float(jnp.abs(merged - want).max()) > 1e-3  # the test can tell a truncation from the right answer


def test_traced_int64_ids_inside_shard_map_raise():
  q, k, v = _qkv()
  mesh = _mesh()
  spec = jax.sharding.PartitionSpec(None, "seq")
  with _x64():
    ids = jnp.asarray(np.zeros((B, T)), jnp.int64)

    def local(q, k, v, ids):
      return context_parallel_attention(q, k, v, axis_name="seq", segment_ids=ids, strategy="all_gather")

    from jaxattn.parallel import _compat
    fn = _compat.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)
    with pytest.raises(ValueError, match=r"traced int64 / int64 segment ids inside shard_map"):
      jax.jit(fn)(q, k, v, ids)


# ------------------------------------------------------------------------------------------ second order
def _second_order_cases():
  q, k, v = _qkv(t=16)
  w = testing.random_qkv(7, B=B, T=16, H=H, G=G, D=D)[0]
  return {
      "softmax_attention": lambda impl: lambda q: jnp.sum(
          jnp.sin(jaxattn.softmax_attention(q, k, v, mask=masks.Causal(), implementation=impl)) * w),
      "linear_attention": lambda impl: lambda q: jnp.sum(
          jnp.sin(jaxattn.linear_attention(q, k, v, implementation=impl, chunk_size=4)) * w),
      "landmark_attention": lambda impl: lambda q: jnp.sum(
          jnp.sin(jaxattn.landmark_attention(q, k, v, block_size=4, implementation=impl)) * w),
  }, q


@pytest.mark.parametrize("op", ["softmax_attention", "linear_attention", "landmark_attention"])
def test_hessian_vector_product_matches_reference(op):
  cases, q = _second_order_cases()
  t = testing.random_qkv(3, B=B, T=16, H=H, G=G, D=D)[0]
  hvp = lambda f: jax.jvp(jax.grad(f), (q,), (t,))[1]
  got, want = hvp(cases[op]("xla")), hvp(cases[op]("reference"))
  assert float(jnp.abs(want).max()) > 1e-3
  testing.assert_close(got, want, kind="grad", name=f"{op} hvp")


@pytest.mark.parametrize("op", ["softmax_attention", "linear_attention", "landmark_attention"])
def test_grad_of_grad_works_or_raises_clearly(op):
  cases, q = _second_order_cases()
  t = testing.random_qkv(3, B=B, T=16, H=H, G=G, D=D)[0]
  gg = lambda f: jax.grad(lambda q: jnp.sum(jax.grad(f)(q) * t))(q)  # reverse-over-reverse H @ t
  want = gg(cases[op]("reference"))
  assert float(jnp.abs(want).max()) > 1e-3
  try:
    got = gg(cases[op]("xla"))
  except NotImplementedError as e:
    assert op in str(e) and "implementation='reference'" in str(e), str(e)
    return
  testing.assert_close(got, want, kind="grad", name=f"{op} grad of grad")


def test_grad_of_grad_linear_xla_works():
  """The linear xla backward is plain scans: second-order reverse mode is supported there, not refused."""
  cases, q = _second_order_cases()
  t = testing.random_qkv(3, B=B, T=16, H=H, G=G, D=D)[0]
  gg = lambda f: jax.grad(lambda q: jnp.sum(jax.grad(f)(q) * t))(q)
  testing.assert_close(gg(cases["linear_attention"]("xla")), gg(cases["linear_attention"]("reference")),
                       kind="grad", name="linear grad of grad")


# ------------------------------------------------------------------------------- landmark at large logits
def _landmark_f64(q, k, v, bs):
  """The grouped softmax in float64 numpy (an independent oracle; H == G here)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  Bq, Tq, Hq, Dq = q.shape
  out = np.zeros((Bq, Tq, Hq, v.shape[-1]))
  for b in range(Bq):
    for h in range(Hq):
      s = q[b, :, h] @ k[b, :, h].T * Dq ** -0.5
      for i in range(Tq):
        c = i // bs
        lm = lambda j: (j + 1) % bs == 0
        top = [j for j in range(c * bs, i + 1) if not lm(j)] + [bb * bs + bs - 1 for bb in range(c)]
        st = s[i, top]
        p = np.exp(st - st.max())
        p /= p.sum()
        w = dict(zip(top, p))
        o = sum(w[j] * v[b, j, h] for j in range(c * bs, i + 1) if not lm(j))
        for bb in range(c):
          reg = list(range(bb * bs, bb * bs + bs - 1))
          pl = np.exp(s[i, reg] - s[i, reg].max())
          pl /= pl.sum()
          o = o + w[bb * bs + bs - 1] * (pl @ v[b, reg, h])
        out[b, i, h] = o
  return out


@pytest.mark.parametrize("factor", [1.0, 1e3, 1e4])
def test_landmark_reference_accurate_at_large_logits(factor):
  q, k, v = testing.random_qkv(5, B=1, T=24, H=2, G=2, D=8)
  q, k = q * factor, k * factor
  ref = jaxattn.landmark_attention(q, k, v, block_size=6, implementation="reference")
  xla = jaxattn.landmark_attention(q, k, v, block_size=6, implementation="xla")
  exact = _landmark_f64(q, k, v, 6)
  assert np.all(np.isfinite(np.asarray(ref)))
  assert float(jnp.abs(ref).max()) <= float(jnp.abs(v).max()) * (1 + 1e-5)  # a convex combination of values
  np.testing.assert_allclose(np.asarray(ref), exact, atol=2e-5, rtol=1e-4)
  testing.assert_close(ref, xla, name=f"landmark reference vs xla x{factor:g}")


# ---------------------------------------------------------------------------------------- recompilation
_COMPILES = []


def _on_event(event, duration, **_):
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES.append(event)


@contextlib.contextmanager
def _count_compiles():
  jax.monitoring.register_event_duration_secs_listener(_on_event)
  _COMPILES.clear()
  try:
    yield _COMPILES
  finally:
    jax.monitoring.unregister_event_duration_listener(_on_event)


def _calls(seed):
  """Each public op on fresh inputs of fixed shapes (new values every call)."""
  q, k, v = _qkv(seed)
  idx, cnt = _blocks()
  state = jnp.asarray(np.random.default_rng(seed).standard_normal((B, H, D, D)), jnp.float32)
  decay = -jnp.abs(jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, H)), jnp.float32))
  ids = np.repeat(np.arange(4), T // 4)[None] + seed
  return {
      "softmax_attention": lambda: jaxattn.softmax_attention(q, k, v, mask=masks.Causal(), segment_ids=ids),
      "block_sparse_attention": lambda: jaxattn.block_sparse_attention(q, k, v, idx, cnt, block_q=8, block_k=8),
      "linear_attention": lambda: jaxattn.linear_attention(q, k, v, log_decay=decay),
      "linear_attention_step": lambda: jaxattn.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state,
                                                                     log_decay=decay[:, 0]),
      "landmark_attention": lambda: jaxattn.landmark_attention(q, k, v, block_size=8),
      "context_parallel_attention": lambda: context_parallel_attention(q, k, v, mesh=_mesh(), seq_axis="seq",
                                                                       mask=masks.Causal(), segment_ids=ids),
      "context_parallel_linear_attention": lambda: context_parallel_linear_attention(
          q, k, v, mesh=_mesh(), seq_axis="seq", log_decay=decay),
  }


@pytest.mark.parametrize("op", OPS)
def test_no_recompilation_on_repeated_eager_calls(op):
  jax.block_until_ready(_calls(0)[op]())  # compiles
  jax.block_until_ready(_calls(1)[op]())  # eager helper ops of the validation may compile once more
  with _count_compiles() as compiles:
    for seed in (2, 3):
      jax.block_until_ready(_calls(seed)[op]())
  assert not compiles, f"{op}: {len(compiles)} compilations on repeated eager calls with the same shapes"


def test_compile_counter_sees_compilations():
  """The counter is live: a new shape compiles."""
  q, k, v = testing.random_qkv(0, B=1, T=40, H=2, D=8)
  with _count_compiles() as compiles:
    jax.block_until_ready(jaxattn.linear_attention(q, k, v, chunk_size=5))
  assert compiles


def test_messages_are_one_line_and_name_the_value():
  q, k, v = _qkv()
  with pytest.raises(ValueError) as e:
    jaxattn.linear_attention(q, k, v, scale=float("nan"))
  assert "\n" not in str(e.value) and re.search(r"\bnan\b", str(e.value))


def test_block_lists_traced_int64_entries_never_wrap():
  """Under x64 and jit, an int64 entry 2**32 + 1 is out of range (dropped), not wrapped to block 1."""
  q, k, v = _qkv()
  idx = np.zeros((B, H, 4, 2), np.int64)
  cnt = np.ones((B, H, 4), np.int64)
  want = jaxattn.block_sparse_attention(q, k, v, idx, cnt, block_q=8, block_k=8, implementation="reference")
  with _x64():
    bad = idx.copy()
    bad[..., 0], bad[..., 1] = 2 ** 32 + 1, 0
    run = jax.jit(lambda q, k, v, i, c: jaxattn.block_sparse_attention(q, k, v, i, c, block_q=8, block_k=8))
    got = run(q, k, v, jnp.asarray(bad), jnp.asarray(cnt * 2))
  testing.assert_close(got, want, name="int64 entry dropped")
