"""Landmark inference with retrieval: a block cache, chunked processing, top-k block retrieval (paper §3.2).

The sequence (landmarks already inserted, see :mod:`jaxattn.ops.landmark.data`) is fed in chunks of any length.
:class:`LandmarkCache` keeps, per layer:

- a ring buffer of the last ``M`` complete blocks' keys and values (keys stored **before** RoPE, so they can be
  re-positioned when retrieved): block ``n`` (0-based, in sequence order) lives in slot ``n % M``;
- the current incomplete block (fewer than ``block_size`` tokens, also pre-RoPE) and counters.

One call of :func:`landmark_retrieval_attention` with a chunk ``[B, C, ...]``:

1. **Local window.** The incomplete block followed by the chunk forms a block-aligned *frame*; the chunk's queries
   attend over it with the ordinary grouped softmax (:func:`jaxattn.landmark_attention`, any implementation): blocks
   completed inside the frame take part through their landmarks, the current block's regular keys directly.
2. **Retrieval.** Each chunk query scores every cached block by its landmark key, ``q_i . rope(k_L)``, and keeps the
   ``top_k`` best: per (token, head) (``"per_token_and_head"``), shared by the heads of a token after a softmax over
   blocks and a max over heads (``"max_over_heads"``), or shared by the tokens of the chunk after a max over tokens
   (``"max_over_tokens"``). The retrieved blocks join the same top-level softmax: each contributes its landmark logit
   and spreads that probability over its regular keys (an intra-block softmax), exactly like an earlier block in
   training. The local and retrieved parts are merged through their log-sum-exps, so with ``top_k`` covering every
   cached block and ``positions="exact"`` the result equals :func:`jaxattn.landmark_attention` over the whole
   sequence.
3. **Cache update.** Blocks completed by the chunk go into the ring buffer; the remainder becomes the new incomplete
   block.

Positions (RoPE, ``rope_base`` not None) are assigned after retrieval, in block slots of ``block_size`` tokens:

- ``"stingy"`` (the paper's scheme, keeps every position within a short training length): the frame starts at slot
  ``top_k + 1``; for *scoring*, the ``top_k`` most recent cached blocks sit at slots ``top_k, top_k - 1, ..., 1`` (most
  recent closest to the frame) and ALL older blocks at slot 0; for *attention*, the retrieved blocks are laid out
  contiguously in their original order at slots ``1 .. top_k`` (oldest first).
- ``"exact"``: every token keeps its true sequence position (the oracle setting of the equivalence tests).

Without RoPE the two schemes coincide. ``top_k=0`` disables retrieval (local frame only).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn.ops.landmark.api import landmark_attention

__all__ = ["LandmarkCache", "landmark_retrieval_attention", "rope", "RETRIEVAL_MODES", "POSITION_MODES"]

RETRIEVAL_MODES = ("per_token_and_head", "max_over_heads", "max_over_tokens")
POSITION_MODES = ("stingy", "exact")


class LandmarkCache(NamedTuple):
  """Block cache of one attention layer (a pytree: jit, tree_map and checkpointing work on it).

  Attributes:
    mem_k: ``[B, M, bs, G, D]`` pre-RoPE keys of complete blocks (ring buffer; block ``n`` in slot ``n % M``; each
      block's landmark last).
    mem_v: ``[B, M, bs, G, E]`` their values.
    num_blocks: int32 scalar, complete blocks seen so far (``min(num_blocks, M)`` slots are valid).
    local_k: ``[B, bs, G, D]`` pre-RoPE keys of the incomplete block (first ``local_len`` slots valid).
    local_v: ``[B, bs, G, E]``.
    local_len: int32 scalar, tokens in the incomplete block (``< bs``).
  """

  mem_k: jax.Array
  mem_v: jax.Array
  num_blocks: jax.Array
  local_k: jax.Array
  local_v: jax.Array
  local_len: jax.Array

  @classmethod
  def create(cls, batch_size: int, mem_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
             value_dim: int | None = None, dtype=jnp.float32) -> "LandmarkCache":
    """An empty cache for ``mem_blocks`` blocks of ``block_size`` tokens."""
    for name, x in (("batch_size", batch_size), ("mem_blocks", mem_blocks), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim)):
      if not isinstance(x, (int, np.integer)) or isinstance(x, bool) or x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    if not isinstance(block_size, (int, np.integer)) or block_size < 2:
      raise ValueError(f"block_size must be an int >= 2, got {block_size!r}")
    E = head_dim if value_dim is None else value_dim
    B, M, bs, G, D = batch_size, mem_blocks, block_size, num_kv_heads, head_dim
    zero = jnp.zeros((), jnp.int32)
    return cls(jnp.zeros((B, M, bs, G, D), dtype), jnp.zeros((B, M, bs, G, E), dtype), zero,
               jnp.zeros((B, bs, G, D), dtype), jnp.zeros((B, bs, G, E), dtype), zero)

  @property
  def block_size(self) -> int:
    return self.local_k.shape[1]

  @property
  def mem_blocks(self) -> int:
    return self.mem_k.shape[1]

  @property
  def length(self):
    """Tokens seen so far (int32 scalar)."""
    return self.num_blocks * self.block_size + self.local_len


def rope(x, positions, base: float):
  """Rotary embedding (rotate-half layout, as :func:`jaxattn.nn.apply_rope`) with positions of any shape.

  Args:
    x: ``[..., D]`` with ``D`` even.
    positions: broadcastable to ``x.shape[:-1]``.
    base: wavelength base.
  """
  D = x.shape[-1]
  freq = float(base) ** (-jnp.arange(0, D, 2, dtype=jnp.float32) / D)  # [D/2]
  angle = jnp.asarray(positions, jnp.float32)[..., None] * freq
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def landmark_retrieval_attention(q, k, v, cache: LandmarkCache, *, top_k: int,
                                 mode: str = "per_token_and_head", positions: str = "stingy",
                                 rope_base: float | None = None, scale: float | None = None,
                                 implementation: str | Sequence[str] | None = None):
  r"""Attention of one chunk over its local frame and the ``top_k`` retrieved cached blocks; updates the cache.

  For chunk query ``i`` with retrieved blocks ``R(i)`` (per head) the top-level softmax runs over the local items
  (current-block regular keys, landmarks of frame blocks before ``i``'s block) and the landmarks of ``R(i)``:

  .. math::
     o_i = \frac{e^{\mathrm{lse}^{loc}_i} o^{loc}_i + \sum_{b \in R(i)} e^{s_{i L_b}} u_{ib}}
                {e^{\mathrm{lse}^{loc}_i} + \sum_{b \in R(i)} e^{s_{i L_b}}},\qquad
     u_{ib} = \sum_{j \in \mathrm{reg}(b)} \mathrm{softmax}_{\mathrm{reg}(b)}(s_{i\cdot})_j\, v_j

  (see the module docstring for the frame, the modes and the positions).

  Args:
    q: ``[B, C, H, D]`` chunk queries **before** RoPE.
    k: ``[B, C, G, D]`` chunk keys before RoPE (``H % G == 0``).
    v: ``[B, C, G, E]``.
    cache: this layer's :class:`LandmarkCache` (its ``block_size`` is the landmark block length).
    top_k: blocks retrieved per query (0 disables retrieval); at most ``cache.mem_blocks``.
    mode: ``"per_token_and_head"``, ``"max_over_heads"`` or ``"max_over_tokens"``.
    positions: ``"stingy"`` or ``"exact"``.
    rope_base: RoPE base, or None for no rotary embedding.
    scale: logit scale, default ``D ** -0.5``.
    implementation: passed to :func:`jaxattn.landmark_attention` for the local frame.

  Returns:
    ``(out [B, C, H, E] in q's dtype, new cache)``.

  Raises:
    ValueError: on bad shapes or options, or a chunk that completes more blocks than the ring buffer holds.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  if not isinstance(cache, LandmarkCache):
    raise ValueError(f"cache must be a LandmarkCache, got {type(cache).__name__}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 ([B, C, heads, dim]), got shape {x.shape}")
  B, C, H, D = q.shape
  _, M, bs, G, Dc = cache.mem_k.shape
  E = cache.mem_v.shape[-1]
  if k.shape != (B, C, G, D) or v.shape != (B, C, G, E) or Dc != D:
    raise ValueError(f"k {k.shape} / v {v.shape} must be [{B}, {C}, {G}, {D}] / [{B}, {C}, {G}, {E}] to match q "
                     f"{q.shape} and the cache ([B, M, bs, G, D] = {cache.mem_k.shape}, E = {E})")
  if cache.mem_k.shape[0] != B:
    raise ValueError(f"the cache was made for batch size {cache.mem_k.shape[0]}, got {B}")
  if H % G:
    raise ValueError(f"q has {H} heads, not a multiple of the cache's {G} kv heads")
  if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or not 0 <= top_k <= M:
    raise ValueError(f"top_k must be an int in [0, mem_blocks={M}], got {top_k!r}")
  if mode not in RETRIEVAL_MODES:
    raise ValueError(f"mode must be one of {RETRIEVAL_MODES}, got {mode!r}")
  if positions not in POSITION_MODES:
    raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
  if (bs - 1 + C) // bs > M:
    raise ValueError(f"a chunk of {C} tokens can complete {(bs - 1 + C) // bs} blocks, more than the cache's "
                     f"{M} slots: use shorter chunks or a larger cache")
  if rope_base is not None and (D % 2 or not rope_base > 0):
    raise ValueError(f"RoPE needs an even head dim and a positive base, got D={D}, rope_base={rope_base!r}")
  scale = float(D) ** -0.5 if scale is None else float(scale)
  if implementation is not None and not isinstance(implementation, str):
    implementation = tuple(implementation)
  return _chunk(q, k, v, cache, top_k=int(top_k), mode=mode, positions=positions,
                rope_base=None if rope_base is None else float(rope_base), scale=scale,
                implementation=implementation)


def _safe_softmax(s, axis):
  """Softmax that gives 0 (not NaN) on all ``-inf`` slices."""
  m = jnp.max(s, axis=axis, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isneginf(m), 0.0, m))
  den = jnp.sum(p, axis=axis, keepdims=True)
  return p / jnp.where(den > 0, den, 1.0)


@functools.partial(jax.jit, static_argnames=("top_k", "mode", "positions", "rope_base", "scale", "implementation"))
def _chunk(q, k, v, cache: LandmarkCache, *, top_k, mode, positions, rope_base, scale, implementation):
  B, C, H, D = q.shape
  _, M, bs, G, _ = cache.mem_k.shape
  E = cache.mem_v.shape[-1]
  R = H // G
  hi = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
  L0, n0 = cache.local_len, cache.num_blocks
  nF = -(-(bs + C) // bs) + 1  # frame blocks, one spare so the new incomplete block can always be sliced out
  Fp = nF * bs

  # ----------------------------------------------------------------------------------------- the local frame
  def frame(local, x):  # local [B, bs, G, F] + x [B, C, G, F] at offset L0 -> [B, Fp, G, F]
    f = jnp.zeros((B, Fp) + x.shape[2:], x.dtype).at[:, :bs].set(local.astype(x.dtype))
    return lax.dynamic_update_slice(f, x, (0, L0, 0, 0))

  kf, vf = frame(cache.local_k, k), frame(cache.local_v, v)  # pre-RoPE
  qf = lax.dynamic_update_slice(jnp.zeros((B, Fp, H, D), q.dtype), q, (0, L0, 0, 0))
  base = ((top_k + 1) * bs if top_k else 0) if positions == "stingy" else n0 * bs
  qr, kr = qf, kf
  if rope_base is not None:
    fpos = (base + jnp.arange(Fp))[:, None]  # [Fp, 1]
    qr, kr = rope(qf, fpos, rope_base), rope(kf, fpos, rope_base)
  out_f, lse_f = landmark_attention(qr, kr, vf, block_size=bs, scale=scale, return_lse=True,
                                    implementation=implementation)
  out = lax.dynamic_slice(out_f, (0, L0, 0, 0), (B, C, H, E)).astype(jnp.float32)  # [B, C, H, E]
  lse = lax.dynamic_slice(lse_f, (0, 0, L0), (B, H, C)).transpose(0, 2, 1)  # [B, C, H]

  # ------------------------------------------------------------------------------------------------ retrieval
  if top_k:
    q_rot = lax.dynamic_slice(qr, (0, L0, 0, 0), (B, C, H, D))
    slots = jnp.arange(M)
    age = (n0 - 1 - slots) % M  # 0 = most recent block
    valid = age < jnp.minimum(n0, M)  # [M]
    if positions == "stingy":
      score_slot = jnp.where(age < top_k, top_k - age, 0)
    else:
      score_slot = n0 - 1 - age
    lm_k = cache.mem_k[:, :, bs - 1].astype(q.dtype)  # [B, M, G, D]
    if rope_base is not None:
      lm_k = rope(lm_k, (score_slot * bs + bs - 1)[:, None], rope_base)
    scores = jnp.einsum("bcgrd,bmgd->bcgrm", q_rot.reshape(B, C, G, R, D), lm_k, precision=hi,
                        preferred_element_type=jnp.float32).reshape(B, C, H, M) * scale
    scores = jnp.where(valid, scores, -jnp.inf)
    if mode == "per_token_and_head":
      agg = scores
    elif mode == "max_over_heads":
      agg = jnp.max(_safe_softmax(scores, -1), axis=2, keepdims=True)  # [B, C, 1, M]
    else:
      agg = jnp.max(_safe_softmax(scores, -1), axis=1, keepdims=True)  # [B, 1, H, M]
    _, idx = lax.top_k(jnp.where(valid, agg, -jnp.inf), top_k)
    idx = jnp.broadcast_to(idx, (B, C, H, top_k))  # ring slots of the retrieved blocks
    ok = valid[idx]
    r_age = jnp.where(ok, age[idx], -1)
    # Oldest retrieved block first: slot 1 + (number of retrieved blocks older than this one).
    order = 1 + jnp.sum(r_age[..., None, :] > r_age[..., :, None], axis=-1)
    slot = order if positions == "stingy" else n0 - 1 - r_age
    b_ix = jnp.arange(B)[:, None, None, None]
    g_ix = (jnp.arange(H) // R)[None, None, :, None]
    kg = cache.mem_k[b_ix, idx, :, g_ix].astype(q.dtype)  # [B, C, H, k, bs, D]
    vg = cache.mem_v[b_ix, idx, :, g_ix]  # [B, C, H, k, bs, E]
    if rope_base is not None:
      kg = rope(kg, slot[..., None] * bs + jnp.arange(bs), rope_base)
    s = jnp.einsum("bchd,bchkjd->bchkj", q_rot, kg, precision=hi, preferred_element_type=jnp.float32) * scale
    lam = jnp.where(ok, s[..., -1], -jnp.inf)  # [B, C, H, k]
    p_loc = _safe_softmax(jnp.where(jnp.arange(bs) < bs - 1, s, -jnp.inf), -1)
    u = jnp.einsum("bchkj,bchkje->bchke", p_loc, vg.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    m_r = jnp.max(lam, axis=-1)
    w = jnp.exp(lam - jnp.where(jnp.isneginf(m_r), 0.0, m_r)[..., None])
    l_r = jnp.sum(w, axis=-1)
    lse_r = jnp.where(l_r > 0, m_r + jnp.log(jnp.where(l_r > 0, l_r, 1.0)), -jnp.inf)
    out_r = jnp.einsum("bchk,bchke->bche", w / jnp.where(l_r > 0, l_r, 1.0)[..., None], u,
                       precision=lax.Precision.HIGHEST)
    both = jnp.logaddexp(lse, lse_r)
    out = jnp.exp(lse - both)[..., None] * out + jnp.exp(lse_r - both)[..., None] * out_r

  # ------------------------------------------------------------------------------------------- cache update
  n_tok = L0 + C
  n_new = n_tok // bs
  f = jnp.arange(nF)
  dst = jnp.where(f < n_new, (n0 + f) % M, M)  # M = out of bounds: dropped
  mem_k = cache.mem_k.at[:, dst].set(kf.reshape(B, nF, bs, G, D).astype(cache.mem_k.dtype), mode="drop")
  mem_v = cache.mem_v.at[:, dst].set(vf.reshape(B, nF, bs, G, E).astype(cache.mem_v.dtype), mode="drop")
  local_k = lax.dynamic_slice(kf, (0, n_new * bs, 0, 0), (B, bs, G, D)).astype(cache.local_k.dtype)
  local_v = lax.dynamic_slice(vf, (0, n_new * bs, 0, 0), (B, bs, G, E)).astype(cache.local_v.dtype)
  new = LandmarkCache(mem_k, mem_v, (n0 + n_new).astype(jnp.int32), local_k, local_v,
                      (n_tok - n_new * bs).astype(jnp.int32))
  return out.astype(q.dtype), new
