r"""Attention Residuals (AttnRes; Kimi Team 2026, ``../shared/papers/efficient.md`` §10): softmax attention over
depth in place of fixed residual sums, as Flax NNX modules.

A pre-norm transformer with ``L`` layers has ``2L`` sub-layers (attention and MLP each count as one). The standard
residual stream gives sub-layer ``l`` the input ``h_l = v_0 + sum_{i<l} v_i`` (``v_0`` the token embedding,
``v_i`` the output of sub-layer ``i``): every earlier output with weight 1. **Full AttnRes** replaces the sum by a
softmax over the sources, per token, with one learned, input-independent pseudo-query ``w_l [D]`` per sub-layer:

.. math:: h_l = \sum_{i<l} \alpha_{i \to l}\, v_i,\qquad
          \alpha_{i \to l} = \mathrm{softmax}_i\big(w_l \cdot \mathrm{RMSNorm}_l(v_i)\big)

(keys are the RMS-normalised values with a per-sub-layer gain; logits in f32). ``w_l`` starts at zero, so at
initialisation every sub-layer reads the *uniform average* of the sources. **Block AttnRes** groups the sub-layers
into blocks of ``S``: inside a block the outputs are summed as usual (the partial sum ``b_n^i``), completed blocks
become single sources, and sub-layer ``i`` of block ``n`` attends over ``[b_0 = embedding, b_1, ..., b_{n-1},
b_n^{i-1}]`` (the first sub-layer of a block only over completed blocks). ``S = 1`` is Full AttnRes; one block of
all sub-layers is close to the standard residual.

**Two-phase inference** (exact): the pseudo-queries do not depend on the input, so the ``S`` sub-layers of a block
can be scored against the completed blocks in one batched pass at the block's start (phase 1: outputs and
log-sum-exp); each sub-layer then merges its one intra-block source, the partial sum, with an online-softmax update
(phase 2). Completed blocks are read once per block instead of once per sub-layer.

The final hidden state (before the final norm and the LM head) is, for AttnRes, one more depth attention over all
sources with its own pseudo-query (the paper's README does not say; this choice treats the head like a sub-layer),
and the plain residual stream for the standard model.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxattn.nn import AttnResLM
  >>> lm = AttnResLM(256, features=64, num_layers=4, num_heads=4, mode="block", block_size=4, rngs=nnx.Rngs(0))
  >>> lm(jnp.zeros((2, 16), jnp.int32)).shape
  (2, 16, 256)
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn import masks
from jaxattn.nn._checks import positive_int
from jaxattn.nn.attention import MultiHeadAttention

__all__ = ["MODES", "rms_normalize", "depth_attention", "DepthAttention", "AttnResDecoder", "AttnResLM"]

MODES = ("none", "full", "block")


def rms_normalize(x, eps: float = 1e-6):
  """``x / sqrt(mean(x**2, -1) + eps)`` in f32 (no gain)."""
  x = jnp.asarray(x, jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def _stack(sources):
  if isinstance(sources, (list, tuple)):
    if not sources:
      raise ValueError("depth attention needs at least one source, got an empty sequence")
    shapes = {tuple(s.shape) for s in sources}
    if len(shapes) != 1:
      raise ValueError(f"all sources must share one shape [B, T, D], got {sorted(shapes)}")
    return jnp.stack(sources)
  sources = jnp.asarray(sources)
  if sources.ndim < 2 or sources.shape[0] < 1:
    raise ValueError(f"sources must have shape [N >= 1, ..., D], got {sources.shape}")
  return sources


def depth_attention(sources, query, *, gain=None, eps: float = 1e-6, count=None, return_lse: bool = False):
  r"""Softmax over the source axis: ``sum_i softmax_i(q . RMSNorm(v_i)) v_i``.

  Args:
    sources: ``[N, B, T, D]`` (or a sequence of ``N`` arrays ``[B, T, D]``): the values ``v_i``.
    query: ``[D]`` pseudo-query ``w``.
    gain: ``[D]`` RMSNorm gain of the keys (None: 1).
    eps: RMSNorm epsilon.
    count: only the first ``count`` sources take part (int or traced int scalar; None: all). Lets a fixed-size
      buffer serve a growing list under ``jit``/``scan``; the masked slots get weight exactly 0.
    return_lse: also return the log-sum-exp of the logits ``[B, T]`` (f32), for two-phase merges.

  Returns:
    ``[B, T, D]`` in the sources' dtype (and the log-sum-exp).

  Raises:
    ValueError: a query or gain whose size is not ``D``, a static ``count`` outside ``[1, N]``.
  """
  v = _stack(sources)
  D = v.shape[-1]
  query = jnp.asarray(query)
  if query.shape != (D,):
    raise ValueError(f"query must have shape [{D}] (the sources' feature size), got {query.shape}")
  q = query.astype(jnp.float32)
  if gain is not None:
    gain = jnp.asarray(gain)
    if gain.shape != (D,):
      raise ValueError(f"gain must have shape [{D}], got {gain.shape}")
    q = q * gain.astype(jnp.float32)
  logits = jnp.einsum("n...d,d->n...", rms_normalize(v, eps), q)  # [N, B, T] f32
  if count is not None:
    if isinstance(count, int) and not 1 <= count <= v.shape[0]:
      raise ValueError(f"count must lie in [1, {v.shape[0]}] (the number of sources), got {count}")
    live = jnp.arange(v.shape[0]) < count
    logits = jnp.where(live.reshape((-1,) + (1,) * (logits.ndim - 1)), logits, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=0)  # [B, T]
  p = jnp.exp(logits - lse)  # masked slots: exp(-inf) = 0
  out = jnp.einsum("n...,n...d->...d", p, v.astype(jnp.float32)).astype(v.dtype)
  return (out, lse) if return_lse else out


class DepthAttention(nnx.Module):
  """One sub-layer's depth attention: a zero-initialised pseudo-query ``w [D]`` and the key RMSNorm gain ``[D]``
  (ones). At initialisation the output is the uniform average of the sources.

  ``__call__(sources [N, B, T, D] or a list, count=None) -> [B, T, D]`` (see :func:`depth_attention`).
  """

  def __init__(self, features: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
    self.features = positive_int("features", features)
    self.eps = float(eps)
    self.query = nnx.Param(jnp.zeros((self.features,), param_dtype))
    self.gain = nnx.Param(jnp.ones((self.features,), param_dtype))

  def effective_query(self):
    """``gain * query`` in f32 ``[D]``: the logit of source ``v`` is ``rms_normalize(v) . effective_query``."""
    return self.gain[...].astype(jnp.float32) * self.query[...].astype(jnp.float32)

  def __call__(self, sources, count=None, *, return_lse: bool = False):
    return depth_attention(sources, self.query[...], gain=self.gain[...], eps=self.eps, count=count,
                           return_lse=return_lse)


class _MLP(nnx.Module):
  """``gelu(x W_1) W_2`` without biases: ``[..., D] -> [..., D]`` through ``hidden``."""

  def __init__(self, features: int, hidden: int, *, rngs: nnx.Rngs):
    self.up = nnx.Linear(features, hidden, use_bias=False, rngs=rngs)  # kernel [D, hidden]
    self.down = nnx.Linear(hidden, features, use_bias=False, rngs=rngs)  # kernel [hidden, D]

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


class AttnResDecoder(nnx.Module):
  """A causal pre-norm transformer body whose residual connections are standard, Full AttnRes or Block AttnRes.

  Sub-layer ``2j`` is layer ``j``'s attention (:class:`jaxattn.nn.MultiHeadAttention`, causal, RoPE), sub-layer
  ``2j+1`` its GELU MLP; each applies its own RMSNorm to its input. With ``mode != "none"`` every sub-layer has its
  own :class:`DepthAttention` (``res[i]``) computing its input from the sources, and ``final_res`` forms the output.

  Shapes: ``x [B, T, D] -> [B, T, D]`` (the hidden state before a final norm).

  Args:
    features: width ``D``.
    num_layers: transformer layers ``L`` (``2L`` sub-layers).
    num_heads: attention heads.
    mlp_features: MLP hidden size (default ``4 D``).
    mode: ``"none"`` (standard residual), ``"full"`` (Full AttnRes) or ``"block"`` (Block AttnRes).
    block_size: sub-layers per block in ``"block"`` mode (``1`` equals ``"full"``); the last block may be shorter.
    use_rope: rotary positions in the attention.
    implementation: passed to :func:`jaxattn.softmax_attention`.
    eps: epsilon of every RMSNorm.
    rngs: parameter initialisation.

  Raises:
    ValueError: unknown ``mode``, a ``block_size`` that is not a positive int, bad sizes.
  """

  def __init__(self, features: int, num_layers: int, num_heads: int, *, mlp_features: int | None = None,
               mode: str = "none", block_size: int = 4, use_rope: bool = True, implementation=None,
               eps: float = 1e-6, rngs: nnx.Rngs):
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    self.features = positive_int("features", features)
    self.num_layers = positive_int("num_layers", num_layers)
    self.block_size = positive_int("block_size", block_size)
    self.mode = mode
    mlp_features = positive_int("mlp_features", mlp_features or 4 * self.features)
    D, n_sub = self.features, 2 * self.num_layers
    sub, norms = [], []
    for _ in range(self.num_layers):
      sub.append(MultiHeadAttention(num_heads, D, use_rope=use_rope, mask=masks.Causal(),
                                    implementation=implementation, rngs=rngs))
      sub.append(_MLP(D, mlp_features, rngs=rngs))
      norms += [nnx.RMSNorm(D, epsilon=eps, rngs=rngs), nnx.RMSNorm(D, epsilon=eps, rngs=rngs)]
    self.sublayers = nnx.List(sub)
    self.norms = nnx.List(norms)
    if mode == "none":
      self.res = None
      self.final_res = None
    else:
      self.res = nnx.List([DepthAttention(D, eps=eps) for _ in range(n_sub)])
      self.final_res = DepthAttention(D, eps=eps)

  @property
  def sublayers_per_block(self) -> int:
    """``S``: 1 for Full AttnRes, ``block_size`` for Block AttnRes (``2L`` for the standard residual)."""
    return {"none": 2 * self.num_layers, "full": 1, "block": self.block_size}[self.mode]

  def _apply(self, i: int, h):
    return self.sublayers[i](self.norms[i](h))

  def __call__(self, x, *, two_phase: bool = False, return_stats: bool = False):
    """``x [B, T, D] -> [B, T, D]``.

    Args:
      x: the embedded tokens (source ``v_0``).
      two_phase: compute the AttnRes inputs with the two-phase block schedule (same result up to float rounding;
        ignored for ``mode="none"``).
      return_stats: also return ``{"input_rms": [2L], "output_rms": [2L]}`` (f32, mean over batch and tokens of
        each sub-layer's input / output RMS) to show how the stream's magnitude grows with depth.
    """
    x = jnp.asarray(x)
    if x.ndim != 3 or x.shape[-1] != self.features:
      raise ValueError(f"x must have shape [B, T, {self.features}], got {x.shape}")
    n_sub = 2 * self.num_layers
    in_rms, out_rms = [], []

    def rms(a):
      return jnp.sqrt(jnp.mean(jnp.square(a.astype(jnp.float32))))

    if self.mode == "none":
      h = x
      for i in range(n_sub):
        out = self._apply(i, h)
        in_rms.append(rms(h))
        out_rms.append(rms(out))
        h = h + out
    else:
      S = self.sublayers_per_block
      blocks, partial = [x], None  # completed sources (b_0 = embedding, b_1, ...) and the block's partial sum
      phase1 = None  # two-phase: (outputs [S', B, T, D], lse [S', B, T]) of this block's sub-layers
      for i in range(n_sub):
        j = i % S  # position inside the block
        if j == 0 and i > 0:
          blocks.append(partial)
          partial = None
        if two_phase:
          if j == 0:
            phase1 = self._phase1(blocks, range(i, min(i + S, n_sub)))
          h = self._phase2(i, phase1[0][j], phase1[1][j], partial, x.dtype)
        else:
          h = self.res[i](blocks + ([partial] if partial is not None else []))
        out = self._apply(i, h)
        in_rms.append(rms(h))
        out_rms.append(rms(out))
        partial = out if partial is None else partial + out
      h = self.final_res(blocks + [partial])
    if return_stats:
      return h, {"input_rms": jnp.stack(in_rms), "output_rms": jnp.stack(out_rms)}
    return h

  def _phase1(self, blocks, subs: Sequence[int]):
    """Scores every sub-layer of a block against the completed blocks in one pass: ``(out [S', B, T, D],
    lse [S', B, T])``; the completed blocks are normalised and read once."""
    v = jnp.stack(blocks)  # [n, B, T, D]
    keys = rms_normalize(v, self.res[subs[0]].eps)  # [n, B, T, D] f32
    q = jnp.stack([self.res[i].effective_query() for i in subs])  # [S', D]
    logits = jnp.einsum("nbtd,sd->snbt", keys, q)  # [S', n, B, T]
    lse = jax.nn.logsumexp(logits, axis=1)  # [S', B, T]
    p = jnp.exp(logits - lse[:, None])
    out = jnp.einsum("snbt,nbtd->sbtd", p, v.astype(jnp.float32))
    return out, lse

  def _phase2(self, i: int, out1, lse1, partial, dtype):
    """Online-softmax merge of the phase-1 result with the intra-block partial sum (None: nothing to merge)."""
    if partial is None:
      return out1.astype(dtype)
    res = self.res[i]
    lp = jnp.einsum("btd,d->bt", rms_normalize(partial, res.eps), res.effective_query())  # [B, T]
    lse = jnp.logaddexp(lse1, lp)
    h = jnp.exp(lse1 - lse)[..., None] * out1 + jnp.exp(lp - lse)[..., None] * partial.astype(jnp.float32)
    return h.astype(dtype)


class AttnResLM(nnx.Module):
  """A causal byte/token LM: ``logits = RMSNorm(AttnResDecoder(embed(tokens))) E^T`` (tied embeddings).

  Args:
    vocab_size, features, num_layers, num_heads: model size.
    mlp_features, mode, block_size, use_rope, implementation, eps: see :class:`AttnResDecoder`.
    rngs: parameter initialisation.

  ``__call__(tokens int [B, T], *, two_phase=False) -> logits [B, T, vocab_size]`` (f32 parameters).
  """

  def __init__(self, vocab_size: int, features: int, num_layers: int, num_heads: int, *,
               mlp_features: int | None = None, mode: str = "none", block_size: int = 4, use_rope: bool = True,
               implementation=None, eps: float = 1e-6, rngs: nnx.Rngs):
    self.vocab_size = positive_int("vocab_size", vocab_size)
    self.embed = nnx.Embed(self.vocab_size, features, rngs=rngs)
    self.decoder = AttnResDecoder(features, num_layers, num_heads, mlp_features=mlp_features, mode=mode,
                                  block_size=block_size, use_rope=use_rope, implementation=implementation, eps=eps,
                                  rngs=rngs)
    self.final_norm = nnx.RMSNorm(features, epsilon=eps, rngs=rngs)

  def __call__(self, tokens, *, two_phase: bool = False):
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an int array [B, T], got {tokens.dtype} {tokens.shape}")
    h = self.decoder(self.embed(tokens), two_phase=two_phase)
    return self.embed.attend(self.final_norm(h))
