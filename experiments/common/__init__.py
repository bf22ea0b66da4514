"""Shared experiment machinery (pure functions around Flax NNX models).

- :mod:`~experiments.common.config`: frozen-dataclass configs <-> JSON and ``--dotted.field value`` overrides;
  the one-line-error ``ArgumentParser`` and value types (``positive_int``, ...) every subcommand uses.
- :mod:`~experiments.common.data`: Grain sources whose records are pure functions of (parameters, seed, index);
  train / eval pipelines.
- :mod:`~experiments.common.train`: AdamW + cosine (optax), jitted steps, the resumable training loop.
- :mod:`~experiments.common.checkpoint`: Orbax checkpoints of state + Grain iterator + history, verified against a
  stored SHA-256 digest on restore; a damaged newest step falls back to the previous one.
- :mod:`~experiments.common.errors`: one-line user-facing errors (diverged run, unusable checkpoint) and the
  missing-extra message.
- :mod:`~experiments.common.paths`: default output folders (``runs/``, git-ignored) vs the committed
  ``experiments/results/``.
- :mod:`~experiments.common.metrics`: JSONL (and tensorboardX) metric writer.
- :mod:`~experiments.common.plots`: matplotlib PNG plots.
- :mod:`~experiments.common.distributed`: ``jax.distributed`` start-up for multi-host runs.

Submodules are imported on use (``from experiments.common import train``) so that importing the package is cheap.
"""
