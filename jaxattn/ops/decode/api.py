"""``decode_attention``: validation, the :class:`DecodeCall`, and dispatch over the decode backends
(:mod:`jaxattn.backend` protocol).

The family's backends take ``(q, k, v, lengths, valid, index, entry_valid)`` (None where absent; ``lengths`` always
given, in ``[0, L]``; ``index`` in ``[0, L)`` where ``entry_valid``) and return ``(out, stats or None)``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import backend as backend_lib
from jaxattn._validation import FLOATS, concrete_int_array, validate_qkv, validate_scale
from jaxattn.ops.decode import pallas_gpu, pallas_tpu, reference, xla
from jaxattn.ops.decode.config import STATS, DecodeCall

OP = "decode_attention"
BACKENDS: dict[str, backend_lib.Backend] = {
    b.name: b for b in (reference.BACKEND, xla.BACKEND, pallas_gpu.BACKEND, pallas_tpu.BACKEND)}
DEFAULTS: dict[str, tuple[str, ...]] = {"cpu": ("xla",), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")}


def decode_attention(q, k, v, *, lengths=None, valid=None, index=None, index_counts=None, index_valid=None,
                     scale: float | None = None, return_stats: str | None = None, implementation=None):
  r"""Attention of one query token per sequence over a KV cache, dense or over gathered key positions.

  For query head ``h`` of sequence ``b`` (kv head ``g = h // (H // G)``) and its set ``A(b, g)`` of attended keys:

  .. math:: p_{b,h,j} = \frac{\exp(\mathrm{scale}\; q_{b,h} \cdot k_{b,j,g})}
                             {\sum_{j' \in A(b,g)} \exp(\mathrm{scale}\; q_{b,h} \cdot k_{b,j',g})}
            \ (j \in A(b, g)), \qquad o_{b,h} = \sum_{j \in A(b,g)} p_{b,h,j}\, v_{b,j,g}

  ``A(b, g)`` = the keys ``j < lengths[b]`` with ``valid[b, j, g]`` (dense), intersected with the positions listed by
  the valid entries of ``index[b, g]`` (gathered, sparse decode: Quest pages, a recycled / top-k selection). The
  gathered form is a set: a position listed twice is attended once. A row with no attended key (``lengths[b] = 0``,
  no valid entry) gets output 0 (and statistics 0), never NaN. Non-finite values in ``k`` / ``v`` reach only the rows
  that attend them: a NaN or inf past the length, at an invalid slot or at an unlisted position never reaches the
  output; a row that attends one gets NaN.

  Args:
    q: ``[B, H, D]`` the new token's queries (f32, bf16 or f16).
    k: ``[B, L, G, D]`` the cache's keys (``H % G == 0``: GQA / MQA), same dtype; v: ``[B, L, G, E]``.
    lengths: int ``[B]`` keys written per sequence (in ``[0, L]``), default ``L``.
    valid: optional bool ``[B, L, G]`` per-(slot, kv head) validity (a compressed :class:`jaxattn.cache.KVCache`'s
      ``valid``).
    index: optional int ``[B, G, K]`` key positions per (sequence, kv head), each in ``[0, L)`` where valid.
    index_counts: optional int ``[B, G]`` in ``[0, K]``: the first ``index_counts[b, g]`` entries are valid.
    index_valid: optional bool ``[B, G, K]`` per-entry validity (instead of ``index_counts``). Neither: every
      entry is valid.
    scale: logit scale, default ``D ** -0.5``.
    return_stats: None, ``"probs"`` (the probability row: ``[B, H, L]`` f32 dense, ``[B, H, K]`` gathered, per
      entry, with the probability of the entry's key; 0 for keys / entries not attended) or ``"colsum"`` (its sum
      over the ``H // G`` query heads of each kv head: ``[B, G, L]`` or ``[B, G, K]``; what H2O, SnapKV and recycled
      re-selection accumulate). Backends other than ``"reference"`` get them from a second chunked pass over the
      keys given the log-sum-exp, so ``"colsum"`` never builds ``[B, H, L]``.
    implementation: a backend name, ``(name, Config)``, a sequence of those tried in order, or None (CPU ``xla``;
      GPU ``pallas_gpu`` then ``xla``; TPU ``pallas_tpu`` then ``xla``, falling back with a
      :class:`jaxattn.backend.FallbackWarning`): ``"reference"`` (dense f32 definition), ``"xla"`` (online softmax
      over chunks of keys / index entries, ``O(B * H * chunk)`` memory per step; Config
      :class:`~jaxattn.ops.decode.config.XlaConfig`), ``"pallas_gpu"`` (Triton split-K flash-decoding with an XLA
      combine; Config :class:`~jaxattn.ops.decode.config.PallasGpuConfig`) and ``"pallas_tpu"`` (Mosaic, key-block
      lists scalar-prefetched like paged attention; refuses float16; Config
      :class:`~jaxattn.ops.decode.config.PallasTpuConfig`). The Pallas backends run in interpret mode when named on
      CPU, and visit whole key blocks: in the gathered form, every block holding a listed key, masked to the listed
      keys (sparse decode reads ``K / L`` of the cache when the selection is block-aligned, e.g. Quest pages that are
      whole blocks).

  Gradients: ``"reference"`` and ``"xla"`` are plain JAX (``jax.grad`` works, w.r.t. q, k, v, also through the
  statistics). The Pallas backends are forward only: differentiating through them raises ``NotImplementedError``
  naming the backend; pass ``implementation="xla"`` to differentiate.

  Out-of-range input: with concrete (non-traced) arguments, ``lengths`` outside ``[0, L]``, ``index_counts``
  outside ``[0, K]`` and a valid ``index`` entry outside ``[0, L)`` raise ``ValueError`` naming the value and its
  position. Traced (under ``jit``): lengths and counts are clamped, and an out-of-range entry is dropped (as if
  invalid); no backend ever reads outside the cache.

  Returns:
    ``out [B, H, E]`` in q's dtype, or ``(out, stats)`` when ``return_stats`` is set (stats f32).

  Raises:
    ValueError: bad shapes, dtypes, scale, ``return_stats``, both ``index_counts`` and ``index_valid``, or concrete
      out-of-range values, naming them.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  if q.ndim != 3:
    raise ValueError(f"q must have rank 3 ([B, H, D]: one query token per sequence), got shape {q.shape}")
  if q.dtype not in FLOATS:
    raise ValueError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
  validate_qkv(q[:, None], k, v)
  B, H, D = q.shape
  _, L, G, E = v.shape
  if return_stats not in STATS:
    raise ValueError(f"return_stats must be one of {STATS}, got {return_stats!r}")
  scale = validate_scale(scale, D)
  lengths = _lengths(lengths, B, L)
  valid = _valid(valid, B, L, G)
  index, entry_valid = _index(index, index_counts, index_valid, B, G, L)
  call = DecodeCall(B=B, T=1, S=L, H=H, G=G, D=D, E=E, dtype=jnp.dtype(q.dtype).name,
                    K=0 if index is None else int(index.shape[-1]), scale=scale, stats=return_stats,
                    has_valid=valid is not None)
  out, stats = _run(q, k, v, lengths, valid, index, entry_valid, implementation=backend_lib.static_implementation(
      implementation), call=call, platform=backend_lib.platform())
  return out if return_stats is None else (out, stats)


