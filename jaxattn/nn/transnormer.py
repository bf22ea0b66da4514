r"""TransNormerLLM (TNL) in Flax NNX: SRMSNorm, SGLU, LRPE-d, the gated linear attention token mixer, the block and a
small causal LM with a constant-size decode cache.

Follows the released HF ``modeling_transnormer.py`` (TransNormerLLM, Qin et al. 2023, arXiv:2307.14995)::

    x = x + GatedLinearAttention(SRMSNorm(x))     # token mixer, decayed linear attention
    x = x + SGLU(SRMSNorm(x))                     # channel mixer

No biases anywhere; the embedding is multiplied by ``sqrt(D)``; a final SRMSNorm precedes the (tied) LM head.
Decoding keeps one f32 state ``[B, H, d_qk, d]`` per layer (plus a position counter for LRPE): memory and work per
token are independent of the context length.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxattn.nn import TransNormerLM
  >>> lm = TransNormerLM(vocab_size=256, features=64, num_layers=2, num_heads=4, rngs=nnx.Rngs(0))
  >>> tokens = jnp.zeros((2, 16), jnp.int32)
  >>> lm(tokens).shape
  (2, 16, 256)
  >>> lm.init_cache(batch_size=2)
  >>> logits = lm(tokens[:, :10], decode=True)   # prefill
  >>> logits = lm(tokens[:, 10:11], decode=True)  # then one token at a time
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.nn._checks import positive_int
from jaxattn.ops.linear.api import linear_attention, linear_attention_step

__all__ = [
    "srms_norm", "SRMSNorm", "SGLU", "LRPE", "tnl_decay_slopes", "GatedLinearAttention", "TransNormerBlock",
    "TransNormerLM",
]


# ------------------------------------------------------------------------------------------------------ norms
def srms_norm(x, eps: float = 1e-6):
  r"""Simple RMSNorm (no gain): :math:`x / \sqrt{\mathrm{mean}(x^2) + \epsilon}` over the last axis, in f32.

  Args:
    x: ``[..., F]``.
    eps: added to the mean square.

  Returns:
    ``[..., F]`` in x's dtype.
  """
  xf = jnp.asarray(x).astype(jnp.float32)
  return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(jnp.asarray(x).dtype)


class SRMSNorm(nnx.Module):
  """Simple RMSNorm (TransNormerLLM Eq. 14): :func:`srms_norm` as a (parameter-free) module."""

  def __init__(self, eps: float = 1e-6):
    if not (isinstance(eps, (int, float)) and eps >= 0):
      raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    self.eps = float(eps)

  def __call__(self, x):
    return srms_norm(x, self.eps)


# -------------------------------------------------------------------------------------------------- channel mixer
class SGLU(nnx.Module):
  r"""Simple GLU channel mixer (TransNormerLLM Eq. 12): :math:`((x W_v) \odot (x W_u)) W_o`, no activation, no bias.

  Shapes: ``x [..., features] -> [..., features]`` through a hidden size ``hidden_features``.
  """

  def __init__(self, features: int, hidden_features: int, *, dtype=None, param_dtype=jnp.float32, precision=None,
               rngs: nnx.Rngs):
    features = positive_int("features", features)
    hidden_features = positive_int("hidden_features", hidden_features)
    common = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.v_proj = nnx.Linear(features, hidden_features, **common)  # kernel [F, Fh]
    self.u_proj = nnx.Linear(features, hidden_features, **common)  # kernel [F, Fh]
    self.o_proj = nnx.Linear(hidden_features, features, **common)  # kernel [Fh, F]

  def __call__(self, x):
    return self.o_proj(self.v_proj(x) * self.u_proj(x))


# --------------------------------------------------------------------------------------------------------- LRPE
class LRPE(nnx.Module):
  r"""Learnable relative positional encoding, LRPE-d (TransNormerLLM Eq. 9), as in the released code.

  .. math:: \mathrm{LRPE}(x)_t = [x_t \cos(\theta t),\; x_t \sin(\theta t)]

  so that :math:`\mathrm{LRPE}(q)_t \cdot \mathrm{LRPE}(k)_s = \sum_j q_{tj} k_{sj} \cos(\theta_j (t - s))`: a
  relative encoding that doubles the feature size. ``theta`` is a parameter ``[H, d]`` initialised to
  ``10000 ** (-2 j / (H d))`` for ``j = 0 .. H d - 1`` (each head gets its own slice of frequencies).
  """

  def __init__(self, num_heads: int, head_dim: int, *, param_dtype=jnp.float32):
    H = positive_int("num_heads", num_heads)
    d = positive_int("head_dim", head_dim)
    j = np.arange(H * d, dtype=np.float64)
    self.theta = nnx.Param(jnp.asarray((10000.0 ** (-2.0 * j / (H * d))).reshape(H, d), param_dtype))  # [H, d]

  def __call__(self, x, positions):
    """``x [B, T, H, d]``, positions ``[T]`` or ``[B, T]`` (int or float) -> ``[B, T, H, 2d]`` in x's dtype."""
    pos = jnp.asarray(positions, jnp.float32)
    pos = jnp.broadcast_to(pos, x.shape[:2])[..., None, None]  # [B, T, 1, 1]
    ang = pos * self.theta[...].astype(jnp.float32)  # [B, T, H, d]
    xf = x.astype(jnp.float32)
    return jnp.concatenate([xf * jnp.cos(ang), xf * jnp.sin(ang)], axis=-1).astype(x.dtype)


