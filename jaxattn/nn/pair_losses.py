r"""Losses for pair and retrieval encoders (pure functions of arrays, scalar outputs: drop into any optax loop).

``papers/cross.md`` in the shared notes, §4 (Trans-Encoder), §6 (DSE), §8 (MVP), §20 (KaLM-Embedding-V2):

- :func:`info_nce` — KaLM-V2's InfoNCE on cosine similarities with temperature :math:`\tau`, in-batch negatives,
  hard negatives (every query sees every hard negative of the batch, as in the paper's
  :math:`\sum_{j=1}^{N}\sum_{k=1}^{M}` term, or only its own), per-query extra negatives (e.g. mixed ones) and focal
  reweighting:

  .. math::
     Z_i = e^{s(q_i,p_i)/\tau} + \sum_{j\ne i} e^{s(q_i,p_j)/\tau} + \sum_{n \in \mathcal{N}_i} e^{s(q_i,n)/\tau},
     \quad p_i = e^{s(q_i,p_i)/\tau} / Z_i,\quad L = -\mathrm{mean}_i\,(1-p_i)^\gamma \log p_i

- :func:`mix_hard_negatives` — online hard-negative mixing: per query, ``num`` synthetic negatives
  :math:`\tilde n = \mathrm{normalize}(\alpha n_a + (1-\alpha) n_b)` of two of its ``top_k`` highest-scoring
  negatives, :math:`\alpha \sim U(0, 1)`, under ``stop_gradient`` (pass them as ``extra_negatives``).
- :func:`logit_l2_distill` — DSE: :math:`(1-\alpha)\,\mathrm{CE}(s, y) + \alpha\,\mathrm{mean}_b \sum_c (s_c-t_c)^2`
  (L2 on logits, not KL; the teacher is not differentiated).
- :func:`orthogonality_loss` — MVP: :math:`\mathrm{mean}_i \|\hat E_i \hat E_i^\top - I_m\|_F^2` with
  :math:`\hat E_i` the row-normalised view vectors of candidate ``i``.
- :func:`kl_distill`, :func:`mse_distill`, :func:`bce_distill`, :func:`cosine_mse` — Trans-Encoder's distillation
  losses (soft-label BCE for the cross-encoder, MSE of the cosine for the bi-encoder) and their KL / MSE variants.

Every function validates its inputs once (``ValueError`` naming the offending shape or value: mismatched pair batch
sizes, hard negatives of the wrong shape, a temperature ``<= 0``), computes in f32 and never returns NaN for finite
inputs (zero vectors have cosine 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["info_nce", "info_nce_probs", "mix_hard_negatives", "logit_l2_distill", "orthogonality_loss",
           "kl_distill", "mse_distill", "bce_distill", "cosine_mse", "normalize"]

_EPS = 1e-6


def normalize(x, axis: int = -1):
  """``x / max(||x||, 1e-6)`` in f32 (a zero vector stays zero; finite gradient)."""
  x = jnp.asarray(x, jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), _EPS * _EPS))


def _check_temperature(temperature):
  if isinstance(temperature, jax.core.Tracer):
    return temperature
  t = float(np.asarray(temperature))
  if not np.isfinite(t) or t <= 0:
    raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
  return temperature


def _check_qp(q, p):
  q, p = jnp.asarray(q), jnp.asarray(p)
  if q.ndim != 2 or p.ndim != 2:
    raise ValueError(f"queries and positives must have shape [B, D], got {q.shape} and {p.shape}")
  if q.shape[0] != p.shape[0]:
    raise ValueError(f"pair batch sizes differ: {q.shape[0]} queries but {p.shape[0]} positives")
  if q.shape[1] != p.shape[1]:
    raise ValueError(f"queries have {q.shape[1]} features but positives {p.shape[1]}")
  return q, p


def _check_negatives(name, n, B, D):
  n = jnp.asarray(n)
  if n.ndim != 3 or n.shape[0] != B or n.shape[2] != D:
    raise ValueError(f"{name} must have shape [B={B}, M, D={D}] (M per query), got {n.shape}")
  return n


def _logits(q, p, hard_negatives, extra_negatives, temperature, in_batch, share_hard_negatives):
  """``[B, 1 + K]`` logits, column 0 the positive, and a bool mask of the columns that count."""
  B, D = q.shape
  qn, pn = normalize(q), normalize(p)
  cols = [jnp.sum(qn * pn, -1, keepdims=True)]
  keep = [jnp.ones((B, 1), bool)]
  if in_batch:
    s = qn @ pn.T  # [B, B]
    off = ~jnp.eye(B, dtype=bool)
    cols.append(s)
    keep.append(off)  # the diagonal is the positive, already column 0
  if hard_negatives is not None:
    hn = normalize(hard_negatives)  # [B, M, D]
    if share_hard_negatives:
      s = qn @ hn.reshape(-1, D).T  # [B, B*M]
    else:
      s = jnp.einsum("bd,bmd->bm", qn, hn)
    cols.append(s)
    keep.append(jnp.ones(s.shape, bool))
  if extra_negatives is not None:
    en = normalize(jax.lax.stop_gradient(extra_negatives))
    s = jnp.einsum("bd,bmd->bm", qn, en)
    cols.append(s)
    keep.append(jnp.ones(s.shape, bool))
  logits = jnp.concatenate(cols, axis=1) / temperature
  return logits, jnp.concatenate(keep, axis=1)


def info_nce_probs(q, p, hard_negatives=None, *, temperature: float = 0.05, in_batch: bool = True,
                   share_hard_negatives: bool = True, extra_negatives=None):
  """``p_i`` of :func:`info_nce` (``[B]``, the softmax probability of each query's positive)."""
  q, p = _check_qp(q, p)
  _check_temperature(temperature)
  B, D = q.shape
  if hard_negatives is not None:
    hard_negatives = _check_negatives("hard_negatives", hard_negatives, B, D)
  if extra_negatives is not None:
    extra_negatives = _check_negatives("extra_negatives", extra_negatives, B, D)
  logits, keep = _logits(q, p, hard_negatives, extra_negatives, temperature, in_batch, share_hard_negatives)
  logits = jnp.where(keep, logits, -jnp.inf)
  return jnp.exp(logits[:, 0] - jax.nn.logsumexp(logits, axis=1))


def info_nce(q, p, hard_negatives=None, *, temperature: float = 0.05, in_batch: bool = True,
             share_hard_negatives: bool = True, extra_negatives=None, focal_gamma: float = 0.0):
  """KaLM-V2 InfoNCE (formula in the module docstring); a scalar.

  Args:
    q, p: queries and their positives ``[B, D]`` (any scale: the similarity is the cosine).
    hard_negatives: ``[B, M, D]`` (query ``j``'s mined negatives), or None.
    temperature: ``tau > 0``.
    in_batch: use the other queries' positives as negatives.
    share_hard_negatives: every query sees all ``B * M`` hard negatives (KaLM's formula); False: only its own.
    extra_negatives: per-query negatives ``[B, K, D]`` under ``stop_gradient`` (e.g. :func:`mix_hard_negatives`).
    focal_gamma: ``gamma >= 0``; weight ``(1 - p_i) ** gamma`` on each query's ``-log p_i`` (0: plain InfoNCE).

  Raises:
    ValueError: mismatched batch / feature sizes, negatives of the wrong shape, ``temperature <= 0``,
      ``focal_gamma < 0``.
  """
  if not isinstance(focal_gamma, jax.core.Tracer) and not float(focal_gamma) >= 0:
    raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma!r}")
  q, p = _check_qp(q, p)
  _check_temperature(temperature)
  B, D = q.shape
  if hard_negatives is not None:
    hard_negatives = _check_negatives("hard_negatives", hard_negatives, B, D)
  if extra_negatives is not None:
    extra_negatives = _check_negatives("extra_negatives", extra_negatives, B, D)
  logits, keep = _logits(q, p, hard_negatives, extra_negatives, temperature, in_batch, share_hard_negatives)
  logits = jnp.where(keep, logits, -jnp.inf)
  logp = logits[:, 0] - jax.nn.logsumexp(logits, axis=1)
  if isinstance(focal_gamma, (int, float)) and focal_gamma == 0:
    return -jnp.mean(logp)
  w = (1.0 - jnp.exp(logp)) ** focal_gamma
  return -jnp.mean(w * logp)


