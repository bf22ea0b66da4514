"""Pure functions over attention maps: aggregation, rollout, entropy / concentration, sinks, agreement, profiles.

Conventions: a stack of per-layer maps is ``[L, B, H, T, S]`` (``Capture.stack("probs")``); one layer's map is
``[B, H, T, S]``; rows are queries and sum to 1 (0 for rows with no allowed key).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["aggregate", "rollout", "entropy", "top_k_mass", "mass_count", "gini", "sink_scores", "column_scores",
           "pearson", "spearman", "position_profile", "distance_profile"]


def _index_list(sel, n: int, what: str):
  if sel is None:
    return list(range(n))
  sel = [sel] if isinstance(sel, (int, np.integer)) else list(sel)
  for s in sel:
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not -n <= s < n:
      raise ValueError(f"{what} {s!r} does not exist: there are {n} {what}s")
  return [int(s) % n for s in sel]


def aggregate(attn, *, layers=None, heads=None, over=("layers", "heads"), how: str = "mean"):
  """Mean or max of attention maps over (a subset of) layers and heads.

  Args:
    attn: ``[L, B, H, T, S]`` (use ``attn[None]`` for one layer).
    layers, heads: indices to keep (None: all); negative indices count from the end.
    over: which of ``"layers"`` / ``"heads"`` to reduce (a string or a tuple).
    how: ``"mean"`` or ``"max"``.

  Returns:
    ``[B, T, S]`` when reducing both; ``[L', B, T, S]`` over heads only; ``[B, H', T, S]`` over layers only.
  """
  attn = jnp.asarray(attn)
  if attn.ndim != 5:
    raise ValueError(f"attn must have shape [L, B, H, T, S], got {attn.shape}")
  if how not in ("mean", "max"):
    raise ValueError(f"how must be 'mean' or 'max', got {how!r}")
  over = (over,) if isinstance(over, str) else tuple(over)
  if not over or any(o not in ("layers", "heads") for o in over):
    raise ValueError(f"over must name 'layers' and/or 'heads', got {over!r}")
  attn = attn[jnp.asarray(_index_list(layers, attn.shape[0], "layer"))]
  attn = attn[:, :, jnp.asarray(_index_list(heads, attn.shape[2], "head"))]
  axes = tuple(a for o, a in (("layers", 0), ("heads", 2)) if o in over)
  return attn.mean(axes) if how == "mean" else attn.max(axes)


def rollout(attn, *, residual: float = 0.5, heads=None, return_all: bool = False):
  r"""Attention rollout (Abnar & Zuidema, 2020; the DCAL form).

  .. math::
     \bar A_l = \mathrm{rownorm}\big(r I + (1 - r)\,\mathrm{mean}_h A_{l,h}\big),\qquad
     \hat A_1 = \bar A_1,\quad \hat A_l = \bar A_l \hat A_{l-1}

  with ``r = residual`` (0.5: the residual stream carries half of each token). Rows are renormalised after adding
  the identity (a row with no attention becomes the identity row). ``\hat A_L[i, j]`` is how much input token ``j``
  flows into position ``i`` at the top; for a ViT, ``rollout(...)[:, 0, 1:]`` is the CLS-to-patch map.

  Args:
    attn: ``[L, B, H, T, T]`` self-attention maps, first layer first.
    residual: the identity weight ``r`` in ``[0, 1]``.
    heads: head indices averaged (None: all).
    return_all: return every ``\hat A_l`` (``[L, B, T, T]``) instead of the last.

  Returns:
    ``[B, T, T]`` (or ``[L, B, T, T]``), f32.
  """
  attn = jnp.asarray(attn, jnp.float32)
  if attn.ndim != 5 or attn.shape[-1] != attn.shape[-2]:
    raise ValueError(f"attn must have shape [L, B, H, T, T] (self-attention), got {attn.shape}")
  if isinstance(residual, bool) or not isinstance(residual, (int, float)) or not 0.0 <= residual <= 1.0:
    raise ValueError(f"residual must be a float in [0, 1], got {residual!r}")
  a = attn[:, :, jnp.asarray(_index_list(heads, attn.shape[2], "head"))].mean(2)  # [L, B, T, T]
  a = residual * jnp.eye(a.shape[-1], dtype=jnp.float32) + (1.0 - residual) * a
  a = a / jnp.where(a.sum(-1, keepdims=True) == 0, 1.0, a.sum(-1, keepdims=True))
  outs = [a[0]]
  for layer in range(1, a.shape[0]):
    outs.append(jnp.einsum("bij,bjk->bik", a[layer], outs[-1], precision="highest"))
  return jnp.stack(outs) if return_all else outs[-1]


def entropy(probs, axis: int = -1, normalize: bool = False):
  """Shannon entropy ``-sum p log p`` in nats along ``axis`` (``0 log 0 = 0``).

  With ``normalize`` divided by ``log n`` (``n`` the axis length), so a uniform row gives 1.
  """
  p = jnp.asarray(probs, jnp.float32)
  h = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)
  if normalize:
    n = p.shape[axis]
    h = h / np.log(n) if n > 1 else jnp.zeros_like(h)
  return h


def top_k_mass(probs, k: int, axis: int = -1):
  """The mass of the ``k`` largest entries along ``axis`` (concentration; 1 = all mass on ``k`` keys)."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive int, got {k!r}")
  p = jnp.moveaxis(jnp.asarray(probs, jnp.float32), axis, -1)
  return jnp.sort(p, axis=-1)[..., ::-1][..., :k].sum(-1)


