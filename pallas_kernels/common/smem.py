"""Shared memory per thread block on NVIDIA GPUs: the limits the Triton kernels' tiles are chosen against.

A Triton kernel whose static shared-memory allocation exceeds the device's opt-in limit per block does not launch
(XLA reports ``RESOURCE_EXHAUSTED: Shared memory size limit exceeded: requested N, available: M``). The kernel
families model their allocation (e.g. :mod:`pallas_kernels.landmark.budget`) and pick tiles that fit
:func:`smem_limit`.

Limits (``cudaDevAttrMaxSharedMemoryPerBlockOptin``, CUDA programming guide, compute capabilities table):
Hopper sm_90 (H100, H200) and Blackwell sm_100: 227 KiB; Ampere sm_80 / sm_87 (A100, Orin): 163 KiB; other sm_8x
and sm_120 (A10, L4, L40, RTX): 99 KiB; Volta sm_70: 96 KiB; Turing sm_75: 64 KiB.
"""

from __future__ import annotations

import contextlib
import contextvars

__all__ = ["HOPPER_SMEM_BYTES", "AMPERE_SMEM_BYTES", "ADA_SMEM_BYTES", "smem_limit_for", "smem_limit",
           "use_smem_limit"]

HOPPER_SMEM_BYTES = 232448  # sm_90 / sm_100: 227 KiB per block (opt-in)
AMPERE_SMEM_BYTES = 166912  # sm_80 / sm_87: 163 KiB
ADA_SMEM_BYTES = 101376  # sm_86 / sm_89 / sm_120: 99 KiB

_BY_CAPABILITY = {
    (7, 0): 98304, (7, 2): 98304, (7, 5): 65536,
    (8, 0): AMPERE_SMEM_BYTES, (8, 7): AMPERE_SMEM_BYTES, (8, 6): ADA_SMEM_BYTES, (8, 9): ADA_SMEM_BYTES,
    (9, 0): HOPPER_SMEM_BYTES, (10, 0): HOPPER_SMEM_BYTES, (10, 3): HOPPER_SMEM_BYTES, (12, 0): ADA_SMEM_BYTES,
}


def smem_limit_for(compute_capability: str | tuple[int, int]) -> int:
  """The opt-in shared memory per block of a compute capability (``"9.0"`` or ``(9, 0)``); unknown ones get the
  smallest limit of their major version's known cards (unknown majors: the Ampere-class 99 KiB)."""
  if isinstance(compute_capability, str):
    major, _, minor = compute_capability.partition(".")
    cc = (int(major), int(minor or 0))
  else:
    cc = tuple(compute_capability)
  if cc in _BY_CAPABILITY:
    return _BY_CAPABILITY[cc]
  same_major = [v for (ma, _), v in _BY_CAPABILITY.items() if ma == cc[0]]
  return min(same_major) if same_major else ADA_SMEM_BYTES


_OVERRIDE: contextvars.ContextVar[int | None] = contextvars.ContextVar("jaxattn_smem_limit", default=None)


@contextlib.contextmanager
def use_smem_limit(limit: int):
  """Choose tiles for a GPU with ``limit`` bytes per block (ahead-of-time compiles for a card that is not here)."""
  if not isinstance(limit, int) or limit <= 0:
    raise ValueError(f"limit must be a positive int (bytes), got {limit!r}")
  token = _OVERRIDE.set(limit)
  try:
    yield
  finally:
    _OVERRIDE.reset(token)


def smem_limit() -> int:
  """The limit set by :func:`use_smem_limit`, else the local GPU's (its compute capability), else Hopper's.

  Without a GPU the kernels are only compiled ahead of time (``python -m experiments gpu_compile`` targets sm_90
  unless told otherwise), so Hopper's limit is the default there.
  """
  if _OVERRIDE.get() is not None:
    return _OVERRIDE.get()
  import jax  # lazy: this module stays importable without initialising jax's backends

  if jax.default_backend() not in ("gpu", "cuda"):
    return HOPPER_SMEM_BYTES
  cc = getattr(jax.devices()[0], "compute_capability", None)
  return smem_limit_for(cc) if cc else HOPPER_SMEM_BYTES
