"""experiments.common: optimizer, Grain pipelines, Orbax checkpoints with the iterator, metrics, plots."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.common import data as data_lib
from experiments.common.checkpoint import Checkpointer
from experiments.common.metrics import MetricWriter, read_jsonl
from experiments.common.plots import line_panels
from experiments.common.train import adamw_cosine, set_peak_lr, tree_equal, unit_schedule


@dataclasses.dataclass(frozen=True)
class _Opt:
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  warmup_steps: int = 0
  grad_clip: float | None = None


class _Squares(data_lib.GeneratedSource):
  PARAMS = ("n", "seed")

  def __init__(self, n, seed):
    self.n, self.seed = n, seed

  def generate(self):
    rng = np.random.default_rng(self.seed)
    return {"x": rng.normal(size=(self.n, 3)).astype(np.float32), "i": np.arange(self.n, dtype=np.int32)}


@pytest.mark.parametrize("warmup", [0, 3])
def test_adamw_cosine_equals_optax_adamw_with_peak_times_schedule(warmup):
  total, peak = 10, 3e-3
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  ours = adamw_cosine(total, _Opt(warmup_steps=warmup))
  ref = optax.adamw(lambda t: peak * unit_schedule(total, warmup)(t), weight_decay=0.1)
  s1, s2 = set_peak_lr(ours.init(params), peak), ref.init(params)
  p1 = p2 = params
  for t in range(total):
    g = jax.tree.map(lambda p: jnp.sin(p * (t + 1)), p1)
    u1, s1 = ours.update(g, s1, p1)
    u2, s2 = ref.update(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p1, p2)
  assert float(unit_schedule(total, warmup)(total)) == pytest.approx(0.0, abs=1e-7)


def test_generated_source_and_pipelines():
  src = _Squares(10, 0)
  assert len(src) == 10 and repr(src) == "_Squares(n=10, seed=0)"
  np.testing.assert_array_equal(src[3]["i"], 3)
  it = data_lib.train_iterator(src, batch_size=4, seed=1)
  seen = np.concatenate([next(it)["i"] for _ in range(5)])  # 20 records = 2 epochs, each a permutation
  assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
  assert seen[:10].tolist() != seen[10:].tolist()  # reshuffled per epoch
  batches = list(data_lib.eval_batches(src, 4, pad_values={"i": -1}))
  assert [b["valid"].sum() for b in batches] == [4, 4, 2]
  np.testing.assert_array_equal(batches[-1]["i"], [8, 9, -1, -1])
  with pytest.raises(ValueError, match="batch_size 11 is larger than the data set"):
    data_lib.train_dataset(src, batch_size=11, seed=0)


def test_checkpoint_restores_state_iterator_and_meta(tmp_path):
  src = _Squares(12, 0)
  it = data_lib.train_iterator(src, batch_size=3, seed=2)
  for _ in range(5):
    next(it)
  state = {"params": {"w": jnp.arange(4.0), "layers": {0: jnp.ones(2)}}, "step": jnp.asarray(5)}
  with Checkpointer(tmp_path / "ck", max_to_keep=1) as ck:
    assert ck.latest_step() is None
    ck.save(5, state, it, meta={"history": [{"step": 5, "accuracy": 0.5}]})
  expected_next = next(it)["i"]
  it2 = data_lib.train_iterator(src, batch_size=3, seed=2)
  with Checkpointer(tmp_path / "ck") as ck:
    assert ck.latest_step() == 5
    template = jax.tree.map(jnp.zeros_like, state)
    restored, meta = ck.restore(template, it2)
  assert tree_equal(restored, state)
  assert meta == {"history": [{"step": 5, "accuracy": 0.5}]}
  np.testing.assert_array_equal(next(it2)["i"], expected_next)
  with pytest.raises(FileNotFoundError):
    Checkpointer(tmp_path / "empty").restore(state)


def test_metric_writer_and_plot(tmp_path):
  with MetricWriter(tmp_path / "m.jsonl", run="r1") as w:
    w.write(3, {"loss": jnp.asarray(1.5), "acc": 0.25, "bad": float("nan")})
  rows = read_jsonl(tmp_path / "m.jsonl")
  assert rows[0]["run"] == "r1" and rows[0]["step"] == 3 and rows[0]["loss"] == 1.5 and rows[0]["bad"] is None
  json.dumps(rows)
  with pytest.raises(ValueError, match="scalars"):
    MetricWriter(tmp_path / "m.jsonl").write(1, {"v": jnp.ones(2)})
  png = line_panels({"N=64": {"attention": ([32, 64], [0.5, 1.0])}, "N=128": {}}, tmp_path / "p.png",
                    xlabel="d", ylabel="acc", log2_x=True, ylim=(0, 1))
  assert png.read_bytes()[:4] == b"\x89PNG"


def test_tree_equal():
  a = {"x": jnp.ones(3), "y": (jnp.zeros(2, jnp.int32),)}
  assert tree_equal(a, jax.tree.map(lambda v: v + 0, a))
  assert not tree_equal(a, {"x": jnp.ones(3).at[1].set(1.0000001), "y": (jnp.zeros(2, jnp.int32),)})
  assert not tree_equal(a, {"x": jnp.ones(3), "y": (jnp.zeros(2, jnp.float32),)})
