"""Public test helpers: the tolerance table, random inputs, assertions and CAB conformance checks.

Other codebases can use these to check their own attention callables against jaxattn's references::

    from jaxattn import testing
    q, k, v = testing.random_qkv(jax.random.key(0), B=2, T=64, S=64, H=4, G=2, D=32)
    testing.assert_close(my_attention(q, k, v), jaxattn.softmax_attention(q, k, v, implementation="reference"))

Tolerances (``TOLERANCES``) are per dtype and per kind of quantity: outputs and gradients (gradients 2x the output
tolerance). Long sequences also use the relative RMS error ``||x - ref|| / ||ref||`` (``RMS_TOLERANCES``).
Loosening a tolerance is done with :func:`override`, which requires a reason. The elementwise comparison is
``chex.assert_trees_all_close`` in float64, with this module's tolerance table, NaN rejection and error messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Tolerance", "TOLERANCES", "RMS_TOLERANCES", "tolerance", "override", "random_qkv", "relative_rms",
    "assert_close", "assert_no_nan", "check_causal_prefix", "check_causal_cross_prefix", "check_decode_matches_full",
]


@dataclasses.dataclass(frozen=True)
class Tolerance:
  atol: float
  rtol: float


# (dtype name, kind) -> tolerance. kind: "out" (outputs, lse, states) or "grad".
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("float32", "out"): Tolerance(1e-5, 1e-5),
    ("float32", "grad"): Tolerance(2e-5, 2e-5),
    ("bfloat16", "out"): Tolerance(2e-2, 2e-2),
    ("bfloat16", "grad"): Tolerance(4e-2, 4e-2),
    ("float16", "out"): Tolerance(2e-3, 2e-3),
    ("float16", "grad"): Tolerance(4e-3, 4e-3),
}
# Relative RMS error bounds for long sequences.
RMS_TOLERANCES: dict[str, float] = {"float32": 1e-5, "bfloat16": 5e-3, "float16": 1e-3}

_overrides: list[tuple[str, str, Tolerance]] = []


def tolerance(dtype, kind: str = "out") -> Tolerance:
  """The tolerance for ``dtype`` (``"out"`` or ``"grad"``), including any active :func:`override`."""
  name = jnp.dtype(dtype).name
  for o_name, o_kind, tol in reversed(_overrides):
    if o_name == name and o_kind == kind:
      return tol
  try:
    return TOLERANCES[(name, kind)]
  except KeyError:
    raise ValueError(f"no tolerance for dtype {name!r} and kind {kind!r}") from None


@contextlib.contextmanager
def override(dtype, kind: str, *, atol: float, rtol: float, reason: str) -> Iterator[None]:
  """Temporarily loosens one tolerance. ``reason`` is required and must say why."""
  if not reason or not reason.strip():
    raise ValueError("a tolerance override needs a reason")
  _overrides.append((jnp.dtype(dtype).name, kind, Tolerance(atol, rtol)))
  try:
    yield
  finally:
    _overrides.pop()


def random_qkv(key, *, B: int, T: int, S: int | None = None, H: int, G: int | None = None, D: int,
               E: int | None = None, dtype=jnp.float32):
  """Random normal ``q [B,T,H,D]``, ``k [B,S,G,D]``, ``v [B,S,G,E]`` (never zeros).

  ``key`` is a ``jax.random`` key or an int seed. Values are drawn with numpy from a seed derived from the key, so
  no random kernel is compiled per shape (tests create many shapes).
  """
  S, G, E = S or T, G or H, E or D
  if isinstance(key, (int, np.integer)):
    seed = int(key)
  else:
    seed = int(np.asarray(jax.random.key_data(key)).astype(np.uint64).sum())
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
             for shape in ((B, T, H, D), (B, S, G, D), (B, S, G, E)))
  return q, k, v


def relative_rms(x, ref) -> float:
  """``||x - ref|| / ||ref||`` in f64 (0 when both are 0)."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  den = np.linalg.norm(ref)
  num = np.linalg.norm(x - ref)
  return float(num / den) if den > 0 else float(num)


def assert_no_nan(x, name: str = "array") -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(x):
    a = np.asarray(leaf, np.float64) if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating) else None
    if a is not None and np.isnan(a).any():
      raise AssertionError(f"{name}{jax.tree_util.keystr(path)} has {int(np.isnan(a).sum())} NaN values")


