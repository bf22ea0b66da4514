r"""The Zoology language-model scaffold (papers/efficient.md section 4) with a choice of sequence mixer.

Zoology's ``TransformerBlock`` keeps a separate residual stream. With ``h_0 = embed(tokens) (+ learned positions)``
and ``r_0 = 0``, each of the ``L`` layers computes

.. math::
   r \leftarrow r + \mathrm{drop}(h),\qquad h \leftarrow \mathrm{mixer}(\mathrm{LN}_1(r)),\qquad
   r \leftarrow r + \mathrm{drop}(h),\qquad h \leftarrow \mathrm{state\_mixer}(\mathrm{LN}_2(r))

and the output is ``LN_f(r + h) E^T`` (LM head tied to the token embedding ``E``). Zoology's Figure 2 uses two
layers and an identity state mixer (no MLP); note that ``LN_2(r)`` is then still added to the stream by the next
layer, exactly as in Zoology's code. Initialisation follows Zoology too: every linear kernel and embedding
``N(0, 0.02)`` with zero biases, and output projections of attention-like mixers ``N(0, 0.02 / sqrt(2 L))``
(GPT-2 residual scaling); convolution weights keep their PyTorch-style defaults.

Mixers (``mixer=``; layer ``i`` of ``L``):

==================  ===========================================================================================
``attention``       :class:`SoftmaxAttention` in every layer, learned absolute positions (or rotary ones,
                    ``use_rope=True``)
``sliding_window``  :class:`SoftmaxAttention` with a causal window of ``window`` keys, learned positions
``baseconv``        :class:`BaseConv`, short convolution (``short_kernel``) in even layers, implicit long FFT
                    convolution in odd layers (Zoology's ``kernel_size=[3, -1, ...]``)
``linear``          :class:`DecayedLinearAttention` (TransNormer gated linear attention, per-layer decay)
``based``           :class:`BaseConv` (short) in even layers, :class:`TaylorLinearAttention` in odd layers
``hybrid``          the ``baseconv`` layer followed by :class:`SigmoidSelectiveAttention` (dense attention in
                    training with the selection penalty, top-``ceil(sqrt(T))`` queries at evaluation)
==================  ===========================================================================================

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from experiments.mqar.zoology import ZooLM
  >>> lm = ZooLM(vocab_size=64, d_model=32, seq_len=16, mixer="baseconv", rngs=nnx.Rngs(0))
  >>> lm(jnp.zeros((2, 16), jnp.int32)).shape
  (2, 16, 64)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.mqar.zoology.conv import BaseConv
from experiments.mqar.zoology.mixers import (DecayedLinearAttention, Mixer, Sequential, SigmoidSelectiveAttention,
                                            SoftmaxAttention, TaylorLinearAttention, positive_int)

__all__ = ["ZooLM", "MIXERS", "make_mixer", "zoology_init"]

MIXERS = ("attention", "sliding_window", "baseconv", "linear", "based", "hybrid")
_POSITIONAL = ("attention", "sliding_window")
_OUT_PROJECTIONS = ("out", "out_proj")


def make_mixer(name: str, d_model: int, seq_len: int, *, layer_idx: int = 0, num_layers: int = 2,
               num_heads: int = 1, window: int = 16, short_kernel: int = 3, feature_dim: int = 8,
               selection_penalty: float = 1e-3, n_lookups: int | None = None, use_rope: bool = False,
               implementation=None, rngs: nnx.Rngs) -> Mixer:
  """The sequence mixer of layer ``layer_idx`` for a mixer family (see the module docstring).

  Args:
    name: one of :data:`MIXERS`.
    d_model, seq_len: width and the longest sequence (long-convolution filter length).
    layer_idx, num_layers: position in the stack.
    num_heads: heads of the attention and linear-attention mixers.
    window: sliding-window length (``sliding_window``).
    short_kernel: short-convolution length (``baseconv``, ``based``, ``hybrid``).
    feature_dim: Taylor feature dimension (``based``).
    selection_penalty, n_lookups: :class:`SigmoidSelectiveAttention` (``hybrid``).
    use_rope: rotary position embeddings in ``attention`` / ``sliding_window`` (not in Zoology's Figure 2).
    implementation: attention implementation passed down (None: per platform).
    rngs: parameter initialisation.

  Raises:
    ValueError: for an unknown name.
  """
  even = layer_idx % 2 == 0
  if name == "attention":
    return SoftmaxAttention(d_model, num_heads, use_rope=use_rope, implementation=implementation, rngs=rngs)
  if name == "sliding_window":
    return SoftmaxAttention(d_model, num_heads, window=window, use_rope=use_rope, implementation=implementation,
                            rngs=rngs)
  if name in ("baseconv", "hybrid"):
    conv = BaseConv(d_model, short_kernel if even else -1, seq_len=seq_len, rngs=rngs)
    if name == "baseconv":
      return conv
    return Sequential([conv, SigmoidSelectiveAttention(d_model, num_heads, selection_penalty=selection_penalty,
                                                       n_lookups=n_lookups, implementation=implementation,
                                                       rngs=rngs)])
  if name == "linear":
    return DecayedLinearAttention(d_model, num_heads, layer_idx=layer_idx, num_layers=num_layers,
                                  implementation=implementation, rngs=rngs)
  if name == "based":
    if even:
      return BaseConv(d_model, short_kernel, rngs=rngs)
    return TaylorLinearAttention(d_model, feature_dim, num_heads, implementation=implementation, rngs=rngs)
  raise ValueError(f"unknown mixer {name!r}; choose one of {MIXERS}")


def zoology_init(model: nnx.Module, key, *, num_layers: int, std: float = 0.02) -> None:
  """Re-initialises ``model`` in place the Zoology way: linear kernels and embeddings ``N(0, std)``, linear biases
  0, kernels of modules named ``out`` / ``out_proj`` ``N(0, std / sqrt(2 num_layers))``."""
  i = 0
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (nnx.Linear, nnx.LinearGeneral)):
      s = std / math.sqrt(2 * num_layers) if path and path[-1] in _OUT_PROJECTIONS else std
      kernel = node.kernel[...]
      node.kernel[...] = s * jax.random.normal(jax.random.fold_in(key, i), kernel.shape, kernel.dtype)
      if node.bias is not None:
        node.bias[...] = jnp.zeros_like(node.bias[...])
    elif isinstance(node, nnx.Embed):
      emb = node.embedding[...]
      node.embedding[...] = std * jax.random.normal(jax.random.fold_in(key, i), emb.shape, emb.dtype)
    else:
      continue
    i += 1


def _dropout(x, rate: float, key):
  if rate == 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class ZooLM(nnx.Module):
  r"""Zoology's LM scaffold: embedding, ``num_layers`` pre-LN blocks with a sequence mixer and an identity state
  mixer (no MLP), a final LayerNorm and a tied head (see the module docstring for the exact residual stream).

  Shapes: ``tokens int [B, T]`` (``T <= seq_len``) -> logits ``[B, T, vocab_size]``; :meth:`hidden` returns the
  final normalised states ``[B, T, d_model]`` and :meth:`logits` applies the head to any gathered subset of them
  (training only needs the labelled positions).

  Args:
    vocab_size: tokens ``V``.
    d_model: width ``D``.
    seq_len: the longest sequence (learned positions, long-convolution filters).
    mixer: one of :data:`MIXERS`.
    num_layers: blocks (Zoology's Figure 2: 2).
    learned_positions: add learned absolute position embeddings (default: only for the attention-only mixers,
      as in Zoology, where ``max_position_embeddings`` is set for attention alone, and not with ``use_rope``).
    embed_dropout: dropout on the embeddings (Zoology: 0.1).
    resid_dropout: dropout on the mixer outputs (Zoology: 0).
    init_std: the ``N(0, std)`` of :func:`zoology_init`.
    layer_norm_eps: LayerNorm epsilon (PyTorch's default 1e-5).
    rngs: parameter initialisation.
    **mixer_kwargs: passed to :func:`make_mixer` (``num_heads``, ``window``, ``short_kernel``, ``feature_dim``,
      ``selection_penalty``, ``n_lookups``, ``implementation``).

  Raises:
    ValueError: on bad sizes, an unknown mixer or bad dropout rates.
  """

  def __init__(self, vocab_size: int, d_model: int, seq_len: int, mixer: str = "attention", *, num_layers: int = 2,
               learned_positions: bool | None = None, embed_dropout: float = 0.0, resid_dropout: float = 0.0,
               init_std: float = 0.02, layer_norm_eps: float = 1e-5, rngs: nnx.Rngs, **mixer_kwargs):
    self.vocab_size = positive_int("vocab_size", vocab_size)
    self.d_model = positive_int("d_model", d_model)
    self.seq_len = positive_int("seq_len", seq_len)
    self.num_layers = positive_int("num_layers", num_layers)
    if mixer not in MIXERS:
      raise ValueError(f"unknown mixer {mixer!r}; choose one of {MIXERS}")
    for name, rate in (("embed_dropout", embed_dropout), ("resid_dropout", resid_dropout)):
      if not (isinstance(rate, (int, float)) and 0.0 <= rate < 1.0):
        raise ValueError(f"{name} must be a float in [0, 1), got {rate!r}")
    self.mixer_name = mixer
    self.embed_dropout = float(embed_dropout)
    self.resid_dropout = float(resid_dropout)
    D = self.d_model
    self.embed = nnx.Embed(self.vocab_size, D, rngs=rngs)  # [V, D], also the LM head
    if learned_positions is None:  # attention needs positions; rotary embeddings (use_rope) replace learned ones
      learned_positions = mixer in _POSITIONAL and not mixer_kwargs.get("use_rope", False)
    use_pos = bool(learned_positions)
    self.positions = nnx.Embed(self.seq_len, D, rngs=rngs) if use_pos else None  # [N, D]
    self.mixers = nnx.List([
        make_mixer(mixer, D, self.seq_len, layer_idx=i, num_layers=self.num_layers, rngs=rngs, **mixer_kwargs)
        for i in range(self.num_layers)])
    ln = dict(epsilon=layer_norm_eps, rngs=rngs)
    self.norm1 = nnx.List([nnx.LayerNorm(D, **ln) for _ in range(self.num_layers)])
    self.norm2 = nnx.List([nnx.LayerNorm(D, **ln) for _ in range(self.num_layers)])
    self.norm_f = nnx.LayerNorm(D, **ln)
    zoology_init(self, rngs.params(), num_layers=self.num_layers, std=init_std)

  def hidden(self, tokens, *, train: bool = False, dropout_key=None):
    """Final normalised hidden states and the summed auxiliary loss.

    Args:
      tokens: int ``[B, T]``, ``T <= seq_len``.
      train: training mode (dropout if ``dropout_key`` is given; dense selection in the hybrid).
      dropout_key: PRNG key for dropout (None: no dropout).

    Returns:
      ``(h [B, T, D] f32, aux_loss scalar f32)``.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an int array [B, T], got {tokens.dtype} {tokens.shape}")
    T = tokens.shape[1]
    if T > self.seq_len:
      raise ValueError(f"the model was built for sequences of at most {self.seq_len} tokens, got {T}")
    key = dropout_key if train else None
    rng = (lambda i: None) if key is None else (lambda i: jax.random.fold_in(key, i))
    h = self.embed(tokens)  # [B, T, D]
    if self.positions is not None:
      h = h + self.positions(jnp.arange(T))[None]
    residual = None
    aux = jnp.zeros((), jnp.float32)
    for i in range(self.num_layers):
      dropped = _dropout(h, self.embed_dropout if i == 0 else self.resid_dropout, rng(2 * i))
      residual = dropped if residual is None else dropped + residual
      h, a = self.mixers[i].call_with_aux(self.norm1[i](residual), train=train)
      aux = aux + a
      residual = _dropout(h, self.resid_dropout, rng(2 * i + 1)) + residual
      h = self.norm2[i](residual)  # identity state mixer
    return self.norm_f(h + residual), aux

  def logits(self, h):
    """Tied head: ``h [..., D] -> [..., V]``."""
    return self.embed.attend(h)

  def __call__(self, tokens, *, train: bool = False, dropout_key=None):
    """``tokens int [B, T] -> logits [B, T, V]`` (the auxiliary loss is dropped; see :meth:`hidden`)."""
    return self.logits(self.hidden(tokens, train=train, dropout_key=dropout_key)[0])

  def state_size(self, seq_len: int | None = None) -> int:
    """Decoding state in floats per sequence, summed over layers (Zoology's recall-memory axis)."""
    n = self.seq_len if seq_len is None else seq_len
    return sum(m.state_size(n) for m in self.mixers)