def make_call(q, k, v, *, index=None, scale: float | None = None, return_stats: str | None = None,
              has_valid: bool = False) -> DecodeCall:
  """The :class:`DecodeCall` of already validated arguments (arrays or ``jax.ShapeDtypeStruct``)."""
  B, H, D = q.shape
  _, L, G, E = v.shape
  return DecodeCall(B=B, T=1, S=L, H=H, G=G, D=D, E=E, dtype=jnp.dtype(q.dtype).name,
                    K=0 if index is None else int(index.shape[-1]),
                    scale=float(D) ** -0.5 if scale is None else float(scale), stats=return_stats,
                    has_valid=has_valid)


def resolve_backend(call: DecodeCall, implementation=None) -> tuple[backend_lib.Backend, Any]:
  """The decode backend and config that serve ``call`` (no trial compile; see :func:`jaxattn.backend.resolve`)."""
  return backend_lib.resolve(OP, BACKENDS, backend_lib.static_implementation(implementation), DEFAULTS, call)


@functools.partial(jax.jit, static_argnames=("implementation", "call", "platform"))
def _run(q, k, v, lengths, valid, index, entry_valid, *, implementation, call: DecodeCall, platform: str):
  del platform  # a cache key: dispatch and the kernels' interpret mode depend on it (use_platform)
  if index is not None:  # traced entries outside the cache are dropped (never read)
    entry_valid = entry_valid & (index >= 0) & (index < call.S)
    index = jnp.clip(index, 0, call.S - 1).astype(jnp.int32)
  return backend_lib.dispatch(OP, BACKENDS, implementation, DEFAULTS, call,
                              (q, k, v, lengths, valid, index, entry_valid), differentiable=False)


