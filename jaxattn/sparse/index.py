"""Training-free sparse-prefill index builders: vertical-slash, block top-k and FlexPrefill.

Each builder estimates which query-key pairs matter from the inputs themselves (no training) and returns the
per-(batch, query head, query block) kv block lists that :func:`jaxattn.block_sparse_attention` runs, forward and
backward (:class:`BlockIndex`). Each method follows the training-free prefill patterns as run by the official code
of "The Sparse Frontier: Sparse Attention Trade-offs in Transformer LLMs" (Nawrot et al., arXiv 2504.17768; its
``modelling/attention/efficient_prefilling.py``), which adapts MInference (Jiang et al., arXiv 2407.02490) and
FlexPrefill (Lai et al., arXiv 2502.20766).

Positions: ``q [B, T, H, D]`` and ``k [B, S, G, D]`` with ``T <= S``; query ``i`` sits at absolute position
``p_i = i + S - T`` (bottom-right aligned, so a prefill chunk can be the tail of a longer context) and the causal
mask is ``j <= p_i`` (:class:`jaxattn.masks.Causal` with ``offset = S - T``; plain ``Causal()`` when ``T == S``).
GQA: query head ``h`` reads kv head ``h // (H // G)``; every builder selects per *query* head.

=========================  ==================================================================================
setting                    selection
=========================  ==================================================================================
``VerticalSlash``          token level: ``n_vertical`` key columns and ``n_slash`` diagonals ``d = p_i - j``,
                           from the softmax of the last ``last_q`` queries (MInference / Sparse Frontier)
``FlexPrefill``            vertical-slash with an adaptive per-head budget: the fewest top entries whose
                           cumulative normalised score reaches ``alpha``, floored at ``min_budget``
``BlockTopK``              block level: the ``top_k`` kv blocks per query block by the mean-pooled score
                           ``mean(q_blk) . mean(k_blk)`` (MInference block-sparse)
=========================  ==================================================================================

Every setting is a frozen (hashable) dataclass: its fields are static, the arrays are traced, so
``jax.jit(lambda q, k: cfg.build(q, k, block_q=64, block_k=64))`` compiles once per shape. List lengths ``K`` are
static (derived from the budgets); the counts vary per (batch, head, query block).

Block approximation (vertical-slash, FlexPrefill): the kernels run whole ``block_q x block_k`` tiles, so a kv block
is listed for a query block iff at least one *selected, causal* entry falls inside it, and the causal mask is
applied on top. The block selection is therefore a **superset** of the token selection: it computes every
selected pair plus the unselected pairs that share a tile with one (its recall is >= the token selection's, its
sparsity <=). :meth:`VerticalSlashSelection.to_mask` gives the exact token-level selection, for references and
:func:`jaxattn.sparse.attention_recall`.

Example:
  >>> import jax, jaxattn
  >>> from jaxattn import sparse, testing
  >>> q, k, v = testing.random_qkv(0, B=1, T=128, H=4, G=2, D=16)
  >>> cfg = sparse.VerticalSlash(n_vertical=16, n_slash=16, last_q=32, force_first=2, force_local=4)
  >>> index = jax.jit(lambda q, k: cfg.build(q, k, block_q=16, block_k=16))(q, k)
  >>> out = sparse.sparse_attention(q, k, v, index)   # block_sparse_attention with the causal mask
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn.masks import Causal

__all__ = [
    "BlockIndex", "VerticalSlashSelection", "VerticalSlash", "FlexPrefill", "BlockTopK",
    "vertical_slash_index", "flexprefill_index", "block_topk_index", "sparse_attention", "causal_mask",
]

_HI = lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------------------- validation
def _int(name: str, value, *, lo: int = 1) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name}={value!r} must be an int, got a {type(value).__name__}")
  if value < lo:
    raise ValueError(f"{name}={value} must be >= {lo}")
  return int(value)


def check_qk(q, k) -> tuple[int, int, int, int, int, int]:
  """``(B, T, S, H, G, D)`` of ``q [B, T, H, D]``, ``k [B, S, G, D]`` (``T <= S``, ``H % G == 0``)."""
  if getattr(q, "ndim", None) != 4 or getattr(k, "ndim", None) != 4:
    raise ValueError(f"q and k must have rank 4 (q [B, T, H, D], k [B, S, G, D]), got shapes "
                     f"{getattr(q, 'shape', None)} and {getattr(k, 'shape', None)}")
  (B, T, H, D), (Bk, S, G, Dk) = q.shape, k.shape
  if B != Bk:
    raise ValueError(f"batch sizes differ: q {B}, k {Bk}")
  if D != Dk:
    raise ValueError(f"q has head dim {D} but k has {Dk}")
  if min(B, T, H, D, S, G) == 0:
    raise ValueError(f"empty dimension in q {q.shape} or k {k.shape}")
  if H % G:
    raise ValueError(f"q has {H} heads, not a multiple of k's {G} kv heads")
  if T > S:
    raise ValueError(f"sparse prefill needs T <= S (queries are the last T of S positions), got T={T}, S={S}")
  for name, x in (("q", q), ("k", k)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a float array, got {x.dtype}")
  return B, T, S, H, G, D


def resolve_scale(scale, D: int) -> float:
  if scale is None:
    return float(D) ** -0.5
  if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)):
    raise ValueError(f"scale must be a finite float > 0 or None, got {scale!r}")
  if not (math.isfinite(float(scale)) and float(scale) > 0):
    raise ValueError(f"scale must be a finite float > 0 or None, got {scale!r}")
  return float(scale)


def causal_mask(T: int, S: int) -> Causal:
  """The causal mask of a ``T``-query, ``S``-key prefill: ``Causal(offset=S - T)`` (``j <= i + S - T``)."""
  return Causal(offset=S - T)


# ------------------------------------------------------------------------------------------------- containers
@functools.partial(jax.tree_util.register_dataclass, data_fields=["indices", "counts"],
                   meta_fields=["block_q", "block_k", "T", "S"])
@dataclasses.dataclass(frozen=True, eq=False)
class BlockIndex:
  """Per-(batch, query head, query block) kv block lists in :func:`jaxattn.block_sparse_attention`'s format.

  A pytree: ``indices`` and ``counts`` are its leaves, the block sizes and lengths are static metadata.

  Attributes:
    indices: int32 ``[B, H, nQ, K]``, ``nQ = ceil(T / block_q)``: the first ``counts`` entries of each list are
      distinct kv block ids in ``[0, ceil(S / block_k))``, sorted ascending (builders); the rest are 0.
    counts: int32 ``[B, H, nQ]`` in ``[0, K]``.
    block_q, block_k: the lists' block sizes.
    T, S: the query and key lengths the lists were built for.
  """

  indices: Any
  counts: Any
  block_q: int
  block_k: int
  T: int
  S: int

  @property
  def num_q_blocks(self) -> int:
    return -(-self.T // self.block_q)

  @property
  def num_k_blocks(self) -> int:
    return -(-self.S // self.block_k)

  def layout(self):
    """bool ``[B, H, nQ, nK]``: whether query block ``qb`` lists kv block ``kb``."""
    return _layout(self.indices, self.counts, nk=self.num_k_blocks)

  def to_mask(self):
    """bool ``[B, H, T, S]``: the pairs ``block_sparse_attention`` computes (listed blocks & causal). Small shapes."""
    return _block_mask(self.indices, self.counts, bq=self.block_q, bk=self.block_k, T=self.T, S=self.S)


@functools.partial(jax.jit, static_argnames=("bq", "bk", "T", "S"))
def _block_mask(indices, counts, *, bq: int, bk: int, T: int, S: int):
  lay = _layout(indices, counts, nk=-(-S // bk))
  full = jnp.repeat(jnp.repeat(lay, bq, 2), bk, 3)[:, :, :T, :S]
  return full & (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T))


@functools.partial(jax.jit, static_argnames=("nk",))
def _layout(indices, counts, *, nk: int):
  B, H, nq, K = indices.shape
  valid = jnp.arange(K) < counts[..., None]
  b, h, r, _ = jnp.indices(indices.shape, sparse=True)
  ids = jnp.where(valid, indices, nk)  # sentinel: dropped
  return jnp.zeros((B, H, nq, nk), bool).at[b, h, r, ids].set(True, mode="drop")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["columns", "column_valid", "offsets", "offset_valid"], meta_fields=["T", "S"])
@dataclasses.dataclass(frozen=True, eq=False)
class VerticalSlashSelection:
  """A token-level vertical-slash selection (exact; the block lists are built from it).

  Query ``i`` (position ``p_i = i + S - T``) attends key ``j <= p_i`` iff ``j`` is a selected column or
  ``p_i - j`` a selected diagonal offset. A pytree (arrays are leaves, ``T`` / ``S`` static).

  Attributes:
    columns: int32 ``[B, H, NV]`` key indices in ``[0, S)`` (distinct among the valid ones).
    column_valid: bool ``[B, H, NV]``: which entries are selected (all, for ``VerticalSlash``; the first
      adaptive-budget ones for ``FlexPrefill``).
    offsets: int32 ``[B, H, NS]`` diagonal offsets ``d = p_i - j`` in ``[0, S)`` (0 = the main diagonal).
    offset_valid: bool ``[B, H, NS]``.
    T, S: query and key lengths.
  """

  columns: Any
  column_valid: Any
  offsets: Any
  offset_valid: Any
  T: int
  S: int

  def budgets(self):
    """int32 ``([B, H], [B, H])``: the number of selected columns and diagonals per head."""
    return (self.column_valid.sum(-1, dtype=jnp.int32), self.offset_valid.sum(-1, dtype=jnp.int32))

  def column_set(self):
    """bool ``[B, H, S]``: selected columns."""
    return _scatter_set(self.columns, self.column_valid, n=self.S)

  def offset_set(self):
    """bool ``[B, H, S]``: selected diagonal offsets."""
    return _scatter_set(self.offsets, self.offset_valid, n=self.S)

  def to_mask(self):
    """bool ``[B, H, T, S]``: the exact token selection intersected with the causal mask. Small shapes only."""
    return _vs_mask(self.columns, self.column_valid, self.offsets, self.offset_valid, T=self.T, S=self.S)

  def to_blocks(self, *, block_q: int, block_k: int) -> BlockIndex:
    """The block lists covering the selection (a superset: see the module docstring). ``K`` is static:
    ``min(NV + NS * span, nK)`` with ``span = ceil((block_q - 1) / block_k) + 1`` (kv blocks one diagonal can
    cross inside one query block)."""
    block_q, block_k = _int("block_q", block_q), _int("block_k", block_k)
    idx, cnt = _vs_blocks(self.columns, self.column_valid, self.offsets, self.offset_valid, T=self.T, S=self.S,
                          bq=block_q, bk=block_k)
    return BlockIndex(idx, cnt, block_q, block_k, self.T, self.S)


@functools.partial(jax.jit, static_argnames=("T", "S"))
def _vs_mask(cols, col_valid, offs, off_valid, *, T: int, S: int):
  col_set, off_set = _scatter_set(cols, col_valid, n=S), _scatter_set(offs, off_valid, n=S)
  return vs_tile(col_set, off_set, jnp.arange(T) + (S - T), S)


@functools.partial(jax.jit, static_argnames=("n",))
def _scatter_set(ids, valid, *, n: int):
  B, H, _ = ids.shape
  b, h, _ = jnp.indices(ids.shape, sparse=True)
  return jnp.zeros((B, H, n), bool).at[b, h, jnp.where(valid, ids, n)].set(True, mode="drop")


def vs_tile(col_set, off_set, pos, S: int):
  """bool ``[B, H, len(pos), S]``: rows at absolute positions ``pos`` under a column / offset selection."""
  j = jnp.arange(S)
  d = pos[:, None] - j[None, :]  # [R, S]
  causal = d >= 0
  diag = jnp.take(off_set, jnp.clip(d, 0, S - 1), axis=-1)  # [B, H, R, S]
  return (col_set[:, :, None, :] | diag) & causal


@functools.partial(jax.jit, static_argnames=("T", "S", "bq", "bk"))
def _vs_blocks(cols, col_valid, offs, off_valid, *, T: int, S: int, bq: int, bk: int):
  nq, nk = -(-T // bq), -(-S // bk)
  shift = S - T
  rows = jnp.arange(nq)
  p_lo = rows * bq + shift  # first / last absolute query position of each query block
  p_hi = jnp.minimum(rows * bq + bq, T) - 1 + shift
  # verticals: column c is visited by query block qb iff some row of qb sees it (c <= p_hi)
  v_ok = col_valid[:, :, None, :] & (cols[:, :, None, :] <= p_hi[:, None])  # [B, H, nQ, NV]
  v_ids = jnp.broadcast_to((cols // bk)[:, :, None, :], v_ok.shape)
  # slashes: diagonal d covers keys max(p_lo - d, 0) .. p_hi - d inside query block qb
  span = -(-(bq - 1) // bk) + 1
  d = offs[:, :, None, :]  # [B, H, 1, NS]
  lo = jnp.maximum(p_lo[:, None] - d, 0) // bk
  hi_key = p_hi[:, None] - d
  cand = lo[..., None] + jnp.arange(span)  # [B, H, nQ, NS, span]
  s_ok = (off_valid[:, :, None, :, None] & (hi_key >= 0)[..., None]
          & (cand <= jnp.floor_divide(jnp.maximum(hi_key, 0), bk)[..., None]))
  B, H = cols.shape[:2]
  ids = jnp.concatenate([jnp.where(v_ok, v_ids, nk), jnp.where(s_ok, cand, nk).reshape(B, H, nq, -1)], axis=-1)
  return _dedupe(ids, nk)


def _dedupe(ids, nk: int):
  """Candidate block ids with sentinel ``nk`` -> (distinct sorted ids ``[..., min(C, nk)]`` padded by 0, counts)."""
  ids = jnp.sort(ids.astype(jnp.int32), axis=-1)
  repeat = jnp.concatenate([jnp.zeros_like(ids[..., :1], bool), ids[..., 1:] == ids[..., :-1]], axis=-1)
  ids = jnp.sort(jnp.where(repeat, nk, ids), axis=-1)[..., :min(ids.shape[-1], nk)]
  valid = ids < nk
  return jnp.where(valid, ids, 0).astype(jnp.int32), valid.sum(-1, dtype=jnp.int32)


# ------------------------------------------------------------------------------------------------- estimation
def _last_query_probs(q, k, last_q: int, scale: float):
  """Causal softmax of the last ``last_q`` queries over all keys, f32 ``[B, H, L, S]``, and their positions."""
  B, T, H, D = q.shape
  S, G = k.shape[1], k.shape[2]
  R = H // G
  ql = q[:, T - last_q:].astype(jnp.float32).reshape(B, last_q, G, R, D)
  s = jnp.einsum("blgrd,bsgd->bgrls", ql, k.astype(jnp.float32), precision=_HI).reshape(B, H, last_q, S) * scale
  pos = jnp.arange(T - last_q, T) + (S - T)  # [L]
  s = jnp.where(jnp.arange(S)[None, :] <= pos[:, None], s, -jnp.inf)  # key 0 is always allowed: no empty row
  return jax.nn.softmax(s, axis=-1), pos


def _vs_scores(q, k, last_q: int, scale: float):
  """Vertical (column-sum) and slash (diagonal-sum) scores, f32 ``[B, H, S]`` each; each sums to ``last_q``."""
  p, pos = _last_query_probs(q, k, last_q, scale)
  S = k.shape[1]
  vertical = p.sum(2)
  j = pos[:, None] - jnp.arange(S)[None, :]  # [L, S]: the key on diagonal d of row r
  on = jnp.take_along_axis(p, jnp.broadcast_to(jnp.clip(j, 0, S - 1), p.shape), axis=-1)
  slash = jnp.where(j >= 0, on, 0.0).sum(2)
  return vertical, slash


def _forced_top(score, n: int, n_forced: int):
  """Indices of the top ``n`` of ``score [..., N]`` with the first ``n_forced`` positions forced (+inf); also the
  raw scores in that order."""
  N = score.shape[-1]
  key = jnp.where(jnp.arange(N) < n_forced, jnp.inf, score)
  _, ids = lax.top_k(key, n)
  return ids.astype(jnp.int32), jnp.take_along_axis(score, ids, axis=-1)


def _adaptive_valid(mass, total, alpha: float, floor: int):
  """First-``n`` flags for entries ordered best first: ``n`` = fewest whose cumulative ``mass / total`` reaches
  ``alpha``, at least ``floor``, at most the list length (the static maximum)."""
  cap = mass.shape[-1]
  frac = jnp.cumsum(mass, axis=-1) / total[..., None]
  n = jnp.sum(frac < alpha, axis=-1) + 1
  n = jnp.clip(jnp.maximum(n, floor), 1, cap)
  return jnp.arange(cap) < n[..., None]


@functools.partial(jax.jit, static_argnames=("cfg", "scale"))
def _select_vs(q, k, *, cfg, scale: float):
  vertical, slash = _vs_scores(q, k, cfg.last_q, scale)
  cols, col_mass = _forced_top(vertical, cfg.max_vertical, cfg.force_first)
  offs, off_mass = _forced_top(slash, cfg.max_slash, cfg.force_local)
  if isinstance(cfg, FlexPrefill):
    col_valid = _adaptive_valid(col_mass, vertical.sum(-1), cfg.alpha, max(cfg.min_budget, cfg.force_first))
    off_valid = _adaptive_valid(off_mass, slash.sum(-1), cfg.alpha, max(cfg.min_budget, cfg.force_local))
  else:
    col_valid = jnp.ones(cols.shape, bool)
    off_valid = jnp.ones(offs.shape, bool)
  return cols, col_valid, offs, off_valid


def _check_vs_budgets(cfg, T: int, S: int) -> None:
  name = type(cfg).__name__
  nv, ns = ("n_vertical", "n_slash") if isinstance(cfg, VerticalSlash) else ("max_vertical", "max_slash")
  if cfg.last_q > T:
    raise ValueError(f"{name}.last_q={cfg.last_q} exceeds the number of queries T={T}")
  if cfg.max_vertical > S:
    raise ValueError(f"{name}.{nv}={cfg.max_vertical} exceeds the context length S={S}")
  if cfg.max_slash > S:
    raise ValueError(f"{name}.{ns}={cfg.max_slash} exceeds the context length S={S} (there are S diagonals)")
  if cfg.force_first > S or cfg.force_local > S:
    raise ValueError(f"{name}: force_first={cfg.force_first} / force_local={cfg.force_local} exceed the context "
                     f"length S={S}")


class _VSMixin:
  """Shared ``select`` / ``build`` / ``mask`` of the vertical-slash family."""

  def select(self, q, k, *, scale: float | None = None) -> VerticalSlashSelection:
    """The token-level selection from ``q [B, T, H, D]``, ``k [B, S, G, D]`` (jit-able; ``scale`` static,
    default ``D ** -0.5``, used only for the estimation softmax)."""
    B, T, S, H, G, D = check_qk(q, k)
    _check_vs_budgets(self, T, S)
    cols, cv, offs, ov = _select_vs(jnp.asarray(q), jnp.asarray(k), cfg=self, scale=resolve_scale(scale, D))
    return VerticalSlashSelection(cols, cv, offs, ov, T, S)

  def build(self, q, k, *, block_q: int, block_k: int, scale: float | None = None) -> BlockIndex:
    """The block lists (``K = min(NV + NS * span, nK)``, see :meth:`VerticalSlashSelection.to_blocks`)."""
    return self.select(q, k, scale=scale).to_blocks(block_q=block_q, block_k=block_k)

  def token_mask(self, q, k, *, scale: float | None = None):
    """bool ``[B, H, T, S]``: the exact token selection (& causal). Small shapes only."""
    return self.select(q, k, scale=scale).to_mask()


@dataclasses.dataclass(frozen=True)
class VerticalSlash(_VSMixin):
  """Vertical-slash selection (MInference; as run by The Sparse Frontier), fixed budgets.

  From the causal softmax ``P`` of the last ``last_q`` queries (rows ``r`` at positions ``p_r``) over all keys:

  - vertical score ``v_j = sum_r P[r, j]``; the first ``force_first`` columns are forced (score ``+inf``, the
    attention sinks); keep the top ``n_vertical`` columns;
  - slash score ``s_d = sum_r P[r, p_r - d]`` (diagonal offset ``d = p - j``, 0 = main diagonal); the
    ``force_local`` most local diagonals ``d < force_local`` are forced; keep the top ``n_slash`` diagonals;
  - every query attends the union of the kept columns and diagonals, causally.

  Provenance (Sparse Frontier code, see the module docstring): config ``approximation_size=256``
  (our ``last_q``), ``vertical_size=512``, ``slash_size=512``, first 4 columns and 64 local diagonals forced.
  Ties are broken towards the lower index (``lax.top_k``). Budgets are per query head.

  Attributes:
    n_vertical: kept columns, ``force_first <= n_vertical <= S``.
    n_slash: kept diagonals, ``force_local <= n_slash <= S``.
    last_q: estimation queries, ``1 <= last_q <= T`` (default 64 as in MInference; the Sparse Frontier uses 256).
    force_first: forced leading columns (sinks), ``>= 0``.
    force_local: forced local diagonals (window), ``>= 0``.
  """

  n_vertical: int
  n_slash: int
  last_q: int = 64
  force_first: int = 4
  force_local: int = 64

  def __post_init__(self):
    for name in ("n_vertical", "n_slash", "last_q"):
      _int(f"VerticalSlash.{name}", getattr(self, name), lo=1)
    for name in ("force_first", "force_local"):
      _int(f"VerticalSlash.{name}", getattr(self, name), lo=0)
    if self.n_vertical < self.force_first:
      raise ValueError(f"VerticalSlash.n_vertical={self.n_vertical} is below force_first={self.force_first} "
                       f"(the forced sink columns)")
    if self.n_slash < self.force_local:
      raise ValueError(f"VerticalSlash.n_slash={self.n_slash} is below force_local={self.force_local} "
                       f"(the forced local diagonals)")

  @property
  def max_vertical(self) -> int:
    return self.n_vertical

  @property
  def max_slash(self) -> int:
    return self.n_slash

  @classmethod
  def for_sparsity(cls, s: float, T: int, S: int | None = None, *, last_q: int = 64, force_first: int = 4,
                   force_local: int = 64) -> "VerticalSlash":
    """Budgets for a target token-level sparsity ``s`` in ``[0, 1)`` of a causal ``T x S`` prefill.

    The per-row budget ``b`` is the smallest with ``sum_i min(p_i + 1, b) >= (1 - s) * area`` (``area`` = causal
    pairs), split ``n_vertical = max(force_first, b // 2)``, ``n_slash = b - n_vertical`` (at least
    ``force_local``). ``sum_i min(p_i + 1, b)`` is what the selection computes when the kept columns are the first
    ones and the diagonals the most local (sinks + window, the typical LLM pattern); columns further right or
    diagonals further out reach fewer rows and columns / diagonals overlap, so the realised token sparsity is
    ``>= s`` (up to rounding ``b``): on random data at T = 256 targets 0.5 / 0.8 / 0.9 / 0.95 realise about
    0.69 / 0.87 / 0.92 / 0.95. ``s = 0`` gives ``n_vertical = S``: every column, the dense causal result exactly.
    The block lists cover more (a superset; measure both with :func:`jaxattn.sparse.sparsity`).
    """
    S = T if S is None else S
    b = _row_budget(s, T, S)
    if b >= S:
      return cls(S, max(force_local, 1), last_q=last_q, force_first=force_first, force_local=force_local)
    nv = max(force_first, b // 2, 1)
    ns = max(force_local, b - nv, 1)
    if nv + ns > max(b, 2):
      raise ValueError(f"target sparsity s={s} allows {b} keys per query row at T={T}, S={S}, below "
                       f"force_first + force_local = {force_first} + {force_local}; lower them or s")
    return cls(min(nv, S), min(ns, S), last_q=last_q, force_first=force_first, force_local=force_local)


@dataclasses.dataclass(frozen=True)
class FlexPrefill(_VSMixin):
  """Vertical-slash with an adaptive per-head budget (FlexPrefill, as run by The Sparse Frontier).

  Scores as :class:`VerticalSlash` (from the last ``last_q`` queries). Per query head and separately for columns
  and diagonals, entries are ordered forced first (the first ``force_first`` columns / ``force_local`` local
  diagonals), then by score; the budget is the fewest leading entries whose cumulative normalised score
  ``sum(score) / sum(all scores)`` reaches ``alpha``, floored at ``max(min_budget, forced)`` and capped at the
  static maximum ``max_vertical`` / ``max_slash`` (the list lengths; under jit only the counts vary).

  Provenance (Sparse Frontier code, see the module docstring): ``alpha`` 0.65 in its config
  (0.9 default), ``min_budget=512``, estimated from the last 512 queries, first 4 columns and 64 local
  diagonals forced. The static caps are this library's addition (jit needs static sizes).

  Attributes:
    alpha: cumulative-mass target in ``(0, 1]``.
    min_budget: budget floor (tokens), ``1 <= min_budget <= min(max_vertical, max_slash)``.
    max_vertical, max_slash: static caps, ``<= S`` and ``>=`` the forced counts.
    last_q, force_first, force_local: as in :class:`VerticalSlash`.
  """

  alpha: float
  min_budget: int
  max_vertical: int
  max_slash: int
  last_q: int = 64
  force_first: int = 4
  force_local: int = 64

  def __post_init__(self):
    a = self.alpha
    if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, float, np.integer, np.floating)) \
        or not (0.0 < float(a) <= 1.0):
      raise ValueError(f"FlexPrefill.alpha must be a number in (0, 1], got {a!r}")
    object.__setattr__(self, "alpha", float(a))
    for name in ("min_budget", "max_vertical", "max_slash", "last_q"):
      _int(f"FlexPrefill.{name}", getattr(self, name), lo=1)
    for name in ("force_first", "force_local"):
      _int(f"FlexPrefill.{name}", getattr(self, name), lo=0)
    if self.max_vertical < self.force_first:
      raise ValueError(f"FlexPrefill.max_vertical={self.max_vertical} is below force_first={self.force_first}")
    if self.max_slash < self.force_local:
      raise ValueError(f"FlexPrefill.max_slash={self.max_slash} is below force_local={self.force_local}")
    if self.min_budget > min(self.max_vertical, self.max_slash):
      raise ValueError(f"FlexPrefill.min_budget={self.min_budget} exceeds the static maxima max_vertical="
                       f"{self.max_vertical} / max_slash={self.max_slash}")

  @classmethod
  def for_sparsity(cls, s: float, T: int, S: int | None = None, *, alpha: float = 0.9,
                   min_budget: int | None = None, last_q: int = 64, force_first: int = 4,
                   force_local: int = 64) -> "FlexPrefill":
    """Caps from :meth:`VerticalSlash.for_sparsity` (so the realised sparsity is at least that of the fixed
    method), ``min_budget`` default ``max(1, min(caps) // 2)`` (at most the caps). ``s = 0`` gives
    ``min_budget = caps = S``: every column and diagonal, the dense causal result exactly."""
    vs = VerticalSlash.for_sparsity(s, T, S, last_q=last_q, force_first=force_first, force_local=force_local)
    S = T if S is None else S
    if vs.n_vertical >= S:  # s = 0: every column and diagonal, floored at everything
      return cls(alpha, S, S, S, last_q=last_q, force_first=force_first, force_local=force_local)
    cap = min(vs.n_vertical, vs.n_slash)
    min_budget = max(1, cap // 2) if min_budget is None else min(min_budget, cap)
    return cls(alpha, min_budget, vs.n_vertical, vs.n_slash, last_q=last_q, force_first=force_first,
               force_local=force_local)


def _row_budget(s, T: int, S: int) -> int:
  if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, float, np.integer, np.floating)) \
      or not (0.0 <= float(s) < 1.0):
    raise ValueError(f"target sparsity must be a number in [0, 1), got {s!r}")
  T, S = _int("T", T), _int("S", S)
  if T > S:
    raise ValueError(f"sparse prefill needs T <= S, got T={T}, S={S}")
  row_len = np.arange(S - T, S, dtype=np.int64) + 1  # causal keys of each query row
  target = (1.0 - float(s)) * row_len.sum()
  if float(s) == 0.0:
    return S
  lo, hi = 1, S  # smallest b with sum(min(row_len, b)) >= target
  while lo < hi:
    mid = (lo + hi) // 2
    if np.minimum(row_len, mid).sum() >= target:
      hi = mid
    else:
      lo = mid + 1
  return lo


# ------------------------------------------------------------------------------------------------- block top-k
@dataclasses.dataclass(frozen=True)
class BlockTopK:
  """Block top-k selection (MInference block-sparse, as run by The Sparse Frontier).

  Queries and keys are mean-pooled per list block (``block_q`` / ``block_k``; the ragged last block averages its
  real rows); the pooled score is ``scale * mean(q_blk) . mean(k_blk)`` per query head (its kv head for GQA).
  Causally empty blocks are excluded; forced (score ``+inf``): kv block 0 (``force_first``) and the
  ``force_local`` kv blocks ending at the diagonal (those overlapping the query block's positions, and the
  ``force_local - 1`` before them; 2 = diagonal + sub-diagonal when ``block_q == block_k``). Keep the top
  ``top_k`` kv blocks per query block (fewer when fewer are causally non-empty). ``K = top_k``.

  Provenance (Sparse Frontier code, see the module docstring): chunk 16, ``top_chunks=64``; diagonal,
  sub-diagonal and first key block forced.

  Attributes:
    top_k: kept kv blocks per query block, ``>= 1``; checked at build time against ``nK`` and the forced count.
    force_first: force kv block 0.
    force_local: number of forced local blocks (0 disables).
  """

  top_k: int
  force_first: bool = True
  force_local: int = 2

  def __post_init__(self):
    _int("BlockTopK.top_k", self.top_k, lo=1)
    _int("BlockTopK.force_local", self.force_local, lo=0)
    if not isinstance(self.force_first, (bool, np.bool_)):
      raise ValueError(f"BlockTopK.force_first must be a bool, got {self.force_first!r}")

  def n_forced(self, T: int, S: int, block_q: int, block_k: int) -> int:
    """The most forced (and causally non-empty) kv blocks of any query block: the floor of ``top_k``."""
    forced = _forced_blocks_np(T, S, block_q, block_k, self.force_first, self.force_local)
    return int((forced & (_block_areas(T, S, block_q, block_k) > 0)).sum(1).max())

  def build(self, q, k, *, block_q: int, block_k: int, scale: float | None = None) -> BlockIndex:
    """The block lists from ``q [B, T, H, D]``, ``k [B, S, G, D]`` (jit-able)."""
    B, T, S, H, G, D = check_qk(q, k)
    block_q, block_k = _int("block_q", block_q), _int("block_k", block_k)
    nk = -(-S // block_k)
    if self.top_k > nk:
      raise ValueError(f"BlockTopK.top_k={self.top_k} exceeds the number of kv blocks ceil(S / block_k) = {nk} "
                       f"(S={S}, block_k={block_k})")
    need = self.n_forced(T, S, block_q, block_k)
    if self.top_k < need:
      raise ValueError(f"BlockTopK.top_k={self.top_k} is below the forced blocks (first + {self.force_local} local "
                       f"= up to {need} at block_q={block_q}, block_k={block_k})")
    idx, cnt = _block_topk(jnp.asarray(q), jnp.asarray(k), cfg=self, bq=block_q, bk=block_k,
                           scale=resolve_scale(scale, D))
    return BlockIndex(idx, cnt, block_q, block_k, T, S)

  def token_mask(self, q, k, *, block_q: int, block_k: int, scale: float | None = None):
    """bool ``[B, H, T, S]``: the listed blocks & causal (block top-k selects whole blocks). Small shapes."""
    return self.build(q, k, block_q=block_q, block_k=block_k, scale=scale).to_mask()

  @classmethod
  def for_sparsity(cls, s: float, T: int, S: int | None = None, *, block_q: int, block_k: int,
                   force_first: bool = True, force_local: int = 2) -> "BlockTopK":
    """The smallest ``top_k`` whose estimated causal density is ``>= 1 - s`` (so the realised sparsity is at
    most ``s``, the closest from below; data-independent estimate: the forced blocks plus the largest causal
    blocks). ``top_k`` never goes below the forced blocks, so high targets can be out of reach at short T (T = 256,
    blocks of 16, ``force_local=1``: at most about 0.82; :func:`jaxattn.sparse.sparsity` reports the realised
    value). ``s = 0`` gives ``top_k = nK``: every causal block, the dense causal result exactly."""
    S = T if S is None else S
    _row_budget(s, T, S)  # validates s, T, S
    block_q, block_k = _int("block_q", block_q), _int("block_k", block_k)
    cfg = cls(1, force_first, force_local)
    nk = -(-S // block_k)
    area = _block_areas(T, S, block_q, block_k)  # [nQ, nK]
    total = area.sum()
    forced = _forced_blocks_np(T, S, block_q, block_k, force_first, force_local) & (area > 0)
    # per query block: forced blocks first, then the others by area (descending)
    order_key = np.where(forced, np.inf, area.astype(np.float64))
    sorted_area = np.take_along_axis(area, np.argsort(-np.where(area > 0, order_key, -1.0), axis=1, kind="stable"),
                                     axis=1)
    cum = np.cumsum(sorted_area, axis=1).sum(0)  # computed pairs for top_k = 1..nK
    lo = cfg.n_forced(T, S, block_q, block_k)
    for top_k in range(max(lo, 1), nk + 1):
      if cum[top_k - 1] >= (1.0 - float(s)) * total - 1e-9:
        return cls(top_k, force_first, force_local)
    return cls(nk, force_first, force_local)


def _block_areas(T: int, S: int, bq: int, bk: int) -> np.ndarray:
  """int64 ``[nQ, nK]``: causal pairs per block (closed form, see :func:`causal_count`)."""
  nq, nk = -(-T // bq), -(-S // bk)
  qb, kb = np.arange(nq)[:, None], np.arange(nk)[None, :]
  return causal_count(np, qb, kb, T, S, bq, bk)


def causal_count(xp, qb, kb, T: int, S: int, bq: int, bk: int):
  """Causal pairs in block ``(qb, kb)``: ``sum_{p in rows} clip(p - j0 + 1, 0, len_k)`` in closed form (integer
  arrays; at most ``block_q * block_k`` per block)."""
  shift = S - T
  p0 = qb * bq + shift
  p1 = xp.minimum(qb * bq + bq, T) - 1 + shift
  j0 = kb * bk
  L = xp.minimum(j0 + bk, S) - j0

  def F(n):  # sum over x <= n (x integer) of clip(x, 0, L)
    tri = n * (n + 1) // 2
    full = L * (L + 1) // 2 + (n - L) * L
    return xp.where(n <= 0, 0, xp.where(n <= L, tri, full))

  return F(p1 - j0 + 1) - F(p0 - j0)


def _forced_blocks_np(T, S, bq, bk, force_first, force_local):
  nq, nk = -(-T // bq), -(-S // bk)
  qb, kb = np.arange(nq)[:, None], np.arange(nk)[None, :]
  return _forced_blocks(np, qb, kb, T, S, bq, bk, force_first, force_local)


def _forced_blocks(xp, qb, kb, T, S, bq, bk, force_first, force_local):
  shift = S - T
  p_lo = qb * bq + shift
  p_hi = xp.minimum(qb * bq + bq, T) - 1 + shift
  forced = (kb == 0) & bool(force_first)
  if force_local:
    forced = forced | ((kb >= p_lo // bk - (force_local - 1)) & (kb <= p_hi // bk))
  return forced


@functools.partial(jax.jit, static_argnames=("cfg", "bq", "bk", "scale"))
def _block_topk(q, k, *, cfg: BlockTopK, bq: int, bk: int, scale: float):
  B, T, H, D = q.shape
  S, G = k.shape[1], k.shape[2]
  R = H // G
  nq, nk = -(-T // bq), -(-S // bk)
  qp = jnp.pad(q.astype(jnp.float32), [(0, 0), (0, nq * bq - T), (0, 0), (0, 0)]).reshape(B, nq, bq, H, D)
  kp = jnp.pad(k.astype(jnp.float32), [(0, 0), (0, nk * bk - S), (0, 0), (0, 0)]).reshape(B, nk, bk, G, D)
  q_len = (jnp.minimum(jnp.arange(nq) * bq + bq, T) - jnp.arange(nq) * bq).astype(jnp.float32)
  k_len = (jnp.minimum(jnp.arange(nk) * bk + bk, S) - jnp.arange(nk) * bk).astype(jnp.float32)
  qm = qp.sum(2) / q_len[None, :, None, None]  # [B, nQ, H, D]
  km = kp.sum(2) / k_len[None, :, None, None]  # [B, nK, G, D]
  score = jnp.einsum("bqgrd,bkgd->bgrqk", qm.reshape(B, nq, G, R, D), km,
                     precision=_HI).reshape(B, H, nq, nk) * scale
  qb, kb = jnp.arange(nq)[:, None], jnp.arange(nk)[None, :]
  causal = causal_count(jnp, qb, kb, T, S, bq, bk) > 0  # [nQ, nK]
  forced = _forced_blocks(jnp, qb, kb, T, S, bq, bk, cfg.force_first, cfg.force_local) & causal
  key = jnp.where(forced, jnp.inf, jnp.where(causal, score, -jnp.inf))
  vals, ids = lax.top_k(key, cfg.top_k)
  valid = vals > -jnp.inf
  ids = jnp.where(valid, ids, nk)
  return _dedupe(ids, nk)  # sorted ascending; K = min(top_k, nK) = top_k


# ------------------------------------------------------------------------------------------------- functions
def vertical_slash_index(q, k, *, n_vertical: int, n_slash: int, block_q: int, block_k: int, last_q: int = 64,
                         force_first: int = 4, force_local: int = 64, scale: float | None = None) -> BlockIndex:
  """``VerticalSlash(n_vertical, n_slash, last_q, force_first, force_local).build(q, k, ...)``."""
  return VerticalSlash(n_vertical, n_slash, last_q, force_first, force_local).build(
      q, k, block_q=block_q, block_k=block_k, scale=scale)


def flexprefill_index(q, k, *, alpha: float, min_budget: int, max_vertical: int, max_slash: int, block_q: int,
                      block_k: int, last_q: int = 64, force_first: int = 4, force_local: int = 64,
                      scale: float | None = None) -> BlockIndex:
  """``FlexPrefill(alpha, min_budget, max_vertical, max_slash, ...).build(q, k, ...)``."""
  return FlexPrefill(alpha, min_budget, max_vertical, max_slash, last_q, force_first, force_local).build(
      q, k, block_q=block_q, block_k=block_k, scale=scale)


def block_topk_index(q, k, *, top_k: int, block_q: int, block_k: int, force_first: bool = True,
                     force_local: int = 2, scale: float | None = None) -> BlockIndex:
  """``BlockTopK(top_k, force_first, force_local).build(q, k, ...)``."""
  return BlockTopK(top_k, force_first, force_local).build(q, k, block_q=block_q, block_k=block_k, scale=scale)


def sparse_attention(q, k, v, index, *, scale: float | None = None, implementation=None):
  """Causal attention restricted to a selection: ``q [B, T, H, D]``, ``k [B, S, G, D]``, ``v [B, S, G, E]`` ->
  ``[B, T, H, E]``, differentiable in q, k and v.

  - a :class:`BlockIndex`: :func:`jaxattn.block_sparse_attention` over its lists with ``Causal(offset=S - T)``
    on top (the kernels' path; ``implementation`` as there);
  - a :class:`VerticalSlashSelection`: the *exact* token selection, as :func:`jaxattn.softmax_attention` with
    the dense bool mask ``selection.to_mask()`` (``O(B * H * T * S)`` memory: small experiments and checks;
    ``implementation`` defaults to ``"xla"``, the kernels refuse mask arrays).
  """
  from jaxattn.ops.softmax import block_sparse_attention, softmax_attention  # noqa: PLC0415 - import cycle

  if not isinstance(index, (BlockIndex, VerticalSlashSelection)):
    raise ValueError(f"index must be a jaxattn.sparse.BlockIndex or VerticalSlashSelection, got "
                     f"{type(index).__name__}")
  T, S = q.shape[1], k.shape[1]
  if (T, S) != (index.T, index.S):
    raise ValueError(f"index was built for T={index.T}, S={index.S} but q, k have T={T}, S={S}")
  if isinstance(index, VerticalSlashSelection):
    return softmax_attention(q, k, v, mask=index.to_mask(), scale=scale,
                             implementation="xla" if implementation is None else implementation)
  return block_sparse_attention(q, k, v, index.indices, index.counts, block_q=index.block_q,
                                block_k=index.block_k, mask=causal_mask(T, S), scale=scale,
                                implementation=implementation)
