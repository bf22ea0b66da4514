"""linear_attention / linear_attention_step: recurrent == parallel == xla (outputs, final states, every gradient),
GQA, initial state, ragged chunks, non-causal, extreme decays, decoding, CAB prefix conformance and bad inputs."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jaxattn
from jaxattn import testing
from jaxattn.ops.linear import XlaConfig, linear_attention_parallel
from jaxattn.ops.linear.api import make_call

IMPLS = ("reference", "xla")


def _arr(rng, shape, scale=1.0, dtype=jnp.float32):
  return jnp.asarray(rng.normal(size=shape) * scale, dtype)


def _inputs(seed, *, B=2, T=37, S=None, H=4, G=2, D=8, E=6, decay="head", dtype=jnp.float32):
  """q, k, v, log_decay (None / [H] / [B, T, H]) and an initial state, from numpy (no per-shape jax.random compile)."""
  rng = np.random.default_rng(seed)
  S = S or T
  q, k, v = _arr(rng, (B, T, H, D), 1, dtype), _arr(rng, (B, S, G, D), 1, dtype), _arr(rng, (B, S, G, E), 1, dtype)
  ld = {"none": None,
        "head": jnp.asarray(-rng.uniform(0.01, 1.0, H), jnp.float32),
        "token": jnp.asarray(np.log(rng.uniform(0.3, 1.0, (B, T, H))), jnp.float32)}[decay]
  return q, k, v, ld, _arr(rng, (B, H, D, E))


@functools.partial(jax.jit, static_argnames=("impl", "causal", "chunk"))
def _run(q, k, v, ld, s0, *, impl, causal=True, chunk=8):
  if impl == "parallel":
    return linear_attention_parallel(q, k, v, ld, s0, make_call(q, k, v, log_decay=ld, initial_state=s0,
                                                                 causal=causal))
  return jaxattn.linear_attention(q, k, v, log_decay=ld, causal=causal, initial_state=s0, return_final_state=True,
                                  implementation=impl, chunk_size=chunk)


@functools.partial(jax.jit, static_argnames=("impl", "causal", "chunk", "argnums"))
def _grads(q, k, v, ld, s0, w_out, w_state, *, impl, causal=True, chunk=8, argnums=(0, 1, 2, 3, 4)):
  def loss(q, k, v, ld, s0):
    out, state = _run(q, k, v, ld, s0, impl=impl, causal=causal, chunk=chunk)
    return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(state * w_state)

  return jax.grad(loss, argnums)(q, k, v, ld, s0)


def _check_all(impl, q, k, v, ld, s0, *, causal=True, chunk=8):
  """Outputs, final state and (dq, dk, dv, dlog_decay, dinitial_state) of ``impl`` against the parallel form."""
  out, state = _run(q, k, v, ld, s0, impl=impl, causal=causal, chunk=chunk)
  ref_out, ref_state = _run(q, k, v, ld, s0, impl="parallel", causal=causal)
  chex.assert_shape(out, ref_out.shape)
  assert out.dtype == q.dtype and state.dtype == jnp.float32
  testing.assert_close(out, ref_out, name=f"{impl} out")
  testing.assert_close(state, ref_state, name=f"{impl} final state")
  rng = np.random.default_rng(7)
  w_out, w_state = _arr(rng, out.shape), _arr(rng, state.shape)
  argnums = (0, 1, 2, 4) if ld is None else (0, 1, 2, 3, 4)
  got = _grads(q, k, v, ld, s0, w_out, w_state, impl=impl, causal=causal, chunk=chunk, argnums=argnums)
  want = _grads(q, k, v, ld, s0, w_out, w_state, impl="parallel", causal=causal, argnums=argnums)
  names = dict(zip((0, 1, 2, 3, 4), ("dq", "dk", "dv", "dlog_decay", "dinitial_state")))
  for i, g, w in zip(argnums, got, want):
    if i == 3:
      # dlog_decay sums B*T*D*E products whose terms reach ~1e3 (cancelling to O(1)): f32 rounding of that sum is
      # ~1e-4 absolute. An f64 run of all three forms agrees to 1e-13, so this is rounding, not a formula error.
      with testing.override(jnp.float32, "grad", atol=2e-3, rtol=1e-4, reason="f32 rounding of a long reduction"):
        testing.assert_close(g, w, kind="grad", name=f"{impl} {names[i]}")
    else:
      testing.assert_close(g, w, kind="grad", name=f"{impl} {names[i]}")


# --------------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("decay", ["none", "head", "token"])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_parallel_gqa_initial_state_ragged(impl, decay):
  # T = 37 is not a multiple of the chunk (8); H = 4 query heads share G = 2 kv heads.
  _check_all(impl, *_inputs(0, decay=decay))


def test_mqa_without_initial_state():
  q, k, v, ld, _ = _inputs(1, B=1, T=20, H=4, G=1, D=4, E=3, decay="token")
  _check_all("xla", q, k, v, ld, jnp.zeros((1, 4, 4, 3)), chunk=16)
  out = jax.jit(functools.partial(jaxattn.linear_attention, implementation="xla"))(q, k, v, log_decay=ld)
  testing.assert_close(out, _run(q, k, v, ld, None, impl="parallel")[0], name="no initial state")


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunk_sizes(chunk):
  q, k, v, ld, s0 = _inputs(2, B=1, T=23, decay="token")
  out, state = _run(q, k, v, ld, s0, impl="xla", chunk=chunk)
  ref_out, ref_state = _run(q, k, v, ld, s0, impl="reference")
  testing.assert_close(out, ref_out, name=f"chunk={chunk} out")
  testing.assert_close(state, ref_state, name=f"chunk={chunk} state")


@pytest.mark.parametrize("impl", IMPLS)
def test_noncausal_cross_lengths(impl):
  q, k, v, _, s0 = _inputs(3, T=9, S=14, decay="none")
  _check_all(impl, q, k, v, None, s0, causal=False)


def test_bf16_xla_close_to_f32_reference():
  q, k, v, ld, s0 = _inputs(4, T=40, decay="head", dtype=jnp.bfloat16)
  out, state = _run(q, k, v, ld, s0, impl="xla", chunk=16)
  f32 = lambda x: x.astype(jnp.float32)
  ref_out, ref_state = _run(f32(q), f32(k), f32(v), ld, s0, impl="reference")
  assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
  testing.assert_close(out, ref_out, dtype=jnp.bfloat16, name="bf16 out", rms=testing.RMS_TOLERANCES["bfloat16"])
  testing.assert_close(state, ref_state, dtype=jnp.bfloat16, name="bf16 state")
  rng = np.random.default_rng(3)
  w_out, w_state = _arr(rng, out.shape), _arr(rng, state.shape)
  got = _grads(q, k, v, ld, s0, w_out, w_state, impl="xla", chunk=16)
  want = _grads(f32(q), f32(k), f32(v), ld, s0, w_out, w_state, impl="reference")
  for name, g, w in zip(("dq", "dk", "dv", "dlog_decay", "dinitial_state"), got, want):
    assert g.dtype == (jnp.bfloat16 if name in ("dq", "dk", "dv") else jnp.float32)
    rms = testing.relative_rms(g, w)
    assert rms < 2 * testing.RMS_TOLERANCES["bfloat16"], (name, rms)  # gradients: 2x the output bound


def test_default_implementation_and_scale():
  q, k, v, ld, _ = _inputs(5, B=1, T=10, decay="head")
  out = jax.jit(jaxattn.linear_attention)(q, k, v, log_decay=ld)  # CPU default: xla
  ref = _run(q, k, v, ld, None, impl="parallel")[0]
  testing.assert_close(out, ref, name="default")
  out2 = jax.jit(functools.partial(jaxattn.linear_attention, scale=1.0, implementation="reference"))(
      q, k, v, log_decay=ld)
  testing.assert_close(out2, ref * q.shape[-1] ** 0.5, name="scale=1")


# ------------------------------------------------------------------------------------------- extreme decays
@pytest.mark.parametrize("decay", ["head", "token"])
def test_extreme_decays_long_sequence(decay):
  """lambda ~ 1 (g = 0, -1e-7) and lambda ~ 0 (g = -60, -1e4, -inf) over T = 2048: finite and equal."""
  B, T, H, G, D, E = 1, 2048, 4, 2, 4, 4
  rng = np.random.default_rng(6)
  q, k, v = _arr(rng, (B, T, H, D)), _arr(rng, (B, T, G, D), 0.5), _arr(rng, (B, T, G, E))
  if decay == "head":
    ld = jnp.asarray([0.0, -1e-7, -60.0, -1e4], jnp.float32)
  else:
    g = np.log(rng.uniform(0.999, 1.0, (B, T, H)))
    g[:, ::7] = -1e4
    g[:, 3::11] = -60.0
    g[:, 5::50] = -np.inf
    ld = jnp.asarray(g, jnp.float32)
  res = {}
  for impl in IMPLS:
    out, state = jax.jit(functools.partial(jaxattn.linear_attention, log_decay=ld, return_final_state=True,
                                           implementation=impl))(q, k, v)
    grads = jax.jit(jax.grad(lambda q, k, v, ld: jnp.sum(jnp.sin(jaxattn.linear_attention(
        q, k, v, log_decay=ld, implementation=impl))), (0, 1, 2, 3)))(q, k, v, ld)
    testing.assert_no_nan((out, state, grads), name=f"{impl} {decay}")
    assert all(np.isfinite(np.asarray(x)).all() for x in (out, state, *grads))
    res[impl] = (out, state, grads)
  # Relative RMS: without decay the state sums 2048 outer products (summation orders differ), and the recurrence
  # multiplies by exp(-1e-7), which f32 rounds to 1 - 1.19e-7, at every step (an f64 run puts xla closer to the
  # exact gradients than the reference: dq 9e-6 vs 4e-4 for that head).
  for name, a, b in zip(("out", "state", "dq", "dk", "dv", "dlog_decay"),
                        (res["xla"][0], res["xla"][1], *res["xla"][2]),
                        (res["reference"][0], res["reference"][1], *res["reference"][2])):
    assert testing.relative_rms(a, b) < 1e-3, (name, testing.relative_rms(a, b))


def test_naive_factorisation_overflows_but_chunked_does_not():
  """The split lambda^(t-s) = lambda^t * lambda^(-s) overflows in f32 once s * |g| > 88 (TransNormerLLM,
  arXiv:2307.14995)."""
  g, t = np.float32(-0.5), np.arange(400, dtype=np.float32)
  with np.errstate(over="ignore", invalid="ignore"):
    naive = np.exp(g * t)[:, None] * np.exp(-g * t)[None, :]
  assert not np.isfinite(naive).all()
  q, k, v, _, _ = _inputs(8, B=1, T=400, H=2, G=2, D=4, E=4, decay="none")
  out = jax.jit(jaxattn.linear_attention)(q, k, v, log_decay=jnp.full((2,), g))
  assert np.isfinite(np.asarray(out)).all()


# ----------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("decay", ["head", "token"])
def test_step_by_step_decode_equals_full(decay):
  q, k, v, ld, s0 = _inputs(9, B=2, T=12, decay=decay)
  full, full_state = _run(q, k, v, ld, s0, impl="xla", chunk=4)
  step = jax.jit(jaxattn.linear_attention_step)
  # prefill 5 tokens, then one at a time
  ld_pre = ld if ld.ndim == 1 else ld[:, :5]
  pre, state = jax.jit(functools.partial(jaxattn.linear_attention, return_final_state=True, chunk_size=4))(
      q[:, :5], k[:, :5], v[:, :5], log_decay=ld_pre, initial_state=s0)
  outs = [pre]
  for t in range(5, 12):
    ld_t = ld if ld.ndim == 1 else ld[:, t]
    o, state = step(q[:, t], k[:, t], v[:, t], state, log_decay=ld_t)
    chex.assert_shape(o, (2, 4, 6))
    assert state.dtype == jnp.float32
    outs.append(o[:, None])
  testing.assert_close(jnp.concatenate(outs, axis=1), full, name="decode outputs")
  testing.assert_close(state, full_state, name="decode final state")


def test_cab_decode_and_causal_prefix_conformance():
  """The op itself passes CAB's causal-self checks (prefix invariance, incremental decode == full)."""
  B, T, H, D = 1, 10, 2, 4
  ld = jnp.asarray([-0.3, -0.01], jnp.float32)
  attn = jax.jit(lambda q, k, v: jaxattn.linear_attention(q, k, v, log_decay=ld, chunk_size=4))
  q, k, v, _, _ = _inputs(10, B=B, T=T, H=H, G=H, D=D, E=D, decay="none")
  testing.check_causal_prefix(attn, q, k, v)
  # decode check on packed inputs x = [q | k | v] along the feature axis
  x = jnp.concatenate([q, k, v], axis=-1)  # [B, T, H, 3D]
  split = lambda x: (x[..., :D], x[..., D:2 * D], x[..., 2 * D:])
  step = jax.jit(lambda s, x: jaxattn.linear_attention_step(*split(x[:, 0]), s, log_decay=ld))

  def step_fn(state, x_t):
    o, state = step(state, x_t)
    return state, o[:, None]

  testing.check_decode_matches_full(lambda x: attn(*split(x)), lambda: jnp.zeros((B, H, D, D)), step_fn, x)