def mass_count(probs, mass: float = 0.9, axis: int = -1):
  """The smallest number of entries (largest first) whose sum reaches ``mass`` of the row's total, int32."""
  if not isinstance(mass, (int, float)) or not 0.0 < mass <= 1.0:
    raise ValueError(f"mass must be in (0, 1], got {mass!r}")
  p = jnp.moveaxis(jnp.asarray(probs, jnp.float32), axis, -1)
  c = jnp.cumsum(jnp.sort(p, axis=-1)[..., ::-1], axis=-1)
  total = c[..., -1:]
  return jnp.minimum(jnp.sum(c < mass * total * (1 - 1e-6), axis=-1) + 1, p.shape[-1]).astype(jnp.int32)


def gini(probs, axis: int = -1):
  """Gini coefficient of each row (0 = uniform, ``1 - 1/n`` = one-hot)."""
  p = jnp.sort(jnp.moveaxis(jnp.asarray(probs, jnp.float32), axis, -1), axis=-1)
  n = p.shape[-1]
  i = jnp.arange(1, n + 1, dtype=jnp.float32)
  total = p.sum(-1)
  g = jnp.sum((2 * i - n - 1) * p, axis=-1) / (n * jnp.where(total == 0, 1.0, total))
  return jnp.where(total == 0, 0.0, g)


def sink_scores(probs, *, num_sink: int = 1):
  """Mass on the first ``num_sink`` keys, averaged over the query rows that attend anything: ``[...]``.

  ``probs [..., T, S]`` (e.g. ``[B, H, T, S]`` gives a score per batch element and head).
  """
  if isinstance(num_sink, bool) or not isinstance(num_sink, (int, np.integer)) or num_sink < 1:
    raise ValueError(f"num_sink must be a positive int, got {num_sink!r}")
  p = jnp.asarray(probs, jnp.float32)
  if num_sink > p.shape[-1]:
    raise ValueError(f"num_sink={num_sink} exceeds the {p.shape[-1]} keys")
  rows = p.sum(-1) > 0
  mass = p[..., :num_sink].sum(-1)
  return jnp.where(rows, mass, 0.0).sum(-1) / jnp.maximum(rows.sum(-1), 1)


def column_scores(colsum, colcount):
  """ACT's column score ``colsum / colcount`` (mean attention a key receives from the queries that see it)."""
  colsum = jnp.asarray(colsum, jnp.float32)
  return colsum / jnp.maximum(jnp.asarray(colcount), 1).astype(jnp.float32)


def _axes(x, axis):
  return tuple(range(x.ndim)) if axis is None else axis


def pearson(x, y, axis=-1):
  """Pearson correlation of ``x`` and ``y`` along ``axis`` (an int, a tuple, or None for all); NaN-free: 0 when
  either side is constant."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
  ax = _axes(x, axis)
  xm = x - x.mean(ax, keepdims=True)
  ym = y - y.mean(ax, keepdims=True)
  den = jnp.sqrt((xm * xm).sum(ax) * (ym * ym).sum(ax))
  return jnp.where(den > 0, (xm * ym).sum(ax) / jnp.where(den > 0, den, 1.0), 0.0)


def _ranks(x):
  """Average ranks (1-based, ties share their mean rank) along the last axis."""
  s = jnp.sort(x, axis=-1)
  lo = jnp.vectorize(lambda s, v: jnp.searchsorted(s, v, side="left"), signature="(n),(n)->(n)")(s, x)
  hi = jnp.vectorize(lambda s, v: jnp.searchsorted(s, v, side="right"), signature="(n),(n)->(n)")(s, x)
  return (lo + hi + 1).astype(jnp.float32) / 2.0


def spearman(x, y, axis=-1):
  """Spearman rank correlation along ``axis`` (an int or None for all): Pearson of average ranks (ties averaged)."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
  if axis is None:
    x, y = x.reshape(-1), y.reshape(-1)
  elif isinstance(axis, int):
    x, y = jnp.moveaxis(x, axis, -1), jnp.moveaxis(y, axis, -1)
  else:
    raise ValueError(f"spearman takes one axis or None, got {axis!r}")
  return pearson(_ranks(x), _ranks(y), axis=-1)