# ----------------------------------------------------------------------------------------------- decay schedule
def _alibi_slopes(n: int) -> list[float]:
  """ALiBi slopes ``2^(-8 (h+1) / n)``; non-powers of 2 interleave the next power's slopes (the released code)."""
  if math.log2(n).is_integer():
    return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
  p = 2 ** math.floor(math.log2(n))
  return _alibi_slopes(p) + _alibi_slopes(2 * p)[0::2][:n - p]


def tnl_decay_slopes(num_heads: int, layer_idx: int, num_layers: int, rule: str = "code") -> np.ndarray:
  r"""Per-head decay rates ``s [H]`` of TransNormerLLM layer ``layer_idx``: ``lambda = exp(-s)``, ``log_decay = -s``.

  - ``rule="code"`` (the released checkpoints): ALiBi slopes ``2^(-8 (h+1) / H)`` (h = 0..H-1) times
    ``1 - l / (L - 1) + 1e-5`` (0-indexed ``l``), so layer 0 decays fastest and the last layer is almost
    decay-free. With one layer (``L == 1``) the factor is ``1 + 1e-5`` (the code divides by zero there).
  - ``rule="paper"`` (Eq. 10): ``s = (8 h / H) (1 - l / L)`` for ``h = 1..H``.

  Returns:
    float64 numpy ``[H]`` (static: the decay is not learned; learnable decays gave NaNs in the paper).
  """
  H = positive_int("num_heads", num_heads)
  L = positive_int("num_layers", num_layers)
  if not isinstance(layer_idx, (int, np.integer)) or isinstance(layer_idx, bool) or not 0 <= layer_idx < L:
    raise ValueError(f"layer_idx must be an int in [0, {L}), got {layer_idx!r}")
  if rule == "code":
    factor = 1.0 - (layer_idx / (L - 1) if L > 1 else 0.0) + 1e-5
    return np.asarray(_alibi_slopes(H), np.float64) * factor
  if rule == "paper":
    return 8.0 * np.arange(1, H + 1, dtype=np.float64) / H * (1.0 - layer_idx / L)
  raise ValueError(f"rule must be 'code' or 'paper', got {rule!r}")