# -------------------------------------------------------------------------------------------------- errors
def _bad_cases():
  q, k, v, ld, s0 = _inputs(11, B=2, T=6, H=4, G=2, D=8, E=6, decay="head")
  pos = jnp.asarray([-0.1, 0.2, -0.3, -0.4])
  return {
      "positive log decay": (dict(q=q, k=k, v=v, log_decay=pos), "must be <= 0"),
      "nan log decay": (dict(q=q, k=k, v=v, log_decay=jnp.asarray([np.nan, -1, -1, -1.0])), "NaN"),
      "decay with causal=False": (dict(q=q, k=k, v=v, log_decay=ld, causal=False), "causal=True"),
      "token gate with causal=False": (dict(q=q, k=k, v=v, log_decay=jnp.zeros((2, 6, 4)), causal=False),
                                       "per-token"),
      "log decay shape": (dict(q=q, k=k, v=v, log_decay=jnp.zeros((2, 6))), "(2, 6)"),
      "log decay per kv head": (dict(q=q, k=k, v=v, log_decay=jnp.zeros((2,))), "(2,)"),
      "int log decay": (dict(q=q, k=k, v=v, log_decay=jnp.zeros((4,), jnp.int32)), "int32"),
      "heads not a multiple": (dict(q=q[:, :, :3], k=k, v=v), "3 heads, not a multiple of k's 2"),
      "head dim": (dict(q=q, k=k[..., :4], v=v), "head dim 8 but k has 4"),
      "kv heads differ": (dict(q=q, k=k, v=v[:, :, :1]), "2 kv heads but v has 1"),
      "lengths differ causal": (dict(q=q, k=k[:, :5], v=v[:, :5]), "q length 6 and k/v length 5"),
      "k v lengths": (dict(q=q, k=k, v=v[:, :5], causal=False), "length 6 but v has length 5"),
      "batch": (dict(q=q, k=k[:1], v=v), "batch sizes differ"),
      "rank": (dict(q=q[0], k=k, v=v), "rank 4"),
      "dtype mix": (dict(q=q.astype(jnp.bfloat16), k=k, v=v), "share a dtype"),
      "int dtype": (dict(q=q.astype(jnp.int32), k=k, v=v), "int32"),
      "initial state shape": (dict(q=q, k=k, v=v, initial_state=s0[:, :2]), "(2, 4, 8, 6)"),
      "chunk size": (dict(q=q, k=k, v=v, chunk_size=0), "chunk_size"),
      "scale": (dict(q=q, k=k, v=v, scale=float("nan")), "scale"),
      "causal not bool": (dict(q=q, k=k, v=v, causal="yes"), "causal must be a bool"),
      "unknown implementation": (dict(q=q, k=k, v=v, implementation="cuda"), "unknown implementation"),
  }