def assert_close(x, ref, *, dtype=None, kind: str = "out", name: str = "x", rms: float | None = None) -> None:
  """Asserts ``|x - ref| <= atol + rtol * |ref|`` elementwise (inf matching inf of the same sign), and no NaN.

  The comparison is ``chex.assert_trees_all_close`` on float64 copies of each leaf pair (so bf16 / f16 differences
  are not rounded), with ``atol`` / ``rtol`` from :func:`tolerance`; a failure names the leaf, the number of
  elements out of tolerance and the worst one, followed by chex's report. Like every chex assertion it does
  nothing after ``chex.disable_asserts()``.

  Args:
    x: the array (or pytree of arrays) under test.
    ref: the reference, same tree and shapes.
    dtype: picks the tolerance row (default: each leaf of ``x``'s dtype).
    kind: ``"out"`` or ``"grad"``.
    name: label used in the error message.
    rms: if given, also bounds the relative RMS error over the reference's finite elements.
  """
  xs, refs = jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(ref)
  if len(xs) != len(refs):
    raise AssertionError(f"{name}: tree structures differ ({len(xs)} vs {len(refs)} leaves)")
  for idx, (a, b) in enumerate(zip(xs, refs)):
    label = name if len(xs) == 1 else f"{name}[{idx}]"
    if np.shape(a) != np.shape(b):
      raise AssertionError(f"{label}: shape {np.shape(a)} != reference shape {np.shape(b)}")
    tol = tolerance(dtype or jnp.asarray(a).dtype, kind)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if np.isnan(a64).any():
      raise AssertionError(f"{label}: {int(np.isnan(a64).sum())} NaN values")
    try:
      _chex().assert_trees_all_close(a64, b64, atol=tol.atol, rtol=tol.rtol, strict=True)
    except AssertionError as e:
      raise AssertionError(f"{label}: {_describe_mismatch(a64, b64, tol)}\n{e}") from None
    if rms is not None:
      finite = np.isfinite(b64)
      r = relative_rms(a64[finite], b64[finite])
      if r > rms:
        raise AssertionError(f"{label}: relative RMS error {r:.3e} > {rms:.1e}")


def _chex():
  """chex, imported on first comparison: ``import jaxattn`` does not need it (it is a core requirement)."""
  import chex  # noqa: PLC0415 - deferred: only the comparison helpers need it
  return chex


def _describe_mismatch(a64: np.ndarray, b64: np.ndarray, tol: Tolerance) -> str:
  """How many elements break ``|a - b| <= atol + rtol * |b|`` and which one breaks it most."""
  same_inf = np.isinf(a64) & np.isinf(b64) & (np.sign(a64) == np.sign(b64))
  with np.errstate(invalid="ignore"):
    err = np.where(same_inf, 0.0, np.abs(a64 - b64))
  bound = tol.atol + tol.rtol * np.where(np.isinf(b64), 0.0, np.abs(b64))
  bad = ~(err <= bound)
  worst = np.unravel_index(np.argmax(np.where(bad, np.nan_to_num(err - bound, nan=np.inf), -np.inf)), a64.shape)
  return (f"{int(bad.sum())}/{a64.size} elements out of tolerance (atol={tol.atol}, rtol={tol.rtol}); "
          f"worst at {tuple(int(w) for w in worst)}: got {a64[worst]}, expected {b64[worst]}")


# ============================================================================================ CAB conformance
# These checks apply to any attention callable ``attn(q, k, v) -> out`` with ``[B, T, H, D]`` layouts.
def check_causal_prefix(attn: Callable, q, k, v, *, dtype=None) -> None:
  """Causal self-attention: the output at position i does not change when positions > i change.

  Compares ``attn`` on the full sequence with ``attn`` on every prefix length in a few cut points, and with
  perturbed suffixes.
  """
  T = q.shape[1]
  full = np.asarray(attn(q, k, v), np.float64)
  rng = np.random.default_rng(0)
  for cut in sorted({1, T // 2, T - 1}):
    if cut < 1:
      continue
    noise = lambda x: x.at[:, cut:].set(jnp.asarray(rng.normal(size=x[:, cut:].shape), x.dtype))
    out = np.asarray(attn(noise(q), noise(k), noise(v)), np.float64)
    assert_close(out[:, :cut], full[:, :cut], dtype=dtype or q.dtype, name=f"causal prefix (cut={cut})")
    pre = np.asarray(attn(q[:, :cut], k[:, :cut], v[:, :cut]), np.float64)
    assert_close(pre, full[:, :cut], dtype=dtype or q.dtype, name=f"causal prefix-only (len={cut})")


def check_causal_cross_prefix(attn: Callable, q, k, v, *, dtype=None) -> None:
  """Causal cross-attention (CAB "CC"): with fixed keys/values, output i does not depend on queries j > i."""
  T = q.shape[1]
  full = np.asarray(attn(q, k, v), np.float64)
  for cut in sorted({1, T // 2, T - 1}):
    if cut < 1:
      continue
    q2 = q.at[:, cut:].set(-q[:, cut:] + 1.0)
    out = np.asarray(attn(q2, k, v), np.float64)
    assert_close(out[:, :cut], full[:, :cut], dtype=dtype or q.dtype, name=f"causal cross prefix (cut={cut})")


def check_decode_matches_full(full_fn: Callable, init_fn: Callable, step_fn: Callable, inputs, *,
                              dtype=None) -> None:
  """Step-by-step decoding with a cache equals the full pass.

  Args:
    full_fn: ``inputs [B, T, ...] -> out [B, T, ...]``.
    init_fn: ``() -> cache``.
    step_fn: ``(cache, x_t [B, 1, ...]) -> (cache, out_t [B, 1, ...])``.
    inputs: the sequence.
  """
  full = np.asarray(full_fn(inputs), np.float64)
  cache, outs = init_fn(), []
  for t in range(inputs.shape[1]):
    cache, o = step_fn(cache, inputs[:, t:t + 1])
    outs.append(np.asarray(o, np.float64))
  assert_close(np.concatenate(outs, axis=1), full, dtype=dtype or inputs.dtype, name="decode vs full")
