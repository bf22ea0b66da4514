r"""Gated convolutions of the Zoology scaffold: short depthwise convolution, FFT long convolution with an implicit
(MLP) filter, and BaseConv (Arora et al. 2023, papers/efficient.md section 4).

.. math::
   \mathrm{ShortConv}(u)_t = b + \sum_{i=0}^{k-1} w_i \odot u_{t-k+1+i}, \qquad
   \mathrm{LongConv}(u)_t = \sum_{s \le t} h_{t-s} \odot u_s + u_t, \qquad
   \mathrm{BaseConv}(u) = \mathrm{conv}(u) \odot (u W + b) + u

All three are causal and depthwise (one filter per channel). The long filter ``h [N, D]`` is produced by an MLP over
positional features and multiplied by an exponential decay (Hyena's implicit parameterisation, as in Zoology's
``ImplicitLongConvolution``); the convolution runs as a length-``2N`` FFT, ``O(N log N)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.mqar.zoology.mixers import Mixer, check_x, positive_int

__all__ = ["ShortConv", "ImplicitFilter", "LongConv", "BaseConv", "fft_causal_conv"]


def fft_causal_conv(u, h):
  r"""Causal depthwise convolution ``y_t = sum_{s <= t} h_{t-s} u_s`` through a length-``2T`` real FFT.

  Args:
    u: ``[B, T, D]``.
    h: filter ``[T, D]`` (or longer; the first ``T`` taps are used).

  Returns:
    ``[B, T, D]`` in u's dtype (computed in f32).
  """
  T = u.shape[1]
  n = 2 * T  # zero padding to 2T makes the circular convolution a linear (causal) one
  u_f = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=1)  # [B, T + 1, D] complex
  h_f = jnp.fft.rfft(h[:T].astype(jnp.float32), n=n, axis=0)  # [T + 1, D] complex
  return jnp.fft.irfft(u_f * h_f[None], n=n, axis=1)[:, :T].astype(u.dtype)


class ShortConv(Mixer):
  r"""Depthwise causal convolution with a short kernel: :math:`y_t = b + \sum_{i<k} w_i \odot u_{t-k+1+i}`
  (positions before the start read zeros).

  Parameters: ``weight [k, D]`` and ``bias [D]``, both uniform in ``+-1/sqrt(k)`` (PyTorch's ``Conv1d`` default,
  which Zoology keeps). Shapes: ``[B, T, D] -> [B, T, D]``. State for decoding: the last ``k`` inputs, ``k D``.
  """

  def __init__(self, d_model: int, kernel_size: int = 3, *, rngs: nnx.Rngs):
    self.d_model = positive_int("d_model", d_model)
    self.kernel_size = positive_int("kernel_size", kernel_size)
    bound = 1.0 / math.sqrt(self.kernel_size)
    self.weight = nnx.Param(jax.random.uniform(rngs.params(), (self.kernel_size, self.d_model), jnp.float32,
                                               -bound, bound))  # [k, D]
    self.bias = nnx.Param(jax.random.uniform(rngs.params(), (self.d_model,), jnp.float32, -bound, bound))  # [D]

  def __call__(self, x, *, train: bool = False):
    x = check_x(x, self.d_model)
    k = self.kernel_size
    T = x.shape[1]
    xp = jnp.pad(x, ((0, 0), (k - 1, 0), (0, 0)))  # [B, T + k - 1, D]
    w = self.weight[...].astype(x.dtype)
    y = sum(w[i] * xp[:, i:i + T] for i in range(k))  # tap i reads u_{t - k + 1 + i}
    return y + self.bias[...].astype(x.dtype)

  def state_size(self, seq_len: int) -> int:
    return self.d_model * self.kernel_size


class _Sin(nnx.Module):
  """``sin(freq * x)`` with a learned per-unit frequency (Hyena / Zoology filter activation)."""

  def __init__(self, dim: int, w: float = 1.0):
    self.freq = nnx.Param(jnp.full((dim,), w, jnp.float32))  # [dim]

  def __call__(self, x):
    return jnp.sin(self.freq[...] * x)


class ImplicitFilter(nnx.Module):
  r"""Implicit long filter ``h [N, D]``: an MLP over positional features, times an exponential decay.

  .. math::
     z_t = [\,t/(N-1),\ \cos(f_j \omega_t),\ -\sin(f_j \omega_t)\,]_{j<\text{bands}},\quad \omega_t = 2\pi t/N,
     \qquad h_t = \mathrm{MLP}(z_t) \odot e^{-|\delta| \, t/(N-1)}

  with ``bands = (emb_dim - 1) // 2`` frequencies ``f = linspace(1e-4, bands - 1, bands)``, the MLP
  ``Linear(emb_dim, order) -> Sin -> [Linear(order, order) -> Sin] x num_inner -> Linear(order, D, no bias)`` (one
  shared learned ``Sin`` frequency vector) and per-channel decay rates ``|delta|`` spaced linearly between
  ``-ln(1e-2)/1.5`` and ``-ln(1e-2)/0.3`` (fixed). This is Zoology's ``ImplicitLongConvolution`` filter.

  Args:
    d_model: channels ``D``.
    seq_len: the filter length ``N`` (``l_max``); calls may use any ``T <= N`` (the first ``T`` taps).
    emb_dim: odd, at least 3 (time plus cosine/sine bands).
    order: MLP width.
    num_inner: hidden ``Linear -> Sin`` layers.
  """

  def __init__(self, d_model: int, seq_len: int, *, emb_dim: int = 3, order: int = 16, num_inner: int = 2,
               rngs: nnx.Rngs):
    self.d_model = positive_int("d_model", d_model)
    self.seq_len = positive_int("seq_len", seq_len)
    emb_dim = positive_int("emb_dim", emb_dim)
    if emb_dim < 3 or emb_dim % 2 == 0:
      raise ValueError(f"emb_dim must be odd and at least 3 (time, cosine and sine), got {emb_dim}")
    self.emb_dim = emb_dim
    order = positive_int("order", order)
    self.act = _Sin(order)
    self.first = nnx.Linear(emb_dim, order, rngs=rngs)
    self.inner = nnx.List([nnx.Linear(order, order, rngs=rngs) for _ in range(num_inner)])
    self.last = nnx.Linear(order, self.d_model, use_bias=False, rngs=rngs)
    target = 1e-2
    self.decay_rates = tuple(float(abs(r)) for r in np.linspace(math.log(target) / 1.5, math.log(target) / 0.3,
                                                                self.d_model))  # static [D]

  def positional_features(self) -> tuple[np.ndarray, np.ndarray]:
    """``(z [N, emb_dim], t [N, 1])`` as float32 numpy (static: they depend on the sizes only)."""
    N = self.seq_len
    t = np.linspace(0.0, 1.0, N)[:, None]  # [N, 1]
    bands = (self.emb_dim - 1) // 2
    w = 2 * np.pi * np.arange(N)[:, None] / N  # [N, 1]
    f = np.linspace(1e-4, bands - 1, bands)[None]  # [1, bands]
    z = np.concatenate([t, np.cos(f * w), -np.sin(f * w)], axis=-1)
    return z.astype(np.float32), t.astype(np.float32)

  def __call__(self):
    """The filter ``h [N, D]`` f32."""
    z, t = self.positional_features()
    h = self.act(self.first(jnp.asarray(z)))  # [N, order]
    for layer in self.inner:
      h = self.act(layer(h))
    h = self.last(h)  # [N, D]
    return h * jnp.exp(-jnp.asarray(t) * jnp.asarray(self.decay_rates, jnp.float32))


class LongConv(Mixer):
  r"""FFT long convolution with an implicit filter and a skip: :math:`y = h * u + u` (causal, depthwise).

  Shapes: ``[B, T, D] -> [B, T, D]`` for ``T <= seq_len``. Decoding state (a recurrent view would need the whole
  input history): ``N D``.
  """

  def __init__(self, d_model: int, seq_len: int, *, rngs: nnx.Rngs, **filter_kwargs):
    self.d_model = positive_int("d_model", d_model)
    self.seq_len = positive_int("seq_len", seq_len)
    self.filter = ImplicitFilter(d_model, seq_len, rngs=rngs, **filter_kwargs)

  def __call__(self, x, *, train: bool = False):
    x = check_x(x, self.d_model)
    if x.shape[1] > self.seq_len:
      raise ValueError(f"LongConv was built for sequences of at most {self.seq_len} tokens, got {x.shape[1]}")
    return fft_causal_conv(x, self.filter()) + x

  def state_size(self, seq_len: int) -> int:
    return self.d_model * seq_len


class BaseConv(Mixer):
  r"""BaseConv (Zoology): :math:`y = \mathrm{conv}(u) \odot (u W + b) + u`.

  ``conv`` is a :class:`ShortConv` (``kernel_size > 0``) or a :class:`LongConv` with an implicit filter
  (``kernel_size == -1``, which needs ``seq_len``). Zoology's Figure-2 model alternates ``kernel_size`` 3 (layer 0)
  and -1 (layer 1).

  Args:
    d_model: width ``D``.
    kernel_size: short-convolution length, or -1 for the long convolution.
    seq_len: the long filter's length (required for ``kernel_size == -1``).
    rngs: parameter initialisation.
  """

  def __init__(self, d_model: int, kernel_size: int = 3, *, seq_len: int | None = None, rngs: nnx.Rngs):
    self.d_model = positive_int("d_model", d_model)
    if kernel_size == -1:
      if seq_len is None:
        raise ValueError("BaseConv with kernel_size=-1 (long convolution) needs seq_len")
      self.conv = LongConv(d_model, seq_len, rngs=rngs)
    elif isinstance(kernel_size, (int, np.integer)) and not isinstance(kernel_size, bool) and kernel_size > 0:
      self.conv = ShortConv(d_model, int(kernel_size), rngs=rngs)
    else:
      raise ValueError(f"kernel_size must be a positive int or -1 (long convolution), got {kernel_size!r}")
    self.projection = nnx.Linear(self.d_model, self.d_model, rngs=rngs)

  def __call__(self, x, *, train: bool = False):
    x = check_x(x, self.d_model)
    return self.conv(x) * self.projection(x) + x

  def state_size(self, seq_len: int) -> int:
    return self.conv.state_size(seq_len)
