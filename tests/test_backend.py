"""The op protocol (jaxattn.backend) through the softmax family: fallback warnings, explicit names, config validation,
``(name, Config)`` implementations, the platform-keyed jit cache and gradients through the one ``flash_vjp``."""

import re
import warnings

import jax
import jax.numpy as jnp
import pytest

import jaxattn
from jaxattn import backend as backend_lib
from jaxattn import masks, testing
from jaxattn.ops.softmax import api as softmax_api
from jaxattn.ops.softmax import reference, xla
from jaxattn.ops.softmax.config import BlockSizes, PallasGpuConfig, PallasTpuConfig, SoftmaxResiduals


def _qkv(seed, T, S=None, H=4, G=2, D=16):
  return testing.random_qkv(jax.random.key(seed), B=1, T=T, S=S or T, H=H, G=G, D=D)


def _ref(q, k, v, **kw):
  return jaxattn.softmax_attention(q, k, v, implementation="reference", **kw)


def _fallbacks(record):
  return [str(w.message) for w in record if issubclass(w.category, backend_lib.FallbackWarning)]


# ------------------------------------------------------------------------------------------------- fallback
def test_supports_refusal_falls_back_with_one_warning():
  q, k, v = _qkv(0, 24)
  bias = jax.random.normal(jax.random.key(1), (24, 24))
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    out = jaxattn.softmax_attention(q, k, v, bias=bias, mask=jnp.tril(jnp.ones((24, 24), bool)),
                                    implementation=("pallas_gpu", "xla"))
  msgs = _fallbacks(record)
  assert len(msgs) == 1, msgs
  assert "'pallas_gpu'" in msgs[0] and "does not take boolean mask arrays" in msgs[0]
  testing.assert_close(out, _ref(q, k, v, bias=bias, mask=masks.Causal()))


class _Tight(backend_lib.Backend):
  """A kernel backend whose compile runs out of shared memory (or fails otherwise)."""

  kernel = True

  def __init__(self, name, message):
    self.name, self.message, self.calls = name, message, 0

  def fwd(self, call, config, args):
    self.calls += 1
    raise RuntimeError(self.message)


@pytest.fixture
def tight(monkeypatch):
  def make(message):
    b = _Tight(f"tight{len(softmax_api.BACKENDS)}", message)
    monkeypatch.setitem(softmax_api.BACKENDS, b.name, b)
    return b
  return make


def test_resource_exhausted_trial_compile_falls_back_on_gpu(tight):
  b = tight("RESOURCE_EXHAUSTED: Shared memory size limit exceeded: requested 232448, available 232448")
  q, k, v = _qkv(2, 40)
  with backend_lib.use_platform("gpu"), warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    out = jaxattn.softmax_attention(q, k, v, mask=masks.Causal(), implementation=(b.name, "xla"))
  msgs = _fallbacks(record)
  assert len(msgs) == 1, msgs
  assert f"'{b.name}'" in msgs[0] and "do not fit" in msgs[0] and "Shared memory" in msgs[0]
  assert b.calls == 1  # only the trial compile traced it
  testing.assert_close(out, _ref(q, k, v, mask=masks.Causal()))


def test_trial_compile_skipped_on_cpu_and_other_errors_raise(tight):
  q, k, v = _qkv(3, 40)
  b = tight("RESOURCE_EXHAUSTED: vmem")
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):  # no trial compile on CPU: the error surfaces
    jaxattn.softmax_attention(q, k, v, implementation=(b.name, "xla"))
  broken = tight("kernel exploded")
  with backend_lib.use_platform("gpu"), pytest.raises(RuntimeError, match="kernel exploded"):
    jaxattn.softmax_attention(q, k, v, implementation=(broken.name, "xla"))


def test_explicit_name_raises():
  q, k, v = _qkv(4, 16)
  with pytest.raises(NotImplementedError, match=r"'pallas_tpu' cannot serve this call: pallas_tpu does not take"):
    jaxattn.softmax_attention(q, k, v, mask=jnp.ones((16, 16), bool), implementation="pallas_tpu")
  with pytest.raises(NotImplementedError, match="cudnn needs a GPU"):
    jaxattn.softmax_attention(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match="unknown implementation 'flash'"):
    jaxattn.softmax_attention(q, k, v, implementation=("flash", "xla"))


