"""Cross-attention variants as Flax NNX modules (LXMERT, DCAL, CrossLMM, Wings, Bayes-PFL RCA, CrossTune, OAT).

Every module here routes its attention through :func:`jaxattn.softmax_attention` (``implementation=`` is passed
through, so every softmax backend serves it), takes key padding as lengths or boolean masks (turned into kv segment
ids, which every backend supports), and has a ``return_probs`` path that also returns the dense attention
probabilities ``[B, H, T, S]`` for analysis (small shapes: it materialises the full matrix).

- :class:`CrossAttention`: one module with the variant switches the papers need (``papers/cross.md`` section 22-A
  in the shared notes):

  ========================  =========================================================================================
  switch                    what it does (paper)
  ========================  =========================================================================================
  ``kv_proj="none"``        K = V = memory split into heads, no projections (Bayes-PFL RCA "zero-parameter" K/V)
  ``normalize_memory``      L2-normalise memory tokens before K/V (RCA: cosine-similarity attention)
  ``combine="residual_l2"`` ``y = l2norm(x + attn)`` (RCA); ``"residual"``: ``x + attn``;
  ``combine="tanh_gate"``   ``y = x + tanh(alpha) * attn``, ``alpha`` init ``gate_init = 0`` (CrossLMM, Flamingo)
  ``gate=`` (call)          per-token weights on the attention output (Wings router)
  ``query_index=`` (call)   attend only from a subset of query positions (DCAL GLCA: top-R by rollout)
  ``distractor=`` (call)    keys/values ``[memory; distractor]`` while training, ignored at eval (DCAL PWCA)
  ``*_proj="lowrank..."``   LoRRA projections ``x + x A B`` (B zero-init) and a low-rank-only output (Wings)
  ========================  =========================================================================================

- :class:`LabelAttentionHead`: label-description features query the input tokens; logits per label (CrossTune).
- :class:`CoAttentionLayer`, :class:`LXMERTEncoder`, :class:`EncoderLayer`: LXMERT's two-stream encoder.
- :class:`SideMemoryBlock`: CrossLMM's V2V / T2V tanh-gated cross-attention into an unpooled side memory.
- :class:`LoRRASideLearner`: Wings' visual and textual LoRRA learners mixed by the attention-weight router.
- :class:`ObjectPointerHead`: OAT's pointer logits over object tokens plus a stop logit.
- :func:`top_r_indices`, :func:`batch_distractor`, :func:`padding_segment_ids`, :func:`l2_normalize`: helpers.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxattn.nn import CrossAttention
  >>> rca = CrossAttention(4, 32, kv_proj="none", out_proj="none", normalize_memory=True,
  ...                      combine="residual_l2", scale=32 ** -0.5, use_bias=True, rngs=nnx.Rngs(0))
  >>> text, patches = jnp.ones((2, 2, 32)), jnp.ones((2, 49, 32))
  >>> rca(text, patches, kv_lengths=jnp.array([49, 30])).shape
  (2, 2, 32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.masks import Causal, Mask
from jaxattn.nn._checks import positive_int
from jaxattn.ops.softmax.api import softmax_attention

__all__ = [
    "CrossAttention", "LabelAttentionHead", "CoAttentionLayer", "EncoderLayer", "LXMERTEncoder", "SideMemoryBlock",
    "LoRRASideLearner", "ObjectPointerHead", "top_r_indices", "batch_distractor", "padding_segment_ids",
    "l2_normalize", "dense_probs",
]

# Segment ids given to padded positions: a padded key never matches any query, a padded query no key.
KV_PAD_ID = int(np.iinfo(np.int32).min)
Q_PAD_ID = int(np.iinfo(np.int32).max)

_Q_PROJ = ("linear", "none", "lowrank_residual")
_KV_PROJ = ("linear", "none", "lowrank_residual")
_OUT_PROJ = ("linear", "none", "lowrank")
_COMBINE = ("none", "residual", "residual_l2", "tanh_gate")


# ------------------------------------------------------------------------------------------------------- helpers
def l2_normalize(x, axis: int = -1, eps: float = 1e-6):
  """``x / max(||x||, eps)`` along ``axis`` (finite gradient at 0)."""
  x = jnp.asarray(x)
  ss = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True)
  return (x * jax.lax.rsqrt(jnp.maximum(ss, eps * eps)).astype(x.dtype)).astype(x.dtype)


def top_r_indices(scores, r: int, *, valid=None):
  """Indices of the ``r`` largest ``scores [B, N]`` per row, in ascending position order (DCAL GLCA selection).

  Args:
    scores: ``[B, N]`` e.g. the CLS row of an attention rollout.
    r: how many to keep (``1 <= r <= N``).
    valid: optional bool ``[B, N]``: invalid positions are never picked before valid ones.

  Returns:
    int32 ``[B, r]`` sorted ascending (the original token order is kept).
  """
  scores = jnp.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f"scores must have shape [B, N], got {scores.shape}")
  r = positive_int("r", r)
  if r > scores.shape[1]:
    raise ValueError(f"r={r} exceeds the number of positions N={scores.shape[1]}")
  s = scores.astype(jnp.float32)
  if valid is not None:
    s = jnp.where(jnp.asarray(valid, bool), s, -jnp.inf)
  _, idx = jax.lax.top_k(s, r)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


def batch_distractor(x, shift: int = 1):
  """The distractor of each sample: the batch rolled by ``shift`` (DCAL PWCA pairs ``I_1`` with ``I_2``)."""
  return jnp.roll(jnp.asarray(x), shift, axis=0)


def _valid_mask(name: str, B: int, S: int, lengths=None, mask=None):
  """Bool ``[B, S]`` of valid positions from ``lengths [B]`` or ``mask [B, S]`` (None when neither is given)."""
  if lengths is not None and mask is not None:
    raise ValueError(f"pass either {name}_lengths or {name}_mask, not both")
  if lengths is not None:
    lengths = jnp.asarray(lengths)
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
      raise ValueError(f"{name}_lengths must be integers of shape ({B},) (batch), got {lengths.dtype} {lengths.shape}")
    if not isinstance(lengths, jax.core.Tracer):
      bad = np.asarray(lengths)
      if (bad < 0).any() or (bad > S).any():
        raise ValueError(f"{name}_lengths must lie in [0, {S}] (the {name} length), got {bad.tolist()}")
    return jnp.arange(S)[None, :] < lengths[:, None]
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.shape != (B, S) or mask.dtype != jnp.bool_:
      raise ValueError(f"{name}_mask must be bool of shape ({B}, {S}), got {mask.dtype} {mask.shape}")
    return mask
  return None


def padding_segment_ids(B: int, T: int, S: int, *, q_valid=None, kv_valid=None, segment_ids=None):
  """``(q_ids [B, T], kv_ids [B, S])`` int32 combining user segment ids with query / key padding, or None.

  Padded keys get id ``KV_PAD_ID`` (int32 min) and padded queries ``Q_PAD_ID`` (int32 max), so they match nothing;
  user segment ids must not use those two values.
  """
  if q_valid is None and kv_valid is None and segment_ids is None:
    return None
  if segment_ids is None:
    q_ids, kv_ids = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)
  else:
    if not (isinstance(segment_ids, (tuple, list)) and len(segment_ids) == 2):
      raise ValueError("segment_ids must be a pair (q_ids [B, T], kv_ids [B, S])")
    q_ids, kv_ids = (jnp.asarray(a) for a in segment_ids)
    if q_ids.shape != (B, T) or not jnp.issubdtype(q_ids.dtype, jnp.integer):
      raise ValueError(f"q segment ids must be integers of shape ({B}, {T}), got {q_ids.dtype} {q_ids.shape}")
    if kv_ids.shape != (B, S) or not jnp.issubdtype(kv_ids.dtype, jnp.integer):
      raise ValueError(f"kv segment ids must be integers of shape ({B}, {S}), got {kv_ids.dtype} {kv_ids.shape}")
    q_ids, kv_ids = q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)
  if q_valid is not None:
    q_ids = jnp.where(q_valid, q_ids, Q_PAD_ID)
  if kv_valid is not None:
    kv_ids = jnp.where(kv_valid, kv_ids, KV_PAD_ID)
  return q_ids, kv_ids


def dense_probs(q, k, *, scale: float, ids=None, mask: Mask | None = None):
  """Dense attention probabilities ``[B, H, T, S]`` (f32) of ``q [B, T, H, D]``, ``k [B, S, G, D]``.

  Same masking rules as :func:`jaxattn.softmax_attention` (segment ids and a static mask); a query with no allowed
  key gets an all-zero row (never NaN). Materialises ``T x S`` per head: for analysis at small shapes.
  """
  B, T, H, _ = q.shape
  S, G = k.shape[1], k.shape[2]
  kk = jnp.repeat(k, H // G, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kk.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) * scale
  allowed = jnp.ones((B, 1, T, S), bool)
  if ids is not None:
    allowed = allowed & (ids[0][:, None, :, None] == ids[1][:, None, None, :])
  if mask is not None:
    allowed = allowed & jnp.asarray(mask.to_dense(T, S))[None, None]
  s = jnp.where(allowed, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(allowed, jnp.exp(s - m), 0.0)
  den = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(den > 0, den, 1.0)


def _check_seq(name: str, x, features: int, B: int | None = None):
  """``x`` as an array of shape ``[B, N, features]`` (ValueError naming the offending dimension)."""
  x = jnp.asarray(x)
  if x.ndim != 3:
    raise ValueError(f"{name} must have rank 3 [B, N, {features}], got shape {x.shape}")
  if x.shape[-1] != features:
    raise ValueError(f"{name} has feature dimension {x.shape[-1]}, expected {features}")
  if B is not None and x.shape[0] != B:
    raise ValueError(f"{name} has batch dimension {x.shape[0]}, but the queries have batch {B}")
  if x.shape[1] == 0:
    raise ValueError(f"{name} has an empty sequence dimension: shape {x.shape}")
  return x


def _choice(name: str, value, allowed):
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
  return value


class _LowRank(nnx.Module):
  """``x A B`` with ``A [F, r] ~ trunc_normal(0.02)`` and ``B [r, out]`` zero-initialised (Wings / LoRA)."""

  def __init__(self, in_features: int, out_features: int, rank: int, *, param_dtype, rngs: nnx.Rngs):
    self.a = nnx.Param(nnx.initializers.truncated_normal(0.02)(rngs.params(), (in_features, rank), param_dtype))
    self.b = nnx.Param(jnp.zeros((rank, out_features), param_dtype))

  def __call__(self, x):
    return (x @ self.a[...].astype(x.dtype)) @ self.b[...].astype(x.dtype)


# ------------------------------------------------------------------------------------------------ CrossAttention
class CrossAttention(nnx.Module):
  r"""Multi-head cross-attention from queries ``x`` to a memory, with the variant switches of the cross papers.

  .. math::
     q = P_q(x_{\mathrm{idx}}),\; k = P_k(c),\; v = P_v(c),\quad c = [\mathrm{memory};\ \mathrm{distractor}]
     \text{ (training) or memory},\quad a = P_o\big(\mathrm{softmax}(\mathrm{scale}\; q k^\top) v\big)

  then ``y = a`` (``combine="none"``), ``x + a`` (``"residual"``), ``l2norm(x + a)`` (``"residual_l2"``) or
  ``x + tanh(alpha) a`` (``"tanh_gate"``, scalar ``alpha`` initialised to ``gate_init``); a call's ``gate [B, T]``
  multiplies ``a`` first. Memory tokens are L2-normalised first when ``normalize_memory``.

  Projections: ``"linear"`` (``LinearGeneral`` to heads), ``"none"`` (split the features into heads: ``q``
  ``[B, T, H, F / H]``, ``k = v`` ``[B, S, G, Fkv / G]``), ``"lowrank_residual"`` (``x + x A B`` split into heads,
  ``B`` zero-init: identity at init). Output: ``"linear"``, ``"none"`` (heads merged, width ``H * E``) or
  ``"lowrank"`` (``o A B``: zero at init).

  Shapes: ``x [B, T, in_features]``, ``memory [B, S, in_kv_features]``, ``distractor [B, S2, in_kv_features]``,
  output ``[B, T, out_features]`` (``[B, R, out_features]`` with ``query_index [B, R]``); probabilities
  ``[B, H, T|R, S(+S2)]``. GQA: ``H = num_heads`` query heads read ``G = num_kv_heads`` kv heads.

  Every :func:`jaxattn.softmax_attention` implementation serves it: padding and frame masks are segment ids, and
  the optional static ``mask`` is a :mod:`jaxattn.masks` mask.

  Args:
    num_heads: query heads ``H``.
    in_features: query feature size ``F``.
    in_kv_features: memory feature size ``Fkv`` (default ``F``).
    num_kv_heads: kv heads ``G`` (default ``H``; ``H % G == 0``).
    head_dim: per-head size ``D`` (default: ``Fkv / G`` with ``kv_proj="none"``, else ``F / H``).
    out_features: output size (default ``F``; must be ``H * D`` with ``out_proj="none"``).
    q_proj, kv_proj, out_proj: projection kinds (above).
    lowrank_rank: rank ``r`` of the low-rank projections.
    normalize_memory: L2-normalise each memory (and distractor) token before the kv projections.
    combine: ``"none"``, ``"residual"``, ``"residual_l2"`` or ``"tanh_gate"`` (residual kinds need
      ``out_features == in_features``).
    gate_init: initial ``alpha`` of the tanh gate.
    mask: a static :mod:`jaxattn.masks` mask applied on top (e.g. ``masks.Causal()``) or None.
    scale: logit scale (default ``D ** -0.5``; Bayes-PFL uses ``F ** -0.5``).
    implementation: passed to :func:`jaxattn.softmax_attention`.
    deterministic: default of the call's ``deterministic`` (True: evaluation, distractors ignored); ``module.eval()``
      and ``module.train()`` set it.
    use_bias: biases on the linear projections.
    dtype, param_dtype: computation and parameter dtypes.
    rngs: parameter initialisation.

  Raises:
    ValueError: on inconsistent sizes or options, naming the offending values.
  """

  def __init__(self, num_heads: int, in_features: int, *, in_kv_features: int | None = None,
               num_kv_heads: int | None = None, head_dim: int | None = None, out_features: int | None = None,
               q_proj: str = "linear", kv_proj: str = "linear", out_proj: str = "linear", lowrank_rank: int = 8,
               normalize_memory: bool = False, combine: str = "none", gate_init: float = 0.0,
               mask: Mask | None = None, scale: float | None = None, implementation=None,
               deterministic: bool = False, use_bias: bool = False, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    H = self.num_heads = positive_int("num_heads", num_heads)
    F = self.in_features = positive_int("in_features", in_features)
    Fkv = self.in_kv_features = positive_int("in_kv_features", F if in_kv_features is None else in_kv_features)
    G = self.num_kv_heads = positive_int("num_kv_heads", H if num_kv_heads is None else num_kv_heads)
    if H % G:
      raise ValueError(f"num_heads ({H}) must be a multiple of num_kv_heads ({G})")
    self.q_proj = _choice("q_proj", q_proj, _Q_PROJ)
    self.kv_proj = _choice("kv_proj", kv_proj, _KV_PROJ)
    self.out_proj = _choice("out_proj", out_proj, _OUT_PROJ)
    self.combine = _choice("combine", combine, _COMBINE)
    if head_dim is None:
      if kv_proj == "none":
        if Fkv % G:
          raise ValueError(f"kv_proj='none' splits in_kv_features ({Fkv}) into num_kv_heads ({G}): not divisible")
        head_dim = Fkv // G
      else:
        if F % H:
          raise ValueError(f"in_features ({F}) is not divisible by num_heads ({H}); pass head_dim explicitly")
        head_dim = F // H
    D = self.head_dim = positive_int("head_dim", head_dim)
    if q_proj != "linear" and F != H * D:
      raise ValueError(f"q_proj={q_proj!r} splits in_features ({F}) into num_heads x head_dim = {H} x {D}: "
                       f"they must match")
    if kv_proj != "linear" and Fkv != G * D:
      raise ValueError(f"kv_proj={kv_proj!r} splits in_kv_features ({Fkv}) into num_kv_heads x head_dim = "
                       f"{G} x {D}: they must match")
    Fo = self.out_features = positive_int("out_features", F if out_features is None else out_features)
    if out_proj == "none" and Fo != H * D:
      raise ValueError(f"out_proj='none' gives num_heads x head_dim = {H * D} features, but out_features is {Fo}")
    if combine != "none" and Fo != F:
      raise ValueError(f"combine={combine!r} adds the queries back: out_features ({Fo}) must equal in_features ({F})")
    if mask is not None and not isinstance(mask, Mask):
      raise ValueError(f"mask must be a jaxattn.masks.Mask or None, got {type(mask).__name__}")
    if scale is not None and not (isinstance(scale, (int, float)) and np.isfinite(scale) and scale > 0):
      raise ValueError(f"scale must be a finite positive float or None, got {scale!r}")
    if implementation is not None and not isinstance(implementation, str):
      implementation = tuple(tuple(i) if isinstance(i, list) else i for i in implementation)
    self.lowrank_rank = positive_int("lowrank_rank", lowrank_rank)
    self.normalize_memory = bool(normalize_memory)
    self.mask = mask
    self.scale = None if scale is None else float(scale)
    self.implementation = implementation
    self.deterministic = bool(deterministic)

    lin = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    r = self.lowrank_rank
    self.query = (nnx.LinearGeneral(F, (H, D), **lin) if q_proj == "linear"
                  else _LowRank(F, F, r, param_dtype=param_dtype, rngs=rngs) if q_proj == "lowrank_residual"
                  else None)  # LinearGeneral kernel [F, H, D]
    if kv_proj == "linear":
      self.key = nnx.LinearGeneral(Fkv, (G, D), **lin)  # kernel [Fkv, G, D]
      self.value = nnx.LinearGeneral(Fkv, (G, D), **lin)
    elif kv_proj == "lowrank_residual":
      self.key = _LowRank(Fkv, Fkv, r, param_dtype=param_dtype, rngs=rngs)
      self.value = _LowRank(Fkv, Fkv, r, param_dtype=param_dtype, rngs=rngs)
    else:
      self.key = self.value = None
    self.out = (nnx.LinearGeneral((H, D), Fo, axis=(-2, -1), **lin) if out_proj == "linear"
                else _LowRank(H * D, Fo, r, param_dtype=param_dtype, rngs=rngs) if out_proj == "lowrank"
                else None)  # LinearGeneral kernel [H, D, Fo]
    self.gate_alpha = nnx.Param(jnp.full((), gate_init, param_dtype)) if combine == "tanh_gate" else None

  # -------------------------------------------------------------------------------------------------- pieces
  def project_query(self, x):
    """``x [B, T, F] -> q [B, T, H, D]``."""
    B, T, _ = x.shape
    if self.q_proj == "linear":
      return self.query(x)
    if self.q_proj == "lowrank_residual":
      x = x + self.query(x)
    return x.reshape(B, T, self.num_heads, self.head_dim)

  def project_memory(self, c):
    """``c [B, S, Fkv] -> (k, v)``, each ``[B, S, G, D]`` (L2-normalised first with ``normalize_memory``)."""
    B, S, _ = c.shape
    if self.normalize_memory:
      c = l2_normalize(c)
    shape = (B, S, self.num_kv_heads, self.head_dim)
    if self.kv_proj == "linear":
      return self.key(c), self.value(c)
    if self.kv_proj == "lowrank_residual":
      return (c + self.key(c)).reshape(shape), (c + self.value(c)).reshape(shape)
    k = c.reshape(shape)
    return k, k

  def project_out(self, o):
    """``o [B, T, H, D] -> [B, T, out_features]``."""
    if self.out_proj == "linear":
      return self.out(o)
    o = o.reshape(o.shape[:2] + (self.num_heads * self.head_dim,))
    return self.out(o) if self.out_proj == "lowrank" else o

  # ---------------------------------------------------------------------------------------------------- call
  def __call__(self, x, memory, *, kv_lengths=None, kv_mask=None, q_mask=None, segment_ids=None,
               query_index=None, distractor=None, distractor_lengths=None, distractor_mask=None, gate=None,
               deterministic: bool | None = None, return_probs: bool = False):
    """Applies cross-attention.

    Args:
      x: queries ``[B, T, in_features]``.
      memory: keys/values source ``[B, S, in_kv_features]``.
      kv_lengths: int ``[B]``: the first ``kv_lengths[b]`` memory tokens are valid (or ``kv_mask`` bool ``[B, S]``).
      q_mask: bool ``[B, T]`` valid queries (padded queries output 0 attention: ``y = x`` for residual kinds).
      segment_ids: ``(q_ids [B, T], kv_ids [B, S])``: queries attend only keys with an equal id (e.g. frame ids for
        a block-diagonal mask). Not combinable with ``distractor``.
      query_index: int ``[B, R]``: attend only from these query positions (DCAL GLCA, see :func:`top_r_indices`);
        the output has ``R`` rows.
      distractor: ``[B, S2, in_kv_features]`` appended to the keys/values while training (``deterministic``
        False); ignored at evaluation (DCAL PWCA; :func:`batch_distractor` pairs each sample with another).
      distractor_lengths, distractor_mask: padding of the distractor, as ``kv_lengths`` / ``kv_mask``.
      gate: ``[B, T]`` (or ``[B, R]``) weights multiplying the attention output before the combination (Wings).
      deterministic: overrides the module's ``deterministic`` (True: evaluation).
      return_probs: also return the dense probabilities ``[B, H, T, S(+S2)]`` (f32).

    Returns:
      ``y [B, T|R, out_features]`` (and the probabilities with ``return_probs``).

    Raises:
      ValueError: on shape mismatches, naming the offending dimension.
    """
    x = _check_seq("x", x, self.in_features)
    B, T, _ = x.shape
    memory = _check_seq("memory", memory, self.in_kv_features, B)
    S = memory.shape[1]
    kv_valid = _valid_mask("kv", B, S, kv_lengths, kv_mask)
    q_valid = _valid_mask("q", B, T, None, q_mask)
    if segment_ids is not None and not (isinstance(segment_ids, (tuple, list)) and len(segment_ids) == 2):
      raise ValueError("segment_ids must be a pair (q_ids [B, T], kv_ids [B, S])")
    ids = padding_segment_ids(B, T, S, q_valid=q_valid, kv_valid=kv_valid, segment_ids=segment_ids)

    if query_index is not None:
      query_index = jnp.asarray(query_index)
      if query_index.ndim != 2 or query_index.shape[0] != B or not jnp.issubdtype(query_index.dtype, jnp.integer):
        raise ValueError(f"query_index must be integers of shape [B={B}, R], got {query_index.dtype} "
                         f"{query_index.shape}")
      x = jnp.take_along_axis(x, query_index[..., None], axis=1)  # [B, R, F]
      if ids is not None:
        ids = (jnp.take_along_axis(ids[0], query_index, axis=1), ids[1])
      T = x.shape[1]

    det = self.deterministic if deterministic is None else bool(deterministic)
    k, v = self.project_memory(memory)  # [B, S, G, D]
    if distractor is not None and not det:
      distractor = _check_seq("distractor", distractor, self.in_kv_features, B)
      S2 = distractor.shape[1]
      d_valid = _valid_mask("distractor", B, S2, distractor_lengths, distractor_mask)
      kd, vd = self.project_memory(distractor)
      k, v = jnp.concatenate([k, kd], axis=1), jnp.concatenate([v, vd], axis=1)  # [B, S + S2, G, D]
      if segment_ids is not None:
        # One id per distractor key cannot make it visible to queries of every segment: refuse, never hide it.
        raise ValueError("distractor cannot be combined with segment_ids (use kv_lengths / kv_mask for padding)")
      if ids is not None or d_valid is not None:
        if ids is None:
          ids = (jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32))
        d_ids = jnp.zeros((B, S2), jnp.int32)
        if d_valid is not None:
          d_ids = jnp.where(d_valid, d_ids, KV_PAD_ID)
        ids = (ids[0], jnp.concatenate([ids[1], d_ids], axis=1))
    if self.mask is not None and k.shape[1] != S:
      raise ValueError("a static mask cannot be combined with a distractor (the key length changes)")

    q = self.project_query(x)  # [B, T, H, D]
    q, k, v = (a.astype(jnp.result_type(q, k, v)) for a in (q, k, v))
    scale = self.scale if self.scale is not None else self.head_dim ** -0.5
    o = softmax_attention(q, k, v, mask=self.mask, segment_ids=ids, scale=scale,
                          implementation=self.implementation)  # [B, T, H, D]
    a = self.project_out(o)  # [B, T, Fo]
    if gate is not None:
      gate = jnp.asarray(gate)
      if gate.shape not in ((B, T), (B, T, 1)):
        raise ValueError(f"gate must have shape ({B}, {T}) (batch, queries), got {gate.shape}")
      a = a * (gate if gate.ndim == 3 else gate[..., None]).astype(a.dtype)
    y = self._combine(x, a)
    if not return_probs:
      return y
    return y, dense_probs(q, k, scale=scale, ids=ids, mask=self.mask)

  def _combine(self, x, a):
    if self.combine == "none":
      return a
    if self.combine == "residual":
      return x + a
    if self.combine == "residual_l2":
      return l2_normalize(x + a)
    return x + jnp.tanh(self.gate_alpha[...]).astype(a.dtype) * a


# ------------------------------------------------------------------------------------------ LabelAttentionHead
class LabelAttentionHead(nnx.Module):
  r"""Label-description cross-attention classifier over frozen token features (CrossTune head).

  .. math::
     Q = E W_l,\quad Z = Q + \mathrm{MHA}(Q, X, X),\quad
     \mathrm{logit}_c = w \cdot \mathrm{LN}(Z_c) + b\ \ (\texttt{score="linear"})\ \text{or}\
     \cos(Z_c, Q_c) / \tau\ \ (\texttt{"cosine"})

  Each label's description features ``E_c`` query the input tokens ``X``; the label-specific summary is scored.

  Shapes: ``tokens [B, L, in_features]``, ``labels [C, label_features]`` (shared) or ``[B, C, label_features]``,
  output logits ``[B, C]``; probabilities ``[B, H, C, L]`` with ``return_probs``.

  Args:
    num_heads: attention heads.
    in_features: token feature size.
    label_features: label description feature size (default ``in_features``).
    hidden_features: width ``d'`` of the head (default ``in_features``).
    score: ``"linear"`` or ``"cosine"``.
    temperature: ``tau`` of the cosine score.
    implementation: passed to :func:`jaxattn.softmax_attention`.
    rngs: parameter initialisation.
  """

  def __init__(self, num_heads: int, in_features: int, *, label_features: int | None = None,
               hidden_features: int | None = None, score: str = "linear", temperature: float = 0.1,
               implementation=None, rngs: nnx.Rngs):
    self.in_features = positive_int("in_features", in_features)
    self.label_features = positive_int("label_features", in_features if label_features is None else label_features)
    self.hidden_features = positive_int("hidden_features", in_features if hidden_features is None else hidden_features)
    self.score = _choice("score", score, ("linear", "cosine"))
    if not (isinstance(temperature, (int, float)) and temperature > 0):
      raise ValueError(f"temperature must be a positive float, got {temperature!r}")
    self.temperature = float(temperature)
    d = self.hidden_features
    self.label_proj = nnx.Linear(self.label_features, d, rngs=rngs)
    self.attn = CrossAttention(num_heads, d, in_kv_features=self.in_features, combine="residual",
                               implementation=implementation, rngs=rngs)
    if score == "linear":
      self.norm = nnx.LayerNorm(d, rngs=rngs)
      self.classifier = nnx.Linear(d, 1, rngs=rngs)

  def __call__(self, tokens, labels, *, kv_lengths=None, kv_mask=None, return_probs: bool = False):
    """Logits ``[B, C]`` of ``tokens [B, L, F]`` for ``labels [C, Fl]`` or ``[B, C, Fl]`` (see the class)."""
    tokens = _check_seq("tokens", tokens, self.in_features)
    B = tokens.shape[0]
    labels = jnp.asarray(labels)
    if labels.ndim == 2:
      labels = jnp.broadcast_to(labels[None], (B,) + labels.shape)
    labels = _check_seq("labels", labels, self.label_features, B)
    q = self.label_proj(labels)  # [B, C, d]
    res = self.attn(q, tokens, kv_lengths=kv_lengths, kv_mask=kv_mask, return_probs=return_probs)
    z, probs = res if return_probs else (res, None)
    if self.score == "linear":
      logits = self.classifier(self.norm(z))[..., 0]
    else:
      logits = jnp.sum(l2_normalize(z) * l2_normalize(q), axis=-1) / self.temperature
    return (logits, probs) if return_probs else logits


# ------------------------------------------------------------------------------------------------------ LXMERT
class _FFN(nnx.Module):
  def __init__(self, features: int, hidden: int, rngs: nnx.Rngs):
    self.up = nnx.Linear(features, hidden, rngs=rngs)
    self.down = nnx.Linear(hidden, features, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


class _CrossSublayer(nnx.Module):
  """LXMERT's ``CrossAtt(x, c) = LN(x + Dense(MHA(x W_q, c W_k, c W_v)))``."""

  def __init__(self, features, num_heads, num_kv_heads, implementation, rngs):
    self.attn = CrossAttention(num_heads, features, num_kv_heads=num_kv_heads, combine="residual",
                               use_bias=True, implementation=implementation, rngs=rngs)
    self.norm = nnx.LayerNorm(features, rngs=rngs)

  def __call__(self, x, c, kv_valid, return_probs):
    res = self.attn(x, c, kv_mask=kv_valid, return_probs=return_probs)
    y, p = res if return_probs else (res, None)
    return self.norm(y), p


