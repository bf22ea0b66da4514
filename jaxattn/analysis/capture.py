"""Capture attention statistics from NNX models, and intervene on their heads, without changing model code.

Supported modules: :class:`jaxattn.nn.MultiHeadAttention` (its ``analysis_hook`` attribute) and
``flax.nnx.MultiHeadAttention`` built with ``attention_fn=jaxattn.nn.as_attention_fn(...)`` (the adapter is wrapped
for the duration). Other attention modules found in the model (flax's MultiHeadAttention with its own
``attention_fn``, jaxattn's linear / landmark attention, which have no softmax probability matrix) raise a
``ValueError`` naming them, unless ``on_unsupported="skip"``.

The jit story. Hooks are static module attributes, so they are part of the NNX graph definition: ``nnx.jit`` (and
``jax.jit`` over ``nnx.split``'s graphdef) retraces when a ``with`` block installs or removes them; a function
jitted as a closure over the model (the model not an argument) keeps whatever hooks it was traced with. Values:

- eagerly, every call of a hooked layer appends its statistics to the capture object (``rec[layer]``);
- under a transformation (``jit``, ``grad``, ``vmap``, ``scan``) the statistics are tracers and cannot be stored on
  the Python object: wrap the transformed function, ``out, records = nnx.jit(rec.wrap(fn))(model, x)``; ``records``
  (a :class:`Records` pytree) holds that trace's statistics as outputs. Recording a tracer outside ``wrap`` raises a
  ``ValueError`` that says so. Interventions need no wrapping.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import jax
import jax.numpy as jnp

from jaxattn.analysis.hooks import ACT, CAPTURABLE, HeadMask, LayerHook, Sink, push_sink

__all__ = ["Records", "Capture", "attention_layers", "capture", "intervene", "HookedAttentionFn"]


# --------------------------------------------------------------------------------------------------- records
@jax.tree_util.register_pytree_node_class
class Records:
  """Recorded statistics: for each recorded layer (module path, model order), one dict per call.

  ``records[layer]`` is the last call's dict (``layer``: the position among the model's attention layers or the
  path); ``records.calls(layer)`` every call's; ``records.stack("probs")`` stacks one statistic over the recorded
  layers (``[L, ...]``). A pytree, so a jitted function can return it.
  """

  def __init__(self, layer_paths: tuple, data: dict):
    self.layer_paths = tuple(layer_paths)  # every attention layer of the model, in order
    self.data = {p: tuple(data[p]) for p in self.layer_paths if p in data}

  def tree_flatten(self):
    keys = tuple(self.data)
    return tuple(self.data[k] for k in keys), (self.layer_paths, keys)

  @classmethod
  def tree_unflatten(cls, aux, children):
    layer_paths, keys = aux
    return cls(layer_paths, dict(zip(keys, children)))

  @property
  def paths(self) -> tuple:
    """The recorded layers' paths, in model order."""
    return tuple(self.data)

  def _path(self, layer) -> str:
    if isinstance(layer, str):
      path = layer
    elif isinstance(layer, int) and not isinstance(layer, bool) and -len(self.layer_paths) <= layer < len(
        self.layer_paths):
      path = self.layer_paths[layer]
    else:
      raise ValueError(f"layer {layer!r} does not exist: the model has {len(self.layer_paths)} attention layers "
                       f"{list(self.layer_paths)}")
    if path not in self.data:
      raise ValueError(f"layer {layer!r} has no records (recorded: {list(self.data)}; attention layers: "
                       f"{list(self.layer_paths)})")
    return path

  def calls(self, layer) -> tuple:
    """Every recorded call of ``layer``, in call order (one dict of statistics each)."""
    return self.data[self._path(layer)]

  def __getitem__(self, layer) -> dict:
    return self.calls(layer)[-1]

  def __contains__(self, layer) -> bool:
    try:
      self._path(layer)
    except ValueError:
      return False
    return True

  def __len__(self) -> int:
    return len(self.data)

  def stack(self, stat: str, call: int = -1):
    """``stat`` of one call (default the last) of every recorded layer, stacked: ``[L, ...]``."""
    if not self.data:
      raise ValueError("nothing was recorded")
    try:
      xs = [self.data[p][call][stat] for p in self.data]
    except KeyError:
      raise ValueError(f"statistic {stat!r} was not recorded (recorded: {sorted(next(iter(self.data.values()))[-1])})"
                       ) from None
    shapes = {p: tuple(x.shape) for p, x in zip(self.data, xs)}
    if len(set(shapes.values())) > 1:
      raise ValueError(f"cannot stack {stat!r}: the layers' shapes differ {shapes}; index layers one by one")
    return jnp.stack(xs)


