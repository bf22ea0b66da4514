"""context_parallel_linear_attention == single-device linear_attention on 8 CPU devices (outputs, final states,
gradients including the decays and the initial state)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import testing
from jaxattn.parallel import context_parallel_linear_attention
from tests.parallel import common

B, T, H, G, D = 2, 64, 4, 2, 8
DEFAULT = {("head", True, True), ("token", False, True), ("none", True, False)}
CASES = [pytest.param(d, s0, c, marks=() if (d, s0, c) in DEFAULT else pytest.mark.slow,
                      id=f"{d}-{'init' if s0 else 'zero'}-{'causal' if c else 'noncausal'}")
         for d in ("none", "head", "token") for s0 in (False, True) for c in (True, False) if c or d == "none"]


def _inputs(seed):
  q, k, v = testing.random_qkv(seed, B=B, T=T, H=H, G=G, D=D)
  rng = np.random.default_rng(seed)
  decays = {"none": None, "head": jnp.asarray(-rng.uniform(0.01, 0.5, H), jnp.float32),
            # per-token gates with a full reset and a run of strong decays spanning shards (weights are
            # exponentials of direct sums: no overflow, no cancellation)
            "token": jnp.asarray(np.log(rng.uniform(0.3, 1.0, (B, T, H))), jnp.float32).at[1, 20, 0].set(-jnp.inf)
                     .at[0, 14:30].set(-30.0)}
  s0 = jnp.asarray(rng.standard_normal((B, H, D, D)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
  w_state = jnp.asarray(rng.standard_normal((B, H, D, D)), jnp.float32)
  return q, k, v, decays, s0, w, w_state


@pytest.mark.parametrize("decay,with_init,causal", CASES)
def test_matches_single_device(decay, with_init, causal):
  q, k, v, decays, s0, w, w_state = _inputs(7)
  g, s0 = decays[decay], (s0 if with_init else None)
  mesh = common.mesh_1d()

  def loss(fn, q, k, v, g, s0):
    out, state = fn(q, k, v, log_decay=g, initial_state=s0, causal=causal, return_final_state=True)
    return jnp.sum(out * w) + jnp.sum(state * w_state), (out, state)

  cp = lambda *a, **kw: context_parallel_linear_attention(*a, mesh=mesh, seq_axis="seq", **kw)
  argnums = (0, 1, 2) + ((3,) if g is not None else ()) + ((4,) if s0 is not None else ())
  run = lambda fn: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), argnums, has_aux=True))(q, k, v, g, s0)
  (_, (out, state)), grads = run(cp)
  (_, (r_out, r_state)), r_grads = run(jaxattn.linear_attention)
  testing.assert_close(out, r_out, name="out")
  testing.assert_close(state, r_state, name="final state", rms=1e-5)
  testing.assert_close(grads[:3], r_grads[:3], kind="grad", name="dq, dk, dv")
  for name, a, b in zip(("d log_decay" if g is not None else "d initial_state", "d initial_state"), grads[3:],
                        r_grads[3:]):
    # the decay gradient sums B*T*D*E terms of both signs (a per-head entry can be much smaller than the terms):
    # bound its error relative to the gradient's scale (against f64, this CP result is the closer of the two).
    scale = float(jnp.max(jnp.abs(b)))
    with testing.override(jnp.float32, "grad", atol=2e-5 * max(scale, 1.0), rtol=2e-5,
                          reason="f32 accumulation of a reduction over all tokens"):
      testing.assert_close(a, b, kind="grad", name=name)


def test_errors():
  q, k, v, _, _, _, _ = _inputs(0)
  mesh = common.mesh_1d()
  with pytest.raises(ValueError, match="either mesh= and seq_axis= or axis_name="):
    context_parallel_linear_attention(q, k, v)
  with pytest.raises(ValueError, match="T=60 is not a multiple of the 'seq' axis size 8"):
    context_parallel_linear_attention(q[:, :60], k[:, :60], v[:, :60], mesh=mesh, seq_axis="seq")
  with pytest.raises(ValueError, match="log_decay must have shape"):
    context_parallel_linear_attention(q, k, v, mesh=mesh, seq_axis="seq", log_decay=jnp.zeros((3,)))
  with pytest.raises(ValueError, match="'data' is not an axis of the mesh"):
    context_parallel_linear_attention(q, k, v, mesh=mesh, seq_axis="seq", batch_axis="data")
