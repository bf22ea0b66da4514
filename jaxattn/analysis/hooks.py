"""Per-layer analysis hooks that attention modules run with: capture, head masks, probability hooks, ACT.

A :class:`LayerHook` is a frozen (hashable, static) setting stored on one attention module (the
``analysis_hook`` attribute of :class:`jaxattn.nn.MultiHeadAttention`, or wrapped around the ``attention_fn`` of
``flax.nnx.MultiHeadAttention``). :func:`jaxattn.analysis.capture` and :func:`jaxattn.analysis.intervene` install
them for the duration of a ``with`` block; a module can also be built with one (``analysis_hook=LayerHook(...)``).
Being static, a hook is part of an NNX graph definition: ``nnx.jit`` retraces when hooks are installed or removed.

What a hook does to one attention call (``q [B, T, H, D]``, ``k, v [B, S, G, *]``), in order:

1. head mask, mode ``"uniform"``: the masked heads' queries are zeroed, so their logits are 0 and their attention
   is uniform over the allowed keys (the retrieval-head paper's flash-path masking; exact without a logit bias;
   with a soft cap ``cap * tanh(0) = 0`` too);
2. the attention itself: every softmax backend (``softmax_attention``) when there is no probability-level
   intervention; with a ``probs_hook`` or ACT heads, the dense path (``P [B, H, T, S]`` in f32, XLA): ``P`` is
   computed, ACT-calibrated (matrix form) on the selected heads, passed through ``probs_hook`` (``P -> P'``, same
   shape), and multiplied with the values. Named kernel backends cannot run a probability hook and raise;
3. head mask, mode ``"zero"``: the masked heads' outputs are zeroed (before the output projection);
4. capture: the requested statistics are recorded (``"probs"``: the probabilities used, after 1 and 2;
   ``attention_stats`` names: from the dense ``P`` when it exists, else computed blockwise by
   ``jaxattn.ops.softmax.stats.attention_stats``, never ``T x S``). Statistics describe the softmax before
   attention dropout.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.analysis.act import act_calibrate
from jaxattn.ops.softmax.api import softmax_attention
from jaxattn.ops.softmax.stats import STATS, attention_stats, probs_and_allowed

__all__ = ["HeadMask", "ACT", "LayerHook", "CAPTURABLE"]

CAPTURABLE = ("probs",) + STATS
_KERNELS = ("pallas_gpu", "pallas_tpu", "cudnn")
_STATS_IMPLS = ("xla", "reference", "pallas_tpu", "pallas_gpu")
_MODES = ("uniform", "zero")


def _head_index(h) -> int:
  if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 0:
    raise ValueError(f"head must be an int >= 0, got {h!r}")
  return int(h)


def _layer_key(layer):
  if isinstance(layer, bool) or not isinstance(layer, (int, np.integer, str)):
    raise ValueError(f"layer must be an int (position among the model's attention layers) or a module path "
                     f"string, got {layer!r}")
  return layer if isinstance(layer, str) else int(layer)


@dataclasses.dataclass(frozen=True)
class HeadMask:
  """A static set of ``(layer, head)`` pairs to switch off, and how.

  ``layer`` is the position of the attention module among the model's attention layers (the order of
  :func:`jaxattn.analysis.attention_layers`, negative counts from the end) or its module path (``"blocks/0/attn"``).

  Modes: ``"uniform"`` zeroes the head's query, so it attends uniformly over its allowed keys (what the retrieval
  head paper does); ``"zero"`` zeroes the head's output (it contributes nothing to the output projection).
  """

  heads: frozenset
  mode: str = "uniform"

  def __post_init__(self):
    if self.mode not in _MODES:
      raise ValueError(f"HeadMask mode must be one of {_MODES}, got {self.mode!r}")
    try:
      pairs = [tuple(p) for p in self.heads]
    except TypeError:
      raise ValueError(f"HeadMask heads must be (layer, head) pairs, got {self.heads!r}") from None
    if any(len(p) != 2 for p in pairs):
      raise ValueError(f"HeadMask heads must be (layer, head) pairs, got {self.heads!r}")
    object.__setattr__(self, "heads", frozenset((_layer_key(l), _head_index(h)) for l, h in pairs))


@dataclasses.dataclass(frozen=True)
class ACT:
  """ACT calibration settings (:func:`jaxattn.analysis.act_calibrate`) for a static set of ``(layer, head)``.

  ``heads`` None calibrates every head of every layer.
  """

  heads: frozenset | None = None
  beta: float = 0.4
  tau: float = 0.1
  keep_first: bool = True

  def __post_init__(self):
    if self.heads is not None:
      pairs = [tuple(p) for p in self.heads]
      if any(len(p) != 2 for p in pairs):
        raise ValueError(f"ACT heads must be (layer, head) pairs, got {self.heads!r}")
      object.__setattr__(self, "heads", frozenset((_layer_key(l), _head_index(h)) for l, h in pairs))
    if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 <= self.beta <= 1:
      raise ValueError(f"ACT beta must be in [0, 1], got {self.beta!r}")
    if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not np.isfinite(self.tau):
      raise ValueError(f"ACT tau must be a finite float, got {self.tau!r}")


@dataclasses.dataclass(frozen=True)
class LayerHook:
  """The static analysis settings of one attention module (see the module docstring for the order of effects).

  Attributes:
    path: the module path (recorded statistics are keyed by it).
    stats: statistics to record: ``"probs"`` and / or :data:`jaxattn.ops.softmax.stats.STATS` names.
    stats_implementation: backend of the blockwise statistics (``"xla"``, ``"reference"``, or the Pallas
      statistics kernels ``"pallas_tpu"`` / ``"pallas_gpu"``: :func:`jaxattn.ops.softmax.stats.attention_stats`).
    mask_heads: head indices to mask; ``mask_mode`` ``"uniform"`` or ``"zero"`` (:class:`HeadMask`).
    probs_hook: ``P [B, H, T, S] -> P'`` (f32), or None.
    act_heads: head indices to ACT-calibrate; ``act`` the settings (:class:`ACT`, its ``heads`` ignored here).
  """

  path: str = ""
  stats: tuple = ()
  stats_implementation: str = "xla"
  mask_heads: tuple = ()
  mask_mode: str = "uniform"
  probs_hook: Callable | None = None
  act_heads: tuple = ()
  act: ACT = ACT()

  def __post_init__(self):
    stats = (self.stats,) if isinstance(self.stats, str) else tuple(self.stats)
    bad = [s for s in stats if s not in CAPTURABLE]
    if bad:
      raise ValueError(f"cannot capture {bad}: capturable statistics are {CAPTURABLE}")
    object.__setattr__(self, "stats", stats)
    if self.stats_implementation == "cudnn":
      raise NotImplementedError("softmax backend 'cudnn' has no statistics mode; use stats_implementation='xla', "
                                "'pallas_tpu', 'pallas_gpu' or 'reference'")
    if self.stats_implementation not in _STATS_IMPLS:
      raise ValueError(f"stats_implementation must be one of {_STATS_IMPLS}, got {self.stats_implementation!r}")
    if self.mask_mode not in _MODES:
      raise ValueError(f"mask_mode must be one of {_MODES}, got {self.mask_mode!r}")
    object.__setattr__(self, "mask_heads", tuple(sorted({_head_index(h) for h in self.mask_heads})))
    object.__setattr__(self, "act_heads", tuple(sorted({_head_index(h) for h in self.act_heads})))
    if self.probs_hook is not None and not callable(self.probs_hook):
      raise ValueError(f"probs_hook must be callable (probs -> probs), got {type(self.probs_hook).__name__}")

  @property
  def active(self) -> bool:
    return bool(self.stats or self.mask_heads or self.probs_hook is not None or self.act_heads)

  def check_heads(self, num_heads: int) -> None:
    """Raises ``ValueError`` naming a head index the layer does not have."""
    for what, heads in (("head mask", self.mask_heads), ("ACT", self.act_heads)):
      for h in heads:
        if h >= num_heads:
          raise ValueError(f"{what} names head {h} of layer {self.path or '<root>'!r}, which has {num_heads} heads "
                           f"(0..{num_heads - 1})")

  def attend(self, q, k, v, *, mask=None, segment_ids=None, bias=None, scale=None, logits_soft_cap=None,
             implementation=None, block_sizes=None, dropout_rate: float = 0.0, dropout_rng=None):
    """``softmax_attention`` with this hook's interventions and capture (arguments as ``softmax_attention``)."""
    B, T, H, _ = q.shape
    self.check_heads(H)
    sel = None
    if self.mask_heads:
      sel = jnp.asarray(np.isin(np.arange(H), self.mask_heads))[None, None, :, None]  # [1, 1, H, 1]
      if self.mask_mode == "uniform":
        q = jnp.where(sel, jnp.zeros((), q.dtype), q)
    geometry = dict(mask=mask, segment_ids=segment_ids, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap)
    dense = self.probs_hook is not None or bool(self.act_heads)
    want = set(self.stats)
    values = {}
    if dense:
      if dropout_rate:
        raise ValueError("a probability hook or ACT runs the dense attention path, which has no attention dropout: "
                         "call the module with deterministic=True")
      name = implementation if isinstance(implementation, str) else (  # one name or one (name, Config) pair
          implementation[0] if isinstance(implementation, tuple) and len(implementation) == 2
          and isinstance(implementation[0], str) and not isinstance(implementation[1], str) else None)
      if name in _KERNELS:
        raise ValueError(f"a probability hook or ACT needs the probabilities, which implementation {name!r} never "
                         f"forms; use implementation='xla' or 'reference' (or None)")
      probs, allowed, lse = probs_and_allowed(q, k, **geometry)
      if self.act_heads:
        probs = act_calibrate(probs, beta=self.act.beta, tau=self.act.tau, keep_first=self.act.keep_first,
                              allowed=allowed, heads=self.act_heads)
      if self.probs_hook is not None:
        new = jnp.asarray(self.probs_hook(probs))
        if new.shape != probs.shape:
          raise ValueError(f"probs_hook of layer {self.path or '<root>'!r} returned shape {new.shape}, expected "
                           f"{probs.shape}")
        probs = new.astype(jnp.float32)
      G = k.shape[2]
      vh = jnp.repeat(v.astype(jnp.float32), H // G, axis=2)  # [B, S, H, E]
      out = jnp.einsum("bhts,bshe->bthe", probs, vh, precision=jax.lax.Precision.HIGHEST).astype(q.dtype)
      if want:
        values = _from_probs(probs, allowed, lse, want)
    else:
      out = softmax_attention(q, k, v, implementation=implementation, block_sizes=block_sizes,
                              dropout_rate=dropout_rate, dropout_rng=dropout_rng, **geometry)
      if "probs" in want:
        values["probs"] = probs_and_allowed(q, k, **geometry)[0]
      rest = tuple(s for s in STATS if s in want)
      if rest:
        values.update(attention_stats(q, k, stats=rest, implementation=self.stats_implementation,
                                      block_sizes=block_sizes, **geometry))
    if sel is not None and self.mask_mode == "zero":
      out = jnp.where(sel, jnp.zeros((), out.dtype), out)
    if values:
      record(self.path, {s: values[s] for s in self.stats})
    return out


def _from_probs(probs, allowed, lse, want) -> dict:
  out = {"probs": probs, "lse": lse}
  if "colsum" in want:
    out["colsum"] = probs.sum(-2)
  if "colcount" in want:
    out["colcount"] = jnp.broadcast_to(allowed.sum(-2, dtype=jnp.int32), probs.shape[:2] + probs.shape[-1:])
  if "rowmax" in want:
    out["rowmax"] = probs.max(-1)
  if "argmax" in want:
    out["argmax"] = jnp.where(allowed.any(-1), jnp.argmax(probs, -1), -1).astype(jnp.int32)
  if "entropy" in want:
    out["entropy"] = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), -1)
  return out


# ----------------------------------------------------------------------------------------------------- recording
class Sink:
  """Collects ``(path, values)`` records; ``traced`` sinks accept tracers (they return them as outputs)."""

  def __init__(self, traced: bool):
    self.traced = traced
    self.items: list[tuple[str, dict]] = []


_SINKS: contextvars.ContextVar[tuple] = contextvars.ContextVar("jaxattn_analysis_sinks", default=())


@contextlib.contextmanager
def push_sink(sink: Sink):
  token = _SINKS.set(_SINKS.get() + (sink,))
  try:
    yield sink
  finally:
    _SINKS.reset(token)


def record(path: str, values: dict) -> None:
  """Sends one call's statistics to the innermost active capture (no-op outside any capture)."""
  sinks = _SINKS.get()
  if not sinks:
    return
  sink = sinks[-1]
  if not sink.traced and any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(values)):
    raise ValueError(f"layer {path or '<root>'!r} was called under a JAX transformation (jit, grad, vmap, scan) "
                     f"while capturing: traced values cannot be stored on the capture object. Wrap the transformed "
                     f"function: `out, records = jax.jit(rec.wrap(fn))(...)` (or nnx.jit) returns the records as "
                     f"outputs")
  sink.items.append((path, values))