def _records(layer_paths, items) -> Records:
  data: dict = {}
  for path, values in items:
    data.setdefault(path, []).append(values)
  return Records(layer_paths, data)


class Capture:
  """What ``with capture(model, ...) as rec`` gives: the eager records (``rec[layer]``, ``rec.calls``,
  ``rec.stack``, as :class:`Records`) and :meth:`wrap` for transformed functions."""

  def __init__(self, layer_paths: tuple):
    self.layer_paths = layer_paths
    self._sink = Sink(traced=False)

  @property
  def records(self) -> Records:
    return _records(self.layer_paths, self._sink.items)

  def __getitem__(self, layer) -> dict:
    return self.records[layer]

  def __contains__(self, layer) -> bool:
    return layer in self.records

  def calls(self, layer) -> tuple:
    return self.records.calls(layer)

  def stack(self, stat: str, call: int = -1):
    return self.records.stack(stat, call)

  @property
  def paths(self) -> tuple:
    return self.records.paths

  def clear(self) -> None:
    """Drops the eager records."""
    self._sink.items.clear()

  def wrap(self, fn: Callable) -> Callable:
    """``fn(*args) -> out`` becomes ``(*args) -> (out, Records)``: the statistics recorded while ``fn`` runs (or is
    traced) are returned as outputs, so it can be jitted (``nnx.jit(rec.wrap(fn))``) or differentiated with
    ``has_aux``."""
    def wrapped(*args, **kwargs):
      with push_sink(Sink(traced=True)) as sink:
        out = fn(*args, **kwargs)
      return out, _records(self.layer_paths, sink.items)
    return wrapped


# ------------------------------------------------------------------------------------------------ flax adapter
@dataclasses.dataclass(frozen=True)
class HookedAttentionFn:
  """``flax.nnx.MultiHeadAttention``'s ``attention_fn`` while a hook is installed: the jaxattn adapter ``inner``
  (:class:`jaxattn.nn.AttentionFn`) run through ``hook`` (same arguments and results as ``inner``)."""

  inner: object
  hook: LayerHook

  def __call__(self, query, key, value, bias=None, mask=None, broadcast_dropout: bool = True, dropout_rng=None,
               dropout_rate: float = 0.0, deterministic: bool = False, dtype=None, precision=None, module=None,
               promote_dtype=None, is_causal: bool = False, **unused):
    import math

    from jaxattn.masks import Causal
    from jaxattn.nn.adapters import flatten_heads_last
    fn = self.inner
    if module is not None:
      raise NotImplementedError("jaxattn's attention_fn cannot sow weights (sow_weights=True); use "
                                "jaxattn.analysis.capture(model, stats=('probs',)) instead")
    if any(v is not None for v in unused.values()):
      raise NotImplementedError(f"unsupported attention_fn arguments under an analysis hook: {sorted(unused)}")
    train_dropout = dropout_rate > 0.0 and not deterministic
    if train_dropout and dropout_rng is None:
      raise ValueError(f"dropout_rate={dropout_rate} with deterministic=False needs a dropout_rng")
    if promote_dtype is not None:
      query, key, value = promote_dtype((query, key, value), dtype=dtype)
    else:
      dtype = dtype or jnp.result_type(query, key, value)
      query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))
    batch = query.shape[:-3]
    T, H = query.shape[-3:-1]
    S = key.shape[-3]
    nb = math.prod(batch)
    q, k, v = (x.reshape(nb, *x.shape[-3:]) for x in (query, key, value))
    static = fn.mask
    if is_causal:
      static = Causal() if static is None else static & Causal()
    full_bias = None
    if bias is not None:
      full_bias = flatten_heads_last(jnp.asarray(bias, jnp.float32), batch, H, T, S, "bias")
    att_mask = static
    if mask is not None:
      allowed = flatten_heads_last(jnp.asarray(mask).astype(bool), batch, H, T, S, "mask")
      if static is not None:
        allowed = allowed & jnp.asarray(static.to_dense(T, S))
      att_mask = allowed
    out = self.hook.attend(q, k, v, mask=att_mask, bias=full_bias, scale=fn.scale,
                           logits_soft_cap=fn.logits_soft_cap, implementation=fn.implementation,
                           block_sizes=fn.block_sizes, dropout_rate=dropout_rate if train_dropout else 0.0,
                           dropout_rng=dropout_rng if train_dropout else None)
    return out.reshape(*batch, T, H, out.shape[-1])


