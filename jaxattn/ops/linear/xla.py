r"""``implementation="xla"``: chunkwise (Lightning-2 style) linear attention in pure JAX.

The sequence is cut into ``N`` chunks of ``C`` tokens (the last one zero-padded: padded keys and values are 0 and
padded log decays 0, so they change nothing). With local indices ``i, j`` in a chunk, ``g`` the log decays and the
state ``S_c`` entering chunk ``c``:

.. math::
   o_i = \mathrm{scale}\Big(\sum_{j \le i} e^{L_{ij}} (q_i \cdot k_j) v_j
         + e^{a_i} q_i^\top S_c\Big), \qquad
   S_{c+1} = e^{A_c} S_c + \sum_j e^{b_j} k_j v_j^\top

   L_{ij} = \sum_{j < s \le i} g_s, \quad a_i = \sum_{s \le i} g_s, \quad b_j = \sum_{s > j} g_s, \quad
   A_c = \sum_s g_s

All exponents are sums of log decays (each ``<= 0``), computed directly as (segment) sums, never as a difference of
two cumulative sums split across an ``exp`` (``e^{G_i} e^{-G_j}`` overflows once ``-G_j > 88``; efficient.md section 1)
and the masked upper triangle of ``L`` is set to ``-inf`` before the ``exp``. Per-head constant decays use the closed
forms ``L_{ij} = (i - j) g``, ``a_i = (i + 1) g``, ``b_j = (n_c - 1 - j) g``, ``A_c = n_c g`` (``n_c`` = valid tokens).

The intra-chunk part and the per-chunk state increments are batched over all chunks; only the cheap state recurrence
``S_{c+1} = e^{A_c} S_c + U_c`` is a ``lax.scan``. Gradients (``bwd``, run by :func:`jaxattn.backend.flash_vjp`; see
``_backward``): ``fwd`` keeps only the chunk-boundary states, the backward recomputes the intra-chunk matrices, with a
reverse ``lax.scan`` for the state gradient, and skips the log-decay terms when the decay is not differentiated.
``causal=False`` is two matmuls, differentiated by ``jax.vjp``.

Config: :class:`~jaxattn.ops.linear.config.XlaConfig` (``chunk_size``: any positive int, default ``min(64, T)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn._vma import match_vma, sum_to_vma
from jaxattn.backend import Backend
from jaxattn.ops.linear.config import (DEFAULT_XLA_CHUNK, FINITE_LOG_DECAY_FLOOR, LinearCall, LinearResiduals,
                                         XlaConfig, check_positive_int)
from jaxattn.ops.nonfinite import poison_rows, sanitize

class XlaBackend(Backend):
  """Chunkwise linear attention in pure JAX: every option (causal or not, every decay kind, states, GQA, dtypes)."""

  name = "xla"
  Config = XlaConfig

  def default_config(self, call: LinearCall) -> XlaConfig:
    return XlaConfig(chunk_size=max(1, min(DEFAULT_XLA_CHUNK, call.T)))

  def validate_config(self, call: LinearCall, config: XlaConfig) -> None:
    check_positive_int(f"{self.name}: {type(config).__name__}", "chunk_size", config.chunk_size)

  def fwd(self, call: LinearCall, config: XlaConfig, args):
    q, k, v, log_decay, initial_state = args
    if not call.causal:
      out, state = _noncausal(q, k, v, initial_state, call.scale)
      return (out, state), LinearResiduals(q, k, v, log_decay, initial_state, state)
    s0, g = _causal_inputs(q, v, log_decay, initial_state)
    out, state, S_in = _forward(q, k, v, g, s0, call.scale, _chunk(call, config))
    return (out, state), LinearResiduals(q, k, v, log_decay, initial_state, state, S_in)

  def bwd(self, call: LinearCall, config: XlaConfig, residuals: LinearResiduals, cotangents, needs):
    q, k, v, log_decay, initial_state, _, S_in = residuals
    dout, dstate = cotangents
    if not call.causal:
      f = lambda q, k, v, s0: _noncausal(q, k, v, s0, call.scale)
      _, vjp = jax.vjp(f, q, k, v, initial_state)
      dq, dk, dv, d_init = vjp((dout, dstate))
      return dq, dk, dv, None, d_init
    s0, g = _causal_inputs(q, v, log_decay, initial_state)
    decay_grad = log_decay is not None and needs[3]
    dq, dk, dv, dg, d_init = _backward(q, k, v, g, s0, S_in, dout, dstate, call.scale, _chunk(call, config),
                                       decay_grad=decay_grad)
    if dg is not None:  # the clamp: no slope below the floor (a reset)
      dg = jnp.where(log_decay >= FINITE_LOG_DECAY_FLOOR, dg, 0.0)
    d_init = None if initial_state is None else d_init
    return sum_to_vma((dq, dk, dv, dg, d_init), (q, k, v, log_decay, initial_state))


def _chunk(call: LinearCall, config: XlaConfig) -> int:
  """The chunk length: the config's, at most ``T``."""
  return max(1, min(config.chunk_size, call.T))


