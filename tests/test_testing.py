"""jaxattn.testing.assert_close: the tolerance table through chex.assert_trees_all_close, NaN / inf handling, shape
and tree checks, the RMS bound and overrides. Each check is shown to fail on an input just outside the bound."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import testing


def _ref():
  return np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)


def test_within_and_just_outside_the_f32_bound():
  ref = _ref()
  tol = testing.tolerance(jnp.float32)
  bound = tol.atol + tol.rtol * np.abs(ref[1, 2])
  testing.assert_close(ref + np.where(np.arange(15).reshape(3, 5) == 7, 0.9 * bound, 0.0).astype(np.float32), ref)
  bad = ref.astype(np.float64).copy()
  bad[1, 2] += 1.5 * bound
  with pytest.raises(AssertionError, match=r"out: 1/15 elements out of tolerance .* worst at \(1, 2\)"):
    testing.assert_close(bad, ref, dtype=jnp.float32, name="out")


def test_grad_kind_and_dtype_rows():
  ref = _ref()
  off = ref + 3e-5  # where 0.6 < |ref| < 1.9: outside f32 "out" (1e-5 + 1e-5 |ref|), inside "grad" (2e-5 + 2e-5 |ref|)
  sel = (np.abs(ref) > 0.6) & (np.abs(ref) < 1.9)
  assert sel.sum() >= 3
  with pytest.raises(AssertionError, match="out of tolerance"):
    testing.assert_close(off[sel], ref[sel])
  testing.assert_close(off[sel], ref[sel], kind="grad")
  # bf16 is compared in float64 against its own (looser) row: 1e-2 passes, 1e-1 does not
  testing.assert_close(jnp.asarray(ref + 1e-2, jnp.bfloat16), ref + 1e-2, dtype=jnp.bfloat16)
  with pytest.raises(AssertionError, match="out of tolerance"):
    testing.assert_close(jnp.asarray(ref, jnp.bfloat16), ref + 1e-1)


def test_nan_and_inf():
  ref = np.array([1.0, np.inf, -np.inf, 2.0], np.float32)
  testing.assert_close(ref.copy(), ref)  # inf matches inf of the same sign
  with pytest.raises(AssertionError, match="1/4 elements"):
    testing.assert_close(np.array([1.0, -np.inf, -np.inf, 2.0], np.float32), ref)
  with pytest.raises(AssertionError, match="1/4 elements"):
    testing.assert_close(np.array([1.0, 3e38, -np.inf, 2.0], np.float32), ref)
  with pytest.raises(AssertionError, match="1 NaN values"):
    testing.assert_close(np.array([np.nan, np.inf, -np.inf, 2.0], np.float32), ref)
  with pytest.raises(AssertionError, match="1/4 elements"):  # a NaN in the reference is never matched
    testing.assert_close(np.array([1.0, np.inf, -np.inf, 2.0], np.float32),
                         np.array([np.nan, np.inf, -np.inf, 2.0], np.float32))


def test_shapes_and_trees():
  ref = _ref()
  with pytest.raises(AssertionError, match=r"shape \(5, 3\) != reference shape \(3, 5\)"):
    testing.assert_close(ref.T, ref)
  with pytest.raises(AssertionError, match=r"shape \(\) != reference shape \(1,\)"):  # no scalar broadcasting
    testing.assert_close(np.float32(1.0), np.ones((1,), np.float32))
  with pytest.raises(AssertionError, match="tree structures differ"):
    testing.assert_close((ref, ref), (ref,))
  bad = {"a": ref, "b": ref + 1.0}
  with pytest.raises(AssertionError, match=r"g\[1\]: 15/15 elements"):
    testing.assert_close(bad, {"a": ref, "b": ref}, name="g")


def test_rms_bound():
  ref = _ref()
  x = ref * (1 + 1e-6)
  testing.assert_close(x, ref, rms=1e-5)
  with pytest.raises(AssertionError, match="relative RMS error"):
    testing.assert_close(x, ref, rms=1e-7)


def test_override_needs_a_reason_and_is_scoped():
  ref = _ref()
  x = ref + 1e-3
  with pytest.raises(ValueError, match="reason"):
    with testing.override(jnp.float32, "out", atol=1e-2, rtol=0.0, reason=" "):
      pass
  with testing.override(jnp.float32, "out", atol=1e-2, rtol=0.0, reason="test"):
    testing.assert_close(x, ref)
  with pytest.raises(AssertionError, match="out of tolerance"):
    testing.assert_close(x, ref)
