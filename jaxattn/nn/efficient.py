r"""CAB's efficient-attention zoo as Flax NNX modules, and one registry (:data:`ZOO`) over them.

CAB (Zhang et al. 2023, arXiv:2210.07661; ``../shared/papers/efficient.md`` §5) sorts attention by pattern:
non-causal self (``"NS"``), causal self (``"CS"``), non-causal cross (``"NC"``) and causal cross (``"CC"``: decoder
cross-attention whose output ``i`` must not depend on target queries ``j > i``). Every module here declares the
patterns it supports in ``supported_patterns`` and raises ``ValueError`` naming any other pattern.

Families (each a pure function on heads plus a module that adds the projections; ``q [B, T, H, D]``,
``k [B, S, H, D]``, ``v [B, S, H, E]``, ``scale = D ** -0.5``):

=================  ===========  ==========================================================================
module             patterns     definition
=================  ===========  ==========================================================================
:class:`Nystrom`   NS           :func:`nystrom_attention`: ``softmax(Q~K^T) pinv(softmax(Q~K~^T)) softmax(Q~K^T) V``
                                with segment-mean landmarks ``Q~, K~`` and the iterative pseudo-inverse
:class:`Lara`      NS           :func:`lara_attention`: LARA's multiple-importance-sampling estimator evaluated at
                                the proposal means (deterministic; see the function for what is unverified)
:class:`ProbSparse` NS          :func:`probsparse_attention`: Informer's top-``u`` "active" queries get softmax
                                attention, the others the mean of ``V``
:class:`ABC`       NS CS NC CC  :func:`abc_attention`: ``n`` memory slots written by learned, sequence-normalised
                                control weights; queries read them with a softmax over slots
:class:`S4D`       NS CS        :func:`s4d_conv`: a diagonal state-space convolution per channel (bidirectional
                                for NS); no queries or keys
:class:`LongShort` NS CS        :func:`longshort_attention`: segment-wise sliding window plus dynamic low-rank
                                projections of the keys (Transformer-LS), one softmax over both
=================  ===========  ==========================================================================

:data:`ZOO` adds the existing modules: dense softmax (:class:`jaxattn.nn.MultiHeadAttention`, all four patterns),
local sliding-window softmax (a :class:`jaxattn.masks.Local` mask, NS / CS) and the feature-map linear attentions of
:class:`jaxattn.nn.LinearAttention` (cosFormer NS / NC, Performer and elu+1 all four). :class:`VanillaSoftmax` is
CAB's "vanilla" (the ``T x S`` matrix materialised), the dense baseline of the efficiency-length measurement
(``python -m experiments cab``). :func:`make` builds a zoo member for a pattern::

    >>> from flax import nnx
    >>> from jaxattn.nn import efficient
    >>> layer = efficient.make("abc", "CS", num_heads=4, in_features=64, rngs=nnx.Rngs(0))
    >>> efficient.make("nystrom", "CS", num_heads=4, in_features=64, rngs=nnx.Rngs(0))
    Traceback (most recent call last):
    ...
    ValueError: 'nystrom' does not support the CAB pattern 'CS' (causal self); it supports NS

Lengths need not be multiples of the landmark count or the window: segments are as equal as possible (sizes differ
by at most one) and padded window positions are masked.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.nn._checks import head_layout, positive_int

__all__ = [
    "PATTERNS", "PATTERN_NAMES", "ZOO", "ZooEntry", "make", "check_pattern",
    "Nystrom", "Lara", "ProbSparse", "ABC", "S4D", "LongShort", "VanillaSoftmax",
    "nystrom_attention", "lara_attention", "probsparse_attention", "abc_attention", "s4d_kernel", "s4d_conv",
    "longshort_attention", "segment_means",
]

PATTERNS = ("NS", "CS", "NC", "CC")
PATTERN_NAMES = {"NS": "non-causal self", "CS": "causal self", "NC": "non-causal cross", "CC": "causal cross"}
_HI = jax.lax.Precision.HIGHEST


def check_pattern(name: str, pattern: str, supported) -> str:
  """``pattern`` if it is one of ``supported``; ValueError naming it (and what ``name`` supports) otherwise."""
  if pattern not in PATTERNS:
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
  if pattern not in supported:
    ok = " ".join(p for p in PATTERNS if p in supported)
    raise ValueError(f"{name!r} does not support the CAB pattern {pattern!r} ({PATTERN_NAMES[pattern]}); it "
                     f"supports {ok}")
  return pattern


# ============================================================================================ functional cores
def segment_means(x, num_segments: int):
  """Means of ``num_segments`` contiguous, near-equal segments along axis 1: ``[B, L, ...] -> [B, m, ...]``.

  Position ``t`` belongs to segment ``floor(t * m / L)``, so segment sizes differ by at most one (``L`` need not be a
  multiple of ``m``; requires ``m <= L``).
  """
  L = x.shape[1]
  seg = (np.arange(L) * num_segments) // L
  avg = np.zeros((num_segments, L), np.float32)
  avg[seg, np.arange(L)] = 1.0
  avg /= avg.sum(1, keepdims=True)
  return jnp.einsum("ml,bl...->bm...", jnp.asarray(avg), x.astype(jnp.float32), precision=_HI)


def _softmax_logits(a, b, scale):
  """``softmax(scale * a b^T)`` over the last axis: ``a [B, X, H, D]``, ``b [B, Y, H, D]`` -> ``[B, H, X, Y]``."""
  return jax.nn.softmax(jnp.einsum("bxhd,byhd->bhxy", a, b, precision=_HI) * scale, axis=-1)


def _iterative_pinv(a, iterations: int):
  """Nyströmformer's Moore-Penrose iteration for ``pinv(a)``, ``a [..., m, m]`` row-stochastic.

  ``Z_0 = a^T / (max_j sum_i a_ij * max_i sum_j a_ij)`` (per batch and head), then
  ``Z <- Z (13 I - a Z (15 I - a Z (7 I - a Z))) / 4``.
  """
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  col = jnp.max(jnp.sum(a, axis=-2), axis=-1)[..., None, None]
  row = jnp.max(jnp.sum(a, axis=-1), axis=-1)[..., None, None]
  z = jnp.swapaxes(a, -1, -2) / (col * row)
  mm = lambda x, y: jnp.matmul(x, y, precision=_HI)
  for _ in range(iterations):
    az = mm(a, z)
    z = 0.25 * mm(z, 13 * eye - mm(az, 15 * eye - mm(az, 7 * eye - az)))
  return z


def nystrom_attention(q, k, v, *, num_landmarks: int = 16, pinv_iterations: int = 6, scale: float | None = None):
  r"""Nyströmformer (Xiong et al. 2021), non-causal self-attention.

  .. math:: \mathrm{out} = \mathrm{softmax}(s\,Q\tilde K^\top)\; Z\; \big(\mathrm{softmax}(s\,\tilde Q K^\top) V\big),
     \qquad Z \approx \mathrm{pinv}(\mathrm{softmax}(s\,\tilde Q \tilde K^\top))

  with landmarks ``Q~, K~`` the :func:`segment_means` of ``q`` and ``k`` (``m = min(num_landmarks, T)``) and ``Z`` from
  ``pinv_iterations`` Moore-Penrose iterations (:func:`_iterative_pinv`). The optional depth-wise convolution skip
  of the paper is not included. Cost ``O(T m (D + E) + m^3)``.

  Args:
    q: ``[B, T, H, D]``; k: ``[B, T, H, D]``; v: ``[B, T, H, E]``.

  Returns:
    ``[B, T, H, E]`` in f32.
  """
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  m = min(num_landmarks, q.shape[1])
  ql, kl = segment_means(q, m), segment_means(k, m)  # [B, m, H, D]
  k1 = _softmax_logits(q, kl, scale)  # [B, H, T, m]
  k2 = _softmax_logits(ql, kl, scale)  # [B, H, m, m]
  k3 = _softmax_logits(ql, k, scale)  # [B, H, m, S]
  z = _iterative_pinv(k2, pinv_iterations)
  kv = jnp.einsum("bhms,bshe->bhme", k3, v, precision=_HI)  # [B, H, m, E]
  out = jnp.einsum("bhtm,bhmn,bhne->bthe", k1, z, kv, precision=_HI)
  return out


def lara_attention(q, k, v, *, num_landmarks: int = 16, scale: float | None = None):
  r"""LARA (linear randomized attention, Zheng et al. 2022) in a deterministic evaluation form, non-causal self.

  LARA estimates softmax attention by self-normalised multiple importance sampling with ``C`` Gaussian proposals
  ``N(mu_c, I)`` centred at landmarks. Evaluating each proposal at its own mean (``omega_c = mu_c``, no noise) makes the
  proposal densities constant and leaves a linear attention with ``C`` query-specific features:

  .. math:: \mathrm{out}_i = \frac{\sum_c w_{ic} \sum_j \psi_{jc} v_j}{\sum_c w_{ic} \sum_j \psi_{jc}},\quad
     w_{ic} = \alpha_{ic}\, e^{\mu_c^\top q_i},\ \alpha_{ic} = \mathrm{softmax}_c(\mu_c^\top q_i),\
     \psi_{jc} = e^{\mu_c^\top k_j - |k_j|^2/2}

  with ``q, k`` pre-scaled by ``scale ** 0.5`` (so ``q.k`` carries ``scale``) and ``mu_c`` the sum of the
  :func:`segment_means` of the scaled queries and keys. Exponents are shifted by their maxima (a per-row shift of
  ``w`` and one shift of ``psi`` per batch and head), which cancel in the ratio.

  Unverified: the choice ``mu_c = q~_c + k~_c``, the mixing weights ``alpha`` and evaluation at the proposal means
  are this library's reading of the method, not checked against the LARA paper or code.

  Returns:
    ``[B, T, H, E]`` in f32.
  """
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  qs, ks = q * math.sqrt(scale), k * math.sqrt(scale)
  c = min(num_landmarks, q.shape[1], k.shape[1])
  mu = segment_means(qs, c) + segment_means(ks, c)  # [B, C, H, D]
  qmu = jnp.einsum("bthd,bchd->bthc", qs, mu, precision=_HI)
  alpha = jax.nn.softmax(qmu, axis=-1)
  w = alpha * jnp.exp(qmu - jax.lax.stop_gradient(jnp.max(qmu, axis=-1, keepdims=True)))  # [B, T, H, C]
  kl = jnp.einsum("bshd,bchd->bshc", ks, mu, precision=_HI) - 0.5 * jnp.sum(ks * ks, -1, keepdims=True)
  psi = jnp.exp(kl - jax.lax.stop_gradient(jnp.max(kl, axis=(1, 3), keepdims=True)))  # [B, S, H, C]
  num = jnp.einsum("bthc,bshc,bshe->bthe", w, psi, v, precision=_HI)
  den = jnp.einsum("bthc,bshc->bth", w, psi, precision=_HI)[..., None]
  return num / den


def probsparse_sizes(T: int, S: int, factor: int) -> tuple[int, int]:
  """``(u, U)``: active queries ``min(T, factor ceil(ln T))`` and sampled keys ``min(S, factor ceil(ln S))``."""
  return (min(T, factor * max(1, math.ceil(math.log(T)))), min(S, factor * max(1, math.ceil(math.log(S)))))


def probsparse_attention(q, k, v, *, factor: int = 5, scale: float | None = None):
  r"""ProbSparse self-attention (Informer, Zhou et al. 2021), non-causal.

  Each query's sparsity measurement is ``M_i = max_j s_ij - (1/S) sum_j s_ij`` over ``U`` sampled keys
  (``s = scale q.k``); the ``u`` queries with the largest ``M`` get full softmax attention, every other query gets the
  mean of ``V`` (Informer's "lazy" queries). ``(u, U)`` from :func:`probsparse_sizes`. Informer samples the keys at
  random; here they are ``U`` evenly spaced keys (``round(linspace(0, S - 1, U))``), so the layer is deterministic.
  Cost ``O((T U + u S) D)``.

  Returns:
    ``[B, T, H, E]`` in f32.
  """
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  T, S = q.shape[1], k.shape[1]
  u, U = probsparse_sizes(T, S, factor)
  idx = np.round(np.linspace(0, S - 1, U)).astype(np.int32)
  s_sample = jnp.einsum("bthd,buhd->bhtu", q, k[:, idx], precision=_HI) * scale
  meas = jnp.max(s_sample, -1) - jnp.sum(s_sample, -1) / S  # [B, H, T]
  top = jax.lax.top_k(jax.lax.stop_gradient(meas), u)[1]  # [B, H, u]
  sel = jax.nn.one_hot(top, T, dtype=jnp.float32)  # [B, H, u, T]
  q_top = jnp.einsum("bhut,bthd->bhud", sel, q, precision=_HI)
  p = jax.nn.softmax(jnp.einsum("bhud,bshd->bhus", q_top, k, precision=_HI) * scale, axis=-1)
  o_top = jnp.einsum("bhus,bshe->bhue", p, v, precision=_HI)  # [B, H, u, E]
  lazy = jnp.mean(v, axis=1)  # [B, H, E]
  chosen = jnp.sum(sel, axis=2)  # [B, H, T] (0 or 1)
  out = lazy[:, None] * (1.0 - chosen.transpose(0, 2, 1))[..., None] + jnp.einsum("bhut,bhue->bthe", sel, o_top,
                                                                                   precision=_HI)
  return out


def _scan_combine(a, b):
  """Associative merge of ``(max, weighted sums...)`` pairs for a numerically safe running softmax-weighted sum."""
  ma, *sa = a
  mb, *sb = b
  m = jnp.maximum(ma, mb)
  fa, fb = jnp.exp(ma - m), jnp.exp(mb - m)
  return (m, *[x * fa[..., None] + y * fb[..., None] for x, y in zip(sa, sb)])


def abc_attention(q, k, v, control, *, causal: bool = False, scale: float | None = None):
  r"""ABC (attention with bounded-memory control, Peng et al. 2022) with ``n`` memory slots.

  Slot ``c`` holds ``K~_c = sum_j a_jc k_j`` and ``V~_c = sum_j a_jc v_j`` with control weights
  ``a_jc = softmax_j(control_jc)`` normalised over the keys written so far: all ``S`` keys when non-causal, keys
  ``j <= i`` for causal self-attention (then the memory is a prefix state, computed with an associative scan in
  ``O(T n (D + E))`` memory). Queries read the memory with ``out_i = sum_c softmax_c(scale q_i.K~_c) V~_c``; each
  query reads it independently, so causal cross-attention is the non-causal formula.

  Args:
    q: ``[B, T, H, D]``; k: ``[B, S, H, D]``; v: ``[B, S, H, E]``.
    control: ``[B, S, H, n]`` control logits.
    causal: causal self-attention (``T == S``).

  Returns:
    ``[B, T, H, E]`` in f32.
  """
  q, k, v, control = (x.astype(jnp.float32) for x in (q, k, v, control))
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if not causal:
    a = jax.nn.softmax(control, axis=1)  # [B, S, H, n]
    km = jnp.einsum("bshn,bshd->bhnd", a, k, precision=_HI)
    vm = jnp.einsum("bshn,bshe->bhne", a, v, precision=_HI)
    p = jax.nn.softmax(jnp.einsum("bthd,bhnd->bthn", q, km, precision=_HI) * scale, axis=-1)
    return jnp.einsum("bthn,bhne->bthe", p, vm, precision=_HI)
  n = control.shape[-1]
  elems = (control,  # running max [B, T, H, n]
           jnp.broadcast_to(k[:, :, :, None, :], k.shape[:3] + (n, k.shape[-1])),
           jnp.broadcast_to(v[:, :, :, None, :], v.shape[:3] + (n, v.shape[-1])),
           jnp.ones(control.shape + (1,), jnp.float32))
  _, sk, sv, z = jax.lax.associative_scan(_scan_combine, elems, axis=1)
  km, vm = sk / z, sv / z  # [B, T, H, n, D|E]
  p = jax.nn.softmax(jnp.einsum("bthd,bthnd->bthn", q, km, precision=_HI) * scale, axis=-1)
  return jnp.einsum("bthn,bthne->bthe", p, vm, precision=_HI)


def s4d_kernel(log_dt, log_a_real, a_imag, c_real, c_imag, length: int):
  r"""The S4D convolution kernel ``K[c, l] = 2 Re(sum_n C~_cn exp(dt_c A_cn l))``, ``[C, L]`` f32.

  ``A = -exp(log_a_real) + i a_imag`` ``[C, N/2]``, ``dt = exp(log_dt)`` ``[C]``, zero-order hold ``B = 1``:
  ``C~ = C (exp(dt A) - 1) / A``. Written in real arithmetic as one reduction over ``n`` so XLA fuses it (no
  ``[C, N/2, L]`` temporary in the forward pass).
  """
  dt = jnp.exp(log_dt)[:, None]  # [C, 1]
  ar, ai = -jnp.exp(log_a_real) * dt, a_imag * dt  # dt A, [C, N2]
  # C~ = C (exp(dtA) - 1) / A = C dt (exp(dtA) - 1) / (dt A)
  er = jnp.exp(ar) * jnp.cos(ai) - 1.0
  ei = jnp.exp(ar) * jnp.sin(ai)
  den = ar * ar + ai * ai
  fr, fi = (er * ar + ei * ai) / den * dt, (ei * ar - er * ai) / den * dt  # (exp(dtA) - 1) / A
  ctr, cti = c_real * fr - c_imag * fi, c_real * fi + c_imag * fr
  ell = jnp.arange(length, dtype=jnp.float32)
  mag = jnp.exp(ar[..., None] * ell)  # [C, N2, L] (fused into the reduction)
  return 2.0 * jnp.sum(mag * (ctr[..., None] * jnp.cos(ai[..., None] * ell) - cti[..., None] *
                              jnp.sin(ai[..., None] * ell)), axis=1)


def _causal_conv(u, kernel):
  """``y_t = sum_{l <= t} K[l] u_{t - l}`` along axis 1 via FFT: ``u [B, L, C]``, ``kernel [C, L]``."""
  L = u.shape[1]
  n = 2 * L
  uf = jnp.fft.rfft(u, n=n, axis=1)
  kf = jnp.fft.rfft(kernel.T, n=n, axis=0)
  return jnp.fft.irfft(uf * kf[None], n=n, axis=1)[:, :L]


def s4d_conv(u, params: dict, *, causal: bool):
  r"""S4D (Gu et al. 2022): ``y = K * u + D u`` per channel, ``u [B, L, C] -> [B, L, C]`` f32.

  ``K`` is :func:`s4d_kernel` of ``params`` (``log_dt [C]``, ``log_a_real, a_imag, c_real, c_imag [C, N/2]``,
  ``d [C]``). Non-causal (NS): a second kernel from ``c_real_bwd, c_imag_bwd`` runs backwards in time and the two
  are added (a bidirectional SSM). Cost ``O(L log L)`` per channel.
  """
  u = u.astype(jnp.float32)
  L = u.shape[1]
  p = params
  y = _causal_conv(u, s4d_kernel(p["log_dt"], p["log_a_real"], p["a_imag"], p["c_real"], p["c_imag"], L))
  if not causal:
    kb = s4d_kernel(p["log_dt"], p["log_a_real"], p["a_imag"], p["c_real_bwd"], p["c_imag_bwd"], L)
    y = y + _causal_conv(u[:, ::-1], kb)[:, ::-1]
  return y + u * p["d"]


def longshort_attention(q, k, v, proj, *, window: int = 16, causal: bool = False, scale: float | None = None):
  r"""Transformer-LS (Zhu et al. 2021): short-range window plus long-range dynamic projection, one softmax.

  The sequence is cut into segments of ``w = window`` tokens (the last may be shorter). Query ``i`` in segment ``b``
  attends, under one softmax, to

  - short range: keys of segments ``b - 1, b, b + 1`` (non-causal) or ``b - 1, b`` with ``j <= i`` (causal);
  - long range, non-causal: ``r`` projected keys/values ``K- = P^T K``, ``V- = P^T V`` with
    ``P = softmax_j(proj)`` over the whole sequence (``proj [B, T, H, r]`` from a learned projection of the keys);
  - long range, causal: the same projection done per segment (``P`` normalised within each segment), and query ``i``
    sees the ``r`` slots of every segment before ``b`` — so no future token enters.

  The paper's DualLN is not included. Cost ``O(T (3w + r) D)`` non-causal, ``O(T (2w + r T / w) D)`` causal.

  Returns:
    ``[B, T, H, E]`` in f32.
  """
  q, k, v, proj = (x.astype(jnp.float32) for x in (q, k, v, proj))
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  B, T, H, D = q.shape
  E, r = v.shape[-1], proj.shape[-1]
  w = min(window, T)
  nb = -(-T // w)
  pad = nb * w - T
  padt = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  qb, kb, vb = (padt(x).reshape(B, nb, w, H, -1) for x in (q, k, v))  # [B, nb, w, H, .]
  valid = np.arange(nb * w) < T
  pos = np.arange(nb * w).reshape(nb, w)
  # short range: neighbouring segments (zero padding at both ends), keys [B, nb, nw*w, H, .]
  shifts = (-1, 0) if causal else (-1, 0, 1)

  def neighbours(x):
    xp = jnp.pad(x, ((0, 0), (1, 1)) + ((0, 0),) * (x.ndim - 2))
    return jnp.concatenate([xp[:, 1 + s:1 + s + nb] for s in shifts], axis=2)

  kn, vn = neighbours(kb), neighbours(vb)
  posp = np.pad(pos, ((1, 1), (0, 0)), constant_values=-1)
  kpos = np.concatenate([posp[1 + s:1 + s + nb] for s in shifts], axis=1)  # [nb, nw*w]
  allowed = (kpos >= 0) & (kpos < T)
  allowed = allowed[:, None, :] & np.ones((nb, w, 1), bool)
  if causal:
    allowed = allowed & (kpos[:, None, :] <= pos[:, :, None])
  s_local = jnp.einsum("bnqhd,bnkhd->bnhqk", qb, kn, precision=_HI) * scale
  s_local = jnp.where(jnp.asarray(allowed)[None, :, None], s_local, -jnp.inf)  # [B, nb, H, w, nw*w]
  if not causal:
    p = jax.nn.softmax(jnp.where(jnp.asarray(valid)[None, :, None, None], padt(proj), -jnp.inf), axis=1)
    kg = jnp.einsum("bthr,bthd->bhrd", p, padt(k), precision=_HI)
    vg = jnp.einsum("bthr,bthe->bhre", p, padt(v), precision=_HI)
    s_glob = jnp.einsum("bnqhd,bhrd->bnhqr", qb, kg, precision=_HI) * scale  # [B, nb, H, w, r]
    vg_b = None
  else:
    pr = padt(proj).reshape(B, nb, w, H, r)
    pr = jnp.where(jnp.asarray(valid.reshape(nb, w))[None, :, :, None, None], pr, -jnp.inf)
    p = jax.nn.softmax(pr, axis=2)  # within each segment
    kg = jnp.einsum("bnwhr,bnwhd->bhnrd", p, kb, precision=_HI).reshape(B, H, nb * r, D)
    vg = jnp.einsum("bnwhr,bnwhe->bhnre", p, vb, precision=_HI).reshape(B, H, nb * r, E)
    s_glob = jnp.einsum("bnqhd,bhmd->bnhqm", qb, kg, precision=_HI) * scale  # [B, nb, H, w, nb*r]
    seg_of = np.repeat(np.arange(nb), r)
    earlier = seg_of[None, :] < np.arange(nb)[:, None]  # [nb, nb*r]
    s_glob = jnp.where(jnp.asarray(earlier)[None, :, None, None, :], s_glob, -jnp.inf)
    vg_b = vg
  s = jnp.concatenate([s_local, s_glob], axis=-1)
  p_all = jax.nn.softmax(s, axis=-1)
  nl = kn.shape[2]
  out = jnp.einsum("bnhqk,bnkhe->bnqhe", p_all[..., :nl], vn, precision=_HI)
  out = out + jnp.einsum("bnhqr,bhre->bnqhe", p_all[..., nl:], vg if vg_b is None else vg_b, precision=_HI)
  return out.reshape(B, nb * w, H, E)[:, :T]


# ================================================================================================= modules
class _Projected(nnx.Module):
  """Query/key/value/output projections around a head-level attention core (subclasses define ``_attend``).

  Shapes: ``x [B, T, in_features]``, ``context [B, S, in_kv_features]`` (cross patterns), output
  ``[B, T, out_features]``; ``H`` heads of ``D = head_dim`` (default ``in_features // num_heads``).
  """

  supported_patterns: ClassVar[frozenset[str]] = frozenset()
  zoo_name: ClassVar[str] = ""

  def __init__(self, num_heads: int, in_features: int, *, causal: bool = False, head_dim: int | None = None,
               out_features: int | None = None, in_kv_features: int | None = None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.num_heads, self.in_features, _, self.head_dim, self.out_features = head_layout(
        num_heads, in_features, None, head_dim, out_features)
    self.in_kv_features = positive_int("in_kv_features", in_kv_features or in_features)
    self.causal = bool(causal)
    if self.causal and not ({"CS", "CC"} & self.supported_patterns):
      check_pattern(self.zoo_name, "CS", self.supported_patterns)
    H, D = self.num_heads, self.head_dim
    common = dict(use_bias=False, param_dtype=param_dtype, rngs=rngs)
    self.query = nnx.LinearGeneral(self.in_features, (H, D), **common)
    self.key = nnx.LinearGeneral(self.in_kv_features, (H, D), **common)
    self.value = nnx.LinearGeneral(self.in_kv_features, (H, D), **common)
    self.out = nnx.LinearGeneral((H, D), self.out_features, axis=(-2, -1), **common)

  def pattern(self, cross: bool) -> str:
    """The CAB pattern of a call: ``"NS"``, ``"CS"``, ``"NC"`` or ``"CC"``."""
    return ("C" if self.causal else "N") + ("C" if cross else "S")

  def _inputs(self, x, context):
    x = jnp.asarray(x)
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"x must have shape [B, T, {self.in_features}], got {x.shape}")
    if context is not None:
      context = jnp.asarray(context)
      if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.in_kv_features:
        raise ValueError(f"context must have shape [{x.shape[0]}, S, {self.in_kv_features}], got {context.shape}")
    pattern = check_pattern(self.zoo_name, self.pattern(context is not None), self.supported_patterns)
    return x, context, pattern

  def __call__(self, x, context=None):
    """``x [B, T, in_features]`` (and ``context [B, S, in_kv_features]`` for cross patterns) -> ``[B, T, out]``."""
    x, context, pattern = self._inputs(x, context)
    src = x if context is None else context
    q, k, v = self.query(x), self.key(src), self.value(src)
    o = self._attend(q, k, v, src, pattern)
    return self.out(o.astype(q.dtype))


class VanillaSoftmax(_Projected):
  """Plain softmax attention that materialises the ``[B, H, T, S]`` probabilities (CAB's "vanilla"; all four
  patterns, causal self with a lower-triangular mask): the dense baseline of the efficiency-length measurement.
  :class:`jaxattn.nn.MultiHeadAttention` is the production softmax (blockwise, memory linear in the length)."""

  supported_patterns = frozenset(PATTERNS)
  zoo_name = "vanilla"

  def _attend(self, q, k, v, src, pattern):
    s = jnp.einsum("bthd,bshd->bhts", q, k) * self.head_dim ** -0.5
    if pattern == "CS":
      s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s.astype(jnp.float32), axis=-1), v)


class Nystrom(_Projected):
  """Nyströmformer attention (NS); :func:`nystrom_attention` with ``num_landmarks`` (16) and ``pinv_iterations``
  (6). Args as :class:`_Projected`."""

  supported_patterns = frozenset({"NS"})
  zoo_name = "nystrom"

  def __init__(self, num_heads: int, in_features: int, *, num_landmarks: int = 16, pinv_iterations: int = 6,
               **kwargs):
    super().__init__(num_heads, in_features, **kwargs)
    self.num_landmarks = positive_int("num_landmarks", num_landmarks)
    self.pinv_iterations = positive_int("pinv_iterations", pinv_iterations)

  def _attend(self, q, k, v, src, pattern):
    return nystrom_attention(q, k, v, num_landmarks=self.num_landmarks, pinv_iterations=self.pinv_iterations)


class Lara(_Projected):
  """LARA attention (NS) in the deterministic evaluation form of :func:`lara_attention` (unverified details are
  listed there); ``num_landmarks`` proposals (16)."""

  supported_patterns = frozenset({"NS"})
  zoo_name = "lara"

  def __init__(self, num_heads: int, in_features: int, *, num_landmarks: int = 16, **kwargs):
    super().__init__(num_heads, in_features, **kwargs)
    self.num_landmarks = positive_int("num_landmarks", num_landmarks)

  def _attend(self, q, k, v, src, pattern):
    return lara_attention(q, k, v, num_landmarks=self.num_landmarks)


class ProbSparse(_Projected):
  """Informer's ProbSparse self-attention (NS), :func:`probsparse_attention` with sampling ``factor`` (5)."""

  supported_patterns = frozenset({"NS"})
  zoo_name = "probsparse"

  def __init__(self, num_heads: int, in_features: int, *, factor: int = 5, **kwargs):
    super().__init__(num_heads, in_features, **kwargs)
    self.factor = positive_int("factor", factor)

  def _attend(self, q, k, v, src, pattern):
    return probsparse_attention(q, k, v, factor=self.factor)


class ABC(_Projected):
  """ABC (all four patterns), :func:`abc_attention` with ``num_slots`` (16) memory slots; the control logits are a
  learned per-head projection of the keys (``control [H, D, n]``)."""

  supported_patterns = frozenset(PATTERNS)
  zoo_name = "abc"

  def __init__(self, num_heads: int, in_features: int, *, num_slots: int = 16, rngs: nnx.Rngs, **kwargs):
    super().__init__(num_heads, in_features, rngs=rngs, **kwargs)
    n = positive_int("num_slots", num_slots)
    self.control = nnx.Param(jax.random.normal(rngs.params(), (self.num_heads, self.head_dim, n), jnp.float32)
                             * self.head_dim ** -0.5)

  def _attend(self, q, k, v, src, pattern):
    ctl = jnp.einsum("bshd,hdn->bshn", k.astype(jnp.float32), self.control[...], precision=_HI)
    return abc_attention(q, k, v, ctl, causal=pattern == "CS")


class LongShort(_Projected):
  """Transformer-LS (NS / CS), :func:`longshort_attention` with ``window`` (16) and ``rank`` projected slots (16
  non-causal; per segment when causal, default 1)."""

  supported_patterns = frozenset({"NS", "CS"})
  zoo_name = "longshort"

  def __init__(self, num_heads: int, in_features: int, *, window: int = 16, rank: int | None = None,
               rngs: nnx.Rngs, **kwargs):
    super().__init__(num_heads, in_features, rngs=rngs, **kwargs)
    self.window = positive_int("window", window)
    r = positive_int("rank", rank if rank is not None else (1 if self.causal else 16))
    self.proj = nnx.Param(jax.random.normal(rngs.params(), (self.num_heads, self.head_dim, r), jnp.float32)
                          * self.head_dim ** -0.5)

  def _attend(self, q, k, v, src, pattern):
    pr = jnp.einsum("bshd,hdr->bshr", k.astype(jnp.float32), self.proj[...], precision=_HI)
    return longshort_attention(q, k, v, pr, window=self.window, causal=pattern == "CS")


class S4D(nnx.Module):
  """S4D state-space layer (NS bidirectional / CS causal) in the attention slot: ``out(S4D(value(x)))``.

  Shapes: ``x [B, T, in_features]`` -> ``[B, T, out_features]``; ``C = num_heads * head_dim`` channels, each with
  ``state_size // 2`` complex modes (S4D-Lin init: ``A_n = -1/2 + i pi n``, ``dt`` log-uniform in [1e-3, 1e-1],
  ``C ~ N(0, 1/2)`` complex). See :func:`s4d_conv`.
  """

  supported_patterns: ClassVar[frozenset[str]] = frozenset({"NS", "CS"})
  zoo_name: ClassVar[str] = "s4d"

  def __init__(self, num_heads: int, in_features: int, *, causal: bool = False, head_dim: int | None = None,
               out_features: int | None = None, state_size: int = 64, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_heads, self.in_features, _, self.head_dim, self.out_features = head_layout(
        num_heads, in_features, None, head_dim, out_features)
    self.causal = bool(causal)
    n2 = positive_int("state_size", state_size) // 2
    if n2 < 1:
      raise ValueError(f"state_size must be at least 2, got {state_size!r}")
    C = self.num_heads * self.head_dim
    common = dict(use_bias=False, param_dtype=param_dtype, rngs=rngs)
    self.value = nnx.Linear(self.in_features, C, **common)
    self.out = nnx.Linear(C, self.out_features, **common)
    ks = jax.random.split(rngs.params(), 6)
    self.log_dt = nnx.Param(jax.random.uniform(ks[0], (C,), minval=math.log(1e-3), maxval=math.log(1e-1)))
    self.log_a_real = nnx.Param(jnp.full((C, n2), math.log(0.5), jnp.float32))
    self.a_imag = nnx.Param(jnp.broadcast_to(math.pi * jnp.arange(n2, dtype=jnp.float32), (C, n2)))
    self.c_real = nnx.Param(jax.random.normal(ks[1], (C, n2)) * 0.5 ** 0.5)
    self.c_imag = nnx.Param(jax.random.normal(ks[2], (C, n2)) * 0.5 ** 0.5)
    self.c_real_bwd = nnx.Param(jax.random.normal(ks[3], (C, n2)) * 0.5 ** 0.5)
    self.c_imag_bwd = nnx.Param(jax.random.normal(ks[4], (C, n2)) * 0.5 ** 0.5)
    self.d = nnx.Param(jax.random.normal(ks[5], (C,)))

  def ssm_params(self) -> dict:
    """The SSM parameters as a dict of arrays (the ``params`` of :func:`s4d_conv`)."""
    names = ("log_dt", "log_a_real", "a_imag", "c_real", "c_imag", "c_real_bwd", "c_imag_bwd", "d")
    return {n: getattr(self, n)[...] for n in names}

  def __call__(self, x, context=None):
    """``x [B, T, in_features] -> [B, T, out_features]``; ``context`` must be None (no cross patterns)."""
    x = jnp.asarray(x)
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"x must have shape [B, T, {self.in_features}], got {x.shape}")
    check_pattern(self.zoo_name, ("C" if self.causal else "N") + ("C" if context is not None else "S"),
                  self.supported_patterns)
    y = s4d_conv(self.value(x), self.ssm_params(), causal=self.causal)
    return self.out(y.astype(x.dtype))


# ==================================================================================================== registry
@dataclasses.dataclass(frozen=True)
class ZooEntry:
  """One member of the zoo.

  Attributes:
    name: registry key.
    patterns: the CAB patterns it supports.
    family: ``"dense"``, ``"local"``, ``"kernel"`` (feature-map linear), ``"landmark"``, ``"sparse"``, ``"memory"``,
      ``"ssm"`` or ``"hybrid"``.
    build: ``(pattern, num_heads, in_features, rngs, **kwargs) -> nnx.Module`` (called by :func:`make`).
    cab_efficiency_length: CAB's (time, memory) efficiency length in tokens, or None (not in CAB's table).
  """

  name: str
  patterns: frozenset[str]
  family: str
  build: Callable = dataclasses.field(repr=False)
  cab_efficiency_length: tuple[int, int] | None = None


def _softmax(pattern, num_heads, in_features, rngs, *, implementation=None, **kw):
  from jaxattn.masks import Causal
  from jaxattn.nn.attention import MultiHeadAttention
  return MultiHeadAttention(num_heads, in_features, mask=Causal() if pattern == "CS" else None,
                            implementation=implementation, rngs=rngs, **kw)


def _local(pattern, num_heads, in_features, rngs, *, window: int = 15, implementation=None, **kw):
  from jaxattn.masks import Local
  from jaxattn.nn.attention import MultiHeadAttention
  w = positive_int("window", window)
  mask = Local(left=w - 1, right=0) if pattern == "CS" else Local(left=w // 2, right=(w - 1) // 2)
  return MultiHeadAttention(num_heads, in_features, mask=mask, implementation=implementation, rngs=rngs, **kw)


def _linear(feature_map):
  def build(pattern, num_heads, in_features, rngs, **kw):
    from jaxattn.nn.linear import LinearAttention
    return LinearAttention(num_heads, in_features, feature_map=feature_map, causal=pattern[0] == "C", rngs=rngs,
                           **kw)
  return build


def _module(cls):
  def build(pattern, num_heads, in_features, rngs, **kw):
    return cls(num_heads, in_features, causal=pattern[0] == "C", rngs=rngs, **kw)
  return build


# CAB's efficiency lengths (time, memory) in tokens from its README leaderboard (papers/efficient.md §5b).
ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    ZooEntry("softmax", frozenset(PATTERNS), "dense", _softmax),
    ZooEntry("local", frozenset({"NS", "CS"}), "local", _local, (4195, 1169)),
    ZooEntry("cosformer", frozenset({"NS", "NC"}), "kernel", _linear("cosformer"), (2539, 164)),
    ZooEntry("performer", frozenset(PATTERNS), "kernel", _linear("performer"), (2361, 37)),
    ZooEntry("linear_elu", frozenset(PATTERNS), "kernel", _linear("elu")),
    ZooEntry("nystrom", Nystrom.supported_patterns, "landmark", _module(Nystrom), (3045, 94)),
    ZooEntry("lara", Lara.supported_patterns, "landmark", _module(Lara), (2541, 68)),
    ZooEntry("probsparse", ProbSparse.supported_patterns, "sparse", _module(ProbSparse), (3450, 281)),
    ZooEntry("abc", ABC.supported_patterns, "memory", _module(ABC), (1877, 70)),
    ZooEntry("s4d", S4D.supported_patterns, "ssm", _module(S4D), (6011, 949)),
    ZooEntry("longshort", LongShort.supported_patterns, "hybrid", _module(LongShort), (5652, 342)),
)}


def make(name: str, pattern: str, *, num_heads: int, in_features: int, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
  """Builds zoo member ``name`` for CAB ``pattern`` (``"NS"``, ``"CS"``, ``"NC"``, ``"CC"``).

  The module is called as ``module(x)`` for self patterns and ``module(x, context)`` for cross patterns;
  ``kwargs`` go to the module (e.g. ``num_landmarks``, ``window``, ``implementation`` for softmax / local).

  Raises:
    ValueError: an unknown name, an unknown pattern, or a pattern the member does not support (named).
  """
  if name not in ZOO:
    raise ValueError(f"unknown zoo member {name!r}; choose one of {sorted(ZOO)}")
  entry = ZOO[name]
  check_pattern(name, pattern, entry.patterns)
  return entry.build(pattern, num_heads, in_features, rngs, **kwargs)