_BAD = _bad_cases()


@pytest.mark.parametrize("case", sorted(_BAD))
def test_bad_inputs_raise_value_error(case):
  kwargs, match = _BAD[case]
  q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
  with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
    jaxattn.linear_attention(q, k, v, **kwargs)


def test_step_bad_inputs():
  q, k, v, ld, s0 = _inputs(12, B=2, T=1, H=4, G=2, D=8, E=6, decay="head")
  q_t, k_t, v_t = q[:, 0], k[:, 0], v[:, 0]
  with pytest.raises(ValueError, match="must be <= 0"):
    jaxattn.linear_attention_step(q_t, k_t, v_t, s0, log_decay=jnp.asarray([0.5, 0, 0, 0]))
  with pytest.raises(ValueError, match=r"\(2, 4, 8, 6\)"):
    jaxattn.linear_attention_step(q_t, k_t, v_t, s0[..., :3])
  with pytest.raises(ValueError, match="rank 3"):
    jaxattn.linear_attention_step(q, k_t, v_t, s0)
  with pytest.raises(ValueError, match="None"):
    jaxattn.linear_attention_step(q_t, k_t, v_t, None)
  with pytest.raises(ValueError, match=r"\[H\]"):
    jaxattn.linear_attention_step(q_t, k_t, v_t, s0, log_decay=jnp.zeros((2, 4, 1)))


