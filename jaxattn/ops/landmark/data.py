"""Landmark token layout: insert a landmark after every ``block_size - 1`` regular tokens, and map back.

A sequence of ``N`` regular tokens becomes ``M = N + N // (block_size - 1)`` tokens: regular token ``t`` sits at
``t + t // (block_size - 1)`` and a landmark follows every complete group of ``block_size - 1`` regular tokens (the
last group too), so position ``j`` holds a landmark iff ``(j + 1) % block_size == 0``, the layout
:func:`jaxattn.landmark_attention` assumes. Index maps are static numpy arrays (shapes are static under ``jit``).

Language-model targets (:func:`next_token_targets`): the output at regular token ``t`` predicts regular token
``t + 1`` (skipping a landmark in between, which the model sees only after producing that prediction); landmark
positions carry weight 0, as in the paper's fused-kernel training (``include_landmark_in_loss=False``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["augmented_length", "regular_positions", "is_landmark", "insert_landmarks", "remove_landmarks",
           "next_token_targets"]


def _check(block_size: int) -> int:
  if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size < 2:
    raise ValueError(f"block_size must be an int >= 2, got {block_size!r}")
  return int(block_size)


def augmented_length(num_regular: int, block_size: int) -> int:
  """``M = N + N // (block_size - 1)``: the length after inserting landmarks."""
  block_size = _check(block_size)
  if num_regular < 0:
    raise ValueError(f"num_regular must be >= 0, got {num_regular}")
  return num_regular + num_regular // (block_size - 1)


def regular_positions(num_regular: int, block_size: int) -> np.ndarray:
  """int32 ``[N]``: where regular token ``t`` sits in the augmented sequence (``t + t // (block_size - 1)``)."""
  block_size = _check(block_size)
  t = np.arange(num_regular, dtype=np.int32)
  return t + t // (block_size - 1)


def is_landmark(length: int, block_size: int) -> np.ndarray:
  """bool ``[length]``: ``(j + 1) % block_size == 0``."""
  block_size = _check(block_size)
  return (np.arange(length) + 1) % block_size == 0


def insert_landmarks(tokens, block_size: int, landmark_id: int):
  """Inserts ``landmark_id`` after every ``block_size - 1`` tokens along the last axis.

  Args:
    tokens: int ``[..., N]`` (numpy or jax).
    block_size: landmark block length (>= 2).
    landmark_id: the landmark token id.

  Returns:
    ``[..., M]`` with ``M = augmented_length(N, block_size)`` (numpy in, numpy out; otherwise a jax array).
  """
  block_size = _check(block_size)
  xp = np if isinstance(tokens, np.ndarray) else jnp
  tokens = xp.asarray(tokens)
  N = tokens.shape[-1]
  M = augmented_length(N, block_size)
  # Source index of every augmented position: the regular token there (landmark slots read a dummy index 0).
  src = np.zeros(M, np.int32)
  pos = regular_positions(N, block_size)
  src[pos] = np.arange(N)
  lm = is_landmark(M, block_size)
  gathered = xp.take(tokens, xp.asarray(src), axis=-1) if N else xp.zeros(tokens.shape[:-1] + (M,), tokens.dtype)
  return xp.where(xp.asarray(lm), xp.asarray(landmark_id, tokens.dtype), gathered)


def remove_landmarks(x, block_size: int, num_regular: int | None = None, axis: int = 1):
  """The entries of ``x`` at regular positions along ``axis`` (e.g. logits ``[B, M, V] -> [B, N, V]``).

  Args:
    x: an array whose ``axis`` has the augmented length ``M``.
    block_size: landmark block length.
    num_regular: ``N`` (default: the largest ``N`` with ``augmented_length(N) <= M``).
    axis: the sequence axis.
  """
  block_size = _check(block_size)
  xp = np if isinstance(x, np.ndarray) else jnp
  M = x.shape[axis]
  if num_regular is None:
    num_regular = M - M // block_size
  if augmented_length(num_regular, block_size) > M:
    raise ValueError(f"{num_regular} regular tokens need {augmented_length(num_regular, block_size)} positions, "
                     f"but x has {M} along axis {axis}")
  return xp.take(x, xp.asarray(regular_positions(num_regular, block_size)), axis=axis)


def next_token_targets(tokens, block_size: int, landmark_id: int, weights=None):
  """Inputs, targets and loss weights for language modelling with landmarks.

  Args:
    tokens: int ``[..., N]`` regular tokens.
    block_size: landmark block length.
    landmark_id: the landmark token id.
    weights: optional per-regular-token weights ``[..., N]`` of the *targets* (e.g. to weight an answer span);
      default 1.

  Returns:
    ``(inputs [..., M], targets [..., M], weights [..., M])``: ``inputs`` has landmarks inserted; at a regular
    position holding token ``t`` the target is token ``t + 1`` with ``weights[t + 1]``; landmark positions and the
    last regular token get target 0 and weight 0.
  """
  block_size = _check(block_size)
  xp = np if isinstance(tokens, np.ndarray) else jnp
  tokens = xp.asarray(tokens)
  N = tokens.shape[-1]
  M = augmented_length(N, block_size)
  inputs = insert_landmarks(tokens, block_size, landmark_id)
  w = xp.ones(tokens.shape, xp.float32) if weights is None else xp.asarray(weights, xp.float32)
  if w.shape != tokens.shape:
    raise ValueError(f"weights must have the shape of tokens {tokens.shape}, got {w.shape}")
  pos = regular_positions(N, block_size)
  src = np.zeros(M, np.int32)  # the regular token whose target each position holds
  has = np.zeros(M, bool)
  src[pos[:-1]] = np.arange(1, N)
  has[pos[:-1]] = True
  targets = xp.where(xp.asarray(has), xp.take(tokens, xp.asarray(src), axis=-1), 0) if N else tokens
  tw = xp.where(xp.asarray(has), xp.take(w, xp.asarray(src), axis=-1), 0.0) if N else w
  return inputs, targets.astype(tokens.dtype), tw.astype(xp.float32)
