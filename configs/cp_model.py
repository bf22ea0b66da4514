"""Presets for ``python -m experiments cp_model``: the context-parallel cost model's sweep (frozen dataclasses).

The default follows the Long-Context Attention Benchmark's CP settings (Bu et al., arXiv:2510.17896: B=1,
64 query heads, 8 kv heads, head dim 128, bf16) at P in {8, 64, 512} devices and T up to 1M tokens.
"""

from __future__ import annotations

import dataclasses

MASK_KINDS = ("full", "causal", "sliding_window", "causal_document", "full_document")
HARDWARE = ("h100", "h200", "tpu_v5p")


@dataclasses.dataclass(frozen=True)
class CPModelPreset:
  """One sweep of the cost model.

  Attributes:
    name: preset id (``--preset``).
    devices: context-parallel degrees ``P``.
    seq_lens: global sequence lengths ``T`` (each a multiple of ``2 * max(devices)``).
    masks: mask kinds from :data:`MASK_KINDS`.
    hardware: hardware ids from :data:`HARDWARE`.
    B, H, G, D: batch, query heads, kv heads, head dim (``E = D``).
    dtype_bytes: bytes per element of q, k, v, o (2 = bf16).
    window: causal sliding-window length for ``"sliding_window"``.
    doc_mean: mean document length for the document masks (log-normal lengths, ``masks.sample_document_lengths``).
    seed: document-length seed.
    description: one line for ``--help`` and the report.
  """

  name: str
  devices: tuple[int, ...]
  seq_lens: tuple[int, ...]
  masks: tuple[str, ...] = ("full", "causal", "sliding_window", "causal_document")
  hardware: tuple[str, ...] = HARDWARE
  B: int = 1
  H: int = 64
  G: int = 8
  D: int = 128
  dtype_bytes: int = 2
  window: int = 4096
  doc_mean: int = 16384
  seed: int = 0
  description: str = ""

  def __post_init__(self):
    for m in self.masks:
      if m not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {m!r}; choose from {MASK_KINDS}")
    for h in self.hardware:
      if h not in HARDWARE:
        raise ValueError(f"unknown hardware {h!r}; choose from {HARDWARE}")
    for f in ("B", "H", "G", "D", "dtype_bytes", "window", "doc_mean"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"CPModelPreset.{f} must be a positive int, got {v!r}")
    if self.H % self.G:
      raise ValueError(f"H={self.H} is not a multiple of G={self.G}")
    if not self.devices or not self.seq_lens:
      raise ValueError("devices and seq_lens must be non-empty")
    p_max = max(self.devices)
    for t in self.seq_lens:
      if t % (2 * p_max):
        raise ValueError(f"seq_len {t} is not a multiple of 2 * max(devices) = {2 * p_max}")
    for p in self.devices:
      if (2 * p_max) % (2 * p):
        raise ValueError(f"device count {p} does not divide the largest one {p_max}")


DEFAULT = CPModelPreset(
    "default", devices=(8, 64, 512), seq_lens=(32768, 131072, 524288, 1048576),
    description="B=1, H=64, G=8, D=128, bf16; P in {8, 64, 512}; T in {32K, 128K, 512K, 1M}; H100, H200, TPU v5p")
TINY = CPModelPreset(
    "tiny", devices=(2, 4), seq_lens=(256, 1024), masks=("full", "causal", "sliding_window", "causal_document"),
    hardware=("h100", "tpu_v5p"), H=8, G=2, D=16, window=32, doc_mean=100,
    description="tiny shapes for tests (well under a second)")

PRESETS: dict[str, CPModelPreset] = {p.name: p for p in (DEFAULT, TINY)}
