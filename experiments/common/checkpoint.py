"""Orbax checkpointing of a training run: parameters and optimizer state, the Grain iterator position and a small
JSON record (the evaluation history), saved together under one step, with a digest that makes a damaged checkpoint
fail loudly instead of restoring silently.

A thin wrapper over ``orbax.checkpoint.CheckpointManager`` (the v0 API with ``args=``), so a move to Orbax's v1 API
stays local to this file::

    with Checkpointer(workdir / "checkpoints") as ckpt:
      restored = ckpt.restore_latest(state, data_iter)    # state: a template with the right structure
      if restored is not None:
        state, meta = restored.state, restored.meta
      ...
      ckpt.save(step, state, data_iter, meta={"history": history})

Saves are asynchronous (training continues while the arrays are written); the Grain iterator state is captured
when :meth:`Checkpointer.save` is called. Only finalised checkpoints count as the latest step, so a run killed
while saving resumes from the previous one.

**Integrity.** Orbax does not checksum array data: a flipped bit in a saved array restores silently as a different
number (measured: orbax-checkpoint 0.12.8, zarr + zstd + OCDBT). So every step also stores an ``integrity`` item:
SHA-256 digests of the state tree (every leaf's path, dtype, shape and bytes), of the JSON ``meta`` and of the data
iterator's state. A restore recomputes them and raises :class:`CorruptCheckpointError` on any difference, as it
does when Orbax itself fails to read the step (a truncated or missing file). :meth:`Checkpointer.restore_latest`
walks back from the newest step: a step that fails is moved aside to ``<step>.corrupt`` (kept for inspection, out
of Orbax's way) with a :class:`CheckpointWarning` naming it, and the previous step is tried; with no usable step it
returns None (the caller starts from scratch) and leaves the data iterator where it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import pathlib
import warnings
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments.common.errors import CheckpointWarning, CorruptCheckpointError

__all__ = ["Checkpointer", "Restored", "CorruptCheckpointError", "CheckpointWarning", "tree_digest",
           "tree_signature"]

INTEGRITY_ITEM = "integrity"
INTEGRITY_FORMAT = 1


def tree_digest(tree: Any) -> str | None:
  """SHA-256 (hex) over every leaf of ``tree``: its key path, dtype, shape and bytes (C order), in flattening
  order. None when a leaf is an array not fully addressable from this process (a multi-host global array: its
  bytes are not all here)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.Array):
      if not leaf.is_fully_addressable:
        return None
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def tree_signature(tree: Any) -> list[list]:
  """``[[key path, dtype, shape], ...]`` of every leaf (arrays or ``jax.ShapeDtypeStruct``s), in flattening order."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    dtype = np.asarray(leaf).dtype if dtype is None else dtype
    out.append([jax.tree_util.keystr(path), str(dtype), list(np.shape(leaf))])
  return out


def _json_digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()


@dataclasses.dataclass
class Restored:
  """What :meth:`Checkpointer.restore_latest` returns: the step restored, the state and the JSON meta."""

  step: int
  state: Any
  meta: dict


def _check_template(saved: list | None, abstract: Any, step: int, directory: pathlib.Path) -> None:
  """Raises ``ValueError`` (a caller's mistake, not damage: the step is not moved aside) when the template's leaves
  differ from the saved ones in path, dtype or shape."""
  if saved is None:
    return
  want = tree_signature(abstract)
  if want == saved:
    return
  diff = next((f"{w[0] if w else s[0]}: saved {s[1:] if s else None}, template {w[1:] if w else None}"
               for s, w in itertools.zip_longest(saved, want) if s != w), "")
  raise ValueError(f"the state template does not match checkpoint step {step} in {directory} ({len(saved)} saved "
                   f"leaves, {len(want)} in the template; first difference {diff}); restore with the structure, "
                   f"dtypes and shapes it was saved with")


class Checkpointer:
  """Saves and restores ``(state pytree, grain iterator, JSON meta)`` by step, verified against a stored digest.

  Args:
    directory: where the step folders go (created if missing).
    max_to_keep: how many recent checkpoints to keep (at least 2 lets a corrupt newest step fall back).
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
    """The newest finalised step (not yet verified), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter: grain.DatasetIterator | None = None,
           meta: dict | None = None) -> None:
    """Saves ``state`` (any pytree of arrays), the iterator's position, ``meta`` (JSON-serialisable) and their
    digests as ``step``. Returns once the iterator state is captured and the arrays are copied and hashed; writing
    continues in the background."""
    meta = dict(meta or {})
    integrity = {"format": INTEGRITY_FORMAT, "state_sha256": tree_digest(state), "meta_sha256": _json_digest(meta),
                 "data_sha256": None if data_iter is None else _json_digest(data_iter.get_state()),
                 "leaves": tree_signature(state)}
    integrity["record_sha256"] = _json_digest(integrity)  # the record checks itself before it is trusted
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta),
             INTEGRITY_ITEM: ocp.args.JsonSave(integrity)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def _step_dir(self, step: int) -> pathlib.Path:
    return self.directory / str(int(step))

  def _restore_step(self, step: int, state_like: Any, data_iter, validate) -> tuple[Any, dict]:
    """Restores and verifies one step; raises :class:`CorruptCheckpointError` naming the step and the reason."""
    def fail(reason: str, cause: BaseException | None = None):
      err = CorruptCheckpointError(f"checkpoint step {step} in {self.directory} is unusable: {reason}", step=step,
                                   reason=reason)
      raise err from cause

    if not self._step_dir(step).is_dir():
      fail("its folder is missing")
    has_digest = (self._step_dir(step) / INTEGRITY_ITEM).is_dir()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    stored = None
    if has_digest:
      try:
        stored = self._manager.restore(int(step), args=ocp.args.Composite(
            **{INTEGRITY_ITEM: ocp.args.JsonRestore()}))[INTEGRITY_ITEM]
      except Exception as e:  # noqa: BLE001
        fail(f"its integrity record is unreadable ({type(e).__name__}: {str(e).strip()[:120]})", e)
      if not isinstance(stored, dict) or stored.get("format") != INTEGRITY_FORMAT:
        fail(f"its integrity record is unreadable ({stored!r:.100})")
      if _json_digest({k: v for k, v in stored.items() if k != "record_sha256"}) != stored.get("record_sha256"):
        fail("its integrity record does not match its own digest")
      _check_template(stored.get("leaves"), abstract, step, self.directory)
    items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      out = self._manager.restore(int(step), args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - whatever Orbax/TensorStore/Grain raise on damaged files
      first = (str(e).strip().splitlines() or [""])[0][:200]
      fail(f"Orbax could not read it ({type(e).__name__}: {first})", e)
    state, meta = out["state"], dict(out["meta"] or {})
    if stored is not None:
      if stored.get("state_sha256") is not None and tree_digest(state) != stored["state_sha256"]:
        fail("the restored arrays do not match the SHA-256 digest stored when it was saved (flipped or "
             "overwritten bytes)")
      if _json_digest(meta) != stored.get("meta_sha256"):
        fail("its JSON record (meta) does not match the stored digest")
      if data_iter is not None and stored.get("data_sha256") is not None and \
          _json_digest(data_iter.get_state()) != stored["data_sha256"]:
        fail("the data-iterator position does not match the stored digest")
    else:
      warnings.warn(f"checkpoint step {step} in {self.directory} has no stored digest (written before digests "
                    f"were added): restored without verification", CheckpointWarning, stacklevel=3)
    if validate is not None:
      problem = validate(state)
      if problem:
        fail(problem)
    return state, meta

  def restore(self, state_like: Any, data_iter: grain.DatasetIterator | None = None,
              step: int | None = None) -> tuple[Any, dict]:
    """Restores step ``step`` (default: the newest usable one, see :meth:`restore_latest`) into a structure like
    ``state_like`` (arrays or ``jax.ShapeDtypeStruct``s) and moves ``data_iter`` to the saved position. The
    template must have the saved structure, dtypes and shapes (what is restored is verified bit for bit).

    Returns:
      ``(state, meta)``.

    Raises:
      FileNotFoundError: if there is no checkpoint.
      ValueError: if ``state_like`` does not match the saved tree (nothing is moved aside).
      CorruptCheckpointError: if ``step`` (or, without ``step``, every step) fails to restore or to verify.
    """
    if step is not None:
      return self._restore_step(int(step), state_like, data_iter, None)
    if not self.all_steps():
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self.restore_latest(state_like, data_iter)
    if restored is None:
      raise CorruptCheckpointError(f"no usable checkpoint in {self.directory} (every step failed; moved aside as "
                                   f"<step>.corrupt)", reason="all steps failed")
    return restored.state, restored.meta

  def restore_latest(self, state_like: Any, data_iter: grain.DatasetIterator | None = None, *,
                     validate: Callable[[Any], str | None] | None = None) -> Restored | None:
    """Restores the newest step that reads back and matches its digest, falling back step by step.

    A step that fails (Orbax cannot read it, a digest differs, or ``validate(state)`` returns a reason) is moved to
    ``<directory>/<step>.corrupt`` and a :class:`CheckpointWarning` names it and the step tried next.

    Args:
      state_like: template of the state (arrays or ``jax.ShapeDtypeStruct``s).
      data_iter: Grain iterator to move to the saved position (left where it was when nothing is restored).
      validate: optional ``state -> None | reason`` run on each restored state (e.g. a finiteness check).

    Returns:
      :class:`Restored`, or None when there is no usable step.

    Raises:
      ValueError: if ``state_like`` does not match the saved tree (a caller's mistake: nothing is moved aside).
    """
    initial_data_state = None if data_iter is None else data_iter.get_state()
    steps = sorted(self.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        state, meta = self._restore_step(step, state_like, data_iter, validate)
      except CorruptCheckpointError as e:
        moved = self._quarantine(step)
        nxt = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no earlier step to fall back to"
        where = f"moved to {moved}" if moved is not None else "left in place"
        warnings.warn(f"{e} ({where}); {nxt}", CheckpointWarning, stacklevel=2)
        continue
      return Restored(step, state, meta)
    if data_iter is not None:
      data_iter.set_state(initial_data_state)
    return None

  def _quarantine(self, step: int) -> pathlib.Path | None:
    """Renames a bad step folder to ``<step>.corrupt`` (``.corrupt.1``, ... if taken) so Orbax no longer lists it and
    the step can be saved again. Only in single-process runs (several processes renaming one shared folder would
    race); elsewhere the folder stays and is skipped again on the next restore."""
    src = self._step_dir(step)
    if jax.process_count() != 1 or not src.exists():
      return None
    self._manager.wait_until_finished()
    dst = self.directory / f"{step}.corrupt"
    n = 0
    while dst.exists():
      n += 1
      dst = self.directory / f"{step}.corrupt.{n}"
    src.rename(dst)
    self._manager.reload()
    return dst

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
