"""Hardware parameters of the context-parallel cost model, with where each number comes from.

Attention throughput (the rate the local attention kernel sustains) is taken from measurements where we have them:
cuDNN softmax attention via ``jax.nn.dot_product_attention``, measured by the project on one H200 (2026-11-27, jax
0.11.2, CUDA 13), ran at 570-650 TFLOP/s forward and 496-553 TFLOP/s forward+backward (bf16, D=128, FLOPs counted
as in :mod:`experiments.bench.flops`). The H100 uses the same rates: it is the same GH100 compute die at the same
clocks, and attention at D=128 is compute-bound (the H200's extra HBM bandwidth and capacity do not change it);
published H100 numbers for cuDNN/FA3-class kernels are 540-680 TFLOP/s forward (FlashAttention-3, Shah et al. 2024,
arXiv:2407.08608, and MagiAttention's benchmark charts), consistent with this. TPU v5p numbers are public
specifications (Google Cloud TPU v5p page: 459 TFLOP/s bf16, 2,765 GB/s HBM, 4,800 Gbps ICI per chip) plus the
splash-attention forward rate derived from the autotuning cache shipped with tokamax (openxla/tokamax: 343 TFLOP/s
causal, 410 non-causal at D=128); its backward rate is an assumption (no published number).

Links: an H100/H200 HGX node has 8 GPUs on NVLink 4 / NVSwitch (900 GB/s bidirectional per GPU, so 450 GB/s each
way) and one 400 Gb/s InfiniBand NDR NIC per GPU between nodes (50 GB/s each way) - NVIDIA's public specifications.
A TPU v5p chip has 6 ICI links in a 3-D torus; 4,800 Gbps / 6 = 100 GB/s per link, which we assume is per direction.
Latency per message: 5 us (NVLink / ICI) and 10 us (InfiniBand), round numbers, not measurements.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["Hardware", "HARDWARE", "get"]


@dataclasses.dataclass(frozen=True)
class Hardware:
  """One accelerator kind and its interconnect, as the model sees it.

  Attributes:
    name: display name.
    attn_tflops_fwd: sustained softmax-attention forward rate (TFLOP/s, bf16, D=128).
    attn_tflops_bwd: sustained backward rate (backward FLOPs = 2.5 x forward).
    peak_tflops: dense bf16 peak (for reference only).
    hbm_gb: memory per device (GB).
    node_size: devices per fast domain (GPUs per NVLink node; a TPU slice is one domain).
    intra_gbps: per-direction bandwidth between two devices of a node (GB/s).
    inter_gbps: per-direction bandwidth of a device to other nodes (GB/s; GPUs only).
    links: links per device usable at once by all-gather / all-to-all (TPU torus: 6; GPUs: 1 NVSwitch port).
    torus: whether devices form a 3-D torus (all-to-all limited by bisection bandwidth).
    intra_latency_us, inter_latency_us: per-message latency.
    source: where the numbers come from (one line).
  """

  name: str
  attn_tflops_fwd: float
  attn_tflops_bwd: float
  peak_tflops: float
  hbm_gb: float
  node_size: int
  intra_gbps: float
  inter_gbps: float
  links: int
  torus: bool
  intra_latency_us: float
  inter_latency_us: float
  source: str

  # -------------------------------------------------------------------------------------------- transfer times
  def p2p_seconds(self, nbytes: float, P: int) -> float:
    """One ring step: every device sends ``nbytes`` to its neighbour at once; the slowest link sets the pace."""
    if P <= 1 or nbytes <= 0:
      return 0.0
    if self.torus or P <= self.node_size:
      return nbytes / (self.intra_gbps * 1e9) + self.intra_latency_us * 1e-6
    return nbytes / (self.inter_gbps * 1e9) + self.inter_latency_us * 1e-6

  def all_gather_seconds(self, shard_bytes: float, P: int) -> float:
    """All-gather of ``shard_bytes`` per device (each receives ``(P - 1) * shard_bytes``).

    GPUs: ring algorithm, ``P - 1`` steps over the slowest link in the ring. TPU: injection-bound over all links
    (``(P - 1) * shard_bytes / (links * link_bw)``, optimistic), plus ``log2(P)`` latencies.
    """
    if P <= 1:
      return 0.0
    if self.torus:
      return ((P - 1) * shard_bytes / (self.links * self.intra_gbps * 1e9)
              + math.ceil(math.log2(P)) * self.intra_latency_us * 1e-6)
    return (P - 1) * self.p2p_seconds(shard_bytes, P)

  def all_to_all_seconds(self, local_bytes: float, P: int) -> float:
    """All-to-all where each device holds ``local_bytes`` and keeps ``1/P`` of it.

    GPUs: the intra-node part over NVLink and the inter-node part over the NIC run concurrently (max of the two).
    TPU (``k x k x k`` torus, ``P = k^3``): max of injection (``sent / (6 link_bw)``) and bisection
    (``P * sent / 4`` crossing ``2 k^2`` links each way).
    """
    if P <= 1:
      return 0.0
    sent = local_bytes * (P - 1) / P
    if self.torus:
      k = round(P ** (1 / 3))
      bisection_links = 2 * max(k, 1) ** 2
      t = max(sent / (self.links * self.intra_gbps * 1e9),
              P * sent / 4 / (bisection_links * self.intra_gbps * 1e9))
      return t + self.intra_latency_us * 1e-6
    if P <= self.node_size:
      return sent / (self.intra_gbps * 1e9) + self.intra_latency_us * 1e-6
    intra = local_bytes * (self.node_size - 1) / P
    inter = local_bytes * (P - self.node_size) / P
    return max(intra / (self.intra_gbps * 1e9), inter / (self.inter_gbps * 1e9)) + self.inter_latency_us * 1e-6


_GPU_SOURCE = ("attention rates measured on an H200 (cuDNN via jax.nn, bf16 D=128, 2026-11-27); NVLink 4 "
               "450 GB/s/direction, IB NDR 400 Gb/s per GPU (NVIDIA specs)")
HARDWARE: dict[str, Hardware] = {
    "h100": Hardware("H100 SXM (HGX, 8/node)", 600.0, 530.0, 989.0, 80.0, 8, 450.0, 50.0, 1, False, 5.0, 10.0,
                     _GPU_SOURCE + "; H100 assumed equal to H200 for compute-bound attention"),
    "h200": Hardware("H200 SXM (HGX, 8/node)", 600.0, 530.0, 989.0, 141.0, 8, 450.0, 50.0, 1, False, 5.0, 10.0,
                     _GPU_SOURCE),
    "tpu_v5p": Hardware("TPU v5p (3-D torus)", 343.0, 300.0, 459.0, 95.0, 1 << 30, 100.0, 100.0, 6, True, 5.0, 5.0,
                        "public specs (459 TF/s bf16, 95 GB HBM, 4,800 Gbps ICI/chip = 6 x 100 GB/s assumed per "
                        "direction); fwd rate from tokamax's splash autotuning cache; bwd rate assumed"),
}


def get(name: str) -> Hardware:
  """The :class:`Hardware` with id ``name`` (``"h100"``, ``"h200"``, ``"tpu_v5p"``)."""
  try:
    return HARDWARE[name]
  except KeyError:
    raise ValueError(f"unknown hardware {name!r}; choose from {sorted(HARDWARE)}") from None
