"""``softmax_attention``: validation, the :class:`SoftmaxCall`, and dispatch over the softmax backends.

The family's backends (:mod:`jaxattn.backend` protocol) take ``(q, k, v, bias, q_ids, kv_ids)`` and return
``(out, lse)``; their residuals are a :class:`~jaxattn.ops.softmax.config.SoftmaxResiduals`. Context parallelism
resolves one with :func:`resolve_backend` and calls its ``fwd`` / ``bwd`` per ring step.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import backend as backend_lib
from jaxattn._validation import validate_qkv, validate_scale, validate_segment_ids, validate_soft_cap
from jaxattn.masks import Full, Mask, PerHead
from jaxattn.ops.softmax import cudnn, dropout, mosaic_gpu, pallas_gpu, pallas_tpu, reference, xla
from jaxattn.ops.softmax.config import BlockSizes, SoftmaxCall

OP = "softmax_attention"
BACKENDS: dict[str, backend_lib.Backend] = {
    b.name: b for b in (reference.BACKEND, xla.BACKEND, cudnn.BACKEND, pallas_gpu.BACKEND, pallas_tpu.BACKEND,
                        mosaic_gpu.BACKEND)}  # mosaic_gpu: explicit only (not in DEFAULTS) until timed on Hopper
DEFAULTS: dict[str, tuple[str, ...]] = {
    "cpu": ("xla",), "gpu": ("cudnn", "pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")}


def resolve_backend(call: SoftmaxCall, implementation=None) -> tuple[backend_lib.Backend, object]:
  """The softmax backend and config that serve ``call`` (no trial compile; see :func:`jaxattn.backend.resolve`).

  Args:
    call: the call description.
    implementation: as in :func:`softmax_attention` (a name, ``(name, Config)``, a sequence, or None).

  Returns:
    ``(backend, config)``: run ``backend.fwd(call, config, args)`` / ``backend.bwd(...)`` or
    ``jaxattn.backend.flash_vjp(backend, call, config, *args)``.
  """
  return backend_lib.resolve(OP, BACKENDS, backend_lib.static_implementation(implementation), DEFAULTS, call)


def make_call(q, k, v, *, mask: Mask | None = None, bias=None, segment_ids: bool = False, scale: float | None = None,
              logits_soft_cap: float | None = None, return_lse: bool = False, mask_array: bool = False,
              dropout_rate: float = 0.0) -> SoftmaxCall:
  """The :class:`SoftmaxCall` of already validated arguments (arrays or ``jax.ShapeDtypeStruct``).

  ``bias`` is the ``[b, h, T, S]`` bias (or its shape) or None; ``segment_ids`` whether ids are passed;
  ``mask_array`` whether ``bias`` carries a boolean mask array as ``-inf`` entries; ``dropout_rate`` the attention
  dropout probability (the backends then take the dropout seed as a 7th argument).
  """
  B, T, H, D = q.shape
  _, S, G, E = v.shape
  if isinstance(mask, Full):
    mask = None
  bias_dims = None if bias is None else tuple(int(d) for d in np.shape(bias)[:2])
  return SoftmaxCall(B=B, T=T, S=S, H=H, G=G, D=D, E=E, dtype=jnp.dtype(q.dtype).name,
                     scale=float(D) ** -0.5 if scale is None else float(scale), logits_soft_cap=logits_soft_cap,
                     mask=mask, bias=bias_dims, segment_ids=bool(segment_ids), return_lse=bool(return_lse),
                     mask_array=bool(mask_array), dropout_rate=float(dropout_rate))


def softmax_attention(q, k, v, *, mask=None, segment_ids=None, bias=None, scale: float | None = None,
                      logits_soft_cap: float | None = None, return_lse: bool = False,
                      implementation=None, block_sizes: BlockSizes | None = None, dropout_rate: float = 0.0,
                      dropout_rng=None):
  r"""Masked multi-head softmax attention.

  .. math::
     s_{ij} = \mathrm{cap}\cdot\tanh\big((\mathrm{scale}\; q_i \cdot k_j + \mathrm{bias}_{ij})/\mathrm{cap}\big),
     \qquad o_i = \sum_{j \in A(i)} \frac{e^{s_{ij}}}{\sum_{j' \in A(i)} e^{s_{ij'}}} v_j

  where ``A(i)`` is the set of keys allowed by ``mask`` and ``segment_ids``. With ``dropout_rate = r > 0`` each
  normalised probability is dropped with probability ``r`` and the kept ones scaled by ``1 / (1 - r)`` (the
  log-sum-exp is unchanged). A query with no allowed key gets
  output 0 and log-sum-exp ``-inf`` (never NaN), and zero gradients. Non-finite values (NaN, inf) in q, k or v
  reach only the (query, key) pairs that are allowed: a row whose allowed keys and own query are finite gets finite,
  exact output, lse and gradients whatever masked or padded positions hold, and a row that attends a non-finite
  input gets NaN (never a silently finite value).

  Args:
    q: queries ``[B, T, H, D]`` (f32, bf16 or f16).
    k: keys ``[B, S, G, D]`` with ``H % G == 0`` (GQA/MQA: query head ``h`` uses kv head ``h // (H // G)``).
    v: values ``[B, S, G, E]``.
    mask: one of
      - a static :mod:`jaxattn.masks` mask (``Causal()``, ``Local(...)``, ``Slices(...)``, ...), for every head.
        For causal cross-attention aligned at the bottom right use ``Causal(offset=S - T)``;
      - per-head static masks: a sequence of ``H`` masks (one per query head) or a :class:`jaxattn.masks.PerHead`
        (``reference`` and ``xla`` only; equal masks collapse to one, which every backend serves);
      - a boolean array broadcastable to ``[B, H, T, S]`` (rank 2-4, each dim 1 or full; True = attend), as in
        ``jax.nn.dot_product_attention`` (``reference`` and ``xla`` only: the kernel backends refuse it, so
        ``implementation=None`` falls back to ``xla`` with a :class:`jaxattn.backend.FallbackWarning`). It is
        carried as an additive ``-inf`` bias of shape ``[B|1, H|1, T, S]`` (bfloat16, or the bias's dtype when
        ``bias`` is given), so the xla path then holds one ``T x S`` array per broadcast batch / head; prefer
        static masks or ``segment_ids`` for long sequences. Masked pairs are excluded after scale, bias and soft
        cap, whatever q, k or the bias hold there.
    segment_ids: ``(q_ids [B, T], kv_ids [B, S])`` integer arrays, or one ``[B, T]`` array when ``T == S``:
      query ``i`` attends key ``j`` only if their ids are equal. Any integer dtype; ids are compared as int32 and
      never truncated: concrete ids outside the int32 range raise ``ValueError``, traced int64 ids (x64 under
      ``jit``) are renumbered exactly.
    bias: additive logit bias, shape ``[T, S]``, ``[H|1, T, S]`` or ``[B|1, H|1, T, S]``; differentiable.
    scale: logit scale, a finite positive number (also in float32), default ``D ** -0.5``.
    logits_soft_cap: if set (a finite positive number), logits become ``cap * tanh(logits / cap)`` (after scale and
      bias).
    return_lse: also return the log-sum-exp ``[B, H, T]`` (natural log, f32).
    implementation: a backend name, ``(name, Config)``, a sequence of those tried in order, or None (per
      platform: CPU ``xla``; GPU ``cudnn``, ``pallas_gpu``, ``xla``; TPU ``pallas_tpu``, ``xla``; a backend that
      refuses the call or whose kernels do not fit is skipped with a :class:`jaxattn.backend.FallbackWarning`).
      Backends: ``"reference"`` (dense f32 definition; everything), ``"xla"`` (blockwise online softmax, memory
      ``O(T * block)``, skips empty blocks; everything; Config :class:`BlockSizes`), ``"cudnn"``
      (``jax.nn.dot_product_attention`` on GPU: bf16/f16, D == E, full / ``Causal(0)`` / ``Local(offset=0)``
      masks; no segment ids, soft cap or ``return_lse``), ``"pallas_gpu"`` (Triton kernels; no bias; head dims up
      to 256; Config :class:`~jaxattn.ops.softmax.config.PallasGpuConfig`), ``"pallas_tpu"`` (Mosaic kernels; no
      bias; Config :class:`~jaxattn.ops.softmax.config.PallasTpuConfig`). Explicitly named Pallas backends run in
      interpret mode on CPU. A named backend that cannot serve the call raises ``NotImplementedError``.
    dropout_rate: attention dropout probability, a Python float in ``[0, 1)``; 0 disables dropout.
      ``reference`` and ``xla`` only (the kernels refuse it). Entries are dropped independently per
      ``(b, h, i, j)`` as a counter-based function of ``(dropout_rng, b, h, i, j)``
      (:mod:`jaxattn.ops.softmax.dropout`): ``reference`` and ``xla`` (any tiles) drop the same entries, and the
      xla backward regenerates them per tile (no ``T x S`` mask is stored).
    dropout_rng: a JAX PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``), required when
      ``dropout_rate > 0``.
    block_sizes: shorthand for the tiles of whichever blockwise backend (``xla``, ``pallas_gpu``, ``pallas_tpu``)
      runs: its default config with these six tile fields replaced (the backend then checks its own rules and
      raises ``ValueError`` when they break them). Not combinable with an explicit ``(name, Config)``.

  Returns:
    ``out [B, T, H, E]`` in q's dtype, and ``lse [B, H, T]`` if ``return_lse``.

  Raises:
    ValueError: on bad shapes, dtypes or options, naming the offending values.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  validate_qkv(q, k, v)
  B, T, H, D = q.shape
  S = k.shape[1]
  q_ids, kv_ids = validate_segment_ids(segment_ids, B, T, S)
  bias = validate_bias(bias, B, H, T, S)
  mask, mask_arr = validate_mask(mask, B, H, T, S)
  mask_array = mask_arr is not None
  if mask_array:
    bias = mask_to_bias(mask_arr, bias, T, S)
  dropout_rate, seed = _validate_dropout(dropout_rate, dropout_rng)
  scale = validate_scale(scale, D)
  logits_soft_cap = validate_soft_cap(logits_soft_cap)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
  call = make_call(q, k, v, mask=mask, bias=bias, segment_ids=q_ids is not None, scale=scale,
                   logits_soft_cap=logits_soft_cap, return_lse=return_lse, mask_array=mask_array,
                   dropout_rate=dropout_rate)
  implementation = backend_lib.static_implementation(implementation)
  if block_sizes is not None:
    implementation = backend_lib.with_config_fields(OP, BACKENDS, DEFAULTS, implementation, call,
                                                    **block_sizes.tiles())
  out, lse = _run(q, k, v, bias, q_ids, kv_ids, seed, implementation=implementation, call=call,
                  platform=backend_lib.platform())
  return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnames=("implementation", "call", "platform"))
