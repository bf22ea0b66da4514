r"""The context-parallel cost model: exact per-device work, bytes moved and idealised time per strategy.

Work is exact. A mask whose allowed keys form one interval per query row (full, causal, sliding windows, packed
documents and their intersections) is described by per-row intervals ``[lo_i, hi_i]`` (:func:`row_intervals`);
from them :func:`pair_areas` counts, in ``O(T)``, the allowed pairs of every (query chunk, key chunk) rectangle for
``2P`` chunks. That matrix gives each device's area (hence FLOPs, ``4 B H D area`` forward as in
:mod:`experiments.bench.flops`), the load imbalance ``max / mean`` area with contiguous and with zigzag shards, and
the area each device computes at each ring step. The row sums equal ``mask.area(T, T)`` exactly (tested).

Time is idealised (perfect kernels at the sustained rates of :mod:`experiments.cp_model.hardware`, bandwidth-only
links plus a fixed latency, no contention beyond what is stated):

- ring: step ``s`` lasts ``max(max_r compute(r, s), transfer)`` (the next K/V shard moves while this one is computed;
  devices synchronise every step); the backward also moves the f32 dK/dV accumulators (``2 x`` the K/V bytes) and
  sends them home after the last step; trailing steps no device needs are dropped;
- all_gather: the K/V all-gather (and the backward's reduce-scatter of dK/dV) is exposed, then the slowest device's
  compute;
- ulysses: all-to-alls of Q, K, V in and O out (the backward: dO in and dQ, dK, dV out), exposed; compute is
  perfectly balanced (``H / P`` heads on the whole sequence); needs ``H % P == 0``; kv heads are repeated to
  ``lcm(G, P)`` when ``G % P != 0``;
- usp: Ulysses over ``Pu`` devices inside a node (largest divisor of ``P`` that is at most the node size, 8, and
  divides ``H``) and a zigzag ring over ``P / Pu`` across nodes.

These are models of multi-chip speed, not measurements: this project ran on CPUs and at most one GPU.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxattn.masks import And, Causal, Full, Local, Mask, Slices

from experiments.cp_model.hardware import Hardware

BWD_FACTOR = 2.5  # backward matmul FLOPs / forward (FlashAttention convention)
STRATEGIES = ("ring", "all_gather", "ulysses", "usp")


# ------------------------------------------------------------------------------------------------ mask geometry
def row_intervals(mask: Mask | None, T: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-row allowed key interval ``[lo_i, hi_i]`` (int64 ``[T]`` each; empty where ``lo > hi``).

  Supports ``Full``, ``Causal``, ``Local``, ``Slices`` whose slices give each row one interval (packed documents,
  prefix-LM, ...) and ``&`` of those.

  Raises:
    ValueError: for masks whose rows are not single intervals (unions, block-sparse, slices with gaps).
  """
  i = np.arange(T, dtype=np.int64)
  if mask is None or isinstance(mask, Full):
    return np.zeros(T, np.int64), np.full(T, T - 1, np.int64)
  if isinstance(mask, Causal):
    return np.zeros(T, np.int64), np.minimum(i + mask.offset, T - 1)
  if isinstance(mask, Local):
    c = i + mask.offset
    return np.maximum(c - mask.left, 0), np.minimum(c + mask.right, T - 1)
  if isinstance(mask, And):
    la, ha = row_intervals(mask.a, T)
    lb, hb = row_intervals(mask.b, T)
    return np.maximum(la, lb), np.minimum(ha, hb)
  if isinstance(mask, Slices):
    lo, hi = np.zeros(T, np.int64), np.full(T, -1, np.int64)
    for qs, qe, ks, ke, kind in mask.slices:
      qe = min(qe, T)
      if qs >= qe:
        continue
      a, lq, lk = i[qs:qe] - qs, qe - qs, ke - ks
      s_lo, s_hi = np.full(len(a), ks, np.int64), np.full(len(a), min(ke, T) - 1, np.int64)
      if kind in ("causal", "bi_causal"):  # b <= a - lq + lk
        s_hi = np.minimum(s_hi, ks + a - lq + lk)
      if kind in ("inv_causal", "bi_causal"):  # b >= a
        s_lo = np.maximum(s_lo, ks + a)
      old_lo, old_hi = lo[qs:qe], hi[qs:qe]
      old_ok, new_ok = old_lo <= old_hi, s_lo <= s_hi
      both = old_ok & new_ok
      # a row may take several slices only when their intervals touch (e.g. prefix-LM: [0, p) and [p, i])
      if (both & ((s_lo > old_hi + 1) | (s_hi < old_lo - 1))).any():
        raise ValueError(f"row_intervals needs one key interval per row; slices of {mask!r} leave a gap in rows "
                         f"[{qs}, {qe})")
      lo[qs:qe] = np.where(both, np.minimum(old_lo, s_lo), np.where(new_ok, s_lo, old_lo))
      hi[qs:qe] = np.where(both, np.maximum(old_hi, s_hi), np.where(new_ok, s_hi, old_hi))
    return lo, hi
  raise ValueError(f"row_intervals does not support {type(mask).__name__} masks (rows must be single intervals)")


