"""Flax NNX multi-head attention backed by :func:`jaxattn.softmax_attention`.

The module projects inputs to queries ``[B, T, H, D]``, keys ``[B, S, G, D]`` and values ``[B, S, G, D]``
(grouped-query attention when ``G < H``), optionally rotates queries and keys with RoPE, calls
:func:`jaxattn.softmax_attention` with a static :mod:`jaxattn.masks` mask and/or segment ids, and projects the
heads back to ``out_features``. A key/value cache (``nnx.Cache`` variables) supports causal decoding one token at a
time or in chunks (chunked prefill), optionally under a KV cache policy (:mod:`jaxattn.cache.policy`: StreamingLLM,
H2O, SnapKV, Ada-SnapKV, Quest, Recycled Attention) given to :meth:`MultiHeadAttention.init_cache`.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxattn import masks
  >>> from jaxattn.nn import MultiHeadAttention
  >>> layer = MultiHeadAttention(4, 32, num_kv_heads=2, use_rope=True, mask=masks.Causal(), rngs=nnx.Rngs(0))
  >>> x = jnp.ones((2, 8, 32))
  >>> layer(x).shape
  (2, 8, 32)
  >>> layer.init_cache(batch_size=2, max_length=16)
  >>> y = layer(x[:, :5], decode=True)    # prefill 5 tokens
  >>> y = layer(x[:, 5:6], decode=True)   # then decode one at a time
  >>> int(layer.cache_index[...])
  6
  >>> from jaxattn.cache import policy
  >>> layer.init_cache(batch_size=2, max_length=16, policy=policy.StreamingLLM(window=4, sinks=2))
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxattn.cache.kv import attend
from jaxattn.cache.policy import CachePolicy, contiguous_view
from jaxattn.masks import Causal, Full, Local, Mask, PerHead
from jaxattn.nn._checks import head_layout, positive_int
from jaxattn.nn.rope import apply_rope
from jaxattn.ops.softmax.api import softmax_attention

__all__ = ["MultiHeadAttention"]


def _decode_band(mask: Mask | None) -> tuple[int | None, int]:
  """The relative band ``lo <= j - p <= hi`` a causal decode step allows (``lo=None``: unbounded below).

  Decoding is causal, so ``hi <= 0`` always; ``Causal`` and ``Local`` masks are translation invariant, so they stay
  exact when the query's absolute position ``p`` is only known at run time.
  """
  if mask is None or isinstance(mask, Full):
    return None, 0
  if isinstance(mask, Causal):
    return None, min(mask.offset, 0)
  if isinstance(mask, Local):
    lo, hi = mask.offset - mask.left, min(mask.offset + mask.right, 0)
    if lo > hi:
      raise ValueError(f"{mask!r} allows no past or current key, so it cannot be used with decode=True")
    return lo, hi
  raise ValueError(f"decode=True supports Full, Causal and Local masks (translation invariant), got {mask!r}")


def _call_mask(mask):
  """A call's ``mask``: a ``Mask``, per-head masks (-> ``PerHead``) or a boolean array (checked by the op)."""
  if isinstance(mask, Mask) or hasattr(mask, "dtype"):
    return mask
  if isinstance(mask, (list, tuple)) and mask and all(isinstance(m, Mask) for m in mask):
    return PerHead(tuple(mask))
  raise ValueError(f"mask must be a jaxattn.masks.Mask, a sequence of per-head Masks, a boolean array "
                   f"broadcastable to [B, H, T, S] or None, got {type(mask).__name__}")


