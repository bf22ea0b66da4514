"""Token-importance scorers for visual-token pruning (``../shared/papers/cross.md`` §10, §11, §17, §22-B).

Every attention-based scorer reads the softmax backends' statistics mode (:func:`jaxattn.analysis.attention_stats`):
column sums over a chosen set of query rows, computed blockwise, never the ``T x S`` probability matrix.

- :func:`row_attention` — the weighted column sums ``sum_t w_t P[t, :]`` of a subset of query rows (the primitive
  the others use). A per-row weight enters through the log-sum-exp the statistics pass normalises by:
  ``w_t P[t, j] = exp(s_tj - (lse_t - log w_t))``, so passing ``lse - log w`` gives the weighted sum in one pass.
- :func:`cls_attention` — FasterVLM: the [CLS] query's attention over the patches of a vision-encoder layer,
  averaged over heads.
- :func:`text_importance` and :func:`text_to_visual` — AdaptInfer: text-token importance from the symmetrised
  text-text block (given + received attention), then the importance-weighted text->visual attention; also the
  FastV (last text token) and PDrop (mean over text rows) host scorers.
- :func:`feature_norm`, :func:`random_scores`, :func:`oracle_scores` — the baselines.

Shapes: queries ``[B, T, H, D]``, keys ``[B, S, G, D]`` (``H % G == 0``); scores ``[B, N]`` f32 (higher = keep).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn import masks
from jaxattn.ops.softmax.stats import attention_stats

__all__ = ["row_attention", "cls_attention", "text_importance", "text_to_visual", "feature_norm", "random_scores",
           "oracle_scores", "WEIGHTINGS"]

WEIGHTINGS = ("adaptinfer", "mean", "last")
_BIG = 1e4  # lse offset of a zero-weight row: exp(s - lse - 1e4) underflows to 0 in f32


def _check_rank(name, x, rank):
  if jnp.ndim(x) != rank:
    raise ValueError(f"{name} must have rank {rank}, got shape {jnp.shape(x)}")


def _weighted_lse(lse, weights):
  """``lse - log w`` (rows of weight 0 pushed far up, so they add nothing)."""
  w = jnp.asarray(weights, jnp.float32)
  return jnp.where(w > 0, lse - jnp.log(jnp.where(w > 0, w, 1.0)), lse + _BIG)


def row_attention(q_rows, k, *, weights=None, lse=None, mask=None, segment_ids=None, scale: float | None = None,
                  reduce_heads: str | None = "mean", implementation: str = "xla"):
  r"""Weighted column sums of the attention rows ``q_rows``: :math:`c_j = \sum_t w_t P_{tj}`.

  ``P`` is the softmax of :func:`jaxattn.softmax_attention` for queries ``q_rows`` against keys ``k`` (same mask,
  segment ids, scale). Pass ``lse`` (``[B, H, T]``) when the rows' normaliser covers more keys than ``k`` holds
  (a block of a longer row): the sums are then of that block of the full-row probabilities.

  Args:
    q_rows: ``[B, T, H, D]`` the query rows (e.g. the [CLS] row, the text rows).
    k: ``[B, S, G, D]``.
    weights: ``None`` (all 1) or non-negative ``[B, T]`` / ``[B, H, T]`` row weights.
    lse: optional ``[B, H, T]`` natural-log normaliser of each row (default: the rows' own over ``k``).
    mask, segment_ids, scale: as in :func:`jaxattn.softmax_attention`.
    reduce_heads: ``"mean"`` (``[B, S]``), ``"sum"`` or ``None`` (``[B, H, S]``).
    implementation: the statistics backend (``"xla"`` blockwise, ``"reference"``, ``"pallas_tpu"``,
      ``"pallas_gpu"``).

  Returns:
    ``[B, S]`` (or ``[B, H, S]``) f32.
  """
  _check_rank("q_rows", q_rows, 4)
  _check_rank("k", k, 4)
  if reduce_heads not in ("mean", "sum", None):
    raise ValueError(f"reduce_heads must be 'mean', 'sum' or None, got {reduce_heads!r}")
  B, T, H, _ = jnp.shape(q_rows)
  kw = dict(mask=mask, segment_ids=segment_ids, scale=scale)
  if weights is not None:
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape == (B, T):
      weights = jnp.broadcast_to(weights[:, None], (B, H, T))
    if weights.shape != (B, H, T):
      raise ValueError(f"weights must have shape [B, T] = {(B, T)} or [B, H, T] = {(B, H, T)}, got "
                       f"{weights.shape}")
    if lse is None:
      # The reference backend ignores a caller lse, so the own-row normaliser comes from the xla row pass.
      lse = attention_stats(q_rows, k, stats=("lse",), implementation="xla", **kw)["lse"]
  if lse is not None:
    lse = jnp.asarray(lse, jnp.float32)
    if lse.shape != (B, H, T):
      raise ValueError(f"lse must have shape [B, H, T] = {(B, H, T)}, got {lse.shape}")
    if weights is not None:
      lse = _weighted_lse(lse, weights)
    impl = "xla" if implementation == "reference" else implementation  # only the blockwise passes take an lse
    col = attention_stats(q_rows, k, lse=lse, stats=("colsum",), implementation=impl, **kw)["colsum"]
  else:
    col = attention_stats(q_rows, k, stats=("colsum",), implementation=implementation, **kw)["colsum"]
  if reduce_heads == "mean":
    return col.mean(1)
  return col.sum(1) if reduce_heads == "sum" else col


def cls_attention(q, k, *, cls_index: int = 0, scale: float | None = None, implementation: str = "xla"):
  """FasterVLM's score: the [CLS] query's attention over the other tokens of a vision-encoder layer, head mean.

  ``a = mean_h softmax(q_cls K^T * scale)[h, patches]``: one attention row per head, from the statistics pass.

  Args:
    q: ``[B, N, H, D]`` the layer's queries (or only the [CLS] row, ``[B, 1, H, D]``, with ``cls_index=0``).
    k: ``[B, N, G, D]`` the layer's keys, [CLS] included.
    cls_index: position of [CLS] in ``q`` and ``k``.

  Returns:
    ``[B, N - 1]`` f32: the scores of the tokens other than [CLS], in their order (they sum to ``1 - a_cls``).
  """
  _check_rank("q", q, 4)
  _check_rank("k", k, 4)
  N = jnp.shape(k)[1]
  if not isinstance(cls_index, int) or not 0 <= cls_index < N:
    raise ValueError(f"cls_index={cls_index!r} is not a token of the {N} keys")
  row = q[:, cls_index:cls_index + 1] if jnp.shape(q)[1] > 1 else q
  a = row_attention(row, k, scale=scale, implementation=implementation)  # [B, N]
  return jnp.concatenate([a[:, :cls_index], a[:, cls_index + 1:]], axis=1)


def text_importance(q_text, k_text, *, lse, text_mask=masks.Causal(), text_valid=None, scale: float | None = None,
                    smoothing: float = 1.0, implementation: str = "xla"):
  r"""AdaptInfer's text-token importance per head, :math:`\pi = \sum_i S'_{i,:}` (``[B, H, T]``).

  With ``A`` the text-text block of the full-row attention (rows normalised by ``lse`` over every key),
  ``S = A + A^T - diag(A)`` and ``S' = (1 - lambda) mean(S) + lambda S``; ``pi_j = colsum_j(A) + rowsum_j(A) -
  A_jj`` is read from two statistics passes and the diagonal, never the ``T x T`` block.

  Args:
    q_text: ``[B, T, H, D]``; k_text: ``[B, T, G, D]`` (the text tokens' keys).
    lse: ``[B, H, T]`` the rows' log-normaliser over all keys (visual and text).
    text_mask: the static mask among text tokens (causal by default).
    text_valid: optional bool ``[B, T]``: padding rows / keys (False) get importance 0 and give none.
    smoothing: ``lambda`` in [0, 1] (1 = no smoothing, the official default).
  """
  if not 0.0 <= smoothing <= 1.0:
    raise ValueError(f"smoothing must lie in [0, 1], got {smoothing!r}")
  B, T, H, D = jnp.shape(q_text)
  seg = None
  if text_valid is not None:
    text_valid = jnp.asarray(text_valid, bool)
    if text_valid.shape != (B, T):
      raise ValueError(f"text_valid must have shape [B, T] = {(B, T)}, got {text_valid.shape}")
    ids = jnp.where(text_valid, 0, 1).astype(jnp.int32)
    seg = (ids, ids)
  valid = jnp.ones((B, T), bool) if text_valid is None else text_valid
  w = valid.astype(jnp.float32)
  col = row_attention(q_text, k_text, weights=w, lse=lse, mask=text_mask, segment_ids=seg, scale=scale,
                      reduce_heads=None, implementation=implementation)  # [B, H, T]
  own = attention_stats(q_text, k_text, mask=text_mask, segment_ids=seg, stats=("lse",), scale=scale,
                        implementation="xla")["lse"]
  rowsum = jnp.where(jnp.isfinite(own), jnp.exp(own - lse), 0.0)
  G = jnp.shape(k_text)[2]
  sc = D ** -0.5 if scale is None else scale
  kk = jnp.repeat(jnp.asarray(k_text, jnp.float32), H // G, axis=2)
  diag = jnp.exp(jnp.einsum("bthd,bthd->bht", jnp.asarray(q_text, jnp.float32), kk,
                            precision=jax.lax.Precision.HIGHEST) * sc - lse)
  pi = (col + rowsum - diag) * w[:, None]
  if smoothing < 1.0:  # sum_i of the constant (1 - lambda) * mean(S) over valid rows
    n = w.sum(-1)[:, None, None]
    mean_s = pi.sum(-1, keepdims=True) / jnp.maximum(n * n, 1.0)
    pi = (smoothing * pi + (1.0 - smoothing) * mean_s * n) * w[:, None]
  return pi


def text_to_visual(q_text, k_vis, k_text, *, weighting: str = "adaptinfer", text_valid=None,
                   text_mask=masks.Causal(), scale: float | None = None, smoothing: float = 1.0,
                   implementation: str = "xla"):
  r"""Text->visual attention scores of an LM layer whose sequence is ``[visual; text]`` (visual tokens first).

  ``sigma_v = sum_h sum_t w_{h,t} P_h[t, v]`` with the full-row probabilities ``P`` (rows normalised over the
  visual and the text keys) and row weights by ``weighting``:

  - ``"adaptinfer"`` (AdaptInfer): ``w_{h,t} = pi_{h,t}`` from :func:`text_importance`;
  - ``"mean"`` (PDrop's host): ``1 / #text rows`` for every valid row, head mean;
  - ``"last"`` (FastV): only the last valid text row, head mean.

  Args:
    q_text: ``[B, T, H, D]`` the text rows' queries; k_vis: ``[B, V, G, D]``; k_text: ``[B, T, G, D]``.
    text_valid: optional bool ``[B, T]`` (False: padding after the text; such rows get weight 0).
    text_mask: the static mask among text tokens (every text row sees every visual key).

  Returns:
    ``[B, V]`` f32.
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
  for name, x in (("q_text", q_text), ("k_vis", k_vis), ("k_text", k_text)):
    _check_rank(name, x, 4)
  B, T, H, _ = jnp.shape(q_text)
  if jnp.shape(k_text)[1] != T:
    raise ValueError(f"k_text has {jnp.shape(k_text)[1]} tokens, q_text {T}: both must be the text tokens")
  valid = jnp.ones((B, T), bool) if text_valid is None else jnp.asarray(text_valid, bool)
  if valid.shape != (B, T):
    raise ValueError(f"text_valid must have shape [B, T] = {(B, T)}, got {valid.shape}")
  seg = None
  if text_valid is not None:
    ids = jnp.where(valid, 0, 1).astype(jnp.int32)
    seg = (ids, ids)
  lse_v = attention_stats(q_text, k_vis, stats=("lse",), scale=scale, implementation="xla")["lse"]
  lse_t = attention_stats(q_text, k_text, mask=text_mask, segment_ids=seg, stats=("lse",), scale=scale,
                          implementation="xla")["lse"]
  lse = jnp.logaddexp(lse_v, lse_t)
  if weighting == "adaptinfer":
    w = text_importance(q_text, k_text, lse=lse, text_mask=text_mask, text_valid=text_valid, scale=scale,
                        smoothing=smoothing, implementation=implementation)
    return row_attention(q_text, k_vis, weights=w, lse=lse, scale=scale, reduce_heads="sum",
                         implementation=implementation)
  vf = valid.astype(jnp.float32)
  if weighting == "mean":
    w = vf / jnp.maximum(vf.sum(-1, keepdims=True), 1.0)
  else:
    last = jnp.maximum(valid.sum(-1) - 1, 0) if text_valid is not None else jnp.full((B,), T - 1)
    w = jax.nn.one_hot(last, T, dtype=jnp.float32)
  return row_attention(q_text, k_vis, weights=w, lse=lse, scale=scale, reduce_heads="mean",
                       implementation=implementation)


def feature_norm(x):
  """``||x_n||_2`` per token: ``x [B, N, F] -> [B, N]`` f32 (the feature-norm baseline)."""
  _check_rank("x", x, 3)
  return jnp.linalg.norm(jnp.asarray(x, jnp.float32), axis=-1)


def random_scores(key, batch: int, num_tokens: int):
  """Uniform random scores ``[batch, num_tokens]`` (the random-pruning baseline)."""
  if batch < 1 or num_tokens < 1:
    raise ValueError(f"batch={batch} and num_tokens={num_tokens} must be positive")
  return jax.random.uniform(key, (batch, num_tokens), jnp.float32)


def oracle_scores(relevance, *, key=None, jitter: float = 1e-3):
  """The oracle: scores from known relevance labels ``[B, N]`` (e.g. overlap of each patch with the answer's box).

  Ties (e.g. all background patches) are broken at random when ``key`` is given (``jitter`` below the smallest
  label gap you use), else by position.
  """
  _check_rank("relevance", relevance, 2)
  r = jnp.asarray(relevance, jnp.float32)
  if key is not None:
    r = r + jitter * jax.random.uniform(key, r.shape, jnp.float32)
  return r