# ------------------------------------------------------------------------------------------------- configs
_SHAPE = re.compile(r"^(pallas_gpu: |pallas_tpu: )?\w+\.\w+=\S+ (must|breaks)")


@pytest.mark.parametrize("name, make", [
    ("xla", lambda: BlockSizes(0, 16)),
    ("xla", lambda: BlockSizes(16, 16, block_k_dkv=-8)),
    ("pallas_gpu", lambda: PallasGpuConfig(48, 64)),
    ("pallas_gpu", lambda: PallasGpuConfig(64, 64, num_warps=3)),
    ("pallas_tpu", lambda: PallasTpuConfig(128, 100)),
    ("pallas_tpu", lambda: PallasTpuConfig(64, 128)),  # block_q_dkv = 64 is a lane dim of the dk/dv kernel
])
def test_invalid_config_raises_value_error_with_one_message_shape(name, make):
  q, k, v = _qkv(5, 200, 300, D=128)
  with pytest.raises(ValueError) as e:
    jaxattn.softmax_attention(q, k, v, implementation=(name, make()))
  assert _SHAPE.match(str(e.value)), str(e.value)
  assert name == "xla" or str(e.value).startswith(f"{name}: ")


@pytest.mark.parametrize("name, tiles", [("pallas_gpu", BlockSizes(48, 64)), ("pallas_tpu", BlockSizes(128, 100))])
def test_invalid_block_sizes_shorthand_raises_even_in_a_chain(name, tiles):
  q, k, v = _qkv(6, 200, 300, D=128)
  for impl in (name, (name, "xla")):  # never a silent replacement, also not when falling back is allowed
    with pytest.raises(ValueError, match=rf"^{name}: Pallas\w+Config\.block_\w+=\d+ "):
      jaxattn.softmax_attention(q, k, v, implementation=impl, block_sizes=tiles)
  with pytest.raises(ValueError, match="not both"):
    jaxattn.softmax_attention(q, k, v, implementation=("xla", BlockSizes(16, 16)), block_sizes=tiles)
  with pytest.raises(ValueError, match="must be a jaxattn.ops.softmax.config.PallasTpuConfig"):
    jaxattn.softmax_attention(q, k, v, implementation=("pallas_tpu", BlockSizes(128, 128)))


def _scan_lengths(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)
  lengths = []

  def walk(j):
    for eqn in j.eqns:
      if eqn.primitive.name == "scan":
        lengths.append(eqn.params["length"])
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)

  walk(jaxpr.jaxpr)
  return lengths


def test_name_config_pair_sets_the_tiles():
  q, k, v = _qkv(7, 64)
  run = lambda impl, **kw: (lambda q, k, v: jaxattn.softmax_attention(q, k, v, mask=masks.Causal(),
                                                                        implementation=impl, **kw))
  # lax.map over query blocks: its length is T / block_q.
  assert _scan_lengths(run("xla"), q, k, v) == [1]  # default: one 64-row block
  assert _scan_lengths(run(("xla", BlockSizes(16, 32))), q, k, v) == [4]
  assert _scan_lengths(run(("xla", BlockSizes(32, 16))), q, k, v) == [2]
  assert _scan_lengths(run("xla", block_sizes=BlockSizes(16, 32)), q, k, v) == [4]  # the shorthand, same tiles
  ref = _ref(q, k, v, mask=masks.Causal())
  for blocks in (BlockSizes(16, 32), BlockSizes(8, 24, block_q_dq=16, block_k_dkv=40)):
    testing.assert_close(run(("xla", blocks))(q, k, v), ref, name=str(blocks))


