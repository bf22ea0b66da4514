"""``apply_rope``: the rotation itself, the relative-position property and input validation."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import testing
from jaxattn.nn import apply_rope

B, T, H, D = 2, 12, 3, 8


def _x(seed, shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _rope_complex(x, pos, base):
  """f64 reference: rotate ``x[..., :D/2] + i x[..., D/2:]`` by ``exp(i p base^(-2k/D))``."""
  x = np.asarray(x, np.float64)
  half = x.shape[-1] // 2
  ang = np.broadcast_to(np.asarray(pos, np.float64), x.shape[:2])[..., None, None] * base ** (-2.0 * np.arange(half)
                                                                                              / x.shape[-1])
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * ang)
  return np.concatenate([z.real, z.imag], axis=-1)


@pytest.mark.parametrize("per_row", [False, True])
def test_matches_complex_rotation(per_row):
  x = _x(0, (B, T, H, D))
  pos = np.stack([np.arange(T), np.arange(T) + 4]) if per_row else np.arange(T)
  out = apply_rope(jnp.asarray(x), jnp.asarray(pos), 10000.0)
  assert out.shape == x.shape and out.dtype == jnp.float32
  testing.assert_close(out, _rope_complex(x, pos, 10000.0), dtype=jnp.float32, name="rope")
  # a rotation: norms of feature pairs are preserved, and position 0 is the identity
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out)[0, 0], x[0, 0], rtol=1e-6, atol=1e-6)  # row 0 starts at p = 0


def test_logits_depend_only_on_relative_position():
  """``rope(q, p + c) . rope(k, p' + c) == rope(q, p) . rope(k, p')`` for every constant shift ``c``."""
  q, k = jnp.asarray(_x(1, (B, T, H, D))), jnp.asarray(_x(2, (B, T, H, D)))
  pos = jnp.arange(T)

  def logits(shift):
    qr, kr = apply_rope(q, pos + shift), apply_rope(k, pos + shift)
    return np.einsum("bthd,bshd->bhts", np.asarray(qr, np.float64), np.asarray(kr, np.float64))

  ref = logits(0)
  with testing.override(jnp.float32, "out", atol=5e-5, rtol=5e-5,
                        reason="f32 rounding of the rotation angles p * freq grows with |p|"):
    for shift in (1, 7, 25):
      testing.assert_close(logits(shift), ref, dtype=jnp.float32, name=f"logits shift {shift}")
  assert not np.allclose(logits(0)[..., 0, 1], np.einsum("bhd,bhd->bh", np.asarray(q[:, 0], np.float64),
                                                          np.asarray(k[:, 1], np.float64)), atol=1e-3)


def test_bf16_keeps_dtype():
  x = jnp.asarray(_x(3, (1, 4, 2, D)), jnp.bfloat16)
  out = apply_rope(x, jnp.arange(4))
  assert out.dtype == jnp.bfloat16
  testing.assert_close(out, _rope_complex(np.asarray(x, np.float32), np.arange(4), 10000.0), dtype=jnp.bfloat16)


@pytest.mark.parametrize("x_shape,pos_shape,match", [
    ((B, T, H, 7), (T,), "even head dim, got 7"),
    ((B, T, D), (T,), r"shape \[B, T, H, D\]"),
    ((B, T, H, D), (T + 1,), "positions must have shape"),
    ((B, T, H, D), (3, T), "positions must have shape"),
])
def test_bad_inputs(x_shape, pos_shape, match):
  with pytest.raises(ValueError, match=match):
    apply_rope(jnp.zeros(x_shape), jnp.zeros(pos_shape, jnp.int32))