def pair_areas(lo: np.ndarray, hi: np.ndarray, n_chunks: int) -> np.ndarray:
  """``A[a, b]`` = allowed pairs with the query in chunk ``a`` and the key in chunk ``b`` (int64 ``[n, n]``)."""
  T = len(lo)
  if T % n_chunks:
    raise ValueError(f"T={T} is not a multiple of {n_chunks} chunks")
  C = T // n_chunks
  ok = lo <= hi
  rows = np.nonzero(ok)[0]
  lo, hi = lo[ok], hi[ok]
  qa = rows // C
  cl, ch = lo // C, hi // C
  width = n_chunks + 1

  def add(a, b, w):  # exact integer sums via float64 bincount (areas stay far below 2^53)
    return np.bincount(a * width + b, weights=w.astype(np.float64), minlength=n_chunks * width).astype(np.float64)

  same = cl == ch
  d = ~same
  A = add(qa[same], cl[same], hi[same] - lo[same] + 1)
  A += add(qa[d], cl[d], (cl[d] + 1) * C - lo[d])
  A += add(qa[d], ch[d], hi[d] - ch[d] * C + 1)
  # whole chunks strictly between: a difference array along the key-chunk axis, C per chunk
  ones = np.full(int(d.sum()), C, np.int64)
  diff = add(qa[d], cl[d] + 1, ones) - add(qa[d], ch[d], ones)
  A = A.reshape(n_chunks, width) + np.cumsum(diff.reshape(n_chunks, width), axis=1)
  return np.rint(A[:, :n_chunks]).astype(np.int64)


def coarsen(A: np.ndarray, n_chunks: int) -> np.ndarray:
  """Sums a fine pair-area matrix into ``n_chunks x n_chunks``."""
  f = A.shape[0] // n_chunks
  return A.reshape(n_chunks, f, n_chunks, f).sum(axis=(1, 3))


def shard_chunks(P: int, layout: str) -> np.ndarray:
  """``[P, 2]`` indices of the ``2P`` chunks each device holds (contiguous: ``2r, 2r+1``; zigzag: ``r, 2P-1-r``)."""
  r = np.arange(P)
  if layout == "zigzag":
    return np.stack([r, 2 * P - 1 - r], 1)
  return np.stack([2 * r, 2 * r + 1], 1)


def device_pair_areas(A2P: np.ndarray, P: int, layout: str) -> np.ndarray:
  """``M[r, p]`` = area of device ``r``'s queries against device ``p``'s keys (``A2P``: ``2P x 2P`` chunk areas)."""
  idx = shard_chunks(P, layout)
  return sum(A2P[np.ix_(idx[:, a], idx[:, b])] for a in (0, 1) for b in (0, 1))