# ---------------------------------------------------------------------------------------------- model traversal
def _path_str(path) -> str:
  return "/".join(str(p) for p in path)


def attention_layers(model, *, on_unsupported: str = "raise") -> list:
  """The attention modules of an NNX ``model`` that analysis hooks can serve: ``[(path, module), ...]`` in
  ``nnx.iter_graph`` order (a layer's integer index in :class:`HeadMask` / :class:`Records` is its position here).

  Raises:
    ValueError: when the model holds an attention module that cannot expose probabilities (naming it and what to
      use instead), unless ``on_unsupported="skip"``; or when it holds no supported module.
  """
  from jaxattn.nn import attention as nn_attention  # flax is reached only through jaxattn.nn, on demand
  from jaxattn.nn.adapters import AttentionFn
  from jaxattn.nn.attention import MultiHeadAttention
  from jaxattn.nn.landmark import LandmarkAttention
  from jaxattn.nn.linear import LinearAttention
  from jaxattn.nn.transnormer import GatedLinearAttention

  if on_unsupported not in ("raise", "skip"):
    raise ValueError(f"on_unsupported must be 'raise' or 'skip', got {on_unsupported!r}")
  found, bad = [], []
  nnx = nn_attention.nnx
  for path, node in nnx.iter_graph(model):
    name = _path_str(path) or "<root>"
    if isinstance(node, MultiHeadAttention):
      found.append((_path_str(path), node))
    elif isinstance(node, nnx.MultiHeadAttention):
      fn = node.attention_fn
      if isinstance(fn, (AttentionFn, HookedAttentionFn)):
        found.append((_path_str(path), node))
      else:
        bad.append(f"{name}: flax.nnx.MultiHeadAttention with attention_fn={getattr(fn, '__name__', fn)!r}; build "
                   f"it with attention_fn=jaxattn.nn.as_attention_fn(...)")
    elif isinstance(node, (LandmarkAttention, LinearAttention, GatedLinearAttention)):
      bad.append(f"{name}: {type(node).__name__} has no softmax probability matrix; use "
                 f"jaxattn.nn.MultiHeadAttention")
  if bad and on_unsupported == "raise":
    raise ValueError("cannot expose attention probabilities of: " + "; ".join(bad)
                     + " (pass on_unsupported='skip' to analyse the other layers)")
  if not found:
    raise ValueError(f"{type(model).__name__} holds no attention module that can expose probabilities: use "
                     f"jaxattn.nn.MultiHeadAttention or flax.nnx.MultiHeadAttention with "
                     f"attention_fn=jaxattn.nn.as_attention_fn(...)")
  return found


