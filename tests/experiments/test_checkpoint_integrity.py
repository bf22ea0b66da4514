"""Checkpoints that cannot lie: real damaged files on disk (a flipped bit, a truncated chunk, an edited JSON record, a
moved data position) are caught on restore, the newest step falls back to the previous good one with a warning
naming the step, and with none good nothing is restored."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.common import data as data_lib
from experiments.common.checkpoint import Checkpointer, CheckpointWarning, CorruptCheckpointError, tree_digest
from experiments.common.train import tree_equal


class _Records(data_lib.GeneratedSource):
  PARAMS = ("n",)

  def __init__(self, n):
    self.n = n

  def generate(self):
    return {"i": np.arange(self.n, dtype=np.int32)}


def _state(seed: int) -> dict:
  # random normal values: incompressible enough that the array chunk is the largest file of the step
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"params": {"w": jax.random.normal(k1, (64, 64)), "b": jax.random.normal(k2, (7,))},
          "step": jnp.asarray(seed, jnp.int32)}


def _save_two(directory: pathlib.Path, data_iter=None):
  """Steps 1 and 2 with different states and metas; returns the states."""
  s1, s2 = _state(1), _state(2)
  with Checkpointer(directory, max_to_keep=3) as ck:
    if data_iter is not None:
      next(data_iter)
    ck.save(1, s1, data_iter, meta={"history": [{"step": 1, "accuracy": 0.25}], "done": False})
    if data_iter is not None:
      next(data_iter)
    ck.save(2, s2, data_iter, meta={"history": [{"step": 2, "accuracy": 0.5}], "done": True})
  return s1, s2


def _chunk_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest file of the saved state: the compressed chunk holding ``w``'s bytes."""
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_bit(path: pathlib.Path, where: float = 0.5, mask: int = 0x08) -> None:
  b = bytearray(path.read_bytes())
  b[int(len(b) * where)] ^= mask
  path.write_bytes(bytes(b))


def test_digest_is_sensitive_to_every_leaf_bit_dtype_and_path():
  s = _state(0)
  d = tree_digest(s)
  assert d == tree_digest(jax.tree.map(lambda x: x + 0, s))
  w = np.asarray(s["params"]["w"]).copy()
  w.view(np.uint32)[10, 3] ^= 1  # one bit of one float
  assert tree_digest({**s, "params": {**s["params"], "w": jnp.asarray(w)}}) != d
  assert tree_digest({**s, "step": s["step"].astype(jnp.int64 if jax.config.x64_enabled else jnp.uint32)}) != d
  assert tree_digest({"params": {"w": s["params"]["b"], "b": s["params"]["w"]}, "step": s["step"]}) != d


def test_bit_flip_in_array_data_is_caught_and_falls_back(tmp_path):
  d = tmp_path / "ck"
  s1, s2 = _save_two(d)
  _flip_bit(_chunk_file(d / "2"))
  # what Orbax alone does with this file: restores it silently, with different numbers
  raw = ocp.StandardCheckpointer().restore(d / "2" / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, s2))
  assert not tree_equal(raw, s2), "the flip did not change the data; the test would prove nothing"
  with Checkpointer(d) as ck:
    with pytest.raises(CorruptCheckpointError, match="step 2 .*do not match the SHA-256 digest"):
      ck.restore(s1, step=2)  # an explicitly named step raises and is left in place
    assert ck.all_steps() == [1, 2]
    with pytest.warns(CheckpointWarning, match=r"checkpoint step 2 in .* is unusable.*falling back to step 1"):
      r = ck.restore_latest(jax.tree.map(jnp.zeros_like, s1))
    assert r.step == 1 and tree_equal(r.state, s1) and r.meta["done"] is False
    assert ck.all_steps() == [1]
  assert (d / "2.corrupt").is_dir() and not (d / "2").exists()  # kept for inspection, out of Orbax's way
  with Checkpointer(d) as ck:  # the step can be written again and then restores normally
    ck.save(2, s2, meta={"done": True})
  with Checkpointer(d) as ck:
    state, meta = ck.restore(s1)
  assert tree_equal(state, s2) and meta == {"done": True}


def test_truncated_chunk_falls_back_with_orbax_error_named(tmp_path):
  d = tmp_path / "ck"
  s1, _ = _save_two(d)
  f = _chunk_file(d / "2")
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with Checkpointer(d) as ck, pytest.warns(CheckpointWarning, match=r"step 2 .*Orbax could not read it"):
    state, meta = ck.restore(s1)  # the default restore falls back too
  assert tree_equal(state, s1) and meta["history"] == [{"step": 1, "accuracy": 0.25}]