def imbalance(areas: np.ndarray) -> float:
  """``max / mean`` of per-device areas (1.0 when all are equal or all zero)."""
  m = float(np.mean(areas))
  return float(np.max(areas)) / m if m > 0 else 1.0


# ------------------------------------------------------------------------------------------------ strategies
@dataclasses.dataclass(frozen=True)
class Problem:
  """One attention layer: ``B`` sequences of ``T`` tokens, ``H`` query / ``G`` kv heads of dim ``D``."""

  B: int
  T: int
  H: int
  G: int
  D: int
  dtype_bytes: int = 2

  def flops(self, area, heads: int | None = None):
    """Forward matmul FLOPs of ``area`` allowed pairs (``4 B heads D area``)."""
    return 4.0 * self.B * (self.H if heads is None else heads) * self.D * np.asarray(area, np.float64)


@dataclasses.dataclass(frozen=True)
class Estimate:
  """The model's numbers for one (strategy, P) on one hardware (per device; times in seconds).

  ``flops_fwd_max`` is the busiest device's forward FLOPs; ``bytes_fwd`` / ``bytes_bwd`` what one device sends;
  ``imbalance`` max/mean attended area; ``steps`` ring steps run (0 for non-ring); ``kv_resident`` the K/V bytes
  a device holds at once (its own included).
  """

  strategy: str
  layout: str
  feasible: bool
  note: str
  flops_fwd_max: float
  flops_fwd_total: float
  bytes_fwd: float
  bytes_bwd: float
  imbalance: float
  steps: int
  t_fwd: float
  t_fwd_bwd: float
  kv_resident: float