def _get_hook(module) -> LayerHook | None:
  fn = getattr(module, "attention_fn", None)
  if isinstance(fn, HookedAttentionFn):
    return fn.hook
  return getattr(module, "analysis_hook", None) if fn is None else None


def _set_hook(module, hook: LayerHook | None) -> None:
  if hasattr(module, "analysis_hook") and not hasattr(module, "attention_fn"):
    module.analysis_hook = hook
    return
  fn = module.attention_fn
  inner = fn.inner if isinstance(fn, HookedAttentionFn) else fn
  module.attention_fn = inner if hook is None or not hook.active else HookedAttentionFn(inner, hook)


@contextlib.contextmanager
def _installed(model, update: Callable, on_unsupported: str) -> Iterator[list]:
  """Installs ``update(index, path, module, old_hook) -> new_hook`` on every attention layer; restores on exit."""
  layers = attention_layers(model, on_unsupported=on_unsupported)
  olds = [_get_hook(m) for _, m in layers]
  news = [update(i, p, m, old) for i, ((p, m), old) in enumerate(zip(layers, olds))]
  for (p, m), new in zip(layers, news):
    if new is not None:
      new.check_heads(m.num_heads)
  try:
    for (_, m), new in zip(layers, news):
      _set_hook(m, new)
    yield layers
  finally:
    for (_, m), old in zip(layers, olds):
      _set_hook(m, old)


def _base(path: str, old: LayerHook | None) -> LayerHook:
  return old if old is not None else LayerHook(path=path)


def _resolve_layers(pairs, layers, what: str) -> dict:
  """``{(layer, head)} -> {index: [heads]}`` with layers resolved to positions (errors name bad layers / heads)."""
  paths = [p for p, _ in layers]
  out: dict = {}
  for layer, head in sorted(pairs, key=repr):
    if isinstance(layer, str):
      if layer not in paths:
        raise ValueError(f"{what} names layer {layer!r}, which is not an attention layer of the model: {paths}")
      i = paths.index(layer)
    else:
      if not -len(paths) <= layer < len(paths):
        raise ValueError(f"{what} names layer {layer}, but the model has {len(paths)} attention layers "
                         f"(0..{len(paths) - 1}): {paths}")
      i = layer % len(paths)
    H = layers[i][1].num_heads
    if head >= H:
      raise ValueError(f"{what} names head {head} of layer {layer!r} ({paths[i] or '<root>'}), which has {H} heads "
                       f"(0..{H - 1})")
    out.setdefault(i, set()).add(head)
  return out


@contextlib.contextmanager
def capture(model, stats=("probs",), *, layers=None, stats_implementation: str = "xla",
            on_unsupported: str = "raise") -> Iterator[Capture]:
  """Records attention statistics of every attention layer of ``model`` while the ``with`` block runs.

  Example::

      with analysis.capture(model, stats=("colsum", "argmax")) as rec:
        model(x)                                  # eager: rec["blocks/0/attn"]["colsum"] [B, H, S]
        y, records = nnx.jit(rec.wrap(lambda m, x: m(x)))(model, x)   # under jit: returned as outputs
      colsums = rec.stack("colsum")               # [L, B, H, S]

  Args:
    model: an NNX module (or one attention module).
    stats: ``"probs"`` (dense ``[B, H, T, S]`` f32) and / or blockwise statistics ``"lse"``, ``"colsum"``,
      ``"colcount"``, ``"rowmax"``, ``"argmax"``, ``"entropy"`` (:func:`jaxattn.ops.softmax.stats.attention_stats`:
      never ``T x S``).
    layers: layer indices or paths to record (None: all attention layers).
    stats_implementation: ``"xla"`` (blockwise), ``"reference"``, or the Pallas statistics kernels
      ``"pallas_tpu"`` / ``"pallas_gpu"`` (interpret mode on CPU); ``"cudnn"`` has no statistics mode and raises
      ``NotImplementedError``.
    on_unsupported: ``"raise"`` (default) or ``"skip"`` attention modules that cannot expose probabilities.

  Yields:
    A :class:`Capture`.
  """
  stats = (stats,) if isinstance(stats, str) else tuple(stats)
  if not stats or any(s not in CAPTURABLE for s in stats):
    raise ValueError(f"stats must be a non-empty sequence of {CAPTURABLE}, got {stats!r}")
  LayerHook(stats=stats, stats_implementation=stats_implementation)  # validates the backend name
  all_layers = attention_layers(model, on_unsupported=on_unsupported)
  paths = tuple(p for p, _ in all_layers)
  chosen = set(range(len(paths))) if layers is None else set(
      _resolve_layers({(l, 0) for l in ([layers] if isinstance(layers, (int, str)) else layers)}, all_layers,
                      "capture"))
  rec = Capture(paths)

  def update(i, path, module, old):
    if i not in chosen:
      return old
    return dataclasses.replace(_base(path, old), stats=stats, stats_implementation=stats_implementation)

  with _installed(model, update, on_unsupported), push_sink(rec._sink):
    yield rec