def position_profile(values, lengths=None, *, n_bins: int = 10, length_buckets=None, normalize: bool = True):
  """Mass by relative position, bucketed by sequence length (PosIR-style profiles; host-side numpy).

  Position ``t`` of a sequence of length ``n`` falls in bin ``floor(t * n_bins / n)``; each sequence's mass per bin
  (normalised to sum 1 with ``normalize``) is averaged over the sequences of its length bucket.

  Args:
    values: ``[N, P]`` non-negative per-position values (attention mass a position receives, saliency, ...);
      positions ``>= lengths[n]`` are ignored.
    lengths: ``[N]`` valid lengths (default ``P`` for all).
    n_bins: relative-position bins.
    length_buckets: increasing bucket edges ``[e_0, ..., e_m]``: bucket ``b`` holds ``e_b <= n < e_{b+1}``
      (default one bucket with every sequence).
    normalize: normalise each sequence's profile to sum 1 before averaging.

  Returns:
    ``(profile [m, n_bins] float64, counts [m] int)``; buckets without sequences have a NaN profile.
  """
  v = np.asarray(values, np.float64)
  if v.ndim != 2:
    raise ValueError(f"values must have shape [N, P], got {v.shape}")
  N, P = v.shape
  n = np.full(N, P) if lengths is None else np.asarray(lengths).astype(np.int64)
  if n.shape != (N,) or np.any(n < 1) or np.any(n > P):
    raise ValueError(f"lengths must be [N={N}] ints in [1, {P}], got {np.asarray(lengths)!r}")
  if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
    raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
  edges = np.array([0, np.iinfo(np.int64).max]) if length_buckets is None else np.asarray(length_buckets)
  if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
    raise ValueError(f"length_buckets must be increasing edges [e_0, ..., e_m], got {length_buckets!r}")
  t = np.arange(P)[None, :]
  valid = t < n[:, None]
  bins = np.minimum(t * n_bins // n[:, None], n_bins - 1)
  per = np.zeros((N, n_bins))
  np.add.at(per, (np.repeat(np.arange(N), P)[valid.ravel()], bins.ravel()[valid.ravel()]), v.ravel()[valid.ravel()])
  if normalize:
    tot = per.sum(1, keepdims=True)
    per = np.where(tot > 0, per / np.where(tot > 0, tot, 1.0), 0.0)
  bucket = np.searchsorted(edges, n, side="right") - 1
  m = len(edges) - 1
  profile = np.full((m, n_bins), np.nan)
  counts = np.zeros(m, int)
  for b in range(m):
    sel = bucket == b
    counts[b] = int(sel.sum())
    if counts[b]:
      profile[b] = per[sel].mean(0)
  return profile, counts


def distance_profile(probs, max_distance: int):
  """Attention mass by query-key distance ``d = i - j`` (the relative position the mass sits at).

  ``probs [..., T, S]`` with key ``j`` at absolute position ``j`` and query ``i`` at ``i + S - T`` (bottom-right
  aligned). Returns ``[..., 2 * max_distance + 1]``: entry ``max_distance + d`` is the mass at distance ``d`` averaged
  over query rows, distances beyond ``+-max_distance`` clipped into the end bins.
  """
  if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)) or max_distance < 0:
    raise ValueError(f"max_distance must be an int >= 0, got {max_distance!r}")
  p = jnp.asarray(probs, jnp.float32)
  T, S = p.shape[-2:]
  d = np.clip(np.arange(T)[:, None] + (S - T) - np.arange(S)[None, :], -max_distance, max_distance) + max_distance
  onehot = jnp.asarray(np.eye(2 * max_distance + 1, dtype=np.float32)[d])  # [T, S, 2m+1]
  return jnp.einsum("...ts,tsd->...d", p, onehot, precision="highest") / T