def _run(q, k, v, bias, q_ids, kv_ids, seed, *, implementation, call: SoftmaxCall, platform: str):
  # jit here so eager calls compile once per (shapes, config, platform), not on every call; inlined under an outer
  # jit. ``platform`` keys the cache: dispatch (and the kernels' interpret mode) depend on it. The dropout seed is
  # a 7th backend argument only when dropout is on (the kernels, which refuse dropout, keep six).
  del platform
  args = (q, k, v, bias, q_ids, kv_ids) + (() if seed is None else (seed,))
  return backend_lib.dispatch(OP, BACKENDS, implementation, DEFAULTS, call, args)


def validate_bias(bias, B, H, T, S):
  if bias is None:
    return None
  bias = jnp.asarray(bias)
  if not jnp.issubdtype(bias.dtype, jnp.floating):
    raise ValueError(f"bias must be a float array, got {bias.dtype}")
  if not 2 <= bias.ndim <= 4:
    raise ValueError(f"bias must have rank 2-4 ([B|1, H|1, T, S]), got shape {bias.shape}")
  full = (1,) * (4 - bias.ndim) + tuple(bias.shape)
  if full[2:] != (T, S) or full[0] not in (1, B) or full[1] not in (1, H):
    raise ValueError(f"bias shape {bias.shape} does not broadcast as [B|1, H|1, T, S] with B={B}, H={H}, "
                     f"T={T}, S={S}")
  return bias.reshape(full)



