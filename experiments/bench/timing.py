"""Wall-clock timing of jitted attention calls: warm-up, then the median of repeated samples.

The first call compiles (its time is reported as ``compile_s``), ``warmup`` more calls run untimed, then each
sample runs the compiled function ``inner`` times back to back and waits with ``block_until_ready``; its time
divided by ``inner`` is one observation. ``inner`` is sized by a first single-call sample so that a sample lasts at
least ``min_sample_s`` (on a GPU this hides the host dispatch latency of very short kernels); when one call is
already that long, ``inner`` is 1 and that first sample counts, so slow CPU cases cost ``1 + warmup + repeats``
calls.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("fwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Timing:
  """Result of :func:`time_fn` (milliseconds per call).

  Attributes:
    ms: median over samples.
    q20_ms, q80_ms: the 0.2 and 0.8 quantiles over samples.
    compile_s: seconds of the first call (tracing, compilation and one run).
    samples: number of timed samples.
    inner: calls per sample.
  """

  ms: float
  q20_ms: float
  q80_ms: float
  compile_s: float
  samples: int
  inner: int


def make_step(fn: Callable, mode: str) -> Callable:
  """Jits ``fn(q, k, v) -> out`` for a mode.

  Args:
    fn: the attention call.
    mode: ``"fwd"`` (the output) or ``"fwd+bwd"`` (gradients of ``sum(out)`` w.r.t. ``q, k, v``, in f32
      accumulation; the forward runs inside the gradient).

  Returns:
    A jitted function of ``(q, k, v)``.
  """
  if mode == "fwd":
    return jax.jit(fn)
  if mode == "fwd+bwd":
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
  raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def time_fn(f: Callable, *args, repeats: int = 10, warmup: int = 1, min_sample_s: float = 2e-3,
            max_inner: int = 100) -> tuple[Timing, object]:
  """Times ``f(*args)``.

  Args:
    f: a (jitted) function.
    *args: its arguments.
    repeats: number of timed samples (at least 1).
    warmup: untimed calls after the first (compiling) one.
    min_sample_s: shortest sample; short calls are repeated ``inner`` times per sample to reach it.
    max_inner: cap on ``inner``.

  Returns:
    ``(Timing, output of the last call)``.
  """
  t0 = time.perf_counter()
  out = jax.block_until_ready(f(*args))
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    out = jax.block_until_ready(f(*args))
  # The first sample runs one call; if that is shorter than min_sample_s it only sizes `inner` and is dropped.
  t0 = time.perf_counter()
  out = jax.block_until_ready(f(*args))
  one = time.perf_counter() - t0
  inner = int(min(max_inner, max(1, math.ceil(min_sample_s / max(one, 1e-9)))))
  samples = [one * 1e3] if inner == 1 else []
  while len(samples) < max(1, repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = f(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / inner * 1e3)
  s = np.asarray(samples)
  timing = Timing(ms=float(np.median(s)), q20_ms=float(np.quantile(s, 0.2)), q80_ms=float(np.quantile(s, 0.8)),
                  compile_s=compile_s, samples=len(samples), inner=inner)
  return timing, out


def refuse(reason: str, case) -> Callable:
  """An implementation builder that declines every case (its rows are recorded as ``skipped`` with ``reason``)."""
  raise NotImplementedError(reason)


def relative_error(out, base) -> float:
  """``||out - base|| / ||base||`` in f32 (how far one implementation's output is from the first one timed)."""
  out, base = np.asarray(out, np.float32), np.asarray(base, np.float32)
  return float(np.linalg.norm(out - base) / max(float(np.linalg.norm(base)), 1e-30))


def measure_into(row: dict, build: Callable, case, mode: str, inputs, *, flops: float, repeats: int, warmup: int,
                 step_fn: Callable[[Callable, str], Callable] = make_step):
  """Times ``step_fn(build(case), mode)`` on ``inputs`` and fills ``row`` (``ms``, quantiles, ``tflops``, ...).

  A builder or call raising ``NotImplementedError`` gives ``status="skipped"``; any other failure is recorded as
  ``"oom"`` or ``"error"`` with its message, so one failing implementation does not stop a benchmark.

  Returns:
    The step's output, or None when it did not run.
  """
  try:
    t, out = time_fn(step_fn(build(case), mode), *inputs, repeats=repeats, warmup=warmup)
  except NotImplementedError as e:
    row.update(status="skipped", error=f"NotImplementedError: {e}")
    return None
  except Exception as e:  # noqa: BLE001 - record and go on (OOM, compiler errors, ...)
    msg = f"{type(e).__name__}: {e}"
    oom = "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
    row.update(status="oom" if oom else "error", error=msg[:2000])
    return None
  row.update(ms=t.ms, q20_ms=t.q20_ms, q80_ms=t.q80_ms, tflops=flops / (t.ms * 1e-3) / 1e12,
             compile_s=t.compile_s, samples=t.samples, inner=t.inner)
  return out