# ------------------------------------------------------------------------------------------------- token mixer
class GatedLinearAttention(nnx.Module):
  r"""The TransNormerLLM token mixer (Eq. 11, "gated linear attention"; not Yang et al.'s GLA).

  .. math::
     [q, k, v, u] = x W_{qkvu},\quad q, k \leftarrow \mathrm{SiLU}(q), \mathrm{SiLU}(k)
     \;(\text{then } \mathrm{LRPE} \text{ in the first layer}),\quad
     o_t = \sum_{s \le t} \lambda_h^{t-s} (q_t \cdot k_s)\, v_s,\quad
     y = (\mathrm{SRMSNorm}(o) \odot u)\, W_o

  with no softmax, no ``1/sqrt(d)`` and no normaliser; SRMSNorm runs over all heads jointly (``[B, T, H d]``).
  ``lambda_h = exp(-s_h)`` from :func:`tnl_decay_slopes` (static).

  Shapes: ``x [B, T, features] -> [B, T, features]``; ``H = num_heads``, ``d = hidden_features // H``.

  Args:
    features: model width ``D``.
    num_heads: heads ``H``.
    hidden_features: attention width (default ``D``); must be a multiple of ``H``.
    layer_idx, num_layers: position in the stack, for the decay schedule.
    use_lrpe: apply LRPE-d to q and k (default: only in layer 0, the "Mix" variant of the released models).
    decay_rule: ``"code"`` (default) or ``"paper"``, see :func:`tnl_decay_slopes`.
    implementation, chunk_size: passed to :func:`jaxattn.linear_attention`.
    dtype, param_dtype, precision: of the projections.
    rngs: parameter initialisation.
  """

  def __init__(self, features: int, num_heads: int, *, hidden_features: int | None = None, layer_idx: int = 0,
               num_layers: int = 1, use_lrpe: bool | None = None, decay_rule: str = "code",
               implementation: str | Sequence[str] | None = None, chunk_size: int | None = None, dtype=None,
               param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs):
    self.features = positive_int("features", features)
    self.num_heads = positive_int("num_heads", num_heads)
    self.hidden_features = positive_int("hidden_features", hidden_features or features)
    if self.hidden_features % self.num_heads:
      raise ValueError(f"hidden_features ({self.hidden_features}) must be a multiple of num_heads "
                       f"({self.num_heads})")
    self.head_dim = self.hidden_features // self.num_heads
    self.slopes = tuple(float(s) for s in tnl_decay_slopes(self.num_heads, layer_idx, num_layers, decay_rule))
    self.use_lrpe = bool(layer_idx == 0 if use_lrpe is None else use_lrpe)
    if implementation is not None and not isinstance(implementation, str):
      implementation = tuple(implementation)
    self.implementation = implementation
    self.chunk_size = chunk_size
    common = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.qkvu_proj = nnx.Linear(self.features, 4 * self.hidden_features, **common)  # kernel [D, 4 Dh]
    self.out_proj = nnx.Linear(self.hidden_features, self.features, **common)  # kernel [Dh, D]
    self.lrpe = LRPE(self.num_heads, self.head_dim, param_dtype=param_dtype) if self.use_lrpe else None
    self.state: nnx.Cache | None = nnx.data(None)  # f32 [B, H, d_qk, d]
    self.position: nnx.Cache | None = nnx.data(None)  # int32 scalar: tokens seen

  @property
  def log_decay(self):
    """``-s [H]`` f32 (``log lambda``)."""
    return -jnp.asarray(self.slopes, jnp.float32)

  @property
  def qk_dim(self) -> int:
    return 2 * self.head_dim if self.use_lrpe else self.head_dim

  def init_cache(self, batch_size: int) -> None:
    """Creates (or resets) the decode cache: ``state`` f32 ``[B, H, d_qk, d]`` and ``position`` (int32 0)."""
    B = positive_int("batch_size", batch_size)
    self.state = nnx.Cache(jnp.zeros((B, self.num_heads, self.qk_dim, self.head_dim), jnp.float32))
    self.position = nnx.Cache(jnp.zeros((), jnp.int32))

  def __call__(self, x, *, decode: bool = False):
    """``x [B, T, features] -> [B, T, features]``.

    With ``decode=True`` the call continues the cached sequence (any ``T``: prefill or one token at a time) and
    updates the cache; requires :meth:`init_cache`.
    """
    x = jnp.asarray(x)
    if x.ndim != 3 or x.shape[-1] != self.features:
      raise ValueError(f"x must have shape [B, T, {self.features}], got {x.shape}")
    B, T, _ = x.shape
    H, d = self.num_heads, self.head_dim
    q, k, v, u = jnp.split(self.qkvu_proj(x), 4, axis=-1)  # each [B, T, Dh]
    q = jax.nn.silu(q).reshape(B, T, H, d)
    k = jax.nn.silu(k).reshape(B, T, H, d)
    v = v.reshape(B, T, H, d)
    start = jnp.zeros((), jnp.int32)
    if decode:
      if self.state is None or self.position is None:
        raise ValueError("decode=True needs a cache: call init_cache(batch_size) first")
      if self.state.shape[0] != B:
        raise ValueError(f"the cache was made for batch size {self.state.shape[0]}, got batch size {B}")
      start = self.position[...]
    if self.lrpe is not None:
      pos = start + jnp.arange(T, dtype=jnp.int32)  # [T]
      q, k = self.lrpe(q, pos), self.lrpe(k, pos)  # [B, T, H, 2d]
    kw = dict(log_decay=self.log_decay, scale=1.0)
    if not decode:
      o = linear_attention(q, k, v, implementation=self.implementation, chunk_size=self.chunk_size, **kw)
    elif T == 1:
      o, state = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], self.state[...], **kw)
      o = o[:, None]
      self.state[...] = state
    else:
      o, state = linear_attention(q, k, v, initial_state=self.state[...], return_final_state=True,
                                  implementation=self.implementation, chunk_size=self.chunk_size, **kw)
      self.state[...] = state
    if decode:
      self.position[...] = start + T
    o = srms_norm(o.reshape(B, T, H * d))  # over all heads jointly
    return self.out_proj(o * u)