class EncoderLayer(nnx.Module):
  """Post-LN transformer encoder layer: ``x = LN(x + SA(x)); x = LN(x + FFN(x))`` (BERT / LXMERT single stream).

  Shapes: ``x [B, N, features]`` -> ``[B, N, features]``; padding by ``lengths [B]`` or ``mask [B, N]``.
  """

  def __init__(self, features: int, num_heads: int, *, num_kv_heads: int | None = None,
               ffn_features: int | None = None, implementation=None, rngs: nnx.Rngs):
    self.features = positive_int("features", features)
    self.self_attn = _CrossSublayer(features, num_heads, num_kv_heads, implementation, rngs)
    self.ffn = _FFN(features, positive_int("ffn_features", ffn_features or 4 * features), rngs)
    self.ffn_norm = nnx.LayerNorm(features, rngs=rngs)

  def __call__(self, x, *, lengths=None, mask=None, return_probs: bool = False):
    x = _check_seq("x", x, self.features)
    valid = _valid_mask("x", x.shape[0], x.shape[1], lengths, mask)
    x, p = self.self_attn(x, x, valid, return_probs)
    x = self.ffn_norm(x + self.ffn(x))
    return (x, p) if return_probs else x


class CoAttentionLayer(nnx.Module):
  r"""LXMERT cross-modality layer: bidirectional cross-attention -> per-modality self-attention -> per-modality FFN.

  .. math::
     l' = \mathrm{CrossAtt}(l, v),\ v' = \mathrm{CrossAtt}'(v, l)\ \text{(both from the inputs; } \mathrm{CrossAtt}'
     = \mathrm{CrossAtt} \text{ with share\_cross)},\quad l'' = \mathrm{SA}_l(l'),\ v'' = \mathrm{SA}_v(v'),\quad
     \text{then } \mathrm{FFN}_l, \mathrm{FFN}_v

  each sublayer post-LN residual (``LN(x + f(x))``).

  Shapes: ``lang [B, T, features]``, ``vis [B, N, features]`` -> the same; padding by ``*_lengths [B]`` or
  ``*_mask [B, T|N]``. With ``return_probs`` also a dict of probabilities ``{"l2v" [B,H,T,N], "v2l" [B,H,N,T],
  "l_self" [B,H,T,T], "v_self" [B,H,N,N]}``.

  Args:
    features: model width (both streams).
    num_heads, num_kv_heads: heads of every attention sublayer (GQA when ``num_kv_heads < num_heads``).
    ffn_features: FFN hidden width (default ``4 * features``).
    share_cross: one cross-attention sublayer for both directions (LXMERT) or two (untied forks).
    implementation: passed to :func:`jaxattn.softmax_attention`.
    rngs: parameter initialisation.
  """

  def __init__(self, features: int, num_heads: int, *, num_kv_heads: int | None = None,
               ffn_features: int | None = None, share_cross: bool = True, implementation=None, rngs: nnx.Rngs):
    self.features = positive_int("features", features)
    self.share_cross = bool(share_cross)
    self.cross_l = _CrossSublayer(features, num_heads, num_kv_heads, implementation, rngs)
    self.cross_v = (None if share_cross else
                    _CrossSublayer(features, num_heads, num_kv_heads, implementation, rngs))
    kw = dict(num_kv_heads=num_kv_heads, ffn_features=ffn_features, implementation=implementation, rngs=rngs)
    self.lang = EncoderLayer(features, num_heads, **kw)
    self.vis = EncoderLayer(features, num_heads, **kw)

  def __call__(self, lang, vis, *, lang_lengths=None, lang_mask=None, vis_lengths=None, vis_mask=None,
               return_probs: bool = False):
    lang = _check_seq("lang", lang, self.features)
    B = lang.shape[0]
    vis = _check_seq("vis", vis, self.features, B)
    l_valid = _valid_mask("lang", B, lang.shape[1], lang_lengths, lang_mask)
    v_valid = _valid_mask("vis", B, vis.shape[1], vis_lengths, vis_mask)
    cross_v = self.cross_l if self.share_cross else self.cross_v
    l1, p_lv = self.cross_l(lang, vis, v_valid, return_probs)
    v1, p_vl = cross_v(vis, lang, l_valid, return_probs)
    lo = self.lang(l1, mask=l_valid, return_probs=return_probs)
    vo = self.vis(v1, mask=v_valid, return_probs=return_probs)
    if not return_probs:
      return lo, vo
    (lo, p_ll), (vo, p_vv) = lo, vo
    return lo, vo, {"l2v": p_lv, "v2l": p_vl, "l_self": p_ll, "v_self": p_vv}


