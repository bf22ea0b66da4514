"""Orbax checkpointing of a training run: parameters and optimizer state, the Grain iterator position and a small
JSON record (the evaluation history), saved together under one step.

A thin wrapper over ``orbax.checkpoint.CheckpointManager`` (the v0 API with ``args=``), so a move to Orbax's v1 API
stays local to this file::

    with Checkpointer(workdir / "checkpoints") as ckpt:
      if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state, data_iter)      # state: a template with the right structure
      ...
      ckpt.save(step, state, data_iter, meta={"history": history})

Saves are asynchronous (training continues while the arrays are written); the Grain iterator state is captured
when :meth:`Checkpointer.save` is called. Only finalised checkpoints count as the latest step, so a run killed
while saving resumes from the previous one.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]


class Checkpointer:
  """Saves and restores ``(state pytree, grain iterator, JSON meta)`` by step.

  Args:
    directory: where the step folders go (created if missing).
    max_to_keep: how many recent checkpoints to keep.
    async_save: write arrays in the background.
  """

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2, async_save: bool = True):
    if not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(f"max_to_keep must be a positive int, got {max_to_keep!r}")
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                             create=True))

  def latest_step(self) -> int | None:
    """The newest finalised step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter: grain.DatasetIterator | None = None,
           meta: dict | None = None) -> None:
    """Saves ``state`` (any pytree of arrays), the iterator's position and ``meta`` (JSON-serialisable) as
    ``step``. Returns once the iterator state is captured and the arrays are copied; writing continues in the
    background."""
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(dict(meta or {}))}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def restore(self, state_like: Any, data_iter: grain.DatasetIterator | None = None,
              step: int | None = None) -> tuple[Any, dict]:
    """Restores step ``step`` (default: the latest) into a structure like ``state_like`` (arrays or
    ``jax.ShapeDtypeStruct``s) and moves ``data_iter`` to the saved position.

    Returns:
      ``(state, meta)``.

    Raises:
      FileNotFoundError: if there is no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self._manager.restore(int(step), args=ocp.args.Composite(**items))
    return out["state"], dict(out["meta"] or {})

  def wait(self) -> None:
    """Blocks until background writes are done."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
