"""Pair and retrieval encoders (Trans-Encoder, DSE, MVP, KaLM-Embedding-V2; ``papers/cross.md`` §4, 6, 8, 20, 22-D
in the shared notes) as Flax NNX modules, plus the pooling and scoring functions they share.

- :class:`TextBackbone`: a small pre-LN transformer over token ids built from :class:`MultiHeadAttention`, with a
  **mask switch**: ``causal=True`` (a decoder LM) or ``causal=False`` (bidirectional, KaLM-V2's conversion of a
  causal LM into an embedder: same weights, the causal mask removed, padding masked only). Padding is given as
  ``valid [B, T]`` and becomes segment ids, so every softmax backend serves it.
- Pooling, as pure functions of ``(h [B, T, D], valid [B, T])``: :func:`mean_pool` (padding excluded),
  :func:`cls_pool` (position 0), :func:`last_pool` (the last valid token: the causal LM choice),
  :func:`attention_pool` (softmax over ``h @ w``). A fully padded row pools to the **zero vector** (documented,
  finite, never NaN); :func:`cosine` then scores it 0.
- Scoring heads: :func:`cosine` (bi-encoder), :class:`CrossHead` (cross-encoder logit from the pooled joint
  sequence), :func:`dse_features` ``[u, v, u*v, |u-v|]`` + :class:`DSEHead` (MLP), :class:`ViewAnchorHead` (MVP:
  one learned query per view cross-attends over all candidates' view vectors, ``s_i = mean_k <a_k, e_ik>``).
- :class:`PairEncoder`: one module in three modes over one backbone —

  =========  =======================================================================================================
  mode       what it scores
  =========  =======================================================================================================
  ``bi``     ``u = pool(Enc(a))``, ``v = pool(Enc(b))``; :meth:`~PairEncoder.score` = ``cos(u, v)`` or the DSE
             head on ``[u, v, u*v, |u-v|]`` (``head="dse"``); :meth:`~PairEncoder.embed` encodes once per text
  ``cross``  ``Enc([CLS] a [SEP] b [SEP])`` with segment types 0/1, pooled -> :class:`CrossHead` logits
  ``fid``    MVP: each candidate ``[v_1..v_m] query [SEP] passage`` is encoded independently with ``m`` learned view
             tokens at fixed positions; ``e_ik`` = hidden state at view ``k``; :class:`ViewAnchorHead` scores
  =========  =======================================================================================================

- :func:`pack_pairs`: the joint cross-encoder sequence of two padded batches (jit-compatible).

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxattn.nn.pair import PairEncoder, TextBackbone
  >>> bb = TextBackbone(vocab_size=50, max_len=32, features=32, num_heads=4, num_layers=2, rngs=nnx.Rngs(0))
  >>> enc = PairEncoder(bb, mode="bi", pooling="mean", rngs=nnx.Rngs(1))
  >>> a = jnp.array([[5, 6, 7, 0], [8, 9, 0, 0]]); la = jnp.array([3, 2])
  >>> enc.score(a, la, a, la).round(3)
  Array([1., 1.], dtype=float32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.masks import Causal, Full
from jaxattn.nn._checks import positive_int
from jaxattn.nn.attention import MultiHeadAttention

__all__ = [
    "POOLINGS", "MODES", "mean_pool", "cls_pool", "last_pool", "attention_pool", "pool", "cosine", "dse_features",
    "valid_from_lengths", "pack_pairs", "TextBackbone", "CrossHead", "DSEHead", "ViewAnchorHead", "PairEncoder",
]

POOLINGS = ("mean", "cls", "last", "attention")
MODES = ("bi", "cross", "fid")
# Special token ids every backbone here reserves: 0 padding, 1 [CLS], 2 [SEP].
PAD, CLS, SEP = 0, 1, 2


# --------------------------------------------------------------------------------------------------- pooling
def _check_pool_inputs(h, valid):
  h = jnp.asarray(h)
  valid = jnp.asarray(valid)
  if h.ndim != 3:
    raise ValueError(f"h must have shape [B, T, D], got {h.shape}")
  if valid.shape != h.shape[:2] or valid.dtype != jnp.bool_:
    raise ValueError(f"valid must be bool of shape {h.shape[:2]} (h's [B, T]), got {valid.dtype} {valid.shape}")
  return h, valid


def valid_from_lengths(lengths, T: int):
  """Bool ``[B, T]``: position ``t`` is valid iff ``t < lengths[b]`` (ValueError on lengths outside ``[0, T]``)."""
  lengths = jnp.asarray(lengths)
  if lengths.ndim != 1 or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be integers of shape [B], got {lengths.dtype} {lengths.shape}")
  if not isinstance(lengths, jax.core.Tracer):
    bad = np.asarray(lengths)
    if (bad < 0).any() or (bad > T).any():
      raise ValueError(f"lengths must lie in [0, {T}] (the sequence length), got {bad.tolist()}")
  return jnp.arange(T)[None, :] < lengths[:, None]


def mean_pool(h, valid):
  """``sum_t valid_t h_t / sum_t valid_t``: ``h [B, T, D]``, ``valid [B, T]`` -> ``[B, D]`` (f32 accumulation).

  A fully padded row returns zeros (finite; its gradient is zero)."""
  h, valid = _check_pool_inputs(h, valid)
  w = valid.astype(jnp.float32)
  n = w.sum(1, keepdims=True)
  s = jnp.einsum("bt,btd->bd", w, h.astype(jnp.float32))
  return (s / jnp.maximum(n, 1.0)).astype(h.dtype)


def cls_pool(h, valid):
  """``h[:, 0]`` (``[B, D]``); zeros where position 0 is padding (a fully padded row)."""
  h, valid = _check_pool_inputs(h, valid)
  return jnp.where(valid[:, :1], h[:, 0], 0).astype(h.dtype)


def last_pool(h, valid):
  """The hidden state of the last valid token of each row (``[B, D]``; right padding); zeros when none is valid.

  This is the causal LM's embedding (only the last token has seen the whole text)."""
  h, valid = _check_pool_inputs(h, valid)
  T = h.shape[1]
  last = jnp.max(jnp.where(valid, jnp.arange(T)[None, :], -1), axis=1)  # [B], -1 when fully padded
  out = jnp.take_along_axis(h, jnp.maximum(last, 0)[:, None, None], axis=1)[:, 0]
  return jnp.where((last >= 0)[:, None], out, 0).astype(h.dtype)