class LXMERTEncoder(nnx.Module):
  """LXMERT-lite: ``N_L`` language layers, ``N_R`` object layers, then ``N_X`` :class:`CoAttentionLayer` s.

  Inputs are already embedded (``lang [B, T, features]``: word + position embeddings; ``vis [B, N, features]``:
  LXMERT's ``(LN(W_F f) + LN(W_P p)) / 2`` object embeddings, built by the caller). Returns
  ``(lang [B, T, features], vis [B, N, features], pooled [B, features])`` with ``pooled = tanh(W lang[:, 0])``
  (the [CLS] vector).
  """

  def __init__(self, features: int, num_heads: int, *, num_language_layers: int = 1, num_object_layers: int = 1,
               num_cross_layers: int = 1, num_kv_heads: int | None = None, ffn_features: int | None = None,
               share_cross: bool = True, implementation=None, rngs: nnx.Rngs):
    self.features = positive_int("features", features)
    kw = dict(num_kv_heads=num_kv_heads, ffn_features=ffn_features, implementation=implementation, rngs=rngs)
    n_l, n_r, n_x = (int(n) for n in (num_language_layers, num_object_layers, num_cross_layers))
    if min(n_l, n_r) < 0 or n_x < 1:
      raise ValueError(f"layer counts must be >= 0 (language {n_l}, object {n_r}) and >= 1 (cross {n_x})")
    self.lang_layers = nnx.List([EncoderLayer(features, num_heads, **kw) for _ in range(n_l)])
    self.vis_layers = nnx.List([EncoderLayer(features, num_heads, **kw) for _ in range(n_r)])
    self.cross_layers = nnx.List([CoAttentionLayer(features, num_heads, share_cross=share_cross, **kw)
                                  for _ in range(n_x)])
    self.pooler = nnx.Linear(features, features, rngs=rngs)

  def __call__(self, lang, vis, *, lang_lengths=None, lang_mask=None, vis_lengths=None, vis_mask=None):
    lang = _check_seq("lang", lang, self.features)
    B = lang.shape[0]
    vis = _check_seq("vis", vis, self.features, B)
    l_valid = _valid_mask("lang", B, lang.shape[1], lang_lengths, lang_mask)
    v_valid = _valid_mask("vis", B, vis.shape[1], vis_lengths, vis_mask)
    for layer in self.lang_layers:
      lang = layer(lang, mask=l_valid)
    for layer in self.vis_layers:
      vis = layer(vis, mask=v_valid)
    for layer in self.cross_layers:
      lang, vis = layer(lang, vis, lang_mask=l_valid, vis_mask=v_valid)
    return lang, vis, jnp.tanh(self.pooler(lang[:, 0]))