def test_traced_log_decay_is_not_value_checked_under_jit():
  q, k, v, ld, _ = _inputs(13, B=1, T=5, decay="head")
  out = jax.jit(lambda ld: jaxattn.linear_attention(q, k, v, log_decay=ld))(ld)
  testing.assert_close(out, _run(q, k, v, ld, None, impl="parallel")[0], name="jit")


class TestJitAndEager(chex.TestCase):
  """``xla`` equals ``reference`` with and without ``jit`` (``chex.variants``): outputs, final state, gradients."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("token_decay", "token"))
  def test_xla_matches_reference(self, decay):
    q, k, v, ld, s0 = _inputs(3, decay=decay)  # T = 37 (ragged chunks), GQA 4:2, an initial state
    rng = np.random.default_rng(3)
    w_out, w_state = _arr(rng, (2, 37, 4, 6)), _arr(rng, (2, 4, 8, 6))

    def run(impl):
      def loss(q, k, v, ld, s0):
        out, state = jaxattn.linear_attention(q, k, v, log_decay=ld, initial_state=s0, return_final_state=True,
                                              implementation=impl)
        return jnp.sum(out * w_out) + jnp.sum(state * w_state), (out, state)

      (_, (out, state)), grads = self.variant(jax.value_and_grad(loss, (0, 1, 2, 3, 4), has_aux=True))(
          q, k, v, ld, s0)
      chex.assert_shape(out, (2, 37, 4, 6))
      chex.assert_shape(state, (2, 4, 8, 6))
      return out, state, grads

    (out, state, grads), (r_out, r_state, r_grads) = run("xla"), run("reference")
    testing.assert_close(out, r_out, name="out")
    testing.assert_close(state, r_state, name="final state")
    testing.assert_close([grads[i] for i in (0, 1, 2, 4)], [r_grads[i] for i in (0, 1, 2, 4)], kind="grad",
                         name="dq, dk, dv, dinitial_state")
    with testing.override(jnp.float32, "grad", atol=2e-3, rtol=1e-4, reason="f32 rounding of a long reduction"):
      testing.assert_close(grads[3], r_grads[3], kind="grad", name="dlog_decay")  # see _check_all


# ------------------------------------------------------------------------------------- the protocol's configs
def test_xla_config_equals_chunk_size_shorthand():
  """``implementation=("xla", XlaConfig(chunk_size=5))`` runs with that chunk: it equals ``chunk_size=5`` and the
  reference, and (ragged chunks of 5 over T = 23) its result is not the default chunk's bit for bit."""
  q, k, v, ld, s0 = _inputs(14, B=1, T=23, decay="token")
  kw = dict(log_decay=ld, initial_state=s0, return_final_state=True)
  cfg = jax.jit(lambda *a: jaxattn.linear_attention(*a, **kw, implementation=("xla", XlaConfig(chunk_size=5))))
  out, state = cfg(q, k, v)
  short, short_state = jax.jit(lambda *a: jaxattn.linear_attention(*a, **kw, implementation="xla", chunk_size=5))(
      q, k, v)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(short))
  np.testing.assert_array_equal(np.asarray(state), np.asarray(short_state))
  ref, ref_state = _run(q, k, v, ld, s0, impl="reference")
  testing.assert_close(out, ref, name="XlaConfig(5) out")
  testing.assert_close(state, ref_state, name="XlaConfig(5) state")
  w = _arr(np.random.default_rng(1), out.shape)
  loss = lambda impl: lambda q, ld: jnp.sum(jaxattn.linear_attention(q, k, v, log_decay=ld, initial_state=s0,
                                                                     implementation=impl) * w)
  got = jax.jit(jax.grad(loss(("xla", XlaConfig(chunk_size=5))), (0, 1)))(q, ld)
  want = jax.jit(jax.grad(loss("reference"), (0, 1)))(q, ld)
  testing.assert_close(got[0], want[0], kind="grad", name="XlaConfig(5) dq")
  with testing.override(jnp.float32, "grad", atol=2e-3, rtol=1e-4, reason="f32 rounding of a long reduction"):
    testing.assert_close(got[1], want[1], kind="grad", name="XlaConfig(5) dlog_decay")