class MultiHeadAttention(nnx.Module):
  r"""Multi-head (grouped-query) softmax attention with optional RoPE and a KV cache.

  .. math::
     q = x W_q,\quad k = c W_k,\quad v = c W_v,\quad
     o_i = \sum_{j \in A(i)} \mathrm{softmax}_j\big(\mathrm{scale}\; q_i \cdot k_j\big)\, v_j,\quad y = o W_o

  with ``c = x`` (self-attention) or ``c = context`` (cross-attention), query head ``h`` reading kv head
  ``h // (H // G)``, and ``A(i)`` the keys allowed by the mask and segment ids. With ``use_rope`` the queries and
  keys are rotated by :func:`jaxattn.nn.rope.apply_rope` before the dot product.

  Shapes: ``x [B, T, in_features]``, ``context [B, S, in_kv_features]``, output ``[B, T, out_features]``;
  ``H = num_heads``, ``G = num_kv_heads``, ``D = head_dim``.

  Every :func:`jaxattn.softmax_attention` implementation serves the module (``implementation`` is passed through);
  the decode path needs segment ids, which ``"cudnn"`` does not take (the default chain falls back to another).

  Args:
    num_heads: number of query heads ``H``.
    in_features: feature size of ``x``.
    num_kv_heads: number of key/value heads ``G`` (default ``H``); ``H`` must be a multiple of ``G``.
    head_dim: per-head size ``D`` (default ``in_features // num_heads``, which must then divide exactly).
    out_features: output feature size (default ``in_features``).
    in_kv_features: feature size of ``context`` for cross-attention (default ``in_features``).
    use_rope: rotate queries and keys with RoPE (self-attention only; ``D`` must be even).
    rope_base: the RoPE wavelength base.
    mask: the default static :mod:`jaxattn.masks` mask, e.g. ``masks.Causal()`` for a decoder, or a sequence of
      ``num_heads`` per-head masks (None: full). Boolean mask arrays are passed per call.
    scale: logit scale (default ``D ** -0.5``).
    logits_soft_cap: if set, logits become ``cap * tanh(logits / cap)``.
    implementation: passed to :func:`jaxattn.softmax_attention`: a backend name, ``(name, Config)`` or a sequence
      of those (None picks per platform).
    dropout_rate: attention dropout on the normalised probabilities (kept ones scaled by ``1 / (1 - rate)``),
      as ``flax.nnx.MultiHeadAttention``; drawn per (batch, head, query, key) by
      :func:`jaxattn.softmax_attention` (served by its ``xla`` / ``reference`` backends: with dropout active the
      default chain falls back to ``xla``).
    deterministic: default of the call's ``deterministic`` (no dropout when True); ``module.eval()`` /
      ``module.train()`` set it. With ``dropout_rate > 0`` one of the two must be given.
    keep_rngs: store ``rngs.dropout.fork()`` as ``self.rngs`` (when ``dropout_rate > 0``) so calls need no
      ``rngs``; with False every training call must pass ``rngs``.
    dtype: computation dtype of the projections and attention (None: promote inputs and parameters).
    param_dtype: parameter dtype.
    use_bias: whether the four projections have biases.
    precision: ``jax.lax.Precision`` of the projections.
    analysis_hook: a :class:`jaxattn.analysis.LayerHook` (capture statistics, head mask, probability hook, ACT)
      applied to every call, or None. :func:`jaxattn.analysis.capture` / :func:`jaxattn.analysis.intervene` set
      it for the duration of a ``with`` block. Not applied under a KV cache policy (raises).
    rngs: random generators for parameter initialisation (and the ``dropout`` stream, see ``keep_rngs``).

  Raises:
    ValueError: on inconsistent sizes or options, naming the offending values.
  """

  def __init__(self, num_heads: int, in_features: int, *, num_kv_heads: int | None = None,
               head_dim: int | None = None, out_features: int | None = None, in_kv_features: int | None = None,
               use_rope: bool = False, rope_base: float = 10000.0, mask: Mask | None = None,
               scale: float | None = None, logits_soft_cap: float | None = None,
               implementation=None, dropout_rate: float = 0.0, deterministic: bool | None = None,
               keep_rngs: bool = True, dtype=None, param_dtype=jnp.float32,
               use_bias: bool = False, precision=None, analysis_hook=None, rngs: nnx.Rngs):
    self.num_heads, self.in_features, self.num_kv_heads, self.head_dim, self.out_features = head_layout(
        num_heads, in_features, num_kv_heads, head_dim, out_features)
    self.in_kv_features = positive_int(
        "in_kv_features", in_features if in_kv_features is None else in_kv_features)
    if use_rope and self.head_dim % 2:
      raise ValueError(f"use_rope needs an even head_dim, got {self.head_dim}")
    if not (isinstance(rope_base, (int, float)) and rope_base > 0):
      raise ValueError(f"rope_base must be a positive float, got {rope_base!r}")
    if mask is not None and not isinstance(mask, Mask):
      if isinstance(mask, (list, tuple)) and mask and all(isinstance(m, Mask) for m in mask):
        mask = PerHead(tuple(mask))
      else:
        raise ValueError(f"mask must be a jaxattn.masks.Mask, a sequence of per-head Masks or None, got "
                         f"{type(mask).__name__} (boolean mask arrays are per call: pass them to __call__)")
    if isinstance(mask, PerHead) and mask.num_heads != self.num_heads:
      raise ValueError(f"mask has {mask.num_heads} per-head masks, but the module has num_heads={self.num_heads}")
    if scale is not None and not (isinstance(scale, (int, float)) and np.isfinite(scale)):
      raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if logits_soft_cap is not None and not (isinstance(logits_soft_cap, (int, float)) and logits_soft_cap > 0):
      raise ValueError(f"logits_soft_cap must be a positive float or None, got {logits_soft_cap!r}")
    if implementation is not None and not isinstance(implementation, str):
      implementation = tuple(tuple(i) if isinstance(i, list) else i for i in implementation)
    if (isinstance(dropout_rate, bool) or not isinstance(dropout_rate, (int, float))
        or not 0.0 <= dropout_rate < 1.0):
      raise ValueError(f"dropout_rate must be a float in [0, 1), got {dropout_rate!r}")
    if deterministic is not None and not isinstance(deterministic, bool):
      raise ValueError(f"deterministic must be a bool or None, got {deterministic!r}")
    self.dropout_rate = float(dropout_rate)
    self.deterministic = deterministic
    self.rngs = rngs.dropout.fork() if keep_rngs and self.dropout_rate > 0 else None
    self.use_rope = bool(use_rope)
    self.rope_base = float(rope_base)
    self.mask = mask
    self.scale = None if scale is None else float(scale)
    self.logits_soft_cap = None if logits_soft_cap is None else float(logits_soft_cap)
    self.implementation = implementation
    self.dtype = dtype
    self.param_dtype = param_dtype
    if analysis_hook is not None:
      analysis_hook.check_heads(self.num_heads)
    self.analysis_hook = analysis_hook  # static jaxattn.analysis.LayerHook or None

    H, G, D = self.num_heads, self.num_kv_heads, self.head_dim
    common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.query = nnx.LinearGeneral(self.in_features, (H, D), **common)  # kernel [F, H, D]
    self.key = nnx.LinearGeneral(self.in_kv_features, (G, D), **common)  # kernel [Fkv, G, D]
    self.value = nnx.LinearGeneral(self.in_kv_features, (G, D), **common)  # kernel [Fkv, G, D]
    self.out = nnx.LinearGeneral((H, D), self.out_features, axis=(-2, -1), **common)  # kernel [H, D, Fout]

    self.cached_key: nnx.Cache | None = nnx.data(None)  # [B, L, G, D]
    self.cached_value: nnx.Cache | None = nnx.data(None)  # [B, L, G, D]
    self.cache_index: nnx.Cache | None = nnx.data(None)  # int32 scalar: number of filled positions
    self.cache_policy: CachePolicy | None = None  # static settings (init_cache)
    self.policy_keep: nnx.Cache | None = nnx.data(None)  # [B, G, L] bool: slots the policy retains
    self.policy_scores: nnx.Cache | None = nnx.data(None)  # [B, G, L] f32: accumulated attention (H2O)
    self.policy_step: nnx.Cache | None = nnx.data(None)  # int32 scalar: decode steps under the policy

  # ------------------------------------------------------------------------------------------------------ cache
  def init_cache(self, batch_size: int, max_length: int, dtype=None, *, policy: CachePolicy | None = None) -> None:
    """Creates an empty key/value cache for causal decoding (``decode=True``).

    Args:
      batch_size: ``B`` of the decoding calls.
      max_length: the cache length ``L``: the most tokens (prompt + generated) one sequence can hold.
      dtype: cache dtype (default: ``dtype`` of the module, else ``param_dtype``).
      policy: a :mod:`jaxattn.cache.policy` setting (``StreamingLLM(window=...)``, ``H2O(budget=...)``,
        ``SnapKV(capacity=...)``, ``AdaSnapKV``, ``Quest(budget=...)``, ``Recycled(k=...)``) or None (dense).
        Decode calls with ``T > 1`` tokens (prefill) attend densely and let the policy select from them; calls
        with one token attend over the slots the policy retains. The buffer keeps its ``L`` slots (the policy
        acts as a key mask: outputs as if the other slots were evicted). Policies need the plain causal mask.

    Creates ``cached_key [B, L, G, D]``, ``cached_value [B, L, G, D]`` and ``cache_index`` (int32 scalar, 0), all
    ``nnx.Cache`` variables, plus the policy's state (``policy_keep``, ``policy_scores``, ``policy_step``).
    Calling it again resets the cache.

    Raises:
      ValueError: for non-positive sizes, or policy settings that do not fit ``max_length`` (naming them).
    """
    B = positive_int("batch_size", batch_size)
    L = positive_int("max_length", max_length)
    if policy is not None and not isinstance(policy, CachePolicy):
      raise ValueError(f"policy must be a jaxattn.cache.policy setting (e.g. SnapKV(capacity=...)) or None, got "
                       f"{type(policy).__name__}")
    if policy is not None:
      policy.validate(L, self.num_kv_heads)
    dtype = dtype or self.dtype or self.param_dtype
    shape = (B, L, self.num_kv_heads, self.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))
    self.cache_policy = policy
    if policy is None:
      self.policy_keep = self.policy_scores = self.policy_step = None
    else:
      state = policy.init_state(B, L, self.num_kv_heads)
      self.policy_keep = nnx.Cache(state["keep"])
      self.policy_scores = nnx.Cache(state["scores"])
      self.policy_step = nnx.Cache(state["step"])

  # ------------------------------------------------------------------------------------------------------- call
  def __call__(self, x, context=None, *, mask: Mask | None = None, segment_ids=None, positions=None,
               decode: bool = False, deterministic: bool | None = None, rngs=None):
    """Applies attention.

    Args:
      x: inputs ``[B, T, in_features]`` (queries; also keys and values for self-attention).
      context: ``[B, S, in_kv_features]`` for cross-attention (keys and values), or None.
      mask: overrides the module's default mask for this call (pass ``masks.Full()`` to disable a default
        mask): a static :mod:`jaxattn.masks` mask, a sequence of ``H`` per-head masks (or ``masks.PerHead``), or a
        boolean array broadcastable to ``[B, H, T, S]`` (True = attend; as ``jax.nn.dot_product_attention``,
        served by the ``xla`` / ``reference`` backends). With ``decode=True`` only ``Full``, ``Causal`` and
        ``Local`` masks are allowed; decoding is always causal on top.
      segment_ids: ``[B, T]`` (self-attention) or ``(q_ids [B, T], kv_ids [B, S])``: attend only within equal ids.
        Not supported with ``decode=True``.
      positions: RoPE positions ``[B, T]`` or ``[T]`` (default ``arange(T)``, or ``cache_index + arange(T)``
        when decoding). Only used with ``use_rope``.
      decode: append this call's keys/values to the cache at ``cache_index`` (any number of tokens ``T``, as long
        as ``cache_index + T <= max_length``) and attend causally to everything cached so far. Requires
        :meth:`init_cache`; self-attention only.
      deterministic: no attention dropout when True (overrides the module's ``deterministic``). Needed (here or
        on the module) when ``dropout_rate > 0``.
      rngs: an ``nnx.Rngs`` (its ``dropout`` stream is used) or an ``nnx.RngStream`` for the dropout key,
        overriding the stored ``self.rngs``.

    Returns:
      ``[B, T, out_features]``.

    Raises:
      ValueError: on bad shapes or options, or a missing / full cache (checked eagerly; under ``jit`` the cache
        index is not known, and writing past ``max_length`` is the caller's responsibility).
    """
    x = jnp.asarray(x)
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"x must have shape [B, T, {self.in_features}], got {x.shape}")
    B, T, _ = x.shape
    if context is not None:
      context = jnp.asarray(context)
      if context.ndim != 3 or context.shape[0] != B or context.shape[-1] != self.in_kv_features:
        raise ValueError(f"context must have shape [{B}, S, {self.in_kv_features}], got {context.shape}")
      if self.use_rope:
        raise ValueError("use_rope applies to self-attention; call with context=None or build the module "
                         "with use_rope=False for cross-attention")
    mask = self.mask if mask is None else _call_mask(mask)
    drop = self._dropout_args(deterministic, rngs)

    src = x if context is None else context
    q = self.query(x)  # [B, T, H, D]
    k = self.key(src)  # [B, S, G, D]
    v = self.value(src)  # [B, S, G, D]

    if decode:
      if context is not None:
        raise ValueError("decode=True is for causal self-attention; context must be None")
      if segment_ids is not None:
        raise ValueError("segment_ids are not supported with decode=True")
      if not isinstance(mask, (Mask, type(None))) or isinstance(mask, PerHead):
        raise ValueError("decode=True supports Full, Causal and Local masks (translation invariant), got a "
                         f"{type(mask).__name__} mask")
      out = self._decode(q, k, v, mask, positions, drop)
    else:
      if self.use_rope:
        positions = jnp.arange(T) if positions is None else positions
        q = apply_rope(q, positions, self.rope_base)
        k = apply_rope(k, positions, self.rope_base)
      out = self._softmax(q, k, v, mask=mask, segment_ids=segment_ids, **drop)
    return self.out(out)  # [B, T, Fout]

  def _softmax(self, q, k, v, **kwargs):
    """:func:`jaxattn.softmax_attention` with the module's settings, through ``analysis_hook`` when set."""
    settings = dict(scale=self.scale, logits_soft_cap=self.logits_soft_cap, implementation=self.implementation)
    if self.analysis_hook is None:
      return softmax_attention(q, k, v, **settings, **kwargs)
    return self.analysis_hook.attend(q, k, v, **settings, **kwargs)

  def _dropout_args(self, deterministic, rngs) -> dict:
    """``dropout_rate`` / ``dropout_rng`` for :func:`jaxattn.softmax_attention` (flax's rules for the key)."""
    if self.dropout_rate == 0.0:
      return {}
    deterministic = self.deterministic if deterministic is None else deterministic
    if deterministic is None:
      raise ValueError("MultiHeadAttention has dropout_rate > 0: pass deterministic= to the call or the "
                       "constructor (or use module.train() / module.eval())")
    if deterministic:
      return {}
    if rngs is None:
      rngs = self.rngs
    elif isinstance(rngs, nnx.Rngs):
      rngs = rngs.dropout
    if rngs is None:
      raise ValueError("'rngs' must be provided to the call when dropout_rate > 0, deterministic is False and the "
                       "module was built with keep_rngs=False")
    return dict(dropout_rate=self.dropout_rate, dropout_rng=rngs())

  def _decode(self, q, k, v, mask, positions, drop):
    """Writes ``k, v [B, T, G, D]`` at ``cache_index`` and attends ``q [B, T, H, D]`` to the filled cache."""
    if self.cached_key is None or self.cached_value is None or self.cache_index is None:
      raise ValueError("decode=True needs a cache: call init_cache(batch_size, max_length) first")
    B, T = q.shape[:2]
    Bc, L = self.cached_key.shape[:2]
    if B != Bc:
      raise ValueError(f"the cache was made for batch size {Bc}, got inputs with batch size {B}")
    if T > L:
      raise ValueError(f"cannot decode {T} tokens into a cache of max_length {L}")
    lo, hi = _decode_band(mask)
    idx = self.cache_index[...]  # int32 scalar
    if not isinstance(idx, jax.core.Tracer) and int(idx) + T > L:
      raise ValueError(f"the cache is full: cache_index {int(idx)} + {T} new tokens > max_length {L}")
    if self.use_rope:
      positions = idx + jnp.arange(T) if positions is None else positions
      q = apply_rope(q, positions, self.rope_base)
      k = apply_rope(k, positions, self.rope_base)
    zero = jnp.zeros((), jnp.int32)
    ck, cv = self.cached_key[...], self.cached_value[...]  # [B, L, G, D]
    ck = lax.dynamic_update_slice(ck, k.astype(ck.dtype), (zero, idx, zero, zero))
    cv = lax.dynamic_update_slice(cv, v.astype(cv.dtype), (zero, idx, zero, zero))
    self.cached_key[...] = ck  # [B, L, G, D]
    self.cached_value[...] = cv  # [B, L, G, D]
    self.cache_index[...] = idx + T
    ck, cv = ck.astype(q.dtype), cv.astype(q.dtype)
    if self.cache_policy is not None and self.analysis_hook is not None:
      raise ValueError("analysis hooks (capture / intervene) are not applied under a KV cache policy")
    if self.cache_policy is not None:
      if (lo, hi) != (None, 0):
        raise ValueError(f"a cache policy needs the plain causal mask, got {mask!r}")
      return self._decode_policy(q, ck, cv, idx + T, drop)
    j = jnp.arange(L, dtype=jnp.int32)  # key positions [L]
    q_ids = jnp.zeros((B, T), jnp.int32)
    if self.analysis_hook is not None:
      # Hooked decode: the allowed keys as a boolean [1, 1, T, L] array over the unrolled cache, so statistics
      # (argmax, column sums) come out in absolute cache positions.
      p = idx + jnp.arange(T, dtype=jnp.int32)[:, None]  # [T, 1] query positions
      allowed = j[None, :] <= p + hi
      if lo is not None:
        allowed &= j[None, :] >= p + lo
      return self._softmax(q, ck, cv, mask=allowed[None, None], **drop)
    if T == 1:
      # One query at absolute position idx: the band is a plain key range, expressed with kv segment ids.
      allowed = j <= idx + hi
      if lo is not None:
        allowed &= j >= idx + lo
      kv_ids = jnp.broadcast_to(jnp.where(allowed, 0, 1).astype(jnp.int32), (B, L))
      return softmax_attention(q, ck, cv, segment_ids=(q_ids, kv_ids), scale=self.scale,
                               logits_soft_cap=self.logits_soft_cap, implementation=self.implementation,
                               **drop)
    # A chunk of T queries at absolute positions idx..idx+T-1. The static mask cannot depend on idx, so roll the
    # cache so the n = idx + T filled keys occupy the last n slots: query i then sits at rolled position
    # L - T + i, the band becomes a static Causal / Local mask with offset L - T + hi, and the n filled slots are
    # the only ones with kv segment id 0 (unfilled ones get 1).
    n = idx + T
    shift = L - n
    ck, cv = jnp.roll(ck, shift, axis=1), jnp.roll(cv, shift, axis=1)  # [B, L, G, D]
    offset = L - T + hi
    static = Causal(offset) if lo is None else Local(hi - lo, 0, offset)
    kv_ids = jnp.broadcast_to(jnp.where(j >= shift, 0, 1).astype(jnp.int32), (B, L))
    return softmax_attention(q, ck, cv, mask=static, segment_ids=(q_ids, kv_ids), scale=self.scale,
                             logits_soft_cap=self.logits_soft_cap, implementation=self.implementation,
                             **drop)

  def _decode_policy(self, q, ck, cv, n, drop):
    """``q [B, T, H, D]`` over the cache ``ck, cv [B, L, G, D]`` whose first ``n`` slots are written, under the
    cache policy: prefill (``T > 1``) attends densely and updates the policy state; a step attends the retained
    slots."""
    if drop:
      raise ValueError("attention dropout is not supported with a cache policy (decoding is inference)")
    policy = self.cache_policy
    D = q.shape[-1]
    scale = float(D ** -0.5) if self.scale is None else self.scale
    if self.logits_soft_cap is not None:
      raise ValueError("logits_soft_cap is not supported with a cache policy")
    view = contiguous_view(ck, cv, n, policy.needs_pages)
    state = {"keep": self.policy_keep[...], "scores": self.policy_scores[...], "step": self.policy_step[...]}
    if q.shape[1] > 1:
      out = attend(q, view, scale=scale, implementation=self.implementation)
      state = policy.after_prefill(q, view, state, scale=scale)
    else:
      out, state = policy.decode(q, view, state, scale=scale, implementation=self.implementation)
    self.policy_keep[...] = state["keep"]
    self.policy_scores[...] = state["scores"]
    self.policy_step[...] = state["step"]
    return out
