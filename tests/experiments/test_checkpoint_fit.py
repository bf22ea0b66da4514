"""The training loop with damaged checkpoints and diverging runs: a corrupt newest step falls back to the previous good
one and still ends bit-identical to an uninterrupted run, resuming prints "resumed from step N of M", a run whose
loss turns NaN stops naming the step and is never recorded as finished."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.common import data as data_lib
from configs.mqar import TrainConfig
from experiments.common.checkpoint import Checkpointer, CheckpointWarning
from experiments.common.errors import NonFiniteError
from experiments.common.metrics import MetricWriter, read_jsonl
from experiments.common.train import Interrupted, Trainer, fit, tree_equal

DIM, N, BATCH, TOTAL, EVERY = 64, 64, 4, 12, 4


class _Regression(data_lib.GeneratedSource):
  """``y = x @ w_true``; record ``nan_at`` (if any) has a NaN input."""

  PARAMS = ("n", "seed", "nan_at")

  def __init__(self, n, seed, nan_at=None):
    self.n, self.seed, self.nan_at = n, seed, nan_at

  def generate(self):
    rng = np.random.default_rng(self.seed)
    x = rng.normal(size=(self.n, DIM)).astype(np.float32)
    y = x @ rng.normal(size=(DIM,)).astype(np.float32)
    if self.nan_at is not None:
      x[self.nan_at, 5] = np.nan
    return {"x": x, "y": y.astype(np.float32), "i": np.arange(self.n, dtype=np.int32)}


def _loss(model, batch, key):
  del key
  err = model(batch["x"])[:, 0] - batch["y"]
  return jnp.mean(err ** 2), {}


def _eval(model, batch):
  err = model(batch["x"])[:, 0] - batch["y"]
  valid = batch["valid"]
  return {"loss": jnp.sum(jnp.where(valid, err ** 2, 0.0)), "count": jnp.sum(valid)}


@pytest.fixture(scope="module")
def trainer():
  return Trainer(lambda rngs: nnx.Linear(DIM, DIM, rngs=rngs),  # w: a 16 KiB chunk on disk
                 _loss, _eval, total_steps=TOTAL, settings=TrainConfig(weight_decay=0.0))


def _fit(trainer, ckpt_dir, train=None, **kw):
  return fit(trainer, lr=0.01, seed=0, train_source=train or _Regression(N, 0), eval_source=_Regression(16, 1),
             batch_size=BATCH, eval_batch_size=8, eval_every=EVERY, checkpoint_dir=ckpt_dir, checkpoint_every=EVERY,
             log_every=0, progress=False, **kw)


def _flip_largest_state_file(step_dir: pathlib.Path) -> None:
  f = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  b = bytearray(f.read_bytes())
  b[len(b) // 2] ^= 0x10
  f.write_bytes(bytes(b))


@pytest.fixture(scope="module")
def full(trainer, tmp_path_factory):
  res = _fit(trainer, tmp_path_factory.mktemp("full") / "ck")
  assert res.steps == TOTAL and res.resumed_from is None and res.history[-1]["loss"] < res.history[0]["loss"]
  return res


def _killed(trainer, d: pathlib.Path):
  with pytest.raises(Interrupted):
    _fit(trainer, d, interrupt_after=10)  # checkpoints at 4 and 8 (kept: 2)
  assert sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) == [4, 8]


def test_bit_flipped_latest_step_falls_back_and_resumes_exactly(trainer, full, tmp_path, capsys):
  d = tmp_path / "ck"
  _killed(trainer, d)
  _flip_largest_state_file(d / "8")
  with pytest.warns(CheckpointWarning, match=r"checkpoint step 8 in .* is unusable: the restored arrays do not match "
                                             r"the SHA-256 digest.*falling back to step 4"):
    res = _fit(trainer, d, desc="run-a")
  assert "run-a: resumed from step 4 of 12" in capsys.readouterr().out
  assert res.resumed_from == 4 and res.steps == TOTAL
  assert tree_equal(res.state.params, full.state.params) and res.history == full.history
  again = _fit(trainer, d)  # finished: the stored result, announced as such
  assert "resumed from step 12 of 12" in capsys.readouterr().out and again.resumed_from == 12


def test_no_usable_step_trains_from_scratch_with_a_warning(trainer, full, tmp_path, capsys):
  d = tmp_path / "ck"
  _killed(trainer, d)
  _flip_largest_state_file(d / "8")
  f = max(((d / "4" / "state").rglob("*")), key=lambda p: p.stat().st_size if p.is_file() else -1)
  f.write_bytes(f.read_bytes()[:5])  # truncated
  with pytest.warns(CheckpointWarning) as rec:
    res = _fit(trainer, d)
  msgs = [str(w.message) for w in rec]
  assert any("step 4" in m and "Orbax could not read it" in m for m in msgs), msgs
  assert any("no usable checkpoint" in m and "training from scratch" in m for m in msgs), msgs
  assert "resumed from" not in capsys.readouterr().out
  assert res.resumed_from is None and tree_equal(res.state.params, full.state.params)


def test_restored_non_finite_parameters_are_rejected(trainer, full, tmp_path):
  """A step that reads back and matches its digest but holds NaN (saved by a broken older run) is not resumed."""
  d = tmp_path / "ck"
  _killed(trainer, d)
  template = trainer.init_state(0, 0.01)
  it = data_lib.train_iterator(_Regression(N, 0), batch_size=BATCH, seed=0)
  with Checkpointer(d) as ck:
    state, meta = ck.restore(template, it, step=8)
    poisoned = dataclasses.replace(state, params=jax.tree.map(lambda p: p * jnp.nan, state.params))
    ck.save(12, poisoned, it, meta={"history": meta["history"], "done": True})
  with pytest.warns(CheckpointWarning, match=r"step 12 .*non-finite values.*falling back to step 8"):
    res = _fit(trainer, d)
  assert res.resumed_from == 8 and tree_equal(res.state.params, full.state.params)


def _step_seeing(index: int, steps: int) -> int:
  it = data_lib.train_iterator(_Regression(N, 0), batch_size=BATCH, seed=0)
  for s in range(1, steps + 1):
    if index in next(it)["i"]:
      return s
  raise AssertionError(f"record {index} not seen in {steps} steps")


def test_nan_loss_stops_naming_the_step_and_never_finishes(trainer, tmp_path):
  it = data_lib.train_iterator(_Regression(N, 0), batch_size=BATCH, seed=0)
  batches = [next(it)["i"] for _ in range(TOTAL)]
  bad_record = int(batches[6][1])  # seen first at step 7 (one epoch is 16 steps, the run 12)
  assert _step_seeing(bad_record, TOTAL) == 7
  d = tmp_path / "ck"
  with MetricWriter(tmp_path / "m.jsonl", run="nan") as w:
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 7 of 12 .*not recorded as finished.*"
                                             r"checkpoints up to step 4") as e:
      _fit(trainer, d, train=_Regression(N, 0, nan_at=bad_record), writer=w)
  assert e.value.step == 7 and np.isnan(e.value.loss)
  assert sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) == [4]
  eval_steps = [r["step"] for r in read_jsonl(tmp_path / "m.jsonl") if "eval/loss" in r]
  assert eval_steps == [4]  # nothing of step 7 or later was evaluated or recorded
  with Checkpointer(d) as ck:
    _, meta = ck.restore(trainer.init_state(0, 0.01))
  assert meta["done"] is False
  # the same command again resumes from step 4 and stops at step 7 again: never recorded as finished
  with pytest.raises(NonFiniteError, match="step 7 of 12"):
    _fit(trainer, d, train=_Regression(N, 0, nan_at=bad_record))
  assert sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) == [4]


def test_train_step_reports_finiteness(trainer):
  state = trainer.init_state(0, 0.01)
  x = np.random.default_rng(0).normal(size=(BATCH, DIM)).astype(np.float32)
  _, m = trainer.train_step(state, {"x": x, "y": np.zeros(BATCH, np.float32), "i": np.arange(BATCH)})
  assert bool(m["finite"]) and np.isfinite(float(m["loss"]))
  x[0, 0] = np.inf
  _, m = trainer.train_step(state, {"x": x, "y": np.zeros(BATCH, np.float32), "i": np.arange(BATCH)})
  assert not bool(m["finite"])