def _causal_inputs(q, v, log_decay, initial_state):
  """``(initial state or f32 zeros, log decay clamped to the finite floor or None)``."""
  B, T, H, D = q.shape
  if initial_state is None:
    initial_state = jnp.zeros((B, H, D, v.shape[-1]), jnp.promote_types(q.dtype, jnp.float32))
  if log_decay is not None:
    log_decay = jnp.maximum(log_decay, FINITE_LOG_DECAY_FLOOR)
  return initial_state, log_decay


def _noncausal(q, k, v, initial_state, scale):
  """``o_t = scale * q_t^T (S_0 + sum_s k_s v_s^T)``: two matmuls, differentiated by autodiff."""
  B, T, H, D = q.shape
  G, E = v.shape[2], v.shape[3]
  R = H // G
  prec = _precision(q.dtype)
  kv = jnp.einsum("bsgd,bsge->bgde", k, v, preferred_element_type=jnp.float32, precision=prec)  # [B, G, D, E]
  state = jnp.broadcast_to(kv[:, :, None], (B, G, R, D, E)).reshape(B, H, D, E)
  if initial_state is not None:
    state = state + initial_state
  out = jnp.einsum("bthd,bhde->bthe", q.astype(jnp.float32), state, precision=prec) * scale
  return out.astype(q.dtype), state


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