# --------------------------------------------------------------------------------------------- SideMemoryBlock
class SideMemoryBlock(nnx.Module):
  r"""CrossLMM dual cross-attention into an unpooled side memory (insert after the self-attention of every K-th layer).

  .. math::
     h_i \mathrel{+}= [\mathrm{id}_i = 0]\, \tanh(\alpha_v)\, \mathrm{Attn}_{V2V}(h_i, M)
                    + [\mathrm{id}_i = 1]\, \tanh(\alpha_t)\, \mathrm{Attn}_{T2V}(h_i, M)

  ``query_ids [B, L]`` say which positions are pooled visual tokens (0, V2V) and text tokens (1, T2V); other ids
  are left untouched. Gates start at ``gate_init = 0`` (identity). With ``query_frames [B, L]`` and
  ``memory_frames [B, M]`` the V2V branch is block-diagonal: each pooled token reads only its own frame's memory
  (cost ``T n N`` instead of ``T^2 n N``); T2V always reads the whole memory.

  Shapes: ``h [B, L, features]``, ``memory [B, M, memory_features]`` -> ``[B, L, features]``.

  Args:
    features: width of the LM hidden states.
    num_heads, num_kv_heads, head_dim: attention layout of both branches.
    memory_features: width of the memory (default ``features``).
    branches: which of ``("v2v", "t2v")`` to build (CrossLMM ablates T2V).
    gate_init: initial tanh-gate parameter.
    implementation: passed to :func:`jaxattn.softmax_attention`.
    rngs: parameter initialisation.
  """

  def __init__(self, features: int, num_heads: int, *, memory_features: int | None = None,
               num_kv_heads: int | None = None, head_dim: int | None = None, branches=("v2v", "t2v"),
               gate_init: float = 0.0, implementation=None, rngs: nnx.Rngs):
    self.features = positive_int("features", features)
    self.memory_features = positive_int("memory_features", features if memory_features is None else memory_features)
    branches = tuple(branches)
    if not branches or any(b not in ("v2v", "t2v") for b in branches) or len(set(branches)) != len(branches):
      raise ValueError(f"branches must be a non-empty subset of ('v2v', 't2v'), got {branches!r}")
    self.branches = branches
    kw = dict(in_kv_features=self.memory_features, num_kv_heads=num_kv_heads, head_dim=head_dim,
              combine="tanh_gate", gate_init=gate_init, implementation=implementation, rngs=rngs)
    self.v2v = CrossAttention(num_heads, features, **kw) if "v2v" in branches else None
    self.t2v = CrossAttention(num_heads, features, **kw) if "t2v" in branches else None

  def __call__(self, h, memory, query_ids, *, memory_lengths=None, memory_mask=None, query_frames=None,
               memory_frames=None, return_probs: bool = False):
    h = _check_seq("h", h, self.features)
    B, L, _ = h.shape
    memory = _check_seq("memory", memory, self.memory_features, B)
    M = memory.shape[1]
    query_ids = jnp.asarray(query_ids)
    if query_ids.shape != (B, L):
      raise ValueError(f"query_ids must have shape ({B}, {L}) (batch, sequence), got {query_ids.shape}")
    if (query_frames is None) != (memory_frames is None):
      raise ValueError("pass both query_frames and memory_frames (block-diagonal V2V), or neither")
    m_valid = _valid_mask("memory", B, M, memory_lengths, memory_mask)
    probs = {}
    out = h
    for name, branch_id, mod in (("v2v", 0, self.v2v), ("t2v", 1, self.t2v)):
      if mod is None:
        continue
      sel = query_ids == branch_id  # [B, L]
      seg = None
      if name == "v2v" and query_frames is not None:
        seg = (query_frames, memory_frames)
      ids = padding_segment_ids(B, L, M, q_valid=sel, kv_valid=m_valid, segment_ids=seg)
      # tanh-gated residual on h's positions of this branch only; other rows see no key (output 0).
      res = mod(h, memory, segment_ids=ids, return_probs=return_probs)
      y, p = res if return_probs else (res, None)
      out = out + jnp.where(sel[..., None], y - h, 0.0)
      if return_probs:
        probs[name] = p
    return (out, probs) if return_probs else out