def _ring(prob: Problem, hw: Hardware, M: np.ndarray, P: int, heads: int, kv_heads: int, T: int,
          extra_fwd: float = 0.0, extra_bwd: float = 0.0, extra_bytes: float = 0.0, layout: str = "zigzag",
          name: str = "ring", note: str = "") -> Estimate:
  """Ring over ``P`` devices given the device-pair areas ``M`` (for ``heads`` local query heads)."""
  r = np.arange(P)
  steps_area = np.stack([M[r, (r - s) % P] for s in range(P)], 1)  # [device, step]
  used = np.nonzero(steps_area.any(0))[0]
  n = int(used[-1]) + 1 if len(used) else 1
  kv_bytes = 2.0 * prob.B * (T // P) * kv_heads * prob.D * prob.dtype_bytes
  comp_fwd = prob.flops(steps_area[:, :n].max(0), heads) / (hw.attn_tflops_fwd * 1e12)  # [n]
  comp_bwd = BWD_FACTOR * prob.flops(steps_area[:, :n].max(0), heads) / (hw.attn_tflops_bwd * 1e12)
  hop = hw.p2p_seconds(kv_bytes, P)
  dkv_hop = hw.p2p_seconds(2 * kv_bytes, P)  # f32 accumulators
  send = np.array([hop if s < n - 1 else 0.0 for s in range(n)])
  t_fwd = float(np.maximum(comp_fwd, send).sum())
  t_bwd = float(np.maximum(comp_bwd, send + dkv_hop).sum())  # dK/dV leave after each step, overlapping the next
  area = M.sum(1)
  return Estimate(name, layout, True, note, float(prob.flops(area.max(), heads)), float(prob.flops(area.sum(), heads)),
                  (n - 1) * kv_bytes + extra_bytes, (n - 1) * kv_bytes + n * 2 * kv_bytes + extra_bytes,
                  imbalance(area), n, t_fwd + extra_fwd, t_fwd + t_bwd + extra_fwd + extra_bwd,
                  3 * kv_bytes)


def estimate(strategy: str, prob: Problem, hw: Hardware, A2P: np.ndarray, P: int, layout: str = "zigzag"
             ) -> Estimate:
  """The model for ``strategy`` at ``P`` devices. ``A2P``: the ``2P x 2P`` chunk pair areas of the mask."""
  T, B, H, G, D, e = prob.T, prob.B, prob.H, prob.G, prob.D, prob.dtype_bytes
  total_area = float(A2P.sum())
  if strategy == "ring":
    return _ring(prob, hw, device_pair_areas(A2P, P, layout), P, H, G, T, layout=layout)
  if strategy == "all_gather":
    M = device_pair_areas(A2P, P, layout)
    area = M.sum(1)
    shard = 2.0 * B * (T // P) * G * D * e
    t_gather = hw.all_gather_seconds(shard, P)
    f_max = float(prob.flops(area.max()))
    t_fwd = t_gather + f_max / (hw.attn_tflops_fwd * 1e12)
    t_bwd = BWD_FACTOR * f_max / (hw.attn_tflops_bwd * 1e12) + t_gather  # reduce-scatter of dK/dV
    return Estimate("all_gather", layout, True, "", f_max, float(prob.flops(area.sum())), (P - 1) * shard,
                    (P - 1) * shard, imbalance(area), 0, t_fwd, t_fwd + t_bwd, P * shard)
  if strategy == "ulysses":
    if H % P:
      return Estimate("ulysses", "-", False, f"H={H} < P={P}" if H < P else f"H={H} % P={P} != 0", math.nan,
                      math.nan, math.nan, math.nan, 1.0, 0, math.nan, math.nan, math.nan)
    g_eff = G if G % P == 0 else math.lcm(G, P)
    q_local = B * (T // P) * H * D * e
    kv_local = 2.0 * B * (T // P) * g_eff * D * e
    t_in = hw.all_to_all_seconds(q_local + kv_local, P)
    t_out = hw.all_to_all_seconds(q_local, P)
    f = float(prob.flops(total_area)) / P
    t_fwd = t_in + f / (hw.attn_tflops_fwd * 1e12) + t_out
    t_bwd = t_out + BWD_FACTOR * f / (hw.attn_tflops_bwd * 1e12) + t_in  # dO in; dQ, dK, dV out
    sent = (2 * q_local + kv_local) * (P - 1) / P
    note = f"kv heads x{g_eff // G}" if g_eff != G else ""
    return Estimate("ulysses", "-", True, note, f, f * P, sent, sent, 1.0, 0, t_fwd, t_fwd + t_bwd,
                    B * T * g_eff / P * D * e * 2)
  if strategy == "usp":
    pu = max(d for d in range(1, min(P, hw.node_size if not hw.torus else 8, H) + 1) if P % d == 0 and H % d == 0)
    pr = P // pu
    g_eff = G if G % pu == 0 else math.lcm(G, pu)
    q_local = B * (T // P) * H * D * e
    kv_local = 2.0 * B * (T // P) * g_eff * D * e
    # the all-to-alls stay inside a Ulysses group (one node / one torus neighbourhood)
    t_in = hw.all_to_all_seconds(q_local + kv_local, pu)
    t_out = hw.all_to_all_seconds(q_local, pu)
    A_r = coarsen(A2P, 2 * pr)
    est = _ring(prob, hw, device_pair_areas(A_r, pr, layout), pr, H // pu, g_eff // pu, T,
                extra_fwd=t_in + t_out, extra_bwd=t_in + t_out,
                extra_bytes=(2 * q_local + kv_local) * (pu - 1) / pu, layout=layout, name="usp",
                note=f"{pu}x{pr} (ulysses x ring)")
    return est
  raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")


def ideal_seconds(prob: Problem, hw: Hardware, total_area: float, P: int, mode: str) -> float:
  """Perfectly balanced compute with free communication: the bound every strategy is compared to."""
  f = float(prob.flops(total_area)) / P
  t = f / (hw.attn_tflops_fwd * 1e12)
  return t if mode == "fwd" else t + BWD_FACTOR * f / (hw.attn_tflops_bwd * 1e12)
