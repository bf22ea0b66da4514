"""Argument checks shared by the NNX modules (errors name the offending value)."""

from __future__ import annotations

import numpy as np

__all__ = ["positive_int", "head_layout"]


def positive_int(name: str, value) -> int:
  """``value`` as an int; ValueError unless it is a positive int (bools refused)."""
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def head_layout(num_heads, in_features, num_kv_heads, head_dim, out_features) -> tuple[int, int, int, int, int]:
  """Checked ``(num_heads, in_features, num_kv_heads, head_dim, out_features)`` of a multi-head layer.

  ``num_kv_heads`` None means ``num_heads``; ``head_dim`` None means ``in_features // num_heads`` (which must
  divide); ``out_features`` None means ``in_features``.
  """
  H = positive_int("num_heads", num_heads)
  in_features = positive_int("in_features", in_features)
  G = positive_int("num_kv_heads", H if num_kv_heads is None else num_kv_heads)
  if H % G:
    raise ValueError(f"num_heads ({H}) must be a multiple of num_kv_heads ({G})")
  if head_dim is None:
    if in_features % H:
      raise ValueError(f"in_features ({in_features}) is not divisible by num_heads ({H}); pass head_dim explicitly")
    head_dim = in_features // H
  head_dim = positive_int("head_dim", head_dim)
  out_features = positive_int("out_features", in_features if out_features is None else out_features)
  return H, in_features, G, head_dim, out_features
