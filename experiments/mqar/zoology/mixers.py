r"""Sequence mixers of the Zoology scaffold (papers/efficient.md section 4), as Flax NNX modules.

Every mixer maps ``x [B, T, D] -> y [B, T, D]`` causally, takes ``train`` (training and evaluation differ only for
the selection hybrid) and reports the size of its decoding state (``state_size(seq_len)``, floats per sequence, as
in Zoology's recall-memory plots). Mixers with an auxiliary loss return it from :meth:`Mixer.call_with_aux`.

- :class:`SoftmaxAttention`: causal softmax attention, optionally a sliding window of ``w`` keys; state ``2 D N``
  (``2 D w``).
- :class:`DecayedLinearAttention`: TransNormer gated linear attention, per-head decay ``lambda_h``; state
  ``H d_qk d``.
- :class:`TaylorLinearAttention`: Based, ``phi(q) . phi(k) = 1 + q.k / sqrt(f) + (q.k)^2 / (2 f)``, normalised;
  state ``H (1 + f + f^2)(D/H + 1)``.
- :class:`SigmoidSelectiveAttention`: ``x + sigmoid(x w) * Attn(x)``, top-``ceil(sqrt(N))`` queries at evaluation;
  state ``2 D N``.
- :class:`Sequential`: mixers applied one after the other (each keeps its own skip); states add up.

The gated convolutions (``ShortConv``, ``LongConv``, ``BaseConv``) live in :mod:`experiments.mqar.zoology.conv`.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn import linear_attention, softmax_attention
from jaxattn import masks as masks_lib
from jaxattn.nn import GatedLinearAttention, MultiHeadAttention

__all__ = [
    "Mixer", "SoftmaxAttention", "DecayedLinearAttention", "TaylorLinearAttention", "taylor_features",
    "SigmoidSelectiveAttention", "Sequential",
]


def positive_int(name: str, value) -> int:
  """``value`` as an int; ValueError naming it unless it is a positive int (bools refused)."""
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def check_x(x, d_model: int):
  """``x`` as an array; ValueError unless it has shape ``[B, T, d_model]``."""
  x = jnp.asarray(x)
  if x.ndim != 3 or x.shape[-1] != d_model:
    raise ValueError(f"x must have shape [B, T, {d_model}], got {x.shape}")
  return x


class Mixer(nnx.Module):
  """Base class: ``__call__(x, *, train=False) -> y`` with ``x, y [B, T, D]``.

  :meth:`call_with_aux` also returns an auxiliary loss (a scalar, 0 unless the mixer defines one); the scaffold
  adds it to the training loss. :meth:`state_size` is the decoding state in floats per sequence.
  """

  def call_with_aux(self, x, *, train: bool = False):
    return self(x, train=train), jnp.zeros((), jnp.float32)

  def state_size(self, seq_len: int) -> int:
    raise NotImplementedError(f"{type(self).__name__} does not report a state size")


class SoftmaxAttention(Mixer):
  r"""Causal multi-head softmax attention (Zoology's ``MHA``: fused biased q/k/v projection, ``1/sqrt(d)`` scale,
  biased output projection), through :class:`jaxattn.nn.MultiHeadAttention`.

  With ``window`` set, query ``i`` sees keys ``i - window + 1 .. i`` only (:func:`jaxattn.masks.sliding_window`):
  the sliding-window attention of the Based paper.

  Args:
    d_model: width ``D``.
    num_heads: heads (Zoology's Figure 2 uses 1).
    window: sliding-window length, or None for full causal attention.
    use_rope: rotary position embeddings on q and k (:func:`jaxattn.nn.apply_rope`; Zoology's Figure-2 model
      has none and learns absolute positions in the scaffold instead).
    implementation: passed to :func:`jaxattn.softmax_attention`.
    rngs: parameter initialisation.
  """

  def __init__(self, d_model: int, num_heads: int = 1, *, window: int | None = None, use_rope: bool = False,
               implementation=None, rngs: nnx.Rngs):
    self.d_model = positive_int("d_model", d_model)
    if window is not None:
      window = positive_int("window", window)
    self.window = window
    mask = masks_lib.Causal() if window is None else masks_lib.sliding_window(window, causal=True)
    self.attn = MultiHeadAttention(num_heads, self.d_model, use_bias=True, mask=mask, use_rope=use_rope,
                                   implementation=implementation, rngs=rngs)

  def __call__(self, x, *, train: bool = False):
    return self.attn(check_x(x, self.d_model))

  def state_size(self, seq_len: int) -> int:
    return 2 * self.d_model * (seq_len if self.window is None else min(self.window, seq_len))


class DecayedLinearAttention(Mixer):
  r"""TransNormer-style decayed linear attention (:class:`jaxattn.nn.GatedLinearAttention`):
  :math:`o_t = \sum_{s \le t} \lambda_h^{t-s} (q_t \cdot k_s) v_s`, ``q, k = SiLU(.)`` (LRPE in layer 0), then
  SRMSNorm, an output gate and a projection. The decay rates follow TransNormerLLM's released schedule for layer
  ``layer_idx`` of ``num_layers``.

  Args:
    d_model: width ``D``.
    num_heads: heads ``H`` (``D`` must be a multiple).
    layer_idx, num_layers: position in the stack (decay schedule; LRPE in layer 0).
    implementation: passed to :func:`jaxattn.linear_attention`.
    rngs: parameter initialisation.
  """

  def __init__(self, d_model: int, num_heads: int = 1, *, layer_idx: int = 0, num_layers: int = 1,
               implementation=None, rngs: nnx.Rngs):
    self.d_model = positive_int("d_model", d_model)
    self.attn = GatedLinearAttention(self.d_model, num_heads, layer_idx=layer_idx, num_layers=num_layers,
                                     implementation=implementation, rngs=rngs)

  def __call__(self, x, *, train: bool = False):
    return self.attn(check_x(x, self.d_model))

  def state_size(self, seq_len: int) -> int:
    return self.attn.num_heads * self.attn.qk_dim * self.attn.head_dim


def taylor_features(x, scale_dim: int | None = None):
  r"""Based's second-order Taylor feature map (``[..., f] -> [..., 1 + f + f^2]``, f32).

  .. math:: \phi(x) = \big[1,\ x / f^{1/4},\ \mathrm{vec}(x x^\top) / (\sqrt{2}\sqrt{f})\big], \qquad
     \phi(q) \cdot \phi(k) = 1 + \frac{q \cdot k}{\sqrt f} + \frac{(q \cdot k)^2}{2 f}

  which approximates :math:`\exp(q \cdot k / \sqrt f)` and is always positive. ``f = scale_dim`` (default: the
  last axis of ``x``).
  """
  x = jnp.asarray(x).astype(jnp.float32)
  f = x.shape[-1] if scale_dim is None else scale_dim
  x2 = (x[..., :, None] * x[..., None, :]).reshape(x.shape[:-1] + (x.shape[-1] ** 2,))
  one = jnp.ones(x.shape[:-1] + (1,), jnp.float32)
  return jnp.concatenate([one, x / f ** 0.25, x2 / (math.sqrt(2.0) * math.sqrt(f))], axis=-1)


class TaylorLinearAttention(Mixer):
  r"""Based linear attention: normalised causal linear attention with Taylor features.

  .. math::
     q = x W_q,\ k = x W_k \in \mathbb{R}^{f},\ v = x W_v,\qquad
     o_t = \frac{\sum_{s \le t} \phi(q_t) \cdot \phi(k_s)\, v_s}{\sum_{s \le t} \phi(q_t) \cdot \phi(k_s) + \epsilon},
     \qquad y = o W_o

  (one head per ``num_heads``, feature dimension ``f = feature_dim`` per head, value width ``D / num_heads``, no
  biases). Numerator and denominator come from one :func:`jaxattn.linear_attention` call (a column of ones
  appended to the values), so memory is linear in ``T``.

  Args:
    d_model: width ``D``.
    feature_dim: ``f`` (Zoology's Figure 2: 8, giving ``1 + 8 + 64 = 73`` features).
    num_heads: heads (``D`` must be a multiple).
    eps: added to the denominator.
    implementation: passed to :func:`jaxattn.linear_attention`.
    rngs: parameter initialisation.
  """

  def __init__(self, d_model: int, feature_dim: int = 8, num_heads: int = 1, *, eps: float = 1e-12,
               implementation=None, rngs: nnx.Rngs):
    self.d_model = positive_int("d_model", d_model)
    self.feature_dim = positive_int("feature_dim", feature_dim)
    self.num_heads = positive_int("num_heads", num_heads)
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})")
    self.head_dim = self.d_model // self.num_heads
    self.eps = float(eps)
    self.implementation = implementation
    H, f = self.num_heads, self.feature_dim
    self.proj_q = nnx.Linear(self.d_model, H * f, use_bias=False, rngs=rngs)  # kernel [D, H f]
    self.proj_k = nnx.Linear(self.d_model, H * f, use_bias=False, rngs=rngs)  # kernel [D, H f]
    self.proj_v = nnx.Linear(self.d_model, self.d_model, use_bias=False, rngs=rngs)  # kernel [D, D]
    self.proj_o = nnx.Linear(self.d_model, self.d_model, use_bias=False, rngs=rngs)  # kernel [D, D]

  def __call__(self, x, *, train: bool = False):
    x = check_x(x, self.d_model)
    B, T, _ = x.shape
    H, f, d = self.num_heads, self.feature_dim, self.head_dim
    q = taylor_features(self.proj_q(x).reshape(B, T, H, f))  # [B, T, H, 1 + f + f^2]
    k = taylor_features(self.proj_k(x).reshape(B, T, H, f))  # [B, T, H, 1 + f + f^2]
    v = self.proj_v(x).reshape(B, T, H, d).astype(jnp.float32)
    va = jnp.concatenate([v, jnp.ones((B, T, H, 1), jnp.float32)], axis=-1)  # [B, T, H, d + 1]
    o = linear_attention(q, k, va, scale=1.0, implementation=self.implementation)  # [B, T, H, d + 1]
    out = o[..., :-1] / (o[..., -1:] + self.eps)
    return self.proj_o(out.reshape(B, T, self.d_model).astype(x.dtype))

  def state_size(self, seq_len: int) -> int:
    f = self.feature_dim
    return self.num_heads * (1 + f + f * f) * (self.head_dim + 1)


class SigmoidSelectiveAttention(Mixer):
  r"""Input-dependent sparse attention with a learned sigmoid router (Zoology's ``SigmoidLookups``).

  .. math::
     s_t = \sigma(x_t \cdot w),\qquad
     \text{train: } y = x + s \odot \mathrm{Attn}(x),\qquad
     \text{eval: } y_t = x_t + [t \in \mathrm{top}_k(s)]\; s_t\, \mathrm{Attn}(x)_t

  ``Attn`` is causal softmax attention (fused biased q/k/v projection, biased output projection). In training every
  position gets the attention output, scaled by its selection score, and the auxiliary loss
  ``penalty * relu(mean(s) - n_lookups / T)`` pushes the mean score towards ``n_lookups / T`` (default
  ``n_lookups = sqrt(T)``). At evaluation only the ``k = ceil(sqrt(T))`` (or ``n_lookups``) highest-scoring
  positions of each sequence attend: their queries are gathered and attend to all earlier keys, ``O(k T)``
  instead of ``O(T^2)`` score entries; the other positions pass ``x`` through.

  Note the mixer keeps its own skip (``x + ...``), as in Zoology; the scaffold's residual comes on top.

  Args:
    d_model: width ``D``.
    num_heads: attention heads.
    selection_penalty: weight of the auxiliary loss (Zoology: 1e-3).
    n_lookups: target number of attending positions (default ``sqrt(T)`` in training, ``ceil(sqrt(T))`` at eval).
    implementation: passed to :func:`jaxattn.softmax_attention`.
    rngs: parameter initialisation.
  """

  def __init__(self, d_model: int, num_heads: int = 1, *, selection_penalty: float = 1e-3,
               n_lookups: int | None = None, implementation=None, rngs: nnx.Rngs):
    self.d_model = positive_int("d_model", d_model)
    self.num_heads = positive_int("num_heads", num_heads)
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})")
    if not (isinstance(selection_penalty, (int, float)) and selection_penalty >= 0):
      raise ValueError(f"selection_penalty must be a non-negative float, got {selection_penalty!r}")
    self.selection_penalty = float(selection_penalty)
    self.n_lookups = None if n_lookups is None else positive_int("n_lookups", n_lookups)
    self.implementation = implementation
    self.head_dim = self.d_model // self.num_heads
    self.qkv = nnx.Linear(self.d_model, 3 * self.d_model, rngs=rngs)  # kernel [D, 3 D]
    self.selecting = nnx.Linear(self.d_model, 1, use_bias=False, rngs=rngs)  # kernel [D, 1]
    self.out_proj = nnx.Linear(self.d_model, self.d_model, rngs=rngs)  # kernel [D, D]

  def num_selected(self, seq_len: int) -> int:
    """``k``: how many positions attend at evaluation."""
    k = math.ceil(math.sqrt(seq_len)) if self.n_lookups is None else self.n_lookups
    return min(k, seq_len)

  def selection(self, x):
    """Selection scores ``s [B, T]`` in (0, 1)."""
    return jax.nn.sigmoid(self.selecting(x)[..., 0].astype(jnp.float32))

  def _qkv(self, x):
    B, T, _ = x.shape
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)  # each [B, T, D]
    shape = (B, T, self.num_heads, self.head_dim)
    return q.reshape(shape), k.reshape(shape), v.reshape(shape)

  def call_with_aux(self, x, *, train: bool = False):
    x = check_x(x, self.d_model)
    B, T, D = x.shape
    s = self.selection(x)  # [B, T]
    q, k, v = self._qkv(x)  # [B, T, H, d]
    if train:
      o = softmax_attention(q, k, v, mask=masks_lib.Causal(), implementation=self.implementation)  # [B, T, H, d]
      attn = self.out_proj(o.reshape(B, T, D))  # [B, T, D]
      target = (math.sqrt(T) if self.n_lookups is None else self.n_lookups) / T
      aux = self.selection_penalty * jax.nn.relu(jnp.mean(s) - target)
      return x + s[..., None].astype(x.dtype) * attn, aux
    n = self.num_selected(T)
    s_top, idx = jax.lax.top_k(s, n)  # [B, n] each
    q_sel = jnp.take_along_axis(q, idx[:, :, None, None], axis=1)  # [B, n, H, d]
    allowed = jnp.arange(T)[None, None, :] <= idx[:, :, None]  # [B, n, T]: causal for the gathered queries
    bias = jnp.where(allowed, 0.0, -jnp.inf)[:, None]  # [B, 1, n, T]
    o = softmax_attention(q_sel, k, v, bias=bias, implementation=self.implementation)  # [B, n, H, d]
    attn = self.out_proj(o.reshape(B, n, D)) * s_top[..., None].astype(x.dtype)  # [B, n, D]
    y = x.at[jnp.arange(B)[:, None], idx].add(attn)  # top_k indices are distinct: one add per position
    return y, jnp.zeros((), jnp.float32)

  def __call__(self, x, *, train: bool = False):
    return self.call_with_aux(x, train=train)[0]

  def state_size(self, seq_len: int) -> int:
    return 2 * self.d_model * seq_len


class Sequential(Mixer):
  """Mixers applied in order (``y = m_n(... m_1(x))``), auxiliary losses summed; e.g. BaseConv then sparse
  attention in one layer of the selection hybrid."""

  def __init__(self, mixers: Sequence[Mixer]):
    if not mixers:
      raise ValueError("Sequential needs at least one mixer")
    self.mixers = nnx.List(list(mixers))

  def call_with_aux(self, x, *, train: bool = False):
    aux = jnp.zeros((), jnp.float32)
    for m in self.mixers:
      x, a = m.call_with_aux(x, train=train)
      aux = aux + a
    return x, aux

  def __call__(self, x, *, train: bool = False):
    return self.call_with_aux(x, train=train)[0]

  def state_size(self, seq_len: int) -> int:
    return sum(m.state_size(seq_len) for m in self.mixers)