# ------------------------------------------------------------------------------------------- LoRRASideLearner
class LoRRASideLearner(nnx.Module):
  r"""Wings: visual and textual LoRRA side learners mixed by the attention-weight router (add after self-attention).

  .. math::
     \mathrm{LoRRA}(x, c):\ Q = x + x A_q B_q,\ K = c + c A_k B_k,\ V = c + c A_v B_v,\
     \mathrm{out} = \mathrm{softmax}(Q K^\top / \sqrt{d_h}) V\, A_o B_o \\
     W = \textstyle\sum_h P^{\mathrm{main}}_h \in R^{B \times L \times L},\quad
     (r_v, r_t) = \mathrm{softmax}(\mathrm{SiLU}(W\, U_{[:L]} + b)),\quad
     h \leftarrow h + r_v\, \mathrm{LoRRA}(h, X_{vis}) + r_t\, \mathrm{LoRRA}_{causal}(h, X_{txt})

  ``B_*`` start at zero, so the learner is the identity (adds 0) at initialisation. The textual learner attends
  causally (static ``masks.Causal()``) to the text-token embeddings ``text [B, L, features]`` aligned with ``h``,
  restricted to positions where ``text_mask`` is True. RoPE inside the learners (Wings rotates Q and K) is left out.

  Args:
    features: hidden width ``d`` (``num_heads * head_dim``).
    num_heads: heads of both learners.
    rank: LoRRA rank ``r``.
    max_length: ``L_max`` of the router's ``Linear(L_max -> 2)`` over key positions (sliced to ``L``).
    implementation: passed to :func:`jaxattn.softmax_attention`.
    rngs: parameter initialisation.
  """

  def __init__(self, features: int, num_heads: int, *, rank: int = 8, max_length: int, implementation=None,
               rngs: nnx.Rngs):
    self.features = positive_int("features", features)
    self.max_length = positive_int("max_length", max_length)
    kw = dict(q_proj="lowrank_residual", kv_proj="lowrank_residual", out_proj="lowrank", lowrank_rank=rank,
              implementation=implementation, rngs=rngs)
    self.visual = CrossAttention(num_heads, features, **kw)
    self.textual = CrossAttention(num_heads, features, mask=Causal(), **kw)
    self.router = nnx.Linear(self.max_length, 2, rngs=rngs)  # kernel [L_max, 2]

  def route(self, attn_probs):
    """Router weights ``[B, L, 2]`` (visual, textual) from the main branch's probabilities ``[B, H, L, L]``."""
    attn_probs = jnp.asarray(attn_probs)
    if attn_probs.ndim != 4 or attn_probs.shape[-1] != attn_probs.shape[-2]:
      raise ValueError(f"attn_probs must have shape [B, H, L, L], got {attn_probs.shape}")
    L = attn_probs.shape[-1]
    if L > self.max_length:
      raise ValueError(f"sequence length L={L} exceeds the router's max_length={self.max_length}")
    w = jnp.sum(attn_probs, axis=1)  # [B, L, L]
    logits = w @ self.router.kernel[...][:L] + self.router.bias[...]
    return jax.nn.softmax(jax.nn.silu(logits), axis=-1)

  def __call__(self, h, visual, text, attn_probs, *, text_mask=None, visual_lengths=None, visual_mask=None,
               return_router: bool = False):
    """``h [B, L, d]``, ``visual [B, Nv, d]``, ``text [B, L, d]``, ``attn_probs [B, H, L, L]`` -> ``[B, L, d]``."""
    h = _check_seq("h", h, self.features)
    B, L, _ = h.shape
    visual = _check_seq("visual", visual, self.features, B)
    text = _check_seq("text", text, self.features, B)
    if text.shape[1] != L:
      raise ValueError(f"text must be aligned with h: length {text.shape[1]} != {L}")
    if jnp.asarray(attn_probs).shape[:1] + jnp.asarray(attn_probs).shape[2:] != (B, L, L):
      raise ValueError(f"attn_probs must have shape [{B}, H, {L}, {L}], got {jnp.asarray(attn_probs).shape}")
    r = self.route(attn_probs)  # [B, L, 2]
    out_v = self.visual(h, visual, kv_lengths=visual_lengths, kv_mask=visual_mask)
    out_t = self.textual(h, text, kv_mask=text_mask)
    y = h + r[..., :1] * out_v + r[..., 1:] * out_t
    return (y, r) if return_router else y


