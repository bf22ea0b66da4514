"""Grain data sources and pipelines for synthetic tasks.

A :class:`GeneratedSource` is a ``grain.sources.RandomAccessDataSource`` whose records are rows of arrays made by a
deterministic generator from the source's hyper-parameters and seed: record ``i`` is a pure function of
``(parameters, seed, i)``, whatever the access order, shuffling, sharding or process. Only the parameters are
pickled (worker processes regenerate the arrays), and ``repr`` lists them all (Grain checkpoints key on it).

Pipelines (Grain's ``MapDataset`` API)::

    train: source -> seed -> shuffle (reshuffled every epoch) -> repeat -> batch (drop remainder) -> iterator
    eval:  source -> batch (last batch padded to full size, with a ``valid`` mask)

The training iterator's position is checkpointable (``get_state`` / ``set_state``, or
``grain.checkpoint.CheckpointSave`` in an Orbax ``CheckpointManager``; see :mod:`experiments.common.checkpoint`).
"""

from __future__ import annotations

import abc
from typing import Iterator, Mapping

import grain
import numpy as np

__all__ = ["GeneratedSource", "train_dataset", "train_iterator", "eval_batches"]


class GeneratedSource(grain.sources.RandomAccessDataSource, abc.ABC):
  """Base class: records are the rows of the arrays returned by :meth:`generate` (generated once per process).

  Subclasses set their hyper-parameters as attributes in ``__init__`` (listed in ``PARAMS`` for ``repr``) and
  implement :meth:`generate`, which must be deterministic (seed every random draw from the parameters).
  """

  PARAMS: tuple[str, ...] = ()

  @abc.abstractmethod
  def generate(self) -> Mapping[str, np.ndarray]:
    """All records at once: a dict of arrays sharing their first axis (the record index)."""

  @property
  def arrays(self) -> Mapping[str, np.ndarray]:
    """The generated arrays (cached)."""
    cache = self.__dict__.get("_arrays")
    if cache is None:
      cache = dict(self.generate())
      sizes = {k: v.shape[0] for k, v in cache.items()}
      if len(set(sizes.values())) != 1:
        raise ValueError(f"{type(self).__name__}.generate returned arrays of different lengths {sizes}")
      self.__dict__["_arrays"] = cache
    return cache

  def __len__(self) -> int:
    return next(iter(self.arrays.values())).shape[0]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f"record {index} out of range for {self!r} with {n} records")
    return {k: v[index] for k, v in self.arrays.items()}

  def __repr__(self) -> str:
    args = ", ".join(f"{p}={getattr(self, p)!r}" for p in self.PARAMS)
    return f"{type(self).__name__}({args})"

  def __getstate__(self):
    state = dict(self.__dict__)
    state.pop("_arrays", None)  # regenerate in the receiving process instead of shipping the arrays
    return state


def train_dataset(source, *, batch_size: int, seed: int, num_epochs: int | None = None) -> grain.MapDataset:
  """``source -> shuffle (per epoch, seeded) -> repeat(num_epochs; None = forever) -> batch(drop_remainder)``.

  Raises:
    ValueError: if ``batch_size`` is not positive or larger than the source.
  """
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if batch_size > len(source):
    raise ValueError(f"batch_size {batch_size} is larger than the data set ({len(source)} records)")
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(num_epochs)
  return ds.batch(batch_size, drop_remainder=True)


def train_iterator(source, *, batch_size: int, seed: int, num_threads: int = 0) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of training batches (dicts of ``[batch_size, ...]`` numpy arrays).

  ``num_threads=0`` reads in the calling thread (records here are array slices; background threads would only
  compete with XLA for the cores).
  """
  ds = train_dataset(source, batch_size=batch_size, seed=seed)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)))


def eval_batches(source, batch_size: int, pad_values: Mapping[str, int | float] | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """The source in order, in batches of exactly ``batch_size`` (one compiled eval step serves them all).

  The last batch is padded with ``pad_values[key]`` (default 0) and every batch carries ``valid`` (bool
  ``[batch_size]``, False on padding rows).
  """
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  pad_values = dict(pad_values or {})
  for batch in grain.MapDataset.source(source).batch(batch_size, drop_remainder=False):
    n = next(iter(batch.values())).shape[0]
    if n < batch_size:
      batch = {k: np.concatenate([v, np.full((batch_size - n,) + v.shape[1:], pad_values.get(k, 0), v.dtype)])
               for k, v in batch.items()}
    batch["valid"] = np.arange(batch_size) < n
    yield batch