@contextlib.contextmanager
def intervene(model, *, head_mask: HeadMask | None = None, probs_hook: Callable | None = None, hook_layers=None,
              act: ACT | None = None, on_unsupported: str = "raise") -> Iterator[list]:
  """Applies head masks, a probability hook and / or ACT to ``model``'s attention layers inside the ``with`` block.

  Args:
    model: an NNX module.
    head_mask: a :class:`HeadMask` (``"uniform"``: the heads attend uniformly over their allowed keys; ``"zero"``:
      their outputs are zeroed). Works with every softmax implementation.
    probs_hook: ``P [B, H, T, S] -> P'`` applied to the probabilities of ``hook_layers`` (None: every layer); those
      layers run the dense XLA path (named kernel implementations raise).
    hook_layers: layer indices / paths for ``probs_hook``.
    act: an :class:`ACT` setting: matrix-form calibration of its heads (dense path, like ``probs_hook``).
    on_unsupported: as in :func:`capture`.

  Yields:
    The ``[(path, module), ...]`` attention layers.

  Raises:
    ValueError: a head mask or ACT naming a layer or head that does not exist (naming it).
  """
  if head_mask is not None and not isinstance(head_mask, HeadMask):
    raise ValueError(f"head_mask must be a HeadMask, got {type(head_mask).__name__}")
  if act is not None and not isinstance(act, ACT):
    raise ValueError(f"act must be an ACT setting, got {type(act).__name__}")
  if probs_hook is not None and not callable(probs_hook):
    raise ValueError(f"probs_hook must be callable (probs -> probs), got {type(probs_hook).__name__}")
  layers = attention_layers(model, on_unsupported=on_unsupported)
  masked = {} if head_mask is None else _resolve_layers(head_mask.heads, layers, "HeadMask")
  if act is None:
    acted = {}
  elif act.heads is None:
    acted = {i: set(range(m.num_heads)) for i, (_, m) in enumerate(layers)}
  else:
    acted = _resolve_layers(act.heads, layers, "ACT")
  if probs_hook is None:
    hooked = set()
  elif hook_layers is None:
    hooked = set(range(len(layers)))
  else:
    sel = [hook_layers] if isinstance(hook_layers, (int, str)) else hook_layers
    hooked = set(_resolve_layers({(l, 0) for l in sel}, layers, "probs_hook"))

  def update(i, path, module, old):
    if i not in masked and i not in acted and i not in hooked:
      return old
    base = _base(path, old)
    changes = {}
    if i in masked:
      changes.update(mask_heads=tuple(sorted(masked[i])), mask_mode=head_mask.mode)
    if i in acted:
      changes.update(act_heads=tuple(sorted(acted[i])), act=act)
    if i in hooked:
      changes.update(probs_hook=probs_hook)
    return dataclasses.replace(base, **changes)

  with _installed(model, update, on_unsupported) as found:
    yield found