# ------------------------------------------------------------------------------------------ ObjectPointerHead
class ObjectPointerHead(nnx.Module):
  r"""OAT pointer head: per-head scaled dot products between decoder states and object tokens, plus a stop logit.

  .. math::
     \ell^{(g)}_{t,j} = \frac{(W_e^g e_j) \cdot (W_d^g d_t)}{\sqrt{d_k}},\quad \ell^{(g)}_{t,N+1} = 0,\quad
     \ell_{t,\cdot} = \mathrm{Linear}_{G \to 1}\big([\ell^{(1)}_{t,\cdot}, \dots, \ell^{(G)}_{t,\cdot}]\big)

  Returns logits ``[B, T, N (+1)]`` over the objects (and "stop" last); padded objects get a large negative logit.
  These are attention logits used as the output distribution, so no softmax kernel runs here; the probabilities
  are ``jax.nn.softmax(logits)``.

  Shapes: ``decoder [B, T, decoder_features]``, ``objects [B, N, object_features]``.
  """

  def __init__(self, num_heads: int, decoder_features: int, object_features: int | None = None, *,
               head_dim: int | None = None, stop_logit: bool = True, rngs: nnx.Rngs):
    G = self.num_heads = positive_int("num_heads", num_heads)
    self.decoder_features = positive_int("decoder_features", decoder_features)
    self.object_features = positive_int("object_features",
                                        decoder_features if object_features is None else object_features)
    if head_dim is None:
      if self.decoder_features % G:
        raise ValueError(f"decoder_features ({self.decoder_features}) is not divisible by num_heads ({G}); "
                         f"pass head_dim")
      head_dim = self.decoder_features // G
    self.head_dim = positive_int("head_dim", head_dim)
    self.stop_logit = bool(stop_logit)
    self.w_d = nnx.LinearGeneral(self.decoder_features, (G, self.head_dim), use_bias=False, rngs=rngs)
    self.w_e = nnx.LinearGeneral(self.object_features, (G, self.head_dim), use_bias=False, rngs=rngs)
    self.mix = nnx.Linear(G, 1, rngs=rngs)

  def __call__(self, decoder, objects, *, object_lengths=None, object_mask=None):
    decoder = _check_seq("decoder", decoder, self.decoder_features)
    B = decoder.shape[0]
    objects = _check_seq("objects", objects, self.object_features, B)
    N = objects.shape[1]
    valid = _valid_mask("object", B, N, object_lengths, object_mask)
    qd, ke = self.w_d(decoder), self.w_e(objects)  # [B, T, G, Dk], [B, N, G, Dk]
    logits = jnp.einsum("btgd,bngd->btng", qd, ke) * self.head_dim ** -0.5  # [B, T, N, G]
    if self.stop_logit:
      logits = jnp.concatenate([logits, jnp.zeros(logits.shape[:2] + (1, self.num_heads), logits.dtype)], axis=2)
    out = self.mix(logits)[..., 0]  # [B, T, N (+1)]
    if valid is not None:
      if self.stop_logit:
        valid = jnp.concatenate([valid, jnp.ones((B, 1), bool)], axis=1)
      out = jnp.where(valid[:, None, :], out, jnp.asarray(-1e9, out.dtype))
    return out