@pytest.mark.parametrize("impl,config,match", [
    ("xla", XlaConfig(chunk_size=0), r"xla: XlaConfig.chunk_size=0 must be a positive int"),
    ("xla", XlaConfig(chunk_size=2.5), r"xla: XlaConfig.chunk_size=2.5 must be a positive int"),
])
def test_invalid_xla_config_raises_value_error(impl, config, match):
  q, k, v, _, _ = _inputs(15, B=1, T=9, decay="none")
  with pytest.raises(ValueError, match=match):
    jaxattn.linear_attention(q, k, v, implementation=(impl, config))


def test_config_of_another_backend_and_config_with_shorthand_raise():
  q, k, v, _, _ = _inputs(16, B=1, T=9, decay="none")
  with pytest.raises(ValueError, match="must be a .*XlaConfig, got PallasTpuConfig"):
    jaxattn.linear_attention(q, k, v, implementation=("xla", jaxattn.ops.linear.PallasTpuConfig(chunk_size=8)))
  with pytest.raises(ValueError, match="not both"):
    jaxattn.linear_attention(q, k, v, implementation=("xla", XlaConfig(4)), chunk_size=4)
  with pytest.raises(ValueError, match="reference.*must be a jaxattn.backend.NoConfig, got XlaConfig"):
    jaxattn.linear_attention(q, k, v, implementation=("reference", XlaConfig(4)))