# ------------------------------------------------------------------------------------------------ layout helpers
def _to_chunks(x, C):
  """``[B, T, *rest] -> [B, N, C, *rest]`` zero-padding ``T`` up to ``N * C``."""
  B, T = x.shape[:2]
  N = -(-T // C)
  x = jnp.pad(x, [(0, 0), (0, N * C - T)] + [(0, 0)] * (x.ndim - 2))
  return x.reshape(B, N, C, *x.shape[2:])


def _decays(log_decay, T, G, R, C):
  """Chunk log decays ``(L [b, N, G, R, C, C] (-inf above the diagonal), a [b, N, G, R, C], b [b, N, G, R, C],
  A [b, N, G, R])`` with ``b = B`` for per-token gates and ``1`` for per-head constants, or all None."""
  N = -(-T // C)
  i = jnp.arange(C)
  causal = i[:, None] >= i[None, :]  # [C(i), C(j)]
  if log_decay is None:
    return jnp.where(causal, 0.0, -jnp.inf), None, None, None
  if log_decay.ndim == 1:  # per-head constant: closed forms
    g = log_decay.reshape(1, 1, G, R)  # [1, 1, G, R]
    n = jnp.clip(T - C * jnp.arange(N), 0, C).astype(jnp.float32)  # valid tokens per chunk [N]
    diff = (i[:, None] - i[None, :]).astype(jnp.float32)
    L = jnp.where(causal, g[..., None, None] * diff, -jnp.inf)  # [1, 1, G, R, C, C]
    a = g[..., None] * (i + 1).astype(jnp.float32)  # [1, 1, G, R, C]
    # max(., 0): a padded key j >= n must not get a positive exponent (its k is 0, but inf * 0 = NaN).
    b = g[..., None] * jnp.maximum(n[:, None] - 1 - i[None, :], 0.0)[None, :, None, None, :]  # [1, N, G, R, C]
    A = g * n[None, :, None, None]  # [1, N, G, R]
    return L, a, b, A
  B = log_decay.shape[0]
  g = _to_chunks(log_decay, C).reshape(B, N, C, G, R).transpose(0, 1, 3, 4, 2)  # [B, N, G, R, C]
  a = jnp.cumsum(g, axis=-1)
  # b_j = sum_{s > j} g_s as a reverse cumulative sum of the shifted gates (no subtraction, no cancellation).
  shifted = jnp.concatenate([g[..., 1:], jnp.zeros_like(g[..., :1])], axis=-1)
  b = jnp.flip(jnp.cumsum(jnp.flip(shifted, -1), axis=-1), -1)
  A = a[..., -1]
  # Segment sums L_ij = sum_{j < s <= i} g_s: cumulative sum over i of g_i masked to i > j.
  strict = i[:, None] > i[None, :]
  L = jnp.cumsum(jnp.where(strict, g[..., :, None], 0.0), axis=-2)  # [B, N, G, R, C(i), C(j)]
  L = jnp.where(causal, L, -jnp.inf)
  return L, a, b, A


# ----------------------------------------------------------------------------------------------------- forward
def _forward(q, k, v, log_decay, initial_state, scale, C):
  """Returns ``(out [B, T, H, E], final state [B, H, D, E] f32, chunk states [N, B, G, R, D, E] f32)``."""
  B, T, H, D = q.shape
  G, E = v.shape[2], v.shape[3]
  R = H // G
  N = -(-T // C)
  prec = _precision(q.dtype)
  f32 = jnp.promote_types(q.dtype, jnp.float32)  # f32 (f64 only in x64 debugging)
  (_, _, vc), (qc, kc, _) = _nonfinite_chunks(q, k, v, C)  # NaN rows / keys in the logits, zeroed values
  L, a, b, A = _decays(log_decay, T, G, R, C)

  # intra-chunk: ((Q K^T) * exp(L)) V; pairs with exp(L) = 0 (future keys, a reset between) are exact zeros.
  s = jnp.einsum("bncgrd,bnsgd->bngrcs", qc, kc, preferred_element_type=f32, precision=prec)  # [B,N,G,R,C,C]
  eL = jnp.exp(L)
  p = jnp.where(eL > 0, s * eL, 0.0)
  o = jnp.einsum("bngrcs,bnsge->bncgre", p.astype(v.dtype), vc, preferred_element_type=f32, precision=prec)

  # per-chunk state increments U_c = sum_j exp(b_j) k_j v_j^T
  if b is None:
    U = jnp.einsum("bnsgd,bnsge->nbgde", kc, vc, preferred_element_type=f32, precision=prec)[:, :, :, None]
  else:
    eb = jnp.exp(b).transpose(0, 1, 4, 2, 3)[..., None]  # [B|1, N, C, G, R, 1]
    kb = jnp.where(eb > 0, kc.astype(f32)[:, :, :, :, None, :] * eb, 0.0)  # [B, N, C, G, R, D]
    U = jnp.einsum("bnsgrd,bnsge->nbgrde", kb, vc.astype(f32), precision=prec)  # [N, B, G, R, D, E]
  S0 = initial_state.reshape(B, G, R, D, E)
  decay = None if A is None else jnp.exp(A).transpose(1, 0, 2, 3)[..., None, None]  # [N, B|1, G, R, 1, 1]
  S_final, S_in = _state_scan(S0, U, decay)  # S_in: state entering each chunk [N, B, G, R, D, E]

  # inter-chunk: exp(a_i) q_i^T S_c (exactly 0 after a reset in the chunk, even if S_c holds NaN)
  qS = jnp.einsum("bncgrd,nbgrde->bncgre", qc.astype(f32), S_in, precision=prec)
  if a is not None:
    ea = jnp.exp(a).transpose(0, 1, 4, 2, 3)[..., None]  # [B|1, N, C, G, R, 1]
    qS = jnp.where(ea > 0, qS * ea, 0.0)
  o = o + qS
  out = (o * scale).reshape(B, N * C, H, E)[:, :T].astype(q.dtype)
  return out, S_final.reshape(B, H, D, E), S_in


def _state_scan(S0, U, decay):
  """``S_{c+1} = decay_c * S_c + U_c``; returns ``(S_N, [S_0 .. S_{N-1}])``."""

  def step(S, xs):
    U_c, d_c = xs
    S_next = S + U_c if d_c is None else jnp.where(d_c == 0, 0.0, d_c * S) + U_c  # a reset drops a NaN state
    return S_next, S

  return lax.scan(step, match_vma(S0, U, decay), (U, decay))


# ---------------------------------------------------------------------------------------------------- backward
def _backward(q, k, v, log_decay, initial_state, S_in, dout, dS_final, scale, C, *, decay_grad: bool = True):
  r"""Gradients of the chunkwise form from the saved chunk-entry states ``S_in`` (the log-decay gradient is None
  without a decay or unless ``decay_grad``).

  With ``dO`` the output cotangent (times ``scale``), ``P = (Q K^T) * e^L`` and ``dP = (dO V^T) * e^L``:

  - intra: ``dQ += dP K``, ``dK += dP^T Q``, ``dV += P^T dO``, ``dL = (dO V^T) * P``-terms (below);
  - inter: ``dQ_i += e^{a_i} dO_i S_c^T``; the state cotangent entering chunk ``c`` from its outputs is
    ``dS_c^{out} = sum_i e^{a_i} q_i dO_i^T``;
  - the reverse sweep ``dS_c = dS_c^{out} + e^{A_c} dS_{c+1}`` (``dS_N`` = final-state cotangent) gives
    ``dK_j += e^{b_j} v_j dS_{c+1}^T``-terms, ``dV_j += e^{b_j} dS_{c+1}^T k_j`` and ``dS_0`` for the initial state;
  - log-decay gradients from the exponents' cotangents: ``dL_{ij} = P_{ij} (dO_i \cdot v_j)``,
    ``da_i = (e^{a_i} q_i) \cdot (dO_i S_c)``, ``db_j = e^{b_j} k_j^T dS_{c+1} v_j``,
    ``dA_c = \langle e^{A_c} S_c, dS_{c+1} \rangle``, mapped back to ``g`` through the (segment) sums.
  """
  B, T, H, D = q.shape
  G, E = v.shape[2], v.shape[3]
  R = H // G
  N = -(-T // C)
  prec = _precision(q.dtype)
  f32 = jnp.promote_types(q.dtype, jnp.float32)  # f32 (f64 only in x64 debugging)
  # Non-finite inputs: zeroed operands for every product; rows / keys with a non-finite entry are NaN only in
  # the factors of the pairs they take part in (pq, pk, pv), and every decay that is exactly 0 selects a 0.
  (qc, kc, vc), (pq, pk, pv) = _nonfinite_chunks(q, k, v, C)
  qc, kc, vc, pq, pk, pv = (x.astype(f32) for x in (qc, kc, vc, pq, pk, pv))
  do = (_to_chunks(dout, C).astype(f32) * scale).reshape(B, N, C, G, R, E)  # scaled output cotangent
  L, a, b, A = _decays(log_decay, T, G, R, C)
  eL = jnp.exp(L)
  live = eL > 0  # pairs (i, j) of a chunk that interact: j <= i and no reset in (j, i]

  # ---- intra-chunk
  s = jnp.einsum("bncgrd,bnsgd->bngrcs", pq, pk, precision=prec)  # [B, N, G, R, C, C]
  p = jnp.where(live, s * eL, 0.0)
  dpv = jnp.einsum("bncgre,bnsge->bngrcs", do, pv, precision=prec)  # dO_i . v_j
  ds = jnp.where(live, dpv * eL, 0.0)  # d s_ij
  dq = jnp.einsum("bngrcs,bnsgd->bncgrd", ds, kc, precision=prec)
  dk = jnp.einsum("bngrcs,bncgrd->bnsgd", ds, qc, precision=prec)
  dv = jnp.einsum("bngrcs,bncgre->bnsge", p, do, precision=prec)
  dL = jnp.where(live, p * dpv, 0.0)  # cotangent of the exponent L (0 where the pair does not interact)

  # ---- inter-chunk: o_i += e^{a_i} q_i^T S_c
  ea = None if a is None else jnp.exp(a).transpose(0, 1, 4, 2, 3)[..., None]  # [B|1, N, C, G, R, 1]
  dqa = jnp.einsum("bncgre,nbgrde->bncgrd", do, S_in, precision=prec)  # d(e^a q)
  if ea is not None:  # after a reset in the chunk e^a = 0 exactly: S_c (maybe NaN) must not reach dq or da
    dqa = jnp.where(ea > 0, dqa, 0.0)
  qa = pq if ea is None else jnp.where(ea > 0, pq * ea, 0.0)
  dq = dq + (dqa if ea is None else dqa * ea)
  dS_out = jnp.einsum("bncgrd,bncgre->nbgrde", qa, do, precision=prec)  # [N, B, G, R, D, E]

  # ---- reverse sweep over chunks: dS_c (cotangent of the state entering chunk c)
  decay = None if A is None else jnp.exp(A).transpose(1, 0, 2, 3)[..., None, None]  # [N, B|1, G, R, 1, 1]
  dS_N = (jnp.zeros((B, H, D, E), f32) if dS_final is None else dS_final.astype(f32)).reshape(B, G, R, D, E)

  def step(dS_next, xs):
    dS_out_c, d_c = xs
    dS_c = dS_out_c + (dS_next if d_c is None else jnp.where(d_c == 0, 0.0, d_c * dS_next))
    return dS_c, dS_next  # emit the cotangent of S_{c+1} for chunk c's increments

  dS_0, dS_next = lax.scan(step, match_vma(dS_N, dS_out, decay), (dS_out, decay), reverse=True)  # dS_next[c] = dS_{c+1}

  # U_c = sum_j e^{b_j} k_j v_j^T  ->  dk_j = e^{b_j} dS_{c+1} v_j, dv_j = e^{b_j} dS_{c+1}^T k_j
  if b is None:
    dSg = dS_next.sum(axis=3)  # [N, B, G, D, E]: without decay every query head of a group shares U
    dk = dk + jnp.einsum("nbgde,bnsge->bnsgd", dSg, pv, precision=prec)
    dv = dv + jnp.einsum("nbgde,bnsgd->bnsge", dSg, pk, precision=prec)
  else:
    eb = jnp.exp(b).transpose(0, 1, 4, 2, 3)  # [B|1, N, C, G, R]
    dkb = jnp.einsum("nbgrde,bnsge->bnsgrd", dS_next, pv, precision=prec)  # d(e^b k) [B, N, C, G, R, D]
    dkb = jnp.where(eb[..., None] > 0, dkb, 0.0)  # a key whose increment a reset drops gets no gradient
    dk = dk + jnp.einsum("bnsgrd,bnsgr->bnsgd", dkb, jnp.broadcast_to(eb, dkb.shape[:-1]), precision=prec)
    kb = jnp.where(eb[..., None] > 0, pk[:, :, :, :, None, :] * eb[..., None], 0.0)  # [B, N, C, G, R, D]
    dv = dv + jnp.einsum("nbgrde,bnsgrd->bnsge", dS_next, kb, precision=prec)

  # do already carries the scale, so dq, dk, dv need no further factor.
  dq = dq.reshape(B, N * C, H, D)[:, :T].astype(q.dtype)
  dk = dk.reshape(B, N * C, G, D)[:, :T].astype(k.dtype)
  dv = dv.reshape(B, N * C, G, E)[:, :T].astype(v.dtype)
  d_init = dS_0.reshape(B, H, D, E).astype(initial_state.dtype)
  if log_decay is None or not decay_grad:
    return dq, dk, dv, None, d_init

  # ---- log-decay gradients: cotangents of the exponents L, a, b, A, then back through the (segment) sums
  da = jnp.einsum("bncgrd,bncgrd->bngrc", dqa, qa, precision=prec)  # [B, N, G, R, C]
  db = jnp.einsum("bnsgrd,bnsgrd->bngrs", dkb, kb, precision=prec)  # [B, N, G, R, C]
  dA = jnp.einsum("nbgrde,nbgrde->nbgr", jnp.where(decay > 0, dS_next * decay, 0.0), jnp.where(decay > 0, S_in, 0.0),
                  precision=prec).transpose(1, 0, 2, 3)  # [B, N, G, R]
  i = jnp.arange(C)
  if log_decay.ndim == 1:
    n = jnp.clip(T - C * jnp.arange(N), 0, C).astype(f32)  # valid tokens per chunk [N]
    diff = jnp.maximum(i[:, None] - i[None, :], 0).astype(f32)  # [C, C]
    coef_b = jnp.maximum(n[:, None] - 1 - i[None, :], 0.0)  # [N, C]
    dg = (jnp.einsum("bngrij,ij->gr", dL, diff, precision=prec)
          + jnp.einsum("bngrc,c->gr", da, (i + 1).astype(f32), precision=prec)
          + jnp.einsum("bngrc,nc->gr", db, coef_b, precision=prec)
          + jnp.einsum("bngr,n->gr", dA, n, precision=prec))
    return dq, dk, dv, dg.reshape(H).astype(log_decay.dtype), d_init
  # per-token gates g_s:  L_ij = sum_{j<s<=i} g_s  ->  dg_s += sum_{i>=s} sum_{j<s} dL_ij
  excl = _exclusive_cumsum(dL)  # [..., i, s] = sum_{j<s} dL_ij
  dg = jnp.sum(jnp.where(i[:, None] >= i[None, :], excl, 0.0), axis=-2)  # [B, N, G, R, C(s)]
  dg = dg + jnp.flip(jnp.cumsum(jnp.flip(da, -1), axis=-1), -1)  # a_i = sum_{s<=i} g_s
  dg = dg + _exclusive_cumsum(db)  # b_j = sum_{s>j} g_s  ->  dg_s += sum_{j<s} db_j
  dg = dg + dA[..., None]  # A = sum_s g_s
  dg = dg.transpose(0, 1, 4, 2, 3).reshape(B, N * C, H)[:, :T]
  return dq, dk, dv, dg.astype(log_decay.dtype), d_init


def _nonfinite_chunks(q, k, v, C):
  """``((q, k, v), (pq, pk, pv))`` in chunks: non-finite entries zeroed, and the poisoned copies in which a query
  row / token whose q, k or v had a non-finite entry is all-NaN (jaxattn.ops.nonfinite)."""
  B, T, H, D = q.shape
  G = k.shape[2]
  (qs, bad_q), (ks, bad_k), (vs, bad_v) = sanitize(q), sanitize(k), sanitize(v)
  bad_kv = bad_k | bad_v
  chunk = lambda x, y, z: (_to_chunks(x, C).reshape(B, -1, C, G, H // G, D), _to_chunks(y, C), _to_chunks(z, C))
  return chunk(qs, ks, vs), chunk(poison_rows(qs, bad_q), poison_rows(ks, bad_kv), poison_rows(vs, bad_kv))


def _exclusive_cumsum(x):
  """``y_s = sum_{j < s} x_j`` along the last axis (a shifted cumulative sum, no subtraction)."""
  return jnp.cumsum(jnp.concatenate([jnp.zeros_like(x[..., :1]), x[..., :-1]], axis=-1), axis=-1)


BACKEND = XlaBackend()