def attention_pool(h, valid, w):
  """``sum_t softmax_t(h_t . w) h_t`` over valid tokens; ``w [D]`` -> ``[B, D]``; zeros for a fully padded row."""
  h, valid = _check_pool_inputs(h, valid)
  w = jnp.asarray(w)
  if w.shape != h.shape[-1:]:
    raise ValueError(f"attention pooling weight must have shape ({h.shape[-1]},), got {w.shape}")
  s = jnp.einsum("btd,d->bt", h.astype(jnp.float32), w.astype(jnp.float32))
  s = jnp.where(valid, s, -jnp.inf)
  m = jnp.max(s, axis=1, keepdims=True)
  e = jnp.where(valid, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  p = e / jnp.maximum(e.sum(1, keepdims=True), 1e-30)
  return jnp.einsum("bt,btd->bd", p, h.astype(jnp.float32)).astype(h.dtype)


def pool(h, valid, kind: str, w=None):
  """Dispatch over :data:`POOLINGS` (``w`` is the attention-pooling weight ``[D]``)."""
  if kind == "mean":
    return mean_pool(h, valid)
  if kind == "cls":
    return cls_pool(h, valid)
  if kind == "last":
    return last_pool(h, valid)
  if kind == "attention":
    if w is None:
      raise ValueError("attention pooling needs its weight vector w [D]")
    return attention_pool(h, valid, w)
  raise ValueError(f"pooling must be one of {POOLINGS}, got {kind!r}")


def _check_pair(u, v, names=("u", "v")):
  u, v = jnp.asarray(u), jnp.asarray(v)
  if u.ndim != 2 or v.ndim != 2:
    raise ValueError(f"{names[0]} and {names[1]} must have shape [B, D], got {u.shape} and {v.shape}")
  if u.shape[0] != v.shape[0]:
    raise ValueError(f"pair batch sizes differ: {names[0]} has {u.shape[0]} rows, {names[1]} has {v.shape[0]}")
  if u.shape[1] != v.shape[1]:
    raise ValueError(f"pair feature sizes differ: {names[0]} has {u.shape[1]}, {names[1]} has {v.shape[1]}")
  return u, v


def cosine(u, v, eps: float = 1e-6):
  """Row-wise cosine similarity of ``u, v [B, D]`` -> ``[B]``; a zero vector scores 0 (never NaN)."""
  u, v = _check_pair(u, v)
  u32, v32 = u.astype(jnp.float32), v.astype(jnp.float32)
  nu = jnp.sqrt(jnp.maximum(jnp.sum(u32 * u32, -1), eps * eps))
  nv = jnp.sqrt(jnp.maximum(jnp.sum(v32 * v32, -1), eps * eps))
  return jnp.sum(u32 * v32, -1) / (nu * nv)


def dse_features(u, v):
  """DSE's pair features ``[u, v, u*v, |u-v|]``: ``u, v [B, D]`` -> ``[B, 4D]`` (symmetric in the last two)."""
  u, v = _check_pair(u, v)
  return jnp.concatenate([u, v, u * v, jnp.abs(u - v)], axis=-1)


def pack_pairs(a, a_lengths, b, b_lengths):
  """The cross-encoder input ``[CLS] a [SEP] b [SEP]`` of two right-padded batches (jit-compatible).

  Args:
    a: int ``[B, Ta]`` token ids, valid prefix ``a_lengths [B]``; ``b``, ``b_lengths`` likewise (``[B, Tb]``).

  Returns:
    ``(tokens [B, Ta + Tb + 3], lengths [B], types [B, Ta + Tb + 3])``: right-padded with 0; ``types`` is 0 on
    ``[CLS] a [SEP]``, 1 on ``b [SEP]`` and 0 on padding.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.ndim != 2 or b.ndim != 2:
    raise ValueError(f"a and b must be token ids of shape [B, T], got {a.shape} and {b.shape}")
  if a.shape[0] != b.shape[0]:
    raise ValueError(f"pair batch sizes differ: a has {a.shape[0]} rows, b has {b.shape[0]}")
  B, Ta = a.shape
  Tb = b.shape[1]
  valid_from_lengths(a_lengths, Ta)
  valid_from_lengths(b_lengths, Tb)
  la, lb = jnp.asarray(a_lengths)[:, None], jnp.asarray(b_lengths)[:, None]
  L = Ta + Tb + 3
  j = jnp.arange(L)[None, :]
  ai = jnp.clip(j - 1, 0, Ta - 1)
  bi = jnp.clip(j - la - 2, 0, Tb - 1)
  ta = jnp.take_along_axis(a, jnp.broadcast_to(ai, (B, L)), axis=1)
  tb = jnp.take_along_axis(b, jnp.broadcast_to(bi, (B, L)), axis=1)
  tok = jnp.where(j == 0, CLS, jnp.where(j <= la, ta, jnp.where(j == la + 1, SEP, jnp.where(
      j <= la + 1 + lb, tb, jnp.where(j == la + lb + 2, SEP, PAD)))))
  lengths = (la + lb + 3)[:, 0]
  types = ((j > la + 1) & (j < lengths[:, None])).astype(jnp.int32)
  return tok.astype(a.dtype), lengths.astype(jnp.int32), types


# --------------------------------------------------------------------------------------------------- modules
class _Block(nnx.Module):
  """Pre-LN transformer block ``x + SA(LN(x))``, then ``x + MLP(LN(x))`` (GELU)."""

  def __init__(self, features: int, num_heads: int, mlp_ratio: int, implementation, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(features, rngs=rngs)
    self.attn = MultiHeadAttention(num_heads, features, implementation=implementation, rngs=rngs)
    self.ln2 = nnx.LayerNorm(features, rngs=rngs)
    self.fc1 = nnx.Linear(features, mlp_ratio * features, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_ratio * features, features, rngs=rngs)

  def __call__(self, x, mask, segment_ids):
    x = x + self.attn(self.ln1(x), mask=mask, segment_ids=segment_ids)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class TextBackbone(nnx.Module):
  """Token + learned position + segment-type embeddings, ``num_layers`` pre-LN blocks, final LayerNorm.

  ``__call__(tokens [B, T], valid [B, T], *, types=None, causal=None) -> h [B, T, features]``. ``causal`` overrides
  the default given at construction (the **mask switch**): ``True`` attends to ``j <= i`` (a decoder LM),
  ``False`` to every valid key. Padded keys are never attended (segment id 0 vs 1 for valid tokens; padded queries
  attend to padded keys only, so no row is empty and nothing is NaN). :meth:`lm_logits` ties the output to the
  token embedding (for causal LM pre-training). :meth:`embed` / :meth:`encode` split the call so gradients can be
  taken with respect to the input embeddings (saliency).

  Args:
    vocab_size, max_len: token vocabulary (ids 0 pad, 1 [CLS], 2 [SEP] reserved) and maximum length.
    features, num_heads, num_layers, mlp_ratio: transformer sizes.
    causal: the default mask.
    num_types: segment types (cross-encoder pairs use 0 and 1).
    implementation: passed to :func:`jaxattn.softmax_attention`.
  """

  def __init__(self, vocab_size: int, max_len: int, *, features: int = 64, num_heads: int = 4, num_layers: int = 2,
               mlp_ratio: int = 4, causal: bool = False, num_types: int = 2, implementation=None,
               rngs: nnx.Rngs):
    self.vocab_size = positive_int("vocab_size", vocab_size)
    self.max_len = positive_int("max_len", max_len)
    self.features = positive_int("features", features)
    self.causal = bool(causal)
    init = nnx.initializers.normal(0.02)
    self.tok = nnx.Embed(vocab_size, features, embedding_init=init, rngs=rngs)
    self.pos = nnx.Embed(max_len, features, embedding_init=init, rngs=rngs)
    self.typ = nnx.Embed(positive_int("num_types", num_types), features, embedding_init=init, rngs=rngs)
    self.blocks = nnx.List([_Block(features, num_heads, positive_int("mlp_ratio", mlp_ratio), implementation, rngs)
                            for _ in range(positive_int("num_layers", num_layers))])
    self.ln = nnx.LayerNorm(features, rngs=rngs)

  def embed(self, tokens, types=None, offset: int = 0):
    """Input embeddings ``[B, T, features]`` (token + position ``offset + t`` + type)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integer ids of shape [B, T], got {tokens.dtype} {tokens.shape}")
    T = tokens.shape[1]
    if offset + T > self.max_len:
      raise ValueError(f"sequence length {offset + T} exceeds the backbone's max_len {self.max_len}")
    x = self.tok(tokens) + self.pos(offset + jnp.arange(T))[None]
    if types is not None:
      types = jnp.asarray(types)
      if types.shape != tokens.shape:
        raise ValueError(f"types must have the tokens' shape {tokens.shape}, got {types.shape}")
      x = x + self.typ(types)
    return x

  def encode(self, x, valid, *, causal: bool | None = None):
    """Transformer over input embeddings ``x [B, T, features]`` with padding ``valid`` (bool ``[B, T]``)."""
    x = jnp.asarray(x)
    valid = jnp.asarray(valid)
    if valid.shape != x.shape[:2] or valid.dtype != jnp.bool_:
      raise ValueError(f"valid must be bool of shape {x.shape[:2]}, got {valid.dtype} {valid.shape}")
    causal = self.causal if causal is None else bool(causal)
    mask = Causal() if causal else Full()
    seg = valid.astype(jnp.int32)
    for blk in self.blocks:
      x = blk(x, mask, seg)
    return self.ln(x)

  def __call__(self, tokens, valid, *, types=None, causal: bool | None = None):
    return self.encode(self.embed(tokens, types), valid, causal=causal)

  def lm_logits(self, h):
    """Next-token logits ``[B, T, vocab]`` from hidden states (output tied to the token embedding)."""
    return self.tok.attend(h)


class CrossHead(nnx.Module):
  """Cross-encoder head: ``Linear(tanh(Linear(pooled)))`` -> ``[B, num_outputs]`` (BERT's pooler + classifier)."""

  def __init__(self, features: int, num_outputs: int = 1, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(features, features, rngs=rngs)
    self.out = nnx.Linear(features, positive_int("num_outputs", num_outputs), rngs=rngs)

  def __call__(self, pooled):
    return self.out(jnp.tanh(self.dense(pooled)))


class DSEHead(nnx.Module):
  """DSE's student head: ``FC(ReLU(FC(dse_features(u, v))))`` -> ``[B, num_outputs]`` logits."""

  def __init__(self, features: int, hidden: int = 128, num_outputs: int = 2, *, rngs: nnx.Rngs):
    self.features = positive_int("features", features)
    self.fc1 = nnx.Linear(4 * features, positive_int("hidden", hidden), rngs=rngs)
    self.fc2 = nnx.Linear(hidden, positive_int("num_outputs", num_outputs), rngs=rngs)

  def __call__(self, u, v):
    z = dse_features(u, v)
    if z.shape[-1] != 4 * self.features:
      raise ValueError(f"DSEHead expects embeddings of size {self.features}, got {u.shape[-1]}")
    return self.fc2(jax.nn.relu(self.fc1(z)))


class ViewAnchorHead(nnx.Module):
  """MVP's anchor-guided scoring: one learned query per view cross-attends (FiD-style) over the view vectors of
  every candidate of the list; ``score_i = mean_k <a_k, e_ik>``.

  Shapes: ``views [B, N, m, D]`` (candidate ``i``'s relevance vector under view ``k``), optional ``valid [B, N]``
  -> ``(scores [B, N], anchors [B, m, D])``. Each candidate is encoded independently and the anchors read the
  candidates as a set, so the scores are equivariant to the candidate order by construction.
  """

  def __init__(self, features: int, num_views: int, num_heads: int = 4, *, implementation=None, rngs: nnx.Rngs):
    self.features = positive_int("features", features)
    self.num_views = positive_int("num_views", num_views)
    self.queries = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (num_views, features)))
    self.attn = MultiHeadAttention(num_heads, features, implementation=implementation, rngs=rngs)

  def __call__(self, views, valid=None):
    views = jnp.asarray(views)
    B, N, m, D = views.shape
    if m != self.num_views or D != self.features:
      raise ValueError(f"views must have shape [B, N, {self.num_views}, {self.features}], got {views.shape}")
    mem = views.reshape(B, N * m, D)
    q = jnp.broadcast_to(self.queries[...][None], (B, m, D))
    seg = None
    if valid is not None:
      valid = jnp.asarray(valid)
      if valid.shape != (B, N) or valid.dtype != jnp.bool_:
        raise ValueError(f"valid must be bool of shape ({B}, {N}), got {valid.dtype} {valid.shape}")
      seg = (jnp.ones((B, m), jnp.int32), jnp.repeat(valid, m, axis=1).astype(jnp.int32))
    anchors = self.attn(q, mem, segment_ids=seg)  # [B, m, D]
    scores = jnp.einsum("bmd,bnmd->bn", anchors, views) / m
    return scores, anchors


