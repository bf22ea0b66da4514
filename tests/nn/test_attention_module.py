"""Tests for the NNX ``MultiHeadAttention`` module: math, GQA, RoPE, masks, jit, split/merge and the KV cache."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import masks, testing
from jaxattn.nn import MultiHeadAttention

B, T, F = 2, 10, 16


@functools.partial(nnx.jit, static_argnames=("mask", "decode"))
def apply(m, x, context=None, *, mask=None, segment_ids=None, positions=None, decode=False):
  """The module call under ``nnx.jit`` (eager calls re-trace the blockwise kernel every time: slow on CPU)."""
  return m(x, context, mask=mask, segment_ids=segment_ids, positions=positions, decode=decode)


def _x(seed=1, shape=(B, T, F)):
  # numpy, not jax.random: every new jax.random shape costs a compile, which dominates CPU test time
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# --------------------------------------------------------------------------------------------- dense reference
def _rope_ref(x, pos, base):
  """RoPE as a complex rotation of ``x[..., :D/2] + i x[..., D/2:]`` (independent of ``apply_rope``)."""
  half = x.shape[-1] // 2
  freq = base ** (-2.0 * jnp.arange(half, dtype=jnp.float32) / x.shape[-1])
  ang = jnp.broadcast_to(jnp.asarray(pos, jnp.float32), x.shape[:2])[..., None, None] * freq  # [B, T, 1, D/2]
  z = (x[..., :half] + 1j * x[..., half:]) * jnp.exp(1j * ang)
  return jnp.concatenate([z.real, z.imag], axis=-1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """The static options of a module that the reference needs."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  use_rope: bool
  rope_base: float
  scale: float | None
  logits_soft_cap: float | None


def _dense(params, m, x, context=None, allowed=None, positions=None):
  """Hand-written dense forward pass with the module's parameters (f32, highest precision).

  ``params``: ``{name: (kernel, bias|None)}``; ``allowed``: bool ``[B|1, T, S]`` or None.
  """
  cfg = _Cfg(m.num_heads, m.num_kv_heads, m.head_dim, m.use_rope, m.rope_base, m.scale, m.logits_soft_cap)
  return _dense_jit(params, cfg, x, context, allowed, positions)


@functools.partial(jax.jit, static_argnums=1)
def _dense_jit(params, m: _Cfg, x, context, allowed, positions):
  hi = jax.lax.Precision.HIGHEST
  ein = functools.partial(jnp.einsum, precision=hi)

  def proj(name, spec, a):
    w, b = params[name]
    y = ein(spec, a, w)
    return y if b is None else y + b

  src = x if context is None else context
  q = proj("query", "btf,fhd->bthd", x)  # [B, T, H, D]
  k = proj("key", "bsf,fgd->bsgd", src)  # [B, S, G, D]
  v = proj("value", "bsf,fgd->bsgd", src)
  if m.use_rope:
    pos = jnp.arange(x.shape[1]) if positions is None else positions
    q, k = _rope_ref(q, pos, m.rope_base), _rope_ref(k, pos, m.rope_base)
  R = m.num_heads // m.num_kv_heads
  k, v = jnp.repeat(k, R, axis=2), jnp.repeat(v, R, axis=2)  # [B, S, H, D]
  scale = m.scale if m.scale is not None else m.head_dim ** -0.5
  s = ein("bthd,bshd->bhts", q, k) * scale  # [B, H, T, S]
  if m.logits_soft_cap is not None:
    s = m.logits_soft_cap * jnp.tanh(s / m.logits_soft_cap)
  if allowed is not None:  # [B|1, T, S], or per head [B|1, H, T, S]
    s = jnp.where(allowed if allowed.ndim == 4 else allowed[:, None], s, -jnp.inf)
  mx = jnp.max(s, -1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0))
  l = p.sum(-1, keepdims=True)
  o = ein("bhts,bshd->bthd", p / jnp.where(l == 0, 1.0, l), v)  # [B, T, H, D]
  w, b = params["out"]
  y = ein("bthd,hdo->bto", o, w)
  return y if b is None else y + b


def _params(m):
  get = lambda lin: (lin.kernel[...], None if lin.bias is None else lin.bias[...])
  return {name: get(getattr(m, name)) for name in ("query", "key", "value", "out")}


def _allowed(mask, Tq, S):
  return None if mask is None else jnp.asarray(mask.to_dense(Tq, S))[None]


