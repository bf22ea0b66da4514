r"""Flax NNX kernelised linear attention (CAB's linear family) on top of :func:`jaxattn.linear_attention`.

.. math::
   o_i = \frac{\phi(q_i)^\top \sum_{j \in A(i)} \phi(k_j) v_j^\top}{\max(\phi(q_i)^\top \sum_{j \in A(i)} \phi(k_j),
   \epsilon)}

with ``A(i) = {j <= i}`` for causal self-attention and all keys otherwise. Numerator and denominator come from one
:func:`jaxattn.linear_attention` call (a column of ones appended to ``v``), so memory is linear in the length and
causal decoding keeps a constant-size state ``[B, H, D', E + 1]``.

Feature maps ``phi`` (``D'`` features per head) and the CAB patterns each supports (CAB, Zhang et al. 2023,
arXiv:2210.07661; NS/CS = non-causal/causal self, NC/CC = non-causal/causal cross):

==============  =====================================================================  ===========  =============
feature_map     phi                                                                    D'           patterns
==============  =====================================================================  ===========  =============
``"elu"``       ``elu(x) + 1`` (Katharopoulos et al. 2020)                             ``D``        NS CS NC CC
``"relu"``      ``relu(x)``                                                            ``D``        NS CS NC CC
``"cosformer"`` ``[relu(x) cos(pi p / 2M), relu(x) sin(pi p / 2M)]``, ``M = max(T, S)``  ``2 D``      NS NC
``"performer"`` FAVOR+ ``exp(w^T x' - |x'|^2 / 2 - c) / sqrt(m)``, ``x' = x D^{-1/4}``,     ``m``        NS CS NC CC
                ``w`` orthogonal random features (Choromanski et al. 2021)
==============  =====================================================================  ===========  =============

cosFormer's re-weighting ``cos(pi/2 (i - j) / M)`` depends on the total length ``M``, so a prefix sees different
weights: it is non-causal only (as in CAB). Cross-attention never looks at other queries, so every map that supports
NC also serves CC except cosFormer (whose ``M`` depends on the query length). CAB's Performer has no causal self mode;
here it has one because the key stabiliser ``c = max_m |w_m|^2 / 2`` depends on the parameters only (it bounds the
key exponents by 0 and cancels between numerator and denominator), so no future token can influence a past output.
Query rows are stabilised by their own maximum, which cancels exactly per row.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.nn._checks import head_layout, positive_int
from jaxattn.ops.linear.api import linear_attention, linear_attention_step

__all__ = ["LinearAttention", "RandomFeatures", "PATTERNS", "SUPPORTED_PATTERNS", "orthogonal_random_features"]

PATTERNS = ("NS", "CS", "NC", "CC")
SUPPORTED_PATTERNS: dict[str, frozenset[str]] = {
    "elu": frozenset(PATTERNS),
    "relu": frozenset(PATTERNS),
    "cosformer": frozenset({"NS", "NC"}),
    "performer": frozenset(PATTERNS),
}
_DEFAULT_EPS = {"elu": 1e-6, "relu": 1e-6, "cosformer": 1e-6, "performer": 1e-30}


class RandomFeatures(nnx.Variable):
  """Fixed (not trained) random projection of the Performer feature map."""


def orthogonal_random_features(key, num_features: int, dim: int) -> jax.Array:
  """``[m, D]`` rows drawn in orthogonal blocks of ``D`` (QR of a Gaussian), each row rescaled to the norm of an
  independent ``D``-dimensional Gaussian vector (FAVOR+ "orthogonal random features")."""
  blocks = []
  keys = jax.random.split(key, -(-num_features // dim) + 1)
  for kb in keys[:-1]:
    qmat, _ = jnp.linalg.qr(jax.random.normal(kb, (dim, dim), jnp.float32))
    blocks.append(qmat.T)
  w = jnp.concatenate(blocks, axis=0)[:num_features]  # [m, D], orthonormal rows within each block
  norms = jnp.linalg.norm(jax.random.normal(keys[-1], (num_features, dim), jnp.float32), axis=-1)
  return w * norms[:, None]


class LinearAttention(nnx.Module):
  r"""Multi-head (grouped-query) kernelised linear attention with a choice of feature map.

  Shapes: ``x [B, T, in_features]``, ``context [B, S, in_kv_features]`` (cross-attention), output
  ``[B, T, out_features]``; ``H = num_heads``, ``G = num_kv_heads``, ``D = head_dim``, values ``[.., G, D]``.
  See the module docstring for the formula, the feature maps and their CAB patterns
  (:attr:`supported_patterns`).

  Args:
    num_heads: query heads ``H``.
    in_features: feature size of ``x``.
    feature_map: ``"elu"``, ``"relu"``, ``"cosformer"`` or ``"performer"``.
    causal: causal self-attention (pattern CS) or causal cross-attention (CC); False: NS / NC.
    num_kv_heads: ``G`` (default ``H``).
    head_dim: ``D`` (default ``in_features // num_heads``).
    out_features, in_kv_features: default ``in_features``.
    num_random_features: Performer's ``m`` (default ``D``).
    eps: denominator floor (default 1e-6; 1e-30 for Performer, whose stabilised features can be small).
    implementation, chunk_size: passed to :func:`jaxattn.linear_attention`.
    dtype, param_dtype, use_bias, precision: of the projections.
    rngs: parameter (and Performer feature) initialisation.

  Raises:
    ValueError: on bad sizes, an unknown feature map, or a pattern the feature map does not support.
  """

  def __init__(self, num_heads: int, in_features: int, *, feature_map: str = "elu", causal: bool = False,
               num_kv_heads: int | None = None, head_dim: int | None = None, out_features: int | None = None,
               in_kv_features: int | None = None, num_random_features: int | None = None, eps: float | None = None,
               implementation: str | Sequence[str] | None = None, chunk_size: int | None = None, dtype=None,
               param_dtype=jnp.float32, use_bias: bool = False, precision=None, rngs: nnx.Rngs):
    if feature_map not in SUPPORTED_PATTERNS:
      raise ValueError(f"feature_map must be one of {sorted(SUPPORTED_PATTERNS)}, got {feature_map!r}")
    self.feature_map = feature_map
    self.causal = bool(causal)
    if self.causal and "CS" not in SUPPORTED_PATTERNS[feature_map] and "CC" not in SUPPORTED_PATTERNS[feature_map]:
      raise ValueError(f"feature_map {feature_map!r} supports the CAB patterns "
                       f"{sorted(SUPPORTED_PATTERNS[feature_map])} only, so causal=True is not available")
    self.num_heads, self.in_features, self.num_kv_heads, self.head_dim, self.out_features = head_layout(
        num_heads, in_features, num_kv_heads or num_heads, head_dim, out_features or in_features)
    self.in_kv_features = positive_int("in_kv_features", in_kv_features or in_features)
    self.eps = float(_DEFAULT_EPS[feature_map] if eps is None else eps)
    if not self.eps > 0:
      raise ValueError(f"eps must be positive, got {eps!r}")
    if implementation is not None and not isinstance(implementation, str):
      implementation = tuple(implementation)
    self.implementation = implementation
    self.chunk_size = chunk_size

    H, G, D = self.num_heads, self.num_kv_heads, self.head_dim
    common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.query = nnx.LinearGeneral(self.in_features, (H, D), **common)  # kernel [F, H, D]
    self.key = nnx.LinearGeneral(self.in_kv_features, (G, D), **common)  # kernel [Fkv, G, D]
    self.value = nnx.LinearGeneral(self.in_kv_features, (G, D), **common)  # kernel [Fkv, G, D]
    self.out = nnx.LinearGeneral((H, D), self.out_features, axis=(-2, -1), **common)  # kernel [H, D, Fout]
    if feature_map == "performer":
      m = positive_int("num_random_features", num_random_features or D)
      self.random_features = RandomFeatures(orthogonal_random_features(rngs.params(), m, D))  # [m, D]
    else:
      self.random_features = None
    self.state: nnx.Cache | None = nnx.data(None)  # f32 [B, H, D', D + 1]

  # ------------------------------------------------------------------------------------------------- patterns
  @property
  def supported_patterns(self) -> frozenset[str]:
    """The CAB patterns (``"NS"``, ``"CS"``, ``"NC"``, ``"CC"``) this module's feature map supports."""
    return SUPPORTED_PATTERNS[self.feature_map]

  def _pattern(self, cross: bool) -> str:
    return ("C" if self.causal else "N") + ("C" if cross else "S")

  # --------------------------------------------------------------------------------------------- feature maps
  def _phi(self, x, positions, length, is_key: bool):
    """``x [B, L, heads, D] -> [B, L, heads, D']`` in f32."""
    x = x.astype(jnp.float32)
    if self.feature_map == "elu":
      return jax.nn.elu(x) + 1.0
    if self.feature_map == "relu":
      return jax.nn.relu(x)
    if self.feature_map == "cosformer":
      ang = (math.pi / 2) * positions.astype(jnp.float32) / length  # [L]
      r = jax.nn.relu(x)
      return jnp.concatenate([r * jnp.cos(ang)[:, None, None], r * jnp.sin(ang)[:, None, None]], axis=-1)
    # performer (FAVOR+ positive features)
    w = self.random_features[...].astype(jnp.float32)  # [m, D]
    xs = x * self.head_dim ** -0.25
    proj = jnp.einsum("blhd,md->blhm", xs, w, precision=jax.lax.Precision.HIGHEST)
    logits = proj - 0.5 * jnp.sum(xs * xs, axis=-1, keepdims=True)
    if is_key:
      stab = 0.5 * jnp.max(jnp.sum(w * w, axis=-1))  # parameter-only bound: logits <= |w_m|^2 / 2
    else:
      stab = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # cancels per query row
    return jnp.exp(logits - stab) / math.sqrt(w.shape[0])

  # ---------------------------------------------------------------------------------------------------- cache
  def init_cache(self, batch_size: int) -> None:
    """Creates (or resets) the causal-decode state ``[B, H, D', D + 1]`` f32 (numerator and normaliser)."""
    if not self.causal or "CS" not in self.supported_patterns:
      raise ValueError(f"decoding needs causal self-attention; this module is causal={self.causal} with "
                       f"feature_map {self.feature_map!r}")
    B = positive_int("batch_size", batch_size)
    d_feat = {"cosformer": 2 * self.head_dim, "performer": None}.get(self.feature_map, self.head_dim)
    if d_feat is None:
      d_feat = self.random_features.shape[0]
    self.state = nnx.Cache(jnp.zeros((B, self.num_heads, d_feat, self.head_dim + 1), jnp.float32))

  # ----------------------------------------------------------------------------------------------------- call
  def __call__(self, x, context=None, *, decode: bool = False):
    """Applies attention.

    Args:
      x: ``[B, T, in_features]``.
      context: ``[B, S, in_kv_features]`` for cross-attention (NC / CC), or None (self-attention, NS / CS).
      decode: causal self-attention only: continue the cached sequence with these ``T`` tokens (prefill or one at
        a time) and update the cache (:meth:`init_cache` first).

    Returns:
      ``[B, T, out_features]``.
    """
    x = jnp.asarray(x)
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"x must have shape [B, T, {self.in_features}], got {x.shape}")
    B, T, _ = x.shape
    cross = context is not None
    if cross:
      context = jnp.asarray(context)
      if context.ndim != 3 or context.shape[0] != B or context.shape[-1] != self.in_kv_features:
        raise ValueError(f"context must have shape [{B}, S, {self.in_kv_features}], got {context.shape}")
    pattern = self._pattern(cross)
    if pattern not in self.supported_patterns:
      raise ValueError(f"feature_map {self.feature_map!r} supports the CAB patterns {sorted(self.supported_patterns)}, "
                       f"not {pattern}")
    src = context if cross else x
    S = src.shape[1]
    q = self.query(x)  # [B, T, H, D]
    k = self.key(src)  # [B, S, G, D]
    v = self.value(src)  # [B, S, G, D]
    length = float(max(T, S))
    fq = self._phi(q, jnp.arange(T), length, False)  # [B, T, H, D']
    fk = self._phi(k, jnp.arange(S), length, True)  # [B, S, G, D']
    ones = jnp.ones(v.shape[:-1] + (1,), jnp.float32)
    va = jnp.concatenate([v.astype(jnp.float32), ones], axis=-1)  # [B, S, G, D + 1]
    kw = dict(scale=1.0, implementation=self.implementation, chunk_size=self.chunk_size)
    if decode:
      if cross or not self.causal:
        raise ValueError("decode=True is for causal self-attention (context=None, causal=True)")
      if self.state is None:
        raise ValueError("decode=True needs a cache: call init_cache(batch_size) first")
      if self.state.shape[0] != B:
        raise ValueError(f"the cache was made for batch size {self.state.shape[0]}, got batch size {B}")
      if T == 1:
        o, state = linear_attention_step(fq[:, 0], fk[:, 0], va[:, 0], self.state[...], scale=1.0)
        o = o[:, None]
      else:
        o, state = linear_attention(fq, fk, va, initial_state=self.state[...], return_final_state=True, **kw)
      self.state[...] = state
    else:
      o = linear_attention(fq, fk, va, causal=self.causal and not cross, **kw)  # [B, T, H, D + 1]
    num, den = o[..., :-1], o[..., -1:]
    out = (num / jnp.maximum(den, self.eps)).astype(q.dtype)  # [B, T, H, D]
    return self.out(out)  # [B, T, Fout]
