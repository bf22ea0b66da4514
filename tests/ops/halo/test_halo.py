"""halo_attention: a loop-by-loop numpy definition, the dense reference, the blocked xla path and the mask path
(jaxattn.softmax_attention + HaloMask) agree forward and in gradients; HaloMask against its predicate; errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxattn
from jaxattn import masks, testing
from jaxattn.ops.halo import HaloMask, halo_attention, num_rel_positions


def _inputs(seed, B, Y, X, H, G, D, E, block, halo, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  L = num_rel_positions(block, halo)
  arrs = [r.normal(size=s) for s in ((B, Y, X, H, D), (B, Y, X, G, D), (B, Y, X, G, E), (L, D), (L, D))]
  return [jnp.asarray(a, dtype) for a in arrs]


def _loops(q, k, v, rh, rw, block, halo, mask_padding):
  """The definition, one query at a time, in float64 numpy (independent of both implementations)."""
  q, k, v, rh, rw = (np.asarray(a, np.float64) for a in (q, k, v, rh, rw))
  B, Y, X, H, D = q.shape
  G = k.shape[3]
  out = np.zeros(q.shape[:4] + (v.shape[-1],))
  b, h = block, halo
  for bb, y, x, n in itertools.product(range(B), range(Y), range(X), range(H)):
    g = n // (H // G)
    y0, x0 = (y // b) * b, (x // b) * b
    logits, vals = [], []
    for ky in range(y0 - h, y0 + b + h):
      for kx in range(x0 - h, x0 + b + h):
        inside = 0 <= ky < Y and 0 <= kx < X
        if not inside and mask_padding:
          continue
        kvec = k[bb, ky, kx, g] if inside else np.zeros(D)
        vvec = v[bb, ky, kx, g] if inside else np.zeros(v.shape[-1])
        qv = q[bb, y, x, n]
        logits.append(qv @ kvec / np.sqrt(D) + qv @ rh[ky - y + b + h - 1] + qv @ rw[kx - x + b + h - 1])
        vals.append(vvec)
    p = np.exp(np.array(logits) - max(logits))
    out[bb, y, x, n] = (p / p.sum()) @ np.array(vals)
  return out


@pytest.mark.parametrize("mask_padding", [True, False])
def test_reference_is_the_loop_definition(mask_padding):
  q, k, v, rh, rw = _inputs(0, B=1, Y=4, X=6, H=2, G=1, D=4, E=3, block=2, halo=1)
  ref = halo_attention(q, k, v, block=2, halo=1, rel_h=rh, rel_w=rw, mask_padding=mask_padding,
                       implementation="reference")
  testing.assert_close(ref, _loops(q, k, v, rh, rw, 2, 1, mask_padding).astype(np.float32), name="reference")


CASES = [  # (Y, X, H, G, block, halo, pad, rel, mask_padding)
    (8, 12, 4, 2, 4, 2, False, True, True),
    (8, 8, 2, 2, 4, 4, False, True, False),    # halo == block
    (6, 6, 2, 1, 2, 0, False, True, True),     # no halo: plain block attention
    (10, 7, 2, 2, 4, 1, True, True, False),    # padded to multiples of the block
    (8, 8, 2, 2, 8, 0, False, False, True),    # one block: global attention
]


def _grads(fn, args, ct):
  return jax.grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=tuple(range(len(args))))(*args)


def _id(c):
  return (f"{c[0]}x{c[1]}-H{c[2]}G{c[3]}-b{c[4]}h{c[5]}{'-pad' if c[6] else ''}{'' if c[7] else '-norel'}"
          f"-{'masked' if c[8] else 'zeros'}")


# CI budget: two cases by default (GQA + halo + mask path; padding + zero borders), the rest marked slow.
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=_id)
def test_blocked_and_mask_paths_equal_the_reference_fwd_and_grads(case):
  _check_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]] + [c[:8] + (not c[8],) for c in CASES], ids=_id)
def test_blocked_and_mask_paths_more_geometries(case):
  _check_case(case)


def _check_case(case):
  Y, X, H, G, b, h, pad, rel, mask_padding = case
  q, k, v, rh, rw = _inputs(1, B=2, Y=Y, X=X, H=H, G=G, D=8, E=6, block=b, halo=h)
  ct = jnp.asarray(np.random.default_rng(2).normal(size=(2, Y, X, H, 6)), jnp.float32)
  impls = ["xla"] + (["mask"] if mask_padding else [])
  if rel:
    args = (q, k, v, rh, rw)

    def run(impl):
      return lambda q, k, v, rh, rw: halo_attention(q, k, v, block=b, halo=h, rel_h=rh, rel_w=rw, pad=pad,
                                                    mask_padding=mask_padding, implementation=impl)
  else:
    args = (q, k, v)

    def run(impl):
      return lambda q, k, v: halo_attention(q, k, v, block=b, halo=h, pad=pad, mask_padding=mask_padding,
                                            implementation=impl)

  def fwd_and_grads(impl):  # one compile per implementation (op-by-op dispatch is slower on 2 cores)
    return jax.jit(lambda *a: (run(impl)(*a), _grads(run(impl), a, ct)))(*args)

  ref_out, ref_grads = fwd_and_grads("reference")
  for impl in impls:
    out, grads = fwd_and_grads(impl)
    testing.assert_close(out, ref_out, name=f"{impl} out")
    testing.assert_close(grads, ref_grads, kind="grad", name=f"{impl} grads")


def test_mask_path_serves_every_softmax_implementation_and_one_block_is_global_attention():
  q, k, v, _, _ = _inputs(3, B=1, Y=8, X=8, H=2, G=2, D=8, E=8, block=4, halo=2)
  ref = halo_attention(q, k, v, block=4, halo=2, implementation="reference")
  for impl in ("reference", "xla", ("xla", jaxattn.BlockSizes(block_q=16, block_k=16, block_q_dkv=16,
                                                               block_k_dkv=16, block_q_dq=16, block_k_dq=16))):
    out = halo_attention(q, k, v, block=4, halo=2, implementation="mask", softmax_implementation=impl)
    testing.assert_close(out, ref, name=f"mask via {impl}")
  # block = image side: plain global softmax attention over the flattened image
  full = jaxattn.softmax_attention(q.reshape(1, 64, 2, 8), k.reshape(1, 64, 2, 8), v.reshape(1, 64, 2, 8),
                                   implementation="reference").reshape(1, 8, 8, 2, 8)
  testing.assert_close(halo_attention(q, k, v, block=8, halo=0), full, name="one block")


def test_padding_modes_differ_only_at_the_border():
  q, k, v, rh, rw = _inputs(4, B=1, Y=12, X=12, H=1, G=1, D=4, E=4, block=4, halo=2)
  a = halo_attention(q, k, v, block=4, halo=2, rel_h=rh, rel_w=rw, mask_padding=True)
  b = halo_attention(q, k, v, block=4, halo=2, rel_h=rh, rel_w=rw, mask_padding=False)
  testing.assert_close(a[:, 4:8, 4:8], b[:, 4:8, 4:8], name="interior block")  # its window is inside the image
  assert float(jnp.abs(a[:, :4] - b[:, :4]).min()) > 0  # border blocks attend zero keys in one mode only


def test_bf16_inputs_match_the_f32_reference():
  q, k, v, rh, rw = _inputs(5, B=1, Y=8, X=8, H=2, G=1, D=8, E=8, block=4, halo=1)
  ref = halo_attention(q, k, v, block=4, halo=1, rel_h=rh, rel_w=rw, implementation="reference")
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v, rh, rw)]
  out = halo_attention(*bf[:3], block=4, halo=1, rel_h=bf[3], rel_w=bf[4])
  assert out.dtype == jnp.bfloat16
  # inputs rounded to bf16 and logits summed over D * 3 terms: 2x the bf16 output tolerance
  with testing.override(jnp.bfloat16, "out", atol=4e-2, rtol=4e-2, reason="bf16 inputs vs f32 reference inputs"):
    testing.assert_close(out, ref.astype(jnp.bfloat16), name="bf16")


@settings(max_examples=25, deadline=None)
@given(by=st.integers(1, 3), bx=st.integers(1, 3), block=st.integers(1, 4), data=st.data())
def test_halo_mask_dense_and_block_layout_match_the_predicate(by, bx, block, data):
  halo = data.draw(st.integers(0, block))
  extra_y, extra_x = data.draw(st.integers(0, block - 1)), data.draw(st.integers(0, block - 1))
  Y, X = by * block + extra_y, bx * block + extra_x
  m = HaloMask(Y, X, block, halo, pad=True)
  T = Y * X
  dense = m.to_dense(T, T)
  yy, xx = np.divmod(np.arange(T), X)
  y0, x0 = (yy // block) * block, (xx // block) * block
  want = ((yy[None] >= y0[:, None] - halo) & (yy[None] < y0[:, None] + block + halo)
          & (xx[None] >= x0[:, None] - halo) & (xx[None] < x0[:, None] + block + halo))
  np.testing.assert_array_equal(dense, want)
  assert m.area(T, T) == want.sum()
  bq = data.draw(st.sampled_from([1, 3, 8]))
  layout = m.block_layout(T, T, bq, bq)
  for i, j in np.ndindex(layout.shape):
    tile = want[i * bq:(i + 1) * bq, j * bq:(j + 1) * bq]
    assert layout[i, j] == (masks.FULL if tile.all() else masks.PARTIAL if tile.any() else masks.EMPTY)
  assert hash(m) == hash(HaloMask(Y, X, block, halo, pad=True)) and m == HaloMask(Y, X, block, halo, pad=True)


def test_bad_input_raises_naming_the_value():
  q, k, v, rh, rw = _inputs(6, B=1, Y=8, X=8, H=2, G=2, D=4, E=4, block=4, halo=2)
  with pytest.raises(ValueError, match=r"halo \(5\) must not exceed block \(4\)"):
    halo_attention(q, k, v, block=4, halo=5)
  with pytest.raises(ValueError, match=r"halo \(3\) must not exceed block \(2\)"):
    HaloMask(8, 8, 2, 3)
  q6, k6, v6, _, _ = _inputs(6, B=1, Y=6, X=8, H=2, G=2, D=4, E=4, block=4, halo=2)
  with pytest.raises(ValueError, match="image height 6 is not divisible by block 4; pass pad=True"):
    halo_attention(q6, k6, v6, block=4, halo=2)
  with pytest.raises(ValueError, match="image height 6 is not divisible by block 4"):
    HaloMask(6, 8, 4, 2)
  assert halo_attention(q6, k6, v6, block=4, halo=2, pad=True).shape == (1, 6, 8, 2, 4)
  with pytest.raises(ValueError, match="halo must be an int >= 0, got -1"):
    halo_attention(q, k, v, block=4, halo=-1)
  with pytest.raises(ValueError, match="block must be an int >= 1, got 0"):
    halo_attention(q, k, v, block=0, halo=0)
  with pytest.raises(ValueError, match="rel_h must have shape"):
    halo_attention(q, k, v, block=4, halo=1, rel_h=rh, rel_w=rw)  # tables sized for halo 2
  with pytest.raises(ValueError, match="given together"):
    halo_attention(q, k, v, block=4, halo=2, rel_h=rh)
  with pytest.raises(ValueError, match="needs mask_padding=True"):
    halo_attention(q, k, v, block=4, halo=2, mask_padding=False, implementation="mask")
  with pytest.raises(ValueError, match="implementation must be one of"):
    halo_attention(q, k, v, block=4, halo=2, implementation="pallas_tpu")
  with pytest.raises(ValueError, match="rank 5"):
    halo_attention(q[0], k, v, block=4, halo=2)
  with pytest.raises(ValueError, match="not a multiple of k's 2 kv heads"):
    halo_attention(jnp.concatenate([q, q[..., :1, :]], axis=3), k, v, block=4, halo=2)
  with pytest.raises(ValueError, match="must agree in"):
    halo_attention(q, k[:, :4], v[:, :4], block=4, halo=2)