# -------------------------------------------------------------------------------------------------- validation
def _first_bad(bad: np.ndarray):
  return [int(i) for i in np.argwhere(bad)[0]], int(bad.sum())


def _lengths(lengths, B: int, L: int):
  if lengths is None:
    return jnp.full((B,), L, jnp.int32)
  a = concrete_int_array(lengths, "lengths")
  if tuple(np.shape(lengths)) != (B,):
    raise ValueError(f"lengths must be int [B={B}], got shape {tuple(np.shape(lengths))}")
  if a is None:
    return jnp.clip(lengths, 0, L).astype(jnp.int32)
  bad = (a < 0) | (a > L)
  if bad.any():
    (b,), n = _first_bad(bad)
    raise ValueError(f"lengths must lie in [0, L={L}] (the cache length), got {int(a[b])} at b={b} ({n} bad)")
  return jnp.asarray(a.astype(np.int32))


def _valid(valid, B: int, L: int, G: int):
  if valid is None:
    return None
  valid = jnp.asarray(valid)
  if valid.dtype != jnp.bool_ or valid.shape != (B, L, G):
    raise ValueError(f"valid must be bool [B={B}, L={L}, G={G}], got {valid.dtype} {valid.shape}")
  return valid


def _index(index, counts, entry_valid, B: int, G: int, L: int):
  if index is None:
    if counts is not None or entry_valid is not None:
      raise ValueError("index_counts / index_valid need an index")
    return None, None
  if counts is not None and entry_valid is not None:
    raise ValueError("pass index_counts or index_valid, not both")
  idx_np = concrete_int_array(index, "index")
  shape = tuple(np.shape(index))
  if len(shape) != 3 or shape[:2] != (B, G) or shape[2] < 1:
    raise ValueError(f"index must be int [B={B}, G={G}, K] with K >= 1 (key positions per kv head), got shape "
                     f"{shape}")
  K = shape[2]
  ev_np = None
  if counts is not None:
    cnt_np = concrete_int_array(counts, "index_counts")
    if tuple(np.shape(counts)) != (B, G):
      raise ValueError(f"index_counts must be int [B={B}, G={G}], got shape {tuple(np.shape(counts))}")
    if cnt_np is not None:
      bad = (cnt_np < 0) | (cnt_np > K)
      if bad.any():
        pos, n = _first_bad(bad)
        raise ValueError(f"index_counts must lie in [0, K={K}], got {int(cnt_np[tuple(pos)])} at [b, g] = {pos} "
                         f"({n} bad)")
      ev_np = np.arange(K) < cnt_np[..., None]
      ev = jnp.asarray(ev_np)
    else:
      ev = jnp.arange(K) < jnp.asarray(counts)[..., None]
  elif entry_valid is not None:
    ev = jnp.asarray(entry_valid)
    if ev.dtype != jnp.bool_ or ev.shape != (B, G, K):
      raise ValueError(f"index_valid must be bool [B={B}, G={G}, K={K}], got {ev.dtype} {ev.shape}")
    if not isinstance(ev, jax.core.Tracer):
      ev_np = np.asarray(ev)
  else:
    ev_np = np.ones((B, G, K), bool)
    ev = jnp.asarray(ev_np)
  if idx_np is not None:
    listed = np.ones((B, G, K), bool) if ev_np is None else ev_np
    bad = listed & ((idx_np < 0) | (idx_np >= L))
    if ev_np is not None and bad.any():
      pos, n = _first_bad(bad)
      raise ValueError(f"index entries must lie in [0, L={L}) (the cache length), got {int(idx_np[tuple(pos)])} "
                       f"at [b, g, k] = {pos} ({n} bad entries)")
    ev = ev & jnp.asarray((idx_np >= 0) & (idx_np < L))  # (traced validity) out-of-range entries drop
    return jnp.asarray(np.clip(idx_np, 0, L - 1).astype(np.int32)), ev
  return index, ev