def mix_hard_negatives(key, q, negatives, *, num: int, top_k: int = 4):
  """Synthetic hard negatives by mixing (KaLM-V2's online hard-negative mixing, MoCHi-style).

  For each query ``i``: rank its negatives ``negatives[i] [M, D]`` by cosine to ``q[i]``, draw ``num`` pairs
  ``(a, b)`` from the ``top_k`` best (with replacement) and ``alpha ~ U(0, 1)``; return
  ``normalize(alpha n_a + (1 - alpha) n_b)`` of the normalised negatives, under ``stop_gradient``.

  Args:
    key: a ``jax.random`` key.
    q: ``[B, D]``; negatives: ``[B, M, D]``.
    num: synthetic negatives per query (>= 1); top_k: pool size (clipped to ``M``).

  Returns:
    ``[B, num, D]`` unit vectors (no gradient flows through them).
  """
  q = jnp.asarray(q)
  if q.ndim != 2:
    raise ValueError(f"q must have shape [B, D], got {q.shape}")
  B, D = q.shape
  negatives = _check_negatives("negatives", negatives, B, D)
  if not isinstance(num, int) or num < 1:
    raise ValueError(f"num must be a positive int, got {num!r}")
  if not isinstance(top_k, int) or top_k < 1:
    raise ValueError(f"top_k must be a positive int, got {top_k!r}")
  k = min(top_k, negatives.shape[1])
  qn, nn = normalize(q), normalize(negatives)
  s = jnp.einsum("bd,bmd->bm", qn, nn)
  _, idx = jax.lax.top_k(s, k)  # [B, k]
  k1, k2, k3 = jax.random.split(key, 3)
  ia = jnp.take_along_axis(idx, jax.random.randint(k1, (B, num), 0, k), axis=1)
  ib = jnp.take_along_axis(idx, jax.random.randint(k2, (B, num), 0, k), axis=1)
  alpha = jax.random.uniform(k3, (B, num, 1))
  na = jnp.take_along_axis(nn, ia[..., None], axis=1)
  nb = jnp.take_along_axis(nn, ib[..., None], axis=1)
  return jax.lax.stop_gradient(normalize(alpha * na + (1 - alpha) * nb))


