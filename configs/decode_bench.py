"""Presets for ``python -m experiments decode_bench``: decode-step time against context length, dense vs sparse.

Every case is one :func:`jaxattn.decode_attention` call (one query token per sequence) over a cache of ``L`` keys,
dense (every key) and sparse over ``K = L / sparse_ratio`` gathered key positions, in two layouts: ``pages``
(whole ``page`` -token pages, what Quest selects) and ``tokens`` (scattered positions, what a top-k selection
gives). The anchor is ``jax.nn.dot_product_attention`` with a one-token query over the same cache.
"""

from __future__ import annotations

import dataclasses

LAYOUTS = ("pages", "tokens")


@dataclasses.dataclass(frozen=True)
class DecodeBenchPreset:
  """One sweep.

  Attributes:
    name: preset id (``--preset``).
    lengths: cache lengths ``L`` (each a multiple of ``page * sparse_ratio``).
    B, H, G, D: batch, query heads, kv heads, head dim (``E = D``).
    dtype: ``"float32"`` or ``"bfloat16"``.
    sparse_ratio: ``L / K`` of the sparse cases (8: the issue's ``K = L / 8``).
    page: page size of the ``pages`` layout.
    layouts: sparse layouts from :data:`LAYOUTS`.
    repeats: timed samples per case (median reported).
    description: one line for ``--help``.
  """

  name: str
  lengths: tuple[int, ...]
  B: int = 1
  H: int = 8
  G: int = 2
  D: int = 128
  dtype: str = "float32"
  sparse_ratio: int = 8
  page: int = 64
  layouts: tuple[str, ...] = LAYOUTS
  repeats: int = 10
  description: str = ""

  def __post_init__(self):
    for f in ("B", "H", "G", "D", "sparse_ratio", "page", "repeats"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"DecodeBenchPreset.{f} must be a positive int, got {v!r}")
    if self.H % self.G:
      raise ValueError(f"DecodeBenchPreset: H={self.H} is not a multiple of G={self.G}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"DecodeBenchPreset.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    for lay in self.layouts:
      if lay not in LAYOUTS:
        raise ValueError(f"unknown layout {lay!r}; choose from {LAYOUTS}")
    if not self.lengths:
      raise ValueError("DecodeBenchPreset.lengths is empty")
    for L in self.lengths:
      if not isinstance(L, int) or L < 1 or L % (self.page * self.sparse_ratio):
        raise ValueError(f"length {L!r} must be a positive multiple of page * sparse_ratio = "
                         f"{self.page * self.sparse_ratio}")


PRESETS: dict[str, DecodeBenchPreset] = {p.name: p for p in (
    DecodeBenchPreset("cpu", lengths=(4096, 8192, 16384, 32768), description="CPU: f32, B=1, H=8, G=2, D=128, "
                      "L in 4K..32K, K = L/8 (about a minute)"),
    DecodeBenchPreset("gpu", lengths=(8192, 32768, 131072), B=8, H=32, G=8, dtype="bfloat16", repeats=20,
                      description="GPU / TPU: bf16, B=8, H=32, G=8, D=128, L in 8K..128K, K = L/8"),
    DecodeBenchPreset("test", lengths=(1024, 2048), H=4, D=32, repeats=2, page=16, description="seconds; tests"),
)}
