"""Multi-host start-up: ``jax.distributed.initialize()`` must run before anything touches the devices.

On Cloud TPU VMs (and Slurm / Kubernetes) the no-argument form discovers the coordinator and the process ids
itself; ``tpu_setup/run.sh`` starts the same command on every worker with ``--distributed``.
"""

from __future__ import annotations

import jax

__all__ = ["initialize", "is_main_process", "shard_indices"]


def initialize(enabled: bool) -> tuple[int, int]:
  """Calls ``jax.distributed.initialize()`` when ``enabled`` (once); returns ``(process_index, process_count)``."""
  if enabled and not jax.distributed.is_initialized():
    jax.distributed.initialize()
  return jax.process_index(), jax.process_count()


def is_main_process() -> bool:
  return jax.process_index() == 0


def shard_indices(n: int, index: int | None = None, count: int | None = None) -> list[int]:
  """The items ``index, index + count, ...`` of ``range(n)``: this process's share of ``n`` independent jobs."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if not 0 <= index < count:
    raise ValueError(f"process index {index} is outside [0, {count})")
  return list(range(index, n, count))