def test_edited_json_record_is_caught(tmp_path):
  d = tmp_path / "ck"
  s1, _ = _save_two(d)
  (meta_file,) = [p for p in (d / "2" / "meta").iterdir() if p.is_file() and "0.5" in p.read_text()]
  meta_file.write_text(meta_file.read_text().replace("0.5", "0.9"))  # still valid JSON, different number
  with Checkpointer(d) as ck, pytest.warns(CheckpointWarning, match=r"step 2 .*JSON record \(meta\) does not match"):
    r = ck.restore_latest(s1)
  assert r.step == 1


def test_moved_data_position_is_caught(tmp_path):
  d = tmp_path / "ck"
  src = _Records(12)
  s1, _ = _save_two(d, data_lib.train_iterator(src, batch_size=2, seed=0))
  files = [p for p in (d / "2" / "data").rglob("*") if p.is_file() and '"next_index": 2' in p.read_text()]
  assert files, sorted(p.name for p in (d / "2" / "data").rglob("*"))
  files[0].write_text(files[0].read_text().replace('"next_index": 2', '"next_index": 5'))
  it = data_lib.train_iterator(src, batch_size=2, seed=0)
  with Checkpointer(d) as ck, pytest.warns(CheckpointWarning, match="data-iterator position does not match"):
    r = ck.restore_latest(s1, it)
  assert r.step == 1 and it.get_state() == {"next_index": 1}


def test_no_good_step_restores_nothing_and_leaves_iterator(tmp_path):
  d = tmp_path / "ck"
  src = _Records(12)
  s1, _ = _save_two(d, data_lib.train_iterator(src, batch_size=2, seed=0))
  for step in (1, 2):
    _flip_bit(_chunk_file(d / str(step)), where=0.3)
  it = data_lib.train_iterator(src, batch_size=2, seed=0)
  with Checkpointer(d) as ck:
    with pytest.warns(CheckpointWarning) as rec:
      assert ck.restore_latest(s1, it) is None
    msgs = [str(w.message) for w in rec if issubclass(w.category, CheckpointWarning)]
    assert any("step 2" in m and "falling back to step 1" in m for m in msgs), msgs
    assert any("step 1" in m and "no earlier step" in m for m in msgs), msgs
    assert it.get_state() == {"next_index": 0}  # untouched by the failed attempts
    assert ck.all_steps() == []
  assert sorted(p.name for p in d.iterdir() if "corrupt" in p.name) == ["1.corrupt", "2.corrupt"]


def test_restore_validate_rejects_a_well_formed_step(tmp_path):
  d = tmp_path / "ck"
  s1, s2 = _save_two(d)
  with Checkpointer(d) as ck, pytest.warns(CheckpointWarning, match="step 2 .*bad w"):
    r = ck.restore_latest(s1, validate=lambda s: "bad w" if float(s["step"]) == 2 else None)
  assert r.step == 1 and tree_equal(r.state, s1)


def test_integrity_record_is_stored_beside_each_step(tmp_path):
  d = tmp_path / "ck"
  _, s2 = _save_two(d)
  (rec_file,) = [p for p in (d / "2" / "integrity").iterdir() if p.is_file() and "sha256" in p.read_text()]
  rec = json.loads(rec_file.read_text())
  assert rec["format"] == 1 and rec["state_sha256"] == tree_digest(s2) and len(rec["meta_sha256"]) == 64


def test_wrong_template_raises_and_moves_nothing(tmp_path):
  """A caller's mistake (another architecture, another dtype) is not damage: no step is moved aside."""
  d = tmp_path / "ck"
  s1, _ = _save_two(d)
  wider = {**s1, "params": {**s1["params"], "b": jnp.zeros(8)}}
  cast = {**s1, "params": {**s1["params"], "w": s1["params"]["w"].astype(jnp.bfloat16)}}
  with Checkpointer(d) as ck:
    with pytest.raises(ValueError, match=r"template does not match checkpoint step 2 .*\['params'\]\['b'\]"):
      ck.restore_latest(wider)
    with pytest.raises(ValueError, match=r"\['params'\]\['w'\]: saved \['float32', \[64, 64\]\], template "
                                         r"\['bfloat16'"):
      ck.restore(cast)
    assert ck.all_steps() == [1, 2]
  assert not [p for p in d.iterdir() if "corrupt" in p.name]


def test_edited_integrity_record_is_damage_not_a_template_error(tmp_path):
  d = tmp_path / "ck"
  s1, _ = _save_two(d)
  (rec_file,) = [p for p in (d / "2" / "integrity").iterdir() if p.is_file() and "sha256" in p.read_text()]
  rec_file.write_text(rec_file.read_text().replace("64, 64", "64, 65", 1))  # valid JSON, a wrong saved shape
  with Checkpointer(d) as ck, pytest.warns(CheckpointWarning, match="step 2 .*integrity record does not match"):
    r = ck.restore_latest(s1)
  assert r.step == 1
