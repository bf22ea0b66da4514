"""Non-finite values (NaN, +inf, -inf) in masked or padded positions never reach valid outputs or gradients.

The guarantee (``jaxattn.ops.nonfinite``): a non-finite entry of ``q``, ``k`` or ``v`` reaches exactly the
(query, key) pairs that the mask allows. A row whose allowed inputs are all finite is bit-for-bit unaffected up to
float tolerance (compared here with the reference on the clean inputs); a row that attends a non-finite input is
non-finite (checked too: nothing is silently hidden); fully masked rows give output 0, lse ``-inf`` and zero dq.

Every family x backend runs on random (never zero) inputs with non-finite values planted at fuzzed positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import masks, testing
from jaxattn.ops.landmark.reference import structure
from jaxattn.ops.softmax.config import BlockSizes

BAD = np.array([np.nan, np.inf, -np.inf], np.float32)


def _plant(rng, x, where_rows):
  """Returns ``x`` (numpy) with a random non-empty subset of the last axis set to NaN / +-inf on rows ``where_rows``."""
  x = np.array(x, np.float32)
  rows = np.argwhere(where_rows)
  for r in rows:
    n = x.shape[-1]
    cols = rng.choice(n, size=rng.integers(1, n + 1), replace=False)
    x[tuple(r)][cols] = rng.choice(BAD, size=len(cols))
  return x


def _masked_loss_weights(rng, out_shape, lse_shape, ok_rows_out, ok_rows_lse):
  w_out = rng.normal(size=out_shape).astype(np.float32) * ok_rows_out[..., None]
  if lse_shape is None:
    return jnp.asarray(w_out), None
  w_lse = rng.normal(size=lse_shape).astype(np.float32) * ok_rows_lse
  return jnp.asarray(w_out), jnp.asarray(w_lse)


def _loss(o, lse, w_out, w_lse):
  # where(), not multiplication: poisoned rows carry NaN and weight 0
  lo = jnp.sum(jnp.where(w_out != 0, o.astype(jnp.float32) * w_out, 0.0))
  if lse is None:
    return lo
  return lo + jnp.sum(jnp.where((w_lse != 0) & jnp.isfinite(lse), lse * w_lse, 0.0))


def _assert_rows_close(got, want, ok, name, dtype=jnp.float32, kind="out"):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.all(np.isfinite(got[ok])), f"{name}: non-finite values in rows that must stay finite"
  testing.assert_close(got[ok], want[ok], dtype=dtype, kind=kind, name=name)


# ------------------------------------------------------------------------------------------------ softmax family
def _softmax_case(seed, kind):
  """Random inputs, a mask / segment ids and the dense ``allowed [B, H, T, S]`` they define."""
  rng = np.random.default_rng(seed)
  B, H, G, D = 2, 4, 2, 16
  if kind == "causal_pad":  # right padding under a causal mask: garbage at the end of the sequence
    T = S = int(rng.integers(20, 48))
    mask, seg = masks.Causal(), None
    allowed = np.broadcast_to(mask.to_dense(T, S), (B, H, T, S))
    plant_k = np.zeros((B, S, G), bool)
    for b in range(B):
      plant_k[b, S - rng.integers(1, S // 3):] = True
  elif kind == "local":  # a sliding window with garbage at a few random keys
    T = S = int(rng.integers(20, 48))
    mask, seg = masks.Local(int(rng.integers(1, 6)), int(rng.integers(0, 3))), None
    allowed = np.broadcast_to(mask.to_dense(T, S), (B, H, T, S))
    plant_k = rng.random((B, S, G)) < 0.15
  elif kind == "segments":  # packed documents: one document is garbage, some query ids match no key
    T, S = int(rng.integers(16, 40)), int(rng.integers(16, 40))
    q_ids = np.sort(rng.integers(0, 4, (B, T)), axis=1).astype(np.int32)
    kv_ids = np.sort(rng.integers(1, 5, (B, S)), axis=1).astype(np.int32)  # id 0 has no key: fully masked rows
    mask, seg = None, (jnp.asarray(q_ids), jnp.asarray(kv_ids))
    allowed = np.broadcast_to((q_ids[:, :, None] == kv_ids[:, None, :])[:, None], (B, H, T, S))
    bad_id = rng.integers(1, 5, (B,))
    plant_k = np.broadcast_to((kv_ids == bad_id[:, None])[:, :, None], (B, S, G)).copy()
    plant_k &= rng.random((B, S, G)) < 0.7
  elif kind == "cross_offset":  # T != S, bottom-right causal, garbage in the keys no query reaches yet
    T, S = int(rng.integers(8, 24)), int(rng.integers(24, 48))
    off = int(rng.integers(-4, S - T))
    mask, seg = masks.Causal(offset=off), None
    allowed = np.broadcast_to(mask.to_dense(T, S), (B, H, T, S))
    plant_k = rng.random((B, S, G)) < 0.2
  else:
    raise ValueError(kind)
  q, k, v = testing.random_qkv(seed, B=B, T=T, S=S, H=H, G=G, D=D)
  return rng, q, k, v, mask, seg, np.asarray(allowed), plant_k


def _plant_softmax(rng, q, k, v, allowed, plant_k):
  B, T, H, _ = q.shape
  G = k.shape[2]
  R = H // G
  empty = ~allowed.any(-1).transpose(0, 2, 1)  # [B, T, H] rows with no allowed key
  which = rng.integers(0, 3, plant_k.shape)  # 0: k only, 1: v only, 2: both
  kp = _plant(rng, k, plant_k & (which != 1))
  vp = _plant(rng, v, plant_k & (which != 0))
  qp = _plant(rng, q, empty & (rng.random(empty.shape) < 0.7))  # garbage queries in fully masked rows
  # rows that attend a planted key (per query head h, kv head h // R)
  plant_h = np.repeat(plant_k, R, axis=2).transpose(0, 2, 1)  # [B, H, S]
  poisoned = (allowed & plant_h[:, :, None, :]).any(-1).transpose(0, 2, 1)  # [B, T, H]
  # keys reached by a poisoned row: their dk / dv may be NaN (0 * NaN from dO = 0 of a NaN row is still NaN).
  # A planted key that no row attends is not reached: its dk / dv must be exactly the clean ones (0).
  touched = (allowed & poisoned.transpose(0, 2, 1)[..., None]).any(2)  # [B, H, S]
  touched = touched.reshape(B, G, R, -1).any(2).transpose(0, 2, 1)  # [B, S, G]
  return jnp.asarray(qp), jnp.asarray(kp), jnp.asarray(vp), poisoned, empty, touched


def _check_family(run, ref, q, k, v, qp, kp, vp, poisoned, empty, touched, rng, has_lse=True, dtype=jnp.float32):
  """``run(q, k, v) -> (out, lse | None)`` on planted inputs vs ``ref`` on the clean ones."""
  clean = ~poisoned
  out, lse = run(qp, kp, vp)
  ref_out, ref_lse = ref(q, k, v)
  _assert_rows_close(out, ref_out, clean, "out", dtype)
  # rows that attend a non-finite input must not be silently finite
  bad_out = np.asarray(out, np.float32)[poisoned]
  assert np.all(~np.isfinite(bad_out).all(-1)), "a row attending a non-finite input came out finite"
  assert np.all(np.asarray(out, np.float32)[empty] == 0), "fully masked rows must output exactly 0"
  if has_lse:
    lse_t = np.asarray(lse).transpose(0, 2, 1)  # [B, T, H]
    assert np.all(np.isneginf(lse_t[empty])), "fully masked rows must have lse -inf"
    ok = clean & ~empty
    _assert_rows_close(lse_t, np.asarray(ref_lse).transpose(0, 2, 1), ok, "lse", dtype)
  w_out, w_lse = _masked_loss_weights(rng, out.shape, lse.shape if has_lse else None,
                                      clean.astype(np.float32), clean.transpose(0, 2, 1).astype(np.float32))
  g = jax.grad(lambda a, b, c: _loss(*run(a, b, c), w_out, w_lse), (0, 1, 2))(qp, kp, vp)
  gr = jax.grad(lambda a, b, c: _loss(*ref(a, b, c), w_out, w_lse), (0, 1, 2))(q, k, v)
  _assert_rows_close(g[0], gr[0], clean, "dq", dtype, "grad")
  assert np.all(np.asarray(g[0])[empty] == 0), "fully masked rows must get dq = 0"
  _assert_rows_close(g[1], gr[1], ~touched, "dk", dtype, "grad")
  _assert_rows_close(g[2], gr[2], ~touched, "dv", dtype, "grad")


SOFTMAX_KINDS = ("causal_pad", "local", "segments", "cross_offset")


def _softmax_runner(impl, mask, seg, **kw):
  def run(q, k, v):
    return jaxattn.softmax_attention(q, k, v, mask=mask, segment_ids=seg, return_lse=True, implementation=impl,
                                     **kw)
  return run


# Pallas kernels run in interpret mode on CPU: one fuzzed case per mask kind by default, the rest marked slow.
KERNEL_TILES = {"xla": BlockSizes(8, 16), "pallas_gpu": BlockSizes(16, 16), "pallas_tpu": BlockSizes(8, 128, block_q_dkv=128, block_k_dkv=8)}
_slow = pytest.mark.slow


def _kernel_params(kinds):
  """Every (kernel, kind, seed); by default only seed 0 of one kind per kernel (interpret mode is slow)."""
  default = {("pallas_gpu", kinds[0]), ("pallas_tpu", kinds[-2])}
  return [pytest.param(impl, kind, seed, marks=() if seed == 0 and (impl, kind) in default else _slow)
          for impl in ("pallas_gpu", "pallas_tpu") for kind in kinds for seed in (0, 1)]


@pytest.mark.parametrize("impl,kind,seed", [(i, k, s) for i in ("reference", "xla") for k in SOFTMAX_KINDS
                                            for s in (0, 1)] + _kernel_params(SOFTMAX_KINDS))
def test_softmax_nonfinite(impl, kind, seed):
  rng, q, k, v, mask, seg, allowed, plant_k = _softmax_case(seed, kind)
  planted = _plant_softmax(rng, q, k, v, allowed, plant_k)
  # several tiles per axis, partial last tiles (padding beyond T / S inside a tile)
  extra = {"block_sizes": KERNEL_TILES[impl]} if impl in KERNEL_TILES else {}
  _check_family(_softmax_runner(impl, mask, seg, **extra), _softmax_runner("reference", mask, seg), q, k, v,
                *planted, rng)


# ------------------------------------------------------------------------------------------------- block sparse
def _block_sparse_case(seed, block_q, block_k, T, S):
  rng = np.random.default_rng(seed)
  B, H, G, D = 2, 4, 2, 16
  nq, nk = -(-T // block_q), -(-S // block_k)
  K = 3
  idx = rng.integers(0, nk, (B, H, nq, K)).astype(np.int32)
  cnt = rng.integers(0, K + 1, (B, H, nq)).astype(np.int32)
  cnt[0, 0, 0] = 0  # at least one query block with no key at all
  mask = masks.Causal(offset=S - T) if seed % 2 else None
  layout = np.zeros((B, H, nq, nk), bool)
  for b, h, r in np.ndindex(B, H, nq):
    layout[b, h, r, idx[b, h, r, :cnt[b, h, r]]] = True
  allowed = np.repeat(np.repeat(layout, block_q, 2), block_k, 3)[:, :, :T, :S]
  if mask is not None:
    allowed = allowed & mask.to_dense(T, S)
  q, k, v = testing.random_qkv(seed, B=B, T=T, S=S, H=H, G=G, D=D)
  plant_k = rng.random((B, S, G)) < 0.2
  return rng, q, k, v, jnp.asarray(idx), jnp.asarray(cnt), mask, allowed, plant_k


def _block_sparse_runner(impl, idx, cnt, block_q, block_k, mask):
  def run(q, k, v):
    out = jaxattn.block_sparse_attention(q, k, v, idx, cnt, block_q=block_q, block_k=block_k, mask=mask,
                                         implementation=impl)
    return out, None
  return run


BLOCK_SPARSE_TILES = {"pallas_gpu": (16, 16), "pallas_tpu": (64, 64)}  # TPU: tiles cover T, S (the (8, 128) rule)


@pytest.mark.parametrize("impl,seed", [(i, s) for i in ("reference", "xla") for s in (0, 1, 2)]
                         + [pytest.param(i, s, marks=() if s == 1 else _slow) for i in BLOCK_SPARSE_TILES
                            for s in (0, 1)])
def test_block_sparse_nonfinite(impl, seed):
  bq, bk = BLOCK_SPARSE_TILES.get(impl, (8, 8))
  T, S = 37, 45  # partial last blocks: padding beyond T and S inside a block
  rng, q, k, v, idx, cnt, mask, allowed, plant_k = _block_sparse_case(seed, bq, bk, T, S)
  planted = _plant_softmax(rng, q, k, v, allowed, plant_k)
  _check_family(_block_sparse_runner(impl, idx, cnt, bq, bk, mask),
                _block_sparse_runner("reference", idx, cnt, bq, bk, mask), q, k, v, *planted, rng, has_lse=False)


# -------------------------------------------------------------------------------------------------------- linear
def _linear_case(seed, kind):
  """Inputs, per-token gates and the planted tokens; returns which output rows must stay clean."""
  rng = np.random.default_rng(seed)
  B, H, G, D, E = 2, 4, 2, 16, 16
  T = int(rng.integers(29, 45))  # not a multiple of the chunk: padding inside the last chunk
  q, k, v = testing.random_qkv(seed, B=B, T=T, H=H, G=G, D=D, E=E)
  g = -rng.uniform(0.0, 0.3, (B, T, H)).astype(np.float32)
  init = rng.normal(size=(B, H, D, E)).astype(np.float32)
  plant = np.zeros((B, T, G), bool)
  poisoned = np.zeros((B, T, H), bool)
  if kind == "future":  # right padding: garbage at the end of the sequence
    t0 = rng.integers(T // 2, T - 1, (B,))
    for b in range(B):
      plant[b, t0[b]:] = True
      poisoned[b, t0[b]:] = True
  elif kind == "reset":  # garbage (and a non-finite initial state) before a reset g = -inf; clean after it
    r = rng.integers(5, T - 8, (B,))
    for b in range(B):
      g[b, r[b]] = -np.inf
      plant[b, :r[b]] = rng.random((r[b], G)) < 0.3
      poisoned[b, :r[b]] = True  # the initial state is poisoned too
    init = _plant(rng, init, rng.random(init.shape[:-1]) < 0.3)
    init[:, :, 0, 0] = np.nan
  else:
    raise ValueError(kind)
  which = rng.integers(0, 3, plant.shape)
  kp = _plant(rng, k, plant & (which != 1))
  vp = _plant(rng, v, plant & (which != 0))
  return rng, (q, k, v, jnp.asarray(g), jnp.asarray(np.where(np.isfinite(init), init, 1.0))), \
      (q, jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(g), jnp.asarray(init)), plant, poisoned


@pytest.mark.parametrize("impl,kind,seed", [(i, k, s) for i in ("reference", "xla") for k in ("future", "reset")
                                            for s in (0, 1)]
                         + [pytest.param(i, k, s, marks=() if (s, i, k) in {(0, "pallas_gpu", "future"),
                                                                            (0, "pallas_tpu", "reset")} else _slow)
                            for i in ("pallas_gpu", "pallas_tpu")
                            for k in ("future", "reset") for s in (0, 1)])
def test_linear_nonfinite(impl, kind, seed):
  rng, clean_args, bad_args, plant, poisoned = _linear_case(seed, kind)
  clean = ~poisoned

  def run(name, q, k, v, g, init):
    return jaxattn.linear_attention(q, k, v, log_decay=g, initial_state=init, implementation=name,
                                    chunk_size=16 if name.startswith("pallas") else 8, return_final_state=True)

  out, state = run(impl, *bad_args)
  ref_out, ref_state = run("reference", *clean_args)
  _assert_rows_close(out, ref_out, clean, "out")
  assert np.all(~np.isfinite(np.asarray(out)[poisoned]).all(-1)), "a row reached by garbage came out finite"
  if kind == "reset":  # the last token is after the reset: the final state is clean
    _assert_rows_close(state, ref_state, np.ones(state.shape[:2], bool), "final state")
  w = jnp.asarray(rng.normal(size=out.shape).astype(np.float32) * clean[..., None])
  got = jax.grad(lambda q, k, v, g: _loss(run(impl, q, k, v, g, bad_args[4])[0], None, w, None),
                 (0, 1, 2, 3))(*bad_args[:4])
  want = jax.grad(lambda q, k, v, g: _loss(run("reference", q, k, v, g, clean_args[4])[0], None, w, None),
                  (0, 1, 2, 3))(*clean_args[:4])
  _assert_rows_close(got[0], want[0], clean, "dq", kind="grad")
  if kind == "future":  # every token before the garbage, incl. their gates
    before = ~plant.any(-1)
    _assert_rows_close(got[1], want[1], ~plant, "dk", kind="grad")
    _assert_rows_close(got[2], want[2], ~plant, "dv", kind="grad")
    _assert_rows_close(got[3], want[3], np.broadcast_to(before[..., None], poisoned.shape), "dlog_decay", kind="grad")
  else:  # tokens strictly after the reset
    after = np.broadcast_to(clean.any(-1, keepdims=True), clean.shape)
    after_kv = after[:, :, :plant.shape[2]]
    _assert_rows_close(got[1], want[1], after_kv, "dk", kind="grad")
    _assert_rows_close(got[2], want[2], after_kv, "dv", kind="grad")
    reset = np.isneginf(np.asarray(bad_args[3]))
    _assert_rows_close(got[3], want[3], after & ~reset, "dlog_decay", kind="grad")


# ------------------------------------------------------------------------------------------------------ landmark
LANDMARK_TILES = {"reference": (4, None), "xla": (4, 8), "pallas_gpu": (16, 32), "pallas_tpu": (16, 32)}


@pytest.mark.parametrize("impl,seed", [(i, s) for i in ("reference", "xla") for s in (0, 1)]
                         + [pytest.param(i, s, marks=() if s == 0 else _slow) for i in ("pallas_gpu", "pallas_tpu")
                            for s in (0, 1)])
def test_landmark_nonfinite(impl, seed):
  rng = np.random.default_rng(seed)
  B, H, G, D = 2, 4, 2, 16
  bs, block_q = LANDMARK_TILES[impl]
  T = int(rng.integers(6 * bs + 2, 10 * bs - 1)) if bs < 16 else int(rng.integers(40, 64))
  q, k, v = testing.random_qkv(seed, B=B, T=T, H=H, G=G, D=D)
  t0 = rng.integers(T // 2, T - 1, (B,))
  plant = np.zeros((B, T, G), bool)
  for b in range(B):
    plant[b, t0[b]:] = True  # future garbage
  landmark = (np.arange(T) + 1) % bs == 0
  lm_v = landmark[None, :, None] & ~plant & (rng.random((B, T, G)) < 0.5)  # landmark values are never used
  which = rng.integers(0, 3, plant.shape)
  kp = jnp.asarray(_plant(rng, k, plant & (which != 1)))
  vp = jnp.asarray(_plant(rng, v, (plant & (which != 0)) | lm_v))
  # rows that use a planted k (any key of the grouped softmax) or v (a regular key whose value is mixed in)
  cur, past_lm, past_reg = structure(T, bs)
  bad_k = np.repeat(np.asarray(~jnp.isfinite(kp).all(-1)), H // G, axis=2)  # [B, T, H]
  bad_v = np.repeat(np.asarray(~jnp.isfinite(vp).all(-1)), H // G, axis=2)
  uses_k, uses_v = cur | past_lm | past_reg, cur | past_reg  # [T(i), T(j)]
  poisoned = (np.einsum("ij,bjh->bih", uses_k.astype(int), bad_k.astype(int))
              + np.einsum("ij,bjh->bih", uses_v.astype(int), bad_v.astype(int))) > 0
  assert poisoned.any() and (~poisoned).any()
  clean = ~poisoned

  def run(name, q, k, v):
    tiles = {"block_q": block_q} if name == impl and block_q else {}
    return jaxattn.landmark_attention(q, k, v, block_size=bs, implementation=name, **tiles)

  out, ref = run(impl, q, kp, vp), run("reference", q, k, v)
  _assert_rows_close(out, ref, clean, "out")
  assert np.all(~np.isfinite(np.asarray(out)[poisoned]).all(-1)), "a row reached by garbage came out finite"
  w = jnp.asarray(rng.normal(size=out.shape).astype(np.float32) * clean[..., None])
  got = jax.grad(lambda q: _loss(run(impl, q, kp, vp), None, w, None))(q)
  want = jax.grad(lambda q: _loss(run("reference", q, k, v), None, w, None))(q)
  _assert_rows_close(got, want, clean, "dq", kind="grad")