def _check_logits(s, t):
  s, t = jnp.asarray(s), jnp.asarray(t)
  if s.shape != t.shape:
    raise ValueError(f"student and teacher must have the same shape, got {s.shape} and {t.shape}")
  return s, t


def logit_l2_distill(student_logits, teacher_logits, labels=None, *, alpha: float = 1.0):
  """DSE's loss: ``(1 - alpha) * CE(student, labels) + alpha * mean_b sum_c (s_bc - t_bc)^2``.

  Args:
    student_logits, teacher_logits: ``[B, C]`` (the teacher is under ``stop_gradient``).
    labels: int ``[B]`` (needed when ``alpha < 1``).
    alpha: in ``[0, 1]``.
  """
  s, t = _check_logits(student_logits, teacher_logits)
  if s.ndim != 2:
    raise ValueError(f"logits must have shape [B, C], got {s.shape}")
  if not 0.0 <= float(alpha) <= 1.0:
    raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
  s32, t32 = s.astype(jnp.float32), jax.lax.stop_gradient(t).astype(jnp.float32)
  l2 = jnp.mean(jnp.sum(jnp.square(s32 - t32), axis=-1))
  if float(alpha) == 1.0:
    return l2
  if labels is None:
    raise ValueError("labels are required when alpha < 1 (the cross-entropy term)")
  labels = jnp.asarray(labels)
  if labels.shape != s.shape[:1]:
    raise ValueError(f"labels must have shape ({s.shape[0]},), got {labels.shape}")
  ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(s32), labels[:, None], axis=1))
  return (1.0 - alpha) * ce + alpha * l2


def orthogonality_loss(views, valid=None):
  """MVP: ``mean_i ||E_i E_i^T - I_m||_F^2`` with ``E_i`` the row-normalised ``views [..., m, D]`` of candidate
  ``i`` (the mean runs over every leading index; ``valid [...]`` bool excludes padded candidates)."""
  views = jnp.asarray(views)
  if views.ndim < 2:
    raise ValueError(f"views must have shape [..., m, D], got {views.shape}")
  e = normalize(views)
  g = jnp.einsum("...md,...nd->...mn", e, e)
  m = views.shape[-2]
  per = jnp.sum(jnp.square(g - jnp.eye(m)), axis=(-2, -1))
  if valid is None:
    return jnp.mean(per)
  valid = jnp.asarray(valid)
  if valid.shape != per.shape or valid.dtype != jnp.bool_:
    raise ValueError(f"valid must be bool of shape {per.shape}, got {valid.dtype} {valid.shape}")
  return jnp.sum(jnp.where(valid, per, 0.0)) / jnp.maximum(valid.sum(), 1)


def kl_distill(student_logits, teacher_logits, *, temperature: float = 1.0):
  """``tau^2 * mean_b KL(softmax(t / tau) || softmax(s / tau))`` over the last axis (teacher not differentiated)."""
  s, t = _check_logits(student_logits, teacher_logits)
  _check_temperature(temperature)
  ls = jax.nn.log_softmax(s.astype(jnp.float32) / temperature)
  lt = jax.nn.log_softmax(jax.lax.stop_gradient(t).astype(jnp.float32) / temperature)
  kl = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
  return temperature ** 2 * jnp.mean(kl)


def mse_distill(student_scores, teacher_scores):
  """``mean (s - t)^2`` (teacher not differentiated)."""
  s, t = _check_logits(student_scores, teacher_scores)
  return jnp.mean(jnp.square(s.astype(jnp.float32) - jax.lax.stop_gradient(t).astype(jnp.float32)))


def bce_distill(logits, soft_labels):
  """Trans-Encoder's cross-encoder step: BCE-with-logits of ``logits [B]`` against soft labels in ``[0, 1]``."""
  x, y = _check_logits(logits, soft_labels)
  x = x.astype(jnp.float32)
  y = jax.lax.stop_gradient(y).astype(jnp.float32)
  return jnp.mean(jnp.maximum(x, 0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x))))


def cosine_mse(u, v, labels):
  """Trans-Encoder's bi-encoder step (sentence-transformers' CosineSimilarityLoss): ``mean (cos(u, v) - y)^2``."""
  u, v = _check_qp(u, v)
  y = jnp.asarray(labels)
  if y.shape != u.shape[:1]:
    raise ValueError(f"labels must have shape ({u.shape[0]},), got {y.shape}")
  c = jnp.sum(normalize(u) * normalize(v), -1)
  return jnp.mean(jnp.square(c - jax.lax.stop_gradient(y).astype(jnp.float32)))