# ------------------------------------------------------------------------------------------------------- block
class TransNormerBlock(nnx.Module):
  """``x + GatedLinearAttention(SRMSNorm(x))`` then ``x + SGLU(SRMSNorm(x))`` (pre-norm, no biases).

  Args:
    features, num_heads: model width and heads.
    glu_features: SGLU hidden size (default ``round(8 D / 3)`` rounded up to a multiple of 8).
    layer_idx, num_layers, use_lrpe, decay_rule, hidden_features, implementation, chunk_size: see
      :class:`GatedLinearAttention`.
    eps: SRMSNorm epsilon.
  """

  def __init__(self, features: int, num_heads: int, *, glu_features: int | None = None, layer_idx: int = 0,
               num_layers: int = 1, use_lrpe: bool | None = None, decay_rule: str = "code",
               hidden_features: int | None = None, implementation=None, chunk_size: int | None = None,
               eps: float = 1e-6, dtype=None, param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs):
    features = positive_int("features", features)
    glu_features = glu_features or -(-(8 * features // 3) // 8) * 8
    self.token_norm = SRMSNorm(eps)
    self.token_mixer = GatedLinearAttention(
        features, num_heads, hidden_features=hidden_features, layer_idx=layer_idx, num_layers=num_layers,
        use_lrpe=use_lrpe, decay_rule=decay_rule, implementation=implementation, chunk_size=chunk_size, dtype=dtype,
        param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.channel_norm = SRMSNorm(eps)
    self.channel_mixer = SGLU(features, glu_features, dtype=dtype, param_dtype=param_dtype, precision=precision,
                              rngs=rngs)

  def init_cache(self, batch_size: int) -> None:
    self.token_mixer.init_cache(batch_size)

  def __call__(self, x, *, decode: bool = False):
    """``x [B, T, D] -> [B, T, D]``."""
    x = x + self.token_mixer(self.token_norm(x), decode=decode)
    return x + self.channel_mixer(self.channel_norm(x))


# ---------------------------------------------------------------------------------------------------------- LM
class TransNormerLM(nnx.Module):
  r"""A small TransNormerLLM causal language model.

  ``logits = SRMSNorm(blocks(sqrt(D) * embed(tokens))) E^T`` (tied embeddings by default).

  Decoding: :meth:`init_cache` then calls with ``decode=True`` (a prompt of any length, then one token at a time);
  the cache is one f32 state ``[B, H, d_qk, d]`` per layer, constant in the sequence length. Step-by-step decoding
  equals the full pass up to float rounding.

  Args:
    vocab_size, features, num_layers, num_heads: the model size.
    glu_features: SGLU hidden size (default ``~8 D / 3``).
    lrpe_layers: layers using LRPE-d (default ``(0,)``, the released configs).
    decay_rule: ``"code"`` or ``"paper"`` (:func:`tnl_decay_slopes`).
    tie_embeddings: use the embedding matrix as the LM head (HF default).
    implementation, chunk_size: passed to :func:`jaxattn.linear_attention`.
  """

  def __init__(self, vocab_size: int, features: int, num_layers: int, num_heads: int, *,
               glu_features: int | None = None, lrpe_layers: Sequence[int] = (0,), decay_rule: str = "code",
               tie_embeddings: bool = True, implementation=None, chunk_size: int | None = None, eps: float = 1e-6,
               dtype=None, param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs):
    self.vocab_size = positive_int("vocab_size", vocab_size)
    self.features = positive_int("features", features)
    self.num_layers = positive_int("num_layers", num_layers)
    bad = [l for l in lrpe_layers if not 0 <= l < self.num_layers]
    if bad:
      raise ValueError(f"lrpe_layers {tuple(lrpe_layers)} has layers outside [0, {self.num_layers}): {bad}")
    self.embed = nnx.Embed(self.vocab_size, self.features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List([
        TransNormerBlock(self.features, num_heads, glu_features=glu_features, layer_idx=l,
                         num_layers=self.num_layers, use_lrpe=l in lrpe_layers, decay_rule=decay_rule,
                         implementation=implementation, chunk_size=chunk_size, eps=eps, dtype=dtype,
                         param_dtype=param_dtype, precision=precision, rngs=rngs)
        for l in range(self.num_layers)])
    self.final_norm = SRMSNorm(eps)
    self.lm_head = None if tie_embeddings else nnx.Linear(
        self.features, self.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, precision=precision,
        rngs=rngs)

  def init_cache(self, batch_size: int) -> None:
    """Creates (or resets) every layer's decode state."""
    for block in self.blocks:
      block.init_cache(batch_size)

  def __call__(self, tokens, *, decode: bool = False):
    """``tokens`` int ``[B, T]`` -> logits ``[B, T, vocab_size]``."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an int array [B, T], got {tokens.dtype} {tokens.shape}")
    x = self.embed(tokens) * math.sqrt(self.features)  # [B, T, D]
    for block in self.blocks:
      x = block(x, decode=decode)
    x = self.final_norm(x)
    return self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