class PairEncoder(nnx.Module):
  """Bi-encoder, cross-encoder or fusion-in-decoder-with-view-tokens scorer over one :class:`TextBackbone`.

  Args:
    backbone: the encoder (any module with ``TextBackbone``'s ``embed`` / ``encode`` / ``features``).
    mode: ``"bi"``, ``"cross"`` or ``"fid"`` (table in the module docstring).
    pooling: one of :data:`POOLINGS` (bi and cross modes).
    causal: the mask used for encoding (None: the backbone's default) — KaLM-V2 sets ``False`` on a causal LM.
    head: bi mode: ``"cosine"`` (no parameters) or ``"dse"`` (:class:`DSEHead`); cross mode always has a
      :class:`CrossHead`; fid mode a :class:`ViewAnchorHead`.
    num_outputs: logits of the DSE / cross head (classes).
    dse_hidden: hidden width of the DSE head.
    num_view_tokens: ``m`` learned view tokens (fid mode, ``>= 1``).
    rngs: parameter initialisation.

  Methods: :meth:`embed` (bi: ``[B, D]``), :meth:`score` (``[B]`` cosine or ``[B, num_outputs]`` logits),
  :meth:`cross_logits`, :meth:`rerank` (fid: ``(scores [B, N], views [B, N, m, D])``).
  """

  def __init__(self, backbone, *, mode: str = "bi", pooling: str = "mean", causal: bool | None = None,
               head: str = "cosine", num_outputs: int = 1, dse_hidden: int = 128, num_view_tokens: int = 0,
               implementation=None, rngs: nnx.Rngs):
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if head not in ("cosine", "dse"):
      raise ValueError(f"head must be 'cosine' or 'dse', got {head!r}")
    self.backbone = backbone
    self.mode, self.pooling, self.head_kind = mode, pooling, head
    self.causal = None if causal is None else bool(causal)
    D = backbone.features
    self.pool_w = (nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (D,))) if pooling == "attention"
                   else None)
    self.dse = DSEHead(D, dse_hidden, num_outputs, rngs=rngs) if (mode == "bi" and head == "dse") else None
    self.cross = CrossHead(D, num_outputs, rngs=rngs) if mode == "cross" else None
    if mode == "fid":
      m = positive_int("num_view_tokens (fid mode needs at least one)", num_view_tokens)
      self.num_view_tokens = m
      self.view_emb = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (m, D)))
      self.anchor = ViewAnchorHead(D, m, implementation=implementation, rngs=rngs)
    else:
      self.num_view_tokens = 0
      self.view_emb = None
      self.anchor = None

  def _pool(self, h, valid):
    return pool(h, valid, self.pooling, None if self.pool_w is None else self.pool_w[...])

  def hidden(self, tokens, lengths, types=None):
    """Backbone states ``[B, T, D]`` and ``valid [B, T]`` of right-padded ``tokens`` with ``lengths``."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must have shape [B, T], got {tokens.shape}")
    valid = valid_from_lengths(lengths, tokens.shape[1])
    return self.backbone.encode(self.backbone.embed(tokens, types), valid, causal=self.causal), valid

  def embed(self, tokens, lengths):
    """Bi mode: one embedding ``[B, D]`` per text (encode once, score many times)."""
    if self.mode != "bi":
      raise ValueError(f"embed() is for mode='bi'; this encoder has mode={self.mode!r}")
    h, valid = self.hidden(tokens, lengths)
    return self._pool(h, valid)

  def score_embeddings(self, u, v):
    """Bi mode: the head on precomputed embeddings ``u, v [B, D]`` (cosine ``[B]`` or DSE logits)."""
    return cosine(u, v) if self.dse is None else self.dse(u, v)

  def cross_logits(self, a, a_lengths, b, b_lengths):
    """Cross mode: logits ``[B, num_outputs]`` of the joint sequence ``[CLS] a [SEP] b [SEP]``."""
    if self.mode != "cross":
      raise ValueError(f"cross_logits() is for mode='cross'; this encoder has mode={self.mode!r}")
    tok, lengths, types = pack_pairs(a, a_lengths, b, b_lengths)
    h, valid = self.hidden(tok, lengths, types)
    return self.cross(self._pool(h, valid))

  def score(self, a, a_lengths, b, b_lengths):
    """Pair scores: bi mode ``cos(u, v) [B]`` (or DSE logits ``[B, C]``), cross mode logits ``[B, C]``."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
      raise ValueError(f"pair batch sizes differ or shapes are not [B, T]: a {a.shape}, b {b.shape}")
    if self.mode == "bi":
      return self.score_embeddings(self.embed(a, a_lengths), self.embed(b, b_lengths))
    if self.mode == "cross":
      return self.cross_logits(a, a_lengths, b, b_lengths)
    raise ValueError("mode='fid' scores lists of candidates: use rerank()")

  def rerank(self, query, query_lengths, passages, passage_lengths, passage_valid=None):
    """Fid mode (MVP): ``query [B, Tq]``, ``passages [B, N, Tp]`` -> ``(scores [B, N], views [B, N, m, D])``.

    Candidate ``i`` is encoded alone as ``[v_1..v_m] query [SEP] passage_i`` (view tokens at fixed positions
    ``0..m-1``); ``views[:, i, k]`` is its hidden state at view ``k`` (the orthogonality loss reads them).
    """
    if self.mode != "fid":
      raise ValueError(f"rerank() is for mode='fid'; this encoder has mode={self.mode!r}")
    query, passages = jnp.asarray(query), jnp.asarray(passages)
    if passages.ndim != 3 or query.ndim != 2 or passages.shape[0] != query.shape[0]:
      raise ValueError(f"query must be [B, Tq] and passages [B, N, Tp] with the same B, got {query.shape} and "
                       f"{passages.shape}")
    B, N, Tp = passages.shape
    Tq = query.shape[1]
    pl = jnp.asarray(passage_lengths)
    if pl.shape != (B, N):
      raise ValueError(f"passage_lengths must have shape ({B}, {N}), got {pl.shape}")
    qr = jnp.repeat(query, N, axis=0)
    ql = jnp.repeat(jnp.asarray(query_lengths), N, axis=0)
    tok, lengths, types = pack_pairs(qr, ql, passages.reshape(B * N, Tp), pl.reshape(B * N))
    tok, types = tok[:, 1:], types[:, 1:]  # drop [CLS]: the view tokens take its place
    lengths = lengths - 1
    m = self.num_view_tokens
    x = self.backbone.embed(tok, types, offset=m)  # text at positions m.., views at 0..m-1 for every candidate
    views0 = self.view_emb[...][None] + self.backbone.pos(jnp.arange(m))[None]
    x = jnp.concatenate([jnp.broadcast_to(views0, (B * N, m, x.shape[-1])), x], axis=1)
    valid = valid_from_lengths(lengths + m, x.shape[1])
    h = self.backbone.encode(x, valid, causal=self.causal)
    views = h[:, :m].reshape(B, N, m, -1)
    scores, _ = self.anchor(views, passage_valid)
    return scores, views
