"""``implementation="pallas_tpu"``: chunked linear attention with Pallas Mosaic kernels on TPUs, plus its FLOP /
HBM-byte counts and a TPU roofline estimate.

Three kernels from :mod:`pallas_kernels.linear.tpu`, joined by :func:`jaxattn.backend.flash_vjp` through the shared
``fwd`` / ``bwd`` of :mod:`jaxattn.ops.linear.pallas_common`: forward (grid ``(B, H, chunks)``, the f32 state in
VMEM scratch, the chunk axis "arbitrary"), dq (the same forward sweep recomputing the state) and dk/dv (reverse sweep
with the state cotangent, grid ``(B, G, chunks, H // G)``: the query heads of a kv head are summed in-kernel). The
log-decay gradient is a small XLA epilogue over per-token terms the kernels emit (exact identity, see
``pallas_common``).

Supports: causal linear attention with no decay, a per-head constant ``[H]`` or a per-token gate ``[B, T, H]``
(``-inf`` = reset), initial and final states, GQA/MQA (K/V through the index maps, never repeated), any ``T``
(zero-padded to whole chunks), any head dims (multiples of 128 are read in place, others through one transpose),
f32 and bf16. ``supports`` refuses (the dispatcher then falls back to ``"xla"``): ``causal=False`` (two matmuls in
XLA), float16 inputs (no f16 MXU path), platforms other than TPU and CPU. On a CPU backend the kernels run in Pallas
TPU interpret mode (slow: for tests and users without the hardware); ``implementation=None`` never picks it there.

Config: :class:`~jaxattn.ops.linear.config.PallasTpuConfig` (default chunk 128, or ``T`` rounded up to the sublane
multiple; a chunk that breaks the TPU tiling rule, i.e. not a multiple of 8 for f32 / 16 for bf16 while ``T`` spans
several chunks, raises ``ValueError``).

No TPU timing of these kernels exists; :func:`kernel_cost` gives the roofline estimate.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxattn.ops.linear.config import LinearCall, PallasTpuConfig, check_positive_int
from jaxattn.ops.linear.pallas_common import PallasLinearBackend
from jaxattn.backend import config_error
from pallas_kernels.common import TPU_SPECS
from pallas_kernels.linear import tpu

__all__ = ["PallasTpuBackend", "BACKEND", "chunk_for", "kernel_cost"]


def chunk_for(T: int, dtype, chunk_size: int | None = None) -> int:
  """The chunk the kernels run with: ``chunk_size``, or the default for ``T`` and ``dtype``.

  Raises:
    ValueError: for a chunk that breaks the TPU tiling rule (not a multiple of the sublane multiple of ``dtype``
      while shorter than ``T``).
  """
  if chunk_size is None:
    return tpu.default_chunk(T, dtype)
  m = tpu.sublane_multiple(dtype)
  if chunk_size < T and chunk_size % m:
    raise config_error("pallas_tpu: PallasTpuConfig", "chunk_size", chunk_size,
                       f"must be a multiple of {m} for {jnp.dtype(dtype).name} (the TPU tiling rule) or cover T={T}")
  return int(chunk_size)


class PallasTpuBackend(PallasLinearBackend):
  """The Mosaic chunk kernels (TPU interpret mode on CPU)."""

  name = "pallas_tpu"
  Config = PallasTpuConfig
  kernel_platform = "tpu"

  def supports(self, call: LinearCall) -> str | None:
    reason = self.platform_reason(call)
    if reason is None and call.dtype == "float16":
      reason = "pallas_tpu takes float32 or bfloat16 inputs, not float16"
    return reason

  def default_config(self, call: LinearCall) -> PallasTpuConfig:
    return PallasTpuConfig(chunk_size=tpu.default_chunk(call.T, call.dtype))

  def validate_config(self, call: LinearCall, config: PallasTpuConfig) -> None:
    check_positive_int(f"{self.name}: {type(config).__name__}", "chunk_size", config.chunk_size)
    chunk_for(call.T, call.dtype, config.chunk_size)

  def _kw(self, call, config):
    return dict(scale=call.scale, chunk=config.chunk_size, interpret=self.interpret())

  def kernel_fwd(self, call, config, q, k, v, log_decay, initial_state):
    return tpu.linear_fwd(q, k, v, log_decay, initial_state, **self._kw(call, config))

  def kernel_dq(self, call, config, q, k, v, log_decay, initial_state, do, log_decay_grad):
    return tpu.linear_bwd_dq(q, k, v, log_decay, initial_state, do, log_decay_grad=log_decay_grad,
                             **self._kw(call, config))

  def kernel_dkv(self, call, config, q, k, v, log_decay, do, d_final_state, log_decay_grad):
    return tpu.linear_bwd_dkv(q, k, v, log_decay, do, d_final_state, log_decay_grad=log_decay_grad,
                              **self._kw(call, config))


BACKEND = PallasTpuBackend()


# =================================================================================================== cost model
def kernel_cost(B: int, T: int, H: int, D: int, *, G: int | None = None, E: int | None = None, dtype=jnp.bfloat16,
                chunk: int | None = None, decay: str | None = "head", decay_grad: bool = True,
                initial_state: bool = False) -> dict:
  """FLOPs and HBM bytes of the pallas_tpu kernels for one call, with a TPU roofline estimate.

  Counts follow the kernels: per chunk of ``C`` tokens and query head, the forward and dq kernels each run
  ``2 C^2 (D + E) + 4 C D E`` matmul FLOPs (two ``C x C`` products, two state products) and the dk/dv kernel
  ``4 C^2 (D + E) + 6 C D E`` (four and three), over padded chunks; when the log decay is differentiated with
  bf16 inputs, each backward kernel runs two more ``C D E`` products (the ``hi + lo`` split of its state
  operands). Bytes count every block copy the Pallas pipeline
  issues: q / do / outputs once per step; K and V once per query head in the forward and dq kernels (the chunk axis
  is innermost, so the block index changes every step) and once per kv head in the dk/dv kernel (query heads are
  innermost there); decay sums and ``rq`` / ``rk`` as lane-dense ``(8, C)`` f32 blocks once per 8 chunks; the
  ``[D, E]`` f32 states where they are read or written. ``glue_bytes`` is the XLA work around the kernels (the
  chunk cumulative sums of per-token gates, the ``[B, H, T, F]`` transposes for head dims that are not multiples
  of 128, the log-decay-gradient epilogue) and is included in the roofline.

  Roofline: ``time = max(FLOPs / peak, bytes / bandwidth)`` per kernel, summed, plus ``glue_bytes / bandwidth``,
  with the public spec-sheet numbers in :data:`TPU_SPECS` (v5e: 197 TFLOP/s bf16, 819 GB/s HBM; v5p: 459 TFLOP/s,
  2765 GB/s). It ignores the exp throughput (EUP), VMEM/vreg pressure, the per-step pipeline overhead (the Pallas
  TPU docs quote ~0.35 us per grid step) and the f32 matmul cost (f32 counts at the bf16 peak), so real kernels run
  slower; no TPU timing exists.

  Args:
    B, T, H, D: batch, length, query heads, key dim; G kv heads (default H), E value dim (default D).
    dtype: input dtype (bf16 or f32).
    chunk: the kernels' chunk (default as :func:`chunk_for`).
    decay: None, ``"head"`` (per-head constant) or ``"token"`` (per-token gate).
    decay_grad: whether the log decay is differentiated (the backward then emits and reads the ``rq`` / ``r``
      terms, and splits bf16 state operands).
    initial_state: whether an initial state is read.

  Returns:
    ``{"forward": {...}, "backward": {...}, "roofline": {"v5e": {...}, "v5p": {...}}, "chunk": C}``; each pass
    holds ``flops``, ``bytes`` and its kernels' entries; the roofline holds seconds per pass, the bound and the
    achieved FLOP rate at the bound.
  """
  if decay not in (None, "head", "token"):
    raise ValueError(f"decay must be None, 'head' or 'token', got {decay!r}")
  G, E = G or H, E or D
  it = jnp.dtype(dtype).itemsize
  C = chunk_for(T, dtype, chunk)
  N = -(-T // C)
  Tp, N8 = N * C, -(-N // 8) * 8
  rows = B * H * N8 * C * 4  # one lane-dense f32 [B|1, H, N8, C] array
  state = B * H * D * E * 4
  dec = 0 if decay is None else rows  # decay-sum blocks, re-read per (batch, head) also when shared by the batch
  intra, inter = 2 * C * C * (D + E), 2 * C * D * E
  steps = B * H * N
  with_r = decay is not None and decay_grad
  split = 2 * inter if (with_r and jnp.dtype(dtype).itemsize == 2) else 0  # hi + lo state products
  r_rows = rows if with_r else 0

  def kernel(flops, nbytes):
    return dict(flops=flops, bytes=nbytes)

  # forward: q in, out written; K and V re-read per query head; decay sums; final state (+ initial state)
  fwd = kernel(steps * (intra + 2 * inter),
               B * H * Tp * (D + E) * it + B * H * Tp * (D + E) * it + dec + state * (1 + initial_state))
  # dq: q, do in, dq out; K and V per query head; decay sums; rq out (+ initial state)
  dq = kernel(steps * (intra + 2 * inter + split),
              B * H * Tp * (2 * D + E) * it + B * H * Tp * (D + E) * it + dec + r_rows + state * initial_state)
  # dk/dv: q, do per query head; K, V in and dK, dV out once per kv head; decay sums; r out; dS_T in, dS_0 out
  dkv = kernel(steps * (2 * intra + 3 * inter + split),
               B * H * Tp * (D + E) * it + 2 * B * G * Tp * (D + E) * it + dec + r_rows + 2 * state)
  glue_f = glue_b = 0
  if decay == "token":
    glue_f = glue_b = B * T * H * 4 + rows  # read g, write the chunk sums (recomputed in the backward)
  if D % 128:
    glue_f += 2 * (B * T * H * D + B * T * G * D) * it  # q, k transposed in
    glue_b += 2 * (B * T * H * D + B * T * G * D) * it + 2 * (B * T * H * D + B * T * G * D) * it  # + dq, dk out
  if E % 128:
    glue_f += 2 * (B * T * G * E + B * T * H * E) * it  # v in, out back
    glue_b += 2 * (B * T * G * E + B * T * H * E) * it + 2 * B * T * G * E * it  # v, do in; dv out
  if with_r:
    glue_b += 2 * B * H * T * 4 + 2 * state + B * T * H * 4  # rq, r, S_T, dS_T in; dlog_decay out
  forward = dict(fwd, glue_bytes=glue_f, bytes=fwd["bytes"] + glue_f)
  backward = dict(flops=dq["flops"] + dkv["flops"], bytes=dq["bytes"] + dkv["bytes"] + glue_b, glue_bytes=glue_b,
                  dq=dq, dkv=dkv)

  def t(c, peak, bw):
    return max(c["flops"] / peak, c["bytes"] / bw)

  roof = {}
  for name, (peak, bw) in TPU_SPECS.items():
    tf = t(fwd, peak, bw) + glue_f / bw
    tb = t(dq, peak, bw) + t(dkv, peak, bw) + glue_b / bw
    roof[name] = dict(forward_s=tf, backward_s=tb, forward_backward_s=tf + tb,
                      forward_bound="compute" if fwd["flops"] / peak >= fwd["bytes"] / bw else "memory",
                      dkv_bound="compute" if dkv["flops"] / peak >= dkv["bytes"] / bw else "memory",
                      forward_tflops=fwd["flops"] / tf / 1e12,
                      forward_backward_tflops=(fwd["flops"] + backward["flops"]) / (tf + tb) / 1e12)
  return dict(forward=forward, backward=backward, roofline=roof, chunk=C)