def test_resolve_backend():
  q, k, v = _qkv(8, 24)
  call = softmax_api.make_call(q, k, v, mask=masks.Causal(), return_lse=True)
  b, c = softmax_api.resolve_backend(call)
  assert b is xla.BACKEND and c == BlockSizes(24, 24)
  b, c = softmax_api.resolve_backend(call, ("pallas_tpu", PallasTpuConfig(128, 128, vmem_limit_bytes=1 << 25)))
  assert b.name == "pallas_tpu" and c.vmem_limit_bytes == 1 << 25
  assert softmax_api.resolve_backend(call, ["reference"])[0] is reference.BACKEND
  (out, lse), res = xla.BACKEND.fwd(call, BlockSizes(8, 8), (q, k, v, None, None, None))
  assert isinstance(res, SoftmaxResiduals) and res.lse.shape == (1, 4, 24) and res.lse.dtype == jnp.float32
  testing.assert_close(out, _ref(q, k, v, mask=masks.Causal()))


def test_jit_cache_is_keyed_by_platform(monkeypatch):
  calls = []
  fwd = reference.ReferenceBackend.fwd

  def spy(self, call, config, args):
    calls.append(call)
    return fwd(self, call, config, args)

  monkeypatch.setattr(reference.ReferenceBackend, "fwd", spy)
  monkeypatch.setitem(softmax_api.DEFAULTS, "tpu", ("reference",))
  q, k, v = _qkv(9, 20)
  jaxattn.softmax_attention(q, k, v)  # CPU: xla
  assert calls == []
  with backend_lib.use_platform("tpu"):
    jaxattn.softmax_attention(q, k, v)  # same shapes, other platform: not the cached CPU trace
  assert len(calls) == 1


# ------------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", ["xla"])
def test_grads_run_the_backends_bwd_once_with_needs(name, monkeypatch):
  be = softmax_api.BACKENDS[name]
  seen = []
  bwd = type(be).bwd

  def spy(self, call, config, residuals, cotangents, needs):
    seen.append(needs)
    return bwd(self, call, config, residuals, cotangents, needs)

  monkeypatch.setattr(type(be), "bwd", spy)
  q, k, v = _qkv(10, 28, 36)
  bias = jax.random.normal(jax.random.key(11), (1, 4, 28, 36))
  mask = masks.Causal(8)
  f = lambda q, k, v, bias: jnp.sum(jnp.sin(jaxattn.softmax_attention(q, k, v, bias=bias, mask=mask,
                                                                      implementation=name)))
  grads = jax.grad(f, (0, 1, 2, 3))(q, k, v, bias)
  assert seen == [(True, True, True, True, False, False)]
  hi = jax.lax.Precision.HIGHEST

  def dense(q, k, v, bias):  # an independent dense definition, differentiated by autodiff
    kk, vv = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, kk, precision=hi) * 16 ** -0.5 + bias
    s = jnp.where(mask.to_dense(28, 36), s, -jnp.inf)
    return jnp.sum(jnp.sin(jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(s, -1), vv, precision=hi)))

  want = jax.grad(dense, (0, 1, 2, 3))(q, k, v, bias)
  for n, g, w in zip(("dq", "dk", "dv", "dbias"), grads, want):
    assert float(jnp.max(jnp.abs(w))) > 1e-3, n  # not a test on zeros
    testing.assert_close(g, w, kind="grad", name=f"{name} {n}")
  seen.clear()
  dq = jax.grad(f)(q, k, v, bias)  # only q differentiated: the backward is told so
  assert seen == [(True, False, False, False, False, False)]
  testing.assert_close(dq, want[0], kind="grad", name=f"{name} dq alone")


def test_reference_is_differentiated_by_jax_itself(monkeypatch):
  """``autodiff`` backends (the references) run without the custom_vjp: their ``bwd`` is never called and
  second derivatives work."""
  be = softmax_api.BACKENDS["reference"]
  assert be.autodiff
  monkeypatch.setattr(type(be), "bwd", lambda *a: pytest.fail("reference bwd called"))
  q, k, v = _qkv(12, 16, 16)
  f = lambda q: jnp.sum(jnp.sin(jaxattn.softmax_attention(q, k, v, mask=masks.Causal(), implementation="reference")))
  g2 = jax.grad(lambda q: jnp.sum(jax.grad(f)(q)))(q)
  assert float(jnp.max(jnp.abs(g2))) > 0