# ------------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("H,G,use_bias,mask", [
    (4, 4, True, None),
    (4, 2, False, masks.Causal()),
    (4, 1, True, masks.Local(3)),
])
def test_matches_dense_reference(H, G, use_bias, mask):
  m = MultiHeadAttention(H, F, num_kv_heads=G, use_bias=use_bias, mask=mask, rngs=nnx.Rngs(0))
  if use_bias:  # non-zero biases, so they are actually checked
    for lin in (m.query, m.key, m.value, m.out):
      lin.bias[...] = _x(7, lin.bias.shape)
  x = _x()
  testing.assert_close(apply(m, x), _dense(_params(m), m, x, allowed=_allowed(mask, T, T)), name="module")


def test_cross_attention_and_options():
  """Cross-attention with its own context width, plus head_dim / out_features / scale / soft cap options."""
  S, Fkv = 7, 12
  m = MultiHeadAttention(4, F, num_kv_heads=2, in_kv_features=Fkv, head_dim=6, out_features=5, scale=0.3,
                         logits_soft_cap=2.0, rngs=nnx.Rngs(2))
  assert m.query.kernel.shape == (F, 4, 6) and m.key.kernel.shape == (Fkv, 2, 6) and m.out.kernel.shape == (4, 6, 5)
  x, c = _x(), _x(3, (B, S, Fkv))
  mask = masks.Causal(offset=S - T)  # bottom-right aligned causal cross-attention (first rows see no key)
  out = apply(m, x, c, mask=mask)
  assert out.shape == (B, T, 5)
  testing.assert_close(out, _dense(_params(m), m, x, c, allowed=_allowed(mask, T, S)), name="cross")


def test_call_time_mask_overrides_default():
  m = MultiHeadAttention(4, F, mask=masks.Causal(), rngs=nnx.Rngs(0))
  x, p = _x(), _params(m)
  testing.assert_close(apply(m, x, mask=masks.Full()), _dense(p, m, x), name="Full override")
  local = masks.Local(2, 1)
  testing.assert_close(apply(m, x, mask=local), _dense(p, m, x, allowed=_allowed(local, T, T)), name="Local")


def test_per_head_and_boolean_array_masks():
  """Per-head static masks (constructor default or per call) and a jax.nn-style boolean mask array per call."""
  H = 4
  heads = (masks.Causal(), masks.Local(2, 0), masks.Full(), masks.Local(1, 1))
  m = MultiHeadAttention(H, F, num_kv_heads=2, mask=heads, rngs=nnx.Rngs(0))
  assert isinstance(m.mask, masks.PerHead)
  x, p = _x(), _params(m)
  per_head = jnp.stack([jnp.asarray(h.to_dense(T, T)) for h in heads])[None]  # [1, H, T, T]
  testing.assert_close(apply(m, x), _dense(p, m, x, allowed=per_head), name="per-head default")
  testing.assert_close(apply(m, x, mask=masks.PerHead(heads[::-1])),
                       _dense(p, m, x, allowed=per_head[:, ::-1]), name="per-head call")
  # a boolean array [B, 1, T, S] with one fully masked row (-> 0 before the output projection's bias)
  allowed = np.random.default_rng(3).random((B, 1, T, T)) < 0.6
  allowed[0, 0, 2] = False
  allowed = jnp.asarray(allowed)
  out = nnx.jit(lambda m, x, a: m(x, mask=a))(m, x, allowed)
  testing.assert_close(out, _dense(p, m, x, allowed=jnp.broadcast_to(allowed, (B, H, T, T))), name="bool array")
  assert bool(jnp.all(jnp.isfinite(out)))
  with pytest.raises(ValueError, match="mask has 3 per-head masks, but the module has num_heads=4"):
    MultiHeadAttention(H, F, mask=heads[:3], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="mask array must be boolean"):
    m(x, mask=allowed.astype(jnp.int32))
  m.init_cache(B, 16)
  with pytest.raises(ValueError, match="decode=True supports Full, Causal and Local masks .* ArrayImpl"):
    m(x[:, :1], mask=allowed[:, :, :1], decode=True)
  with pytest.raises(ValueError, match="decode=True supports Full, Causal and Local masks .* PerHead"):
    m(x[:, :1], decode=True)


