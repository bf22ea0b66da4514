"""Input checks shared by the public ops: done once, at the boundary, with messages naming the values."""

from __future__ import annotations

import jax.numpy as jnp

FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def validate_qkv(q, k, v, *, same_length: str | None = None) -> None:
  """Checks ``q [B, T, H, D]``, ``k [B, S, G, D]``, ``v [B, S, G, E]`` with ``H % G == 0``.

  Args:
    same_length: when set, ``S`` must equal ``T``; the text says why (it starts the error message).

  Raises:
    ValueError: naming the offending shapes or dtypes.
  """
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 ([B, T|S, heads, dim]), got shape {x.shape}")
    if x.dtype not in FLOATS:
      raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  (B, T, H, D), (Bk, S, G, Dk), (Bv, Sv, Gv, E) = q.shape, k.shape, v.shape
  if not B == Bk == Bv:
    raise ValueError(f"batch sizes differ: q {B}, k {Bk}, v {Bv}")
  if S != Sv:
    raise ValueError(f"k has length {S} but v has length {Sv}")
  if same_length is not None and S != T:
    raise ValueError(f"{same_length}, got q length {T} and k/v length {S}")
  if G != Gv:
    raise ValueError(f"k has {G} kv heads but v has {Gv}")
  if D != Dk:
    raise ValueError(f"q has head dim {D} but k has {Dk}")
  if min(B, T, H, D, S, G, E) == 0:
    raise ValueError(f"empty dimension in q {q.shape}, k {k.shape} or v {v.shape}")
  if H % G:
    raise ValueError(f"q has {H} heads, not a multiple of k's {G} kv heads")
