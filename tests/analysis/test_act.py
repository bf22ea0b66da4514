"""ACT: matrix form against a numpy loop of the official algorithm; fused online-softmax and row-bias forms equal it."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import analysis, masks, testing
from jaxattn.ops.softmax.config import BlockSizes


def act_loop(A, beta, tau, keep_first):
  """The official per-head calibration of a square causal matrix, as a plain loop (float64)."""
  A = np.asarray(A, np.float64)
  n = A.shape[0]
  col = A.sum(0) / (n - np.arange(n))
  sinks = [j for j in range(n) if col[j] > tau]
  if keep_first and sinks:
    sinks = sinks[1:]
  non = [j for j in range(n) if j not in sinks]
  out = A.copy()
  for i in range(n):
    T_i, N_i = A[i, sinks].sum(), A[i, non].sum()
    if N_i == 0:
      continue
    out[i, sinks] = beta * A[i, sinks]
    out[i, non] = A[i, non] + (1 - beta) * T_i * A[i, non] / N_i
  return out


def _inputs(B=2, T=40, H=4, G=2, D=8, seed=0):
  q, k, v = testing.random_qkv(seed, B=B, T=T, H=H, G=G, D=D)
  bias = np.zeros((1, H, T, T), np.float32)
  bias[..., 0] += 3.0  # plant sinks: the first token and a later "delimiter"
  bias[..., 7] += 2.0
  return q, k, v, jnp.asarray(bias)


@pytest.mark.parametrize("keep_first", [True, False])
def test_matrix_form_matches_official_loop(keep_first):
  q, k, _, bias = _inputs()
  P = analysis.attention_probs(q, k, mask=masks.Causal(), bias=bias)
  got = np.asarray(analysis.act_calibrate(P, beta=0.4, tau=0.1, keep_first=keep_first))
  B, H = P.shape[:2]
  n_sinks = 0
  for b in range(B):
    for h in range(H):
      want = act_loop(P[b, h], 0.4, 0.1, keep_first)
      np.testing.assert_allclose(got[b, h], want, atol=1e-6)
      n_sinks += int(np.sum(np.abs(want - np.asarray(P[b, h], np.float64)).sum(0) > 1e-7))
  assert n_sinks > 0  # the calibration changed something
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_fused_and_row_bias_forms_equal_matrix_form():
  q, k, v, bias = _inputs()
  causal = masks.Causal()
  P = analysis.attention_probs(q, k, mask=causal, bias=bias)
  cal = analysis.act_calibrate(P)
  vh = jnp.repeat(v, 2, axis=2)
  want = jnp.einsum("bhts,bshe->bthe", cal, vh, precision="highest")
  fused, sinks = analysis.act_attention(q, k, v, mask=causal, bias=bias, block_sizes=BlockSizes(16, 16),
                                        return_sinks=True)
  np.testing.assert_allclose(fused, want, atol=1e-6, rtol=0)
  assert bool(sinks.any())
  # the row-dependent bias b_i on the sink keys reproduces the calibration inside an ordinary softmax
  b, sink = analysis.act_row_bias(P)
  np.testing.assert_array_equal(sink, sinks)
  row_bias = bias + b[..., :, None] * sink[..., None, :]
  out = jaxattn.softmax_attention(q, k, v, mask=causal, bias=row_bias, implementation="reference")
  np.testing.assert_allclose(out, want, atol=1e-6, rtol=0)
  # a single key bias log(beta) is not the same thing
  flat = jaxattn.softmax_attention(q, k, v, mask=causal, bias=bias + np.log(0.4) * sink[..., None, :],
                                   implementation="reference")
  assert float(jnp.abs(flat - want).max()) > 1e-3


def test_fused_selects_heads():
  q, k, v, bias = _inputs()
  causal = masks.Causal()
  both = analysis.act_attention(q, k, v, mask=causal, bias=bias, heads=(1, 3), block_sizes=BlockSizes(16, 16))
  plain = jaxattn.softmax_attention(q, k, v, mask=causal, bias=bias, implementation="reference")
  P = analysis.attention_probs(q, k, mask=causal, bias=bias)
  want = jnp.einsum("bhts,bshe->bthe", analysis.act_calibrate(P, heads=(1, 3)), jnp.repeat(v, 2, axis=2),
                    precision="highest")
  np.testing.assert_allclose(both, want, atol=1e-6, rtol=0)
  np.testing.assert_allclose(both[:, :, (0, 2)], plain[:, :, (0, 2)], atol=1e-6)
  assert float(jnp.abs(both[:, :, 1] - plain[:, :, 1]).max()) > 1e-4


def test_act_errors():
  P = jnp.full((1, 2, 4, 4), 0.25)
  with pytest.raises(ValueError, match="head 5 does not exist"):
    analysis.act_calibrate(P, heads=(5,))
  with pytest.raises(ValueError, match="beta"):
    analysis.act_calibrate(P, beta=1.5)