def test_segment_ids_at_call_time():
  m = MultiHeadAttention(4, F, num_kv_heads=2, use_rope=True, mask=masks.Causal(), rngs=nnx.Rngs(0))
  x = _x()
  ids = jnp.array([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3], jnp.int32)  # two packed documents per row
  # RoPE positions restart in each document, as for packed sequences
  positions = jnp.array([list(range(4)) + list(range(6)), list(range(7)) + list(range(3))])
  allowed = (ids[:, :, None] == ids[:, None, :]) & jnp.asarray(np.tril(np.ones((T, T), bool)))[None]
  out = apply(m, x, segment_ids=ids, positions=positions)
  testing.assert_close(out, _dense(_params(m), m, x, allowed=allowed, positions=positions), name="segments")
  # segment ids as a (q_ids, kv_ids) pair, for cross-attention
  mc = MultiHeadAttention(4, F, rngs=nnx.Rngs(1))
  c = _x(4, (B, 6, F))
  kv_ids = jnp.array([[0, 0, 1, 1, 1, 1], [0] * 6], jnp.int32)
  out = apply(mc, x, c, segment_ids=(ids, kv_ids))
  allowed = ids[:, :, None] == kv_ids[:, None, :]
  testing.assert_close(out, _dense(_params(mc), mc, x, c, allowed=allowed), name="cross segments")


def test_gradients_match_dense_reference():
  m = MultiHeadAttention(4, F, num_kv_heads=2, use_rope=True, use_bias=True, mask=masks.Causal(), rngs=nnx.Rngs(0))
  x = _x()
  ct = _x(9)

  @nnx.jit
  def module_grads(m, x):
    return nnx.grad(lambda m: jnp.sum(m(x) * ct))(m)

  g = module_grads(m, x)
  allowed = _allowed(masks.Causal(), T, T)
  g_ref = jax.jit(jax.grad(lambda p: jnp.sum(_dense(p, m, x, allowed=allowed) * ct)))(_params(m))
  for name in ("query", "key", "value", "out"):
    lin = getattr(g, name)
    testing.assert_close((lin.kernel[...], lin.bias[...]), g_ref[name], kind="grad", name=f"d{name}")


def test_bf16_compute_dtype():
  m = MultiHeadAttention(4, F, num_kv_heads=2, dtype=jnp.bfloat16, mask=masks.Causal(), rngs=nnx.Rngs(0))
  x = _x()
  out = apply(m, x)
  assert out.dtype == jnp.bfloat16 and m.query.kernel.dtype == jnp.float32
  ref = _dense(_params(m), m, x, allowed=_allowed(masks.Causal(), T, T))
  testing.assert_close(out, ref, dtype=jnp.bfloat16, name="bf16", rms=testing.RMS_TOLERANCES["bfloat16"] * 2)


# --------------------------------------------------------------------------------------------------------- RoPE
def test_rope_shift_invariance():
  """Shifting every position by a constant leaves the attention logits, hence the output, unchanged."""
  m = MultiHeadAttention(4, F, num_kv_heads=2, use_rope=True, mask=masks.Causal(), rngs=nnx.Rngs(0))
  x = _x()
  base = jnp.arange(T)
  out0 = apply(m, x, positions=base)
  with testing.override(jnp.float32, "out", atol=5e-5, rtol=5e-5,
                        reason="f32 rounding of the rotation angles p * freq grows with |p|"):
    for shift in (3, 17):
      testing.assert_close(apply(m, x, positions=base + shift), out0, name=f"shift {shift}")
  # per-row positions [B, T]: a different shift for each batch row
  pos = jnp.stack([base + 5, base + 11])
  with testing.override(jnp.float32, "out", atol=5e-5, rtol=5e-5, reason="as above"):
    testing.assert_close(apply(m, x, positions=pos), out0, name="per-row shift")
  # and RoPE actually changes the result
  assert not np.allclose(np.asarray(apply(m, x, positions=base * 2)), np.asarray(out0), atol=1e-3)


# --------------------------------------------------------------------------------------------- jit, split, merge
def test_split_merge_round_trip():
  m = MultiHeadAttention(4, F, num_kv_heads=2, use_rope=True, mask=masks.Causal(), rngs=nnx.Rngs(0))
  x = _x()
  graphdef, state = nnx.split(m)
  m2 = nnx.merge(graphdef, state)
  testing.assert_close(apply(m2, x), apply(m, x), name="merged")
  # pure functional use: jax.jit over (graphdef static, state) with a cache threaded through the state
  m.init_cache(B, 12)
  graphdef, state = nnx.split(m)

  @functools.partial(jax.jit, static_argnums=0)
  def step(graphdef, state, x_t):
    mod = nnx.merge(graphdef, state)
    y = mod(x_t, decode=True)
    return y, nnx.state(mod)

  outs = []
  for t in range(T):
    y, state = step(graphdef, state, x[:, t:t + 1])
    outs.append(y)
  assert int(state["cache_index"][...]) == T
  testing.assert_close(jnp.concatenate(outs, 1), apply(m, x), name="functional decode")


