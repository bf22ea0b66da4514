"""Shared toy substrates: deterministic canvases with boxes inside the canvas and disjoint digit images, grammar
answers checked on a hand-built scene, ViT / VLM shapes, and the VLM cache folder."""

import dataclasses

import numpy as np
import pytest

from configs.substrates import CanvasConfig, LMConfig, TrainConfig, ViTConfig, VLMConfig
from experiments.substrates import canvas, grammar

CFG = CanvasConfig()


def test_scenes_are_deterministic_and_boxes_inside_the_canvas():
  a = canvas.make_scenes(CFG, 40, seed=3)
  b = canvas.make_scenes(CFG, 40, seed=3)
  c = canvas.make_scenes(CFG, 40, seed=4)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["image"], c["image"])
  assert a["image"].shape == (40, 32, 32) and a["boxes"].shape == (40, 4, 4) and a["objects"].shape == (40, 4, 64)
  for i in range(40):
    k = a["count"][i]
    assert CFG.min_digits <= k <= CFG.max_digits
    lab, box = a["labels"][i, :k], a["boxes"][i, :k]
    assert len(set(lab.tolist())) == k and (a["labels"][i, k:] == -1).all()
    assert (box[:, :2] >= 0).all() and (box[:, 2:] <= CFG.size).all()
    assert (box[:, 2] - box[:, 0] == 8).all() and (box[:, 3] - box[:, 1] == 8).all()
    assert (box[:, :2] % CFG.coord_step == 0).all()
    # no two boxes overlap
    ious = canvas.iou(box[:, None], box[None])
    assert np.allclose(ious[~np.eye(k, dtype=bool)], 0.0)
    # the region crop is the canvas under the box
    x0, y0, x1, y1 = box[0]
    np.testing.assert_array_equal(a["objects"][i, 0], a["image"][i, y0:y1, x0:x1].reshape(-1))


def test_train_and_test_never_share_a_digit_image():
  tr, _ = canvas.digit_pool("train")
  te, _ = canvas.digit_pool("test")
  assert len(tr) + len(te) == 1797
  flat = {x.tobytes() for x in tr}
  assert sum(x.tobytes() in flat for x in te) <= 2  # sklearn holds a couple of exact duplicate images
  with pytest.raises(ValueError, match="split"):
    canvas.digit_pool("val")


def test_iou():
  assert canvas.iou(np.array([0, 0, 8, 8]), np.array([0, 0, 8, 8])) == 1.0
  assert canvas.iou(np.array([0, 0, 8, 8]), np.array([4, 0, 12, 8])) == pytest.approx(32 / 96)
  assert canvas.iou(np.array([0, 0, 8, 8]), np.array([8, 8, 16, 16])) == 0.0


def test_grammar_answers_on_a_checked_scene():
  # 3 at the top left, 7 at the top right, 5 below the 3
  labels = np.array([3, 7, 5])
  boxes = np.array([[0, 0, 8, 8], [20, 0, 28, 8], [0, 20, 8, 28]])
  rng = np.random.default_rng(0)
  v = grammar.Vocab(CFG)
  seen = set()
  for _ in range(300):
    for qt in grammar.QTYPES:
      q, a = grammar.ask(qt, labels, boxes, rng, CFG)
      seen.add((qt, " ".join(q), " ".join(a)))
  got = {q: a for _, q, a in seen}
  assert got["is the 3 left of the 7 ?"] == "yes" and got["is the 7 left of the 3 ?"] == "no"
  assert got["is the 5 below of the 3 ?"] == "yes" and got["is the 3 below of the 5 ?"] == "no"
  assert got["what digit is right of the 3 ?"] == "7"
  assert got["what digit is below of the 3 ?"] == "5"
  assert got["what digit is left of the 3 ?"] == "none"
  assert got["where is the 7 ?"] == "c10 c0 c14 c4"
  assert got["which digit is at c0 c10 c4 c14 ?"] == "5"
  assert got["is there a 7 ?"] == "yes" and got.get("is there a 0 ?", "no") == "no"
  assert v.coord_value(v.ids["c10"]) == 20 and v.coord_value(v.ids["yes"]) == -1
  with pytest.raises(ValueError, match="qtype"):
    grammar.ask("count", labels, boxes, rng, CFG)


def test_make_questions_fields():
  s = canvas.make_scenes(CFG, 30, seed=0)
  q = grammar.make_questions(s, ("where", "exists"), CFG, seed=0)
  assert set(np.unique(q["qtype"])) <= {grammar.QTYPES.index("where"), grammar.QTYPES.index("exists")}
  where = q["qtype"] == grammar.QTYPES.index("where")
  assert (q["answer_len"][where] == 4).all() and (q["answer_class"][where] == -1).all()
  assert (q["answer_len"][~where] == 1).all() and (q["answer_class"][~where] >= 0).all()
  with pytest.raises(ValueError, match="qtypes"):
    grammar.make_questions(s, ("bogus",), CFG, seed=0)


def test_configs_reject_bad_values():
  with pytest.raises(ValueError, match="canvas.size"):
    CanvasConfig(size=30, coord_step=4)
  with pytest.raises(ValueError, match="max_digits"):
    CanvasConfig(size=16, max_digits=5)
  with pytest.raises(ValueError, match="qtypes"):
    VLMConfig("x", qtypes=("count",))


SMALL = VLMConfig("t", vit=ViTConfig(patch=8, d_model=16, num_heads=2, num_layers=1),
                  lm=LMConfig(d_model=16, num_heads=2, num_layers=1), qtypes=("where", "which_at"),
                  train=TrainConfig(steps=4, eval_every=2, batch_size=8, eval_batch_size=16, warmup_steps=1,
                                    num_train=32, num_eval=16))


@pytest.mark.slow
def test_vit_and_vlm_shapes_and_source():
  import jax.numpy as jnp
  from flax import nnx

  from experiments.substrates import vit, vlm
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32)), jnp.float32)
  p = vit.patchify(x, 8)
  assert p.shape == (2, 16, 64)
  np.testing.assert_array_equal(np.asarray(p[0, 1]), np.asarray(x[0, 0:8, 8:16]).reshape(-1))
  enc = vit.ViTTiny(SMALL.vit, 32, rngs=nnx.Rngs(0))
  assert enc(x).shape == (2, 16, 16)
  src = vlm.VLMSource(SMALL, SMALL.qtypes, 6, seed=0, split="test")
  a = src.arrays
  assert a["tokens"].shape == (6, SMALL.lm.max_text) and a["weights"].sum() == a["answer_len"].sum()
  v = grammar.Vocab(SMALL.canvas)
  assert (a["tokens"][:, 0] == v.bos).all()
  model = vlm.build(SMALL)
  logits = model(a["image"], a["tokens"])
  assert logits.shape == (6, SMALL.lm.max_text, len(v)) and np.isfinite(np.asarray(logits)).all()
  ans = vlm.generate_answers(model, src, batch_size=4)
  assert ans.shape == (6, vlm.MAX_ANSWER)
  assert ((ans != v.pad).sum(1) <= a["answer_len"]).all()


def test_cache_folder_depends_on_settings_not_name(tmp_path):
  from experiments.substrates import vlm
  a = vlm.substrate_dir(SMALL, tmp_path)
  assert a == vlm.substrate_dir(dataclasses.replace(SMALL, name="other"), tmp_path)
  assert a != vlm.substrate_dir(dataclasses.replace(SMALL, blind=True), tmp_path)
  assert a.parent == tmp_path