def validate_mask(mask, B, H, T, S):
  """``-> (static mask or None, boolean [b, h, t, s] array or None)`` (see ``softmax_attention``'s ``mask``)."""
  if mask is None or isinstance(mask, Full):
    return None, None
  if isinstance(mask, (list, tuple)) and all(isinstance(m, Mask) for m in mask):
    mask = PerHead(tuple(mask)) if mask else mask
  if isinstance(mask, PerHead):
    if mask.num_heads != H:
      raise ValueError(f"mask has {mask.num_heads} per-head masks, but q has {H} heads")
    if all(m == mask.masks[0] for m in mask.masks):
      mask = mask.masks[0]
      return (None if isinstance(mask, Full) else mask), None
    return mask, None
  if isinstance(mask, Mask):
    return mask, None
  if not (hasattr(mask, "shape") and hasattr(mask, "dtype")):
    raise ValueError(f"mask must be a jaxattn.masks.Mask, a sequence of {H} per-head Masks, a boolean array "
                     f"broadcastable to [B, H, T, S] or None, got {type(mask).__name__}")
  if mask.dtype != jnp.bool_:
    raise ValueError(f"mask array must be boolean (True = attend), got dtype {mask.dtype} (shape {mask.shape})")
  if not 2 <= mask.ndim <= 4:
    raise ValueError(f"mask array must have rank 2-4 (broadcastable to [B, H, T, S] = {[B, H, T, S]}), got shape "
                     f"{tuple(mask.shape)}")
  full = (1,) * (4 - mask.ndim) + tuple(mask.shape)
  if any(d not in (1, n) for d, n in zip(full, (B, H, T, S))):
    raise ValueError(f"mask array shape {tuple(mask.shape)} does not broadcast to [B, H, T, S] = {[B, H, T, S]}")
  return None, jnp.asarray(mask).reshape(full)