def test_nnx_pure_dict_round_trip():
  m = MultiHeadAttention(4, F, rngs=nnx.Rngs(0))
  other = MultiHeadAttention(4, F, rngs=nnx.Rngs(5))
  state = nnx.state(other)
  nnx.replace_by_pure_dict(state, nnx.to_pure_dict(nnx.state(m)))
  nnx.update(other, state)
  x = _x()
  testing.assert_close(apply(other, x), apply(m, x), name="restored")


# --------------------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("mask", [masks.Causal(), masks.Local(3)])
def test_decode_token_by_token_matches_full(mask):
  m = MultiHeadAttention(4, F, num_kv_heads=2, use_rope=True, mask=mask, rngs=nnx.Rngs(0))

  def init():
    m.init_cache(B, 16)
    return m

  def step(mod, x_t):
    return mod, apply(mod, x_t, decode=True)

  testing.check_decode_matches_full(lambda x: apply(m, x), init, step, _x())
  assert int(m.cache_index[...]) == T


@pytest.mark.parametrize("mask", [masks.Causal(), masks.Local(3)])
def test_chunked_prefill_then_decode_matches_full(mask):
  m = MultiHeadAttention(4, F, num_kv_heads=2, use_rope=True, mask=mask, rngs=nnx.Rngs(0))
  x = _x()
  full = apply(m, x)
  m.init_cache(B, 16)
  outs = [apply(m, x[:, :5], decode=True),  # prefill 5 (chunk path at cache_index 0)
          apply(m, x[:, 5:8], decode=True),  # a chunk of 3 at cache_index 5
          apply(m, x[:, 8:9], decode=True),  # then single tokens
          apply(m, x[:, 9:10], decode=True)]
  testing.assert_close(jnp.concatenate(outs, 1), full, name="chunked decode vs full")
  assert int(m.cache_index[...]) == T


def test_decode_errors_and_eager_decode():
  m = MultiHeadAttention(2, F, rngs=nnx.Rngs(0))  # no default mask: decoding is causal anyway
  x = _x()[:, :3]
  full = apply(m, x, mask=masks.Causal())
  with pytest.raises(ValueError, match="init_cache"):
    m(x, decode=True)
  m.init_cache(B, 4)
  with pytest.raises(ValueError, match="batch size 2"):
    m(x[:1], decode=True)
  with pytest.raises(ValueError, match="context must be None"):
    m(x, x, decode=True)
  with pytest.raises(ValueError, match="segment_ids"):
    m(x, segment_ids=jnp.zeros((B, 3), jnp.int32), decode=True)
  with pytest.raises(ValueError, match="Full, Causal and Local"):
    m(x, mask=masks.Slices(((0, 3, 0, 3, "full"),)), decode=True)
  with pytest.raises(ValueError, match="max_length 4"):
    m(_x()[:, :5], decode=True)
  testing.assert_close(m(x, decode=True), full, name="eager decode")  # eager: the cache index is concrete
  with pytest.raises(ValueError, match=r"cache is full: cache_index 3 \+ 2 new tokens > max_length 4"):
    m(x[:, :2], decode=True)


# ------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=4, in_features=16, num_kv_heads=3), r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
    (dict(num_heads=3, in_features=16), r"in_features \(16\) is not divisible by num_heads \(3\)"),
    (dict(num_heads=4, in_features=16, head_dim=5, use_rope=True), "even head_dim, got 5"),
    (dict(num_heads=0, in_features=16), "num_heads must be a positive int, got 0"),
    (dict(num_heads=4, in_features=16, mask="causal"), "mask must be a jaxattn.masks.Mask"),
    (dict(num_heads=4, in_features=16, logits_soft_cap=-1.0), "logits_soft_cap must be a positive float"),
])
def test_bad_constructor_args(kwargs, match):
  with pytest.raises(ValueError, match=match):
    MultiHeadAttention(**kwargs, rngs=nnx.Rngs(0))


def test_bad_call_args():
  m = MultiHeadAttention(4, F, use_rope=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"x must have shape \[B, T, 16\], got \(2, 10, 8\)"):
    m(jnp.ones((B, T, 8)))
  with pytest.raises(ValueError, match="use_rope applies to self-attention"):
    m(_x(), _x())
  with pytest.raises(ValueError, match=r"context must have shape \[2, S, 16\]"):
    MultiHeadAttention(4, F, rngs=nnx.Rngs(0))(_x(), jnp.ones((3, 5, F)))
  with pytest.raises(ValueError, match="positions must have shape"):
    m(_x(), positions=jnp.arange(T + 1))
  with pytest.raises(ValueError, match="segment ids must have shape"):
    m(_x(), segment_ids=jnp.zeros((B, T + 1), jnp.int32))