def mask_to_bias(mask, bias, T, S):
  """The boolean ``[b, h, t, s]`` mask (and the optional ``[b, h, T, S]`` bias) as one ``-inf``-carrying bias."""
  b, h = mask.shape[:2]
  if bias is None:
    return jnp.where(jnp.broadcast_to(mask, (b, h, T, S)), 0.0, -jnp.inf).astype(jnp.bfloat16)
  shape = (max(b, bias.shape[0]), max(h, bias.shape[1]), T, S)
  return jnp.where(jnp.broadcast_to(mask, shape), jnp.broadcast_to(bias, shape), jnp.asarray(-jnp.inf, bias.dtype))


def _validate_dropout(rate, rng):
  """``-> (rate as float, uint32 [2] seed or None)``."""
  if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating, np.integer)):
    raise ValueError(f"dropout_rate must be a Python float in [0, 1), got {rate!r}")
  rate = float(rate)
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {rate}")
  if rate == 0.0:
    return 0.0, None
  if rng is None:
    raise ValueError(f"dropout_rate={rate} needs dropout_rng (a jax PRNG key)")
  try:
    seed = dropout.dropout_seed(rng)
  except (TypeError, ValueError) as e:
    raise ValueError(f"dropout_rng must be a jax PRNG key, got {type(rng).__name__} "
                     f"{getattr(rng, 'shape', '')} {getattr(rng, 'dtype', '')}: {e}") from None
  return rate, seed
