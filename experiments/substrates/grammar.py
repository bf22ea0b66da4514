"""Question and referring-expression grammar over digit canvases, with box-as-text answers.

One vocabulary serves every toy task (a VQA classifier reads the question tokens; the toy VLM reads
``<bos> question answer <eos>``). Question types (``QTYPES``) and their answers:

==========  =========================================  ==========================================================
type        question                                   answer
==========  =========================================  ==========================================================
exists      ``is there a 7 ?``                         ``yes`` / ``no`` (present and absent digits 50/50)
rel_yn      ``is the 3 left of the 7 ?``               ``yes`` / ``no``: the relation between the two box centres
                                                       (left/right/above/below; asked only when the two centres
                                                       differ on that axis)
rel_what    ``what digit is left of the 3 ?``          the digit nearest to the 3 (centre distance) among those
                                                       whose centre is at least 4 px to its left; ``none`` if none
where       ``where is the 5 ?``                       four coordinate tokens ``<x0> <y0> <x1> <y1>``
which_at    ``which digit is at <x0> <y0> <x1> <y1> ?``  the digit in that box
==========  =========================================  ==========================================================

Coordinates are pixels divided by ``coord_step`` (token ``c<k>`` means ``k * coord_step`` pixels), so boxes are
exact in text (Pink serialises boxes the same way, as text coordinates).
"""

from __future__ import annotations

import numpy as np

from configs.substrates import QTYPES, CanvasConfig

__all__ = ["QTYPES", "RELATIONS", "ANSWERS", "Vocab", "vocab", "ask", "make_questions", "relation_holds"]

RELATIONS = ("left", "right", "above", "below")
ANSWERS = ("yes", "no", "none") + tuple(str(d) for d in range(10))  # classifier answers (not coordinates)
_WORDS = ("<pad>", "<bos>", "<eos>", "?", "is", "there", "a", "the", "what", "digit", "of", "where", "which", "at",
          "yes", "no", "none") + RELATIONS + tuple(str(d) for d in range(10))
MIN_OFFSET = 4  # rel_what: a digit is "left of" another when its centre is at least this many pixels further left


class Vocab:
  """Word <-> id for a canvas size: the fixed words, then one token ``c<k>`` per box coordinate."""

  def __init__(self, cfg: CanvasConfig):
    self.num_coords = cfg.size // cfg.coord_step + 1
    self.words = _WORDS + tuple(f"c{k}" for k in range(self.num_coords))
    self.ids = {w: i for i, w in enumerate(self.words)}
    self.coord_step = cfg.coord_step
    self.pad, self.bos, self.eos = self.ids["<pad>"], self.ids["<bos>"], self.ids["<eos>"]

  def __len__(self) -> int:
    return len(self.words)

  def encode(self, words) -> list[int]:
    return [self.ids[w] for w in words]

  def decode(self, ids) -> list[str]:
    return [self.words[int(i)] for i in ids if int(i) != self.pad]

  def box_words(self, box) -> list[str]:
    return [f"c{int(v) // self.coord_step}" for v in box]

  def coord_value(self, token_id: int) -> int:
    """Pixels of a coordinate token (-1 for any other token)."""
    w = self.words[int(token_id)]
    return int(w[1:]) * self.coord_step if w.startswith("c") and w[1:].isdigit() else -1

  def answer_index(self, word: str) -> int:
    return ANSWERS.index(word)


def vocab(cfg: CanvasConfig) -> Vocab:
  return Vocab(cfg)


def _centre(box) -> tuple[float, float]:
  return (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0


def relation_holds(rel: str, a_box, b_box, min_offset: float = 0.0) -> bool:
  """True when box ``a`` is ``rel`` (left/right/above/below) of box ``b``: the centres differ in that direction
  by more than 0 pixels (``min_offset=0``) or by at least ``min_offset`` pixels (y grows downwards)."""
  (ax, ay), (bx, by) = _centre(a_box), _centre(b_box)
  d = {"left": bx - ax, "right": ax - bx, "above": by - ay, "below": ay - by}[rel]
  return d > min_offset if min_offset == 0 else d >= min_offset


def ask(qtype: str, labels, boxes, rng: np.random.Generator, cfg: CanvasConfig) -> tuple[list[str], list[str]]:
  """One question of type ``qtype`` about a scene (``labels [k]``, ``boxes [k, 4]``, no padding rows):
  ``(question words, answer words)``."""
  k = len(labels)
  labels = [int(c) for c in labels]
  v = Vocab(cfg)
  if qtype == "exists":
    if rng.random() < 0.5:
      d, ans = labels[int(rng.integers(k))], "yes"
    else:
      d, ans = int(rng.choice([c for c in range(10) if c not in labels])), "no"
    return ["is", "there", "a", str(d), "?"], [ans]
  if qtype == "rel_yn":
    while True:
      i, j = (int(x) for x in rng.choice(k, size=2, replace=False))
      rel = RELATIONS[int(rng.integers(4))]
      axis = 0 if rel in ("left", "right") else 1
      if _centre(boxes[i])[axis] != _centre(boxes[j])[axis]:
        break
    ans = "yes" if relation_holds(rel, boxes[i], boxes[j]) else "no"
    return ["is", "the", str(labels[i]), rel, "of", "the", str(labels[j]), "?"], [ans]
  if qtype == "rel_what":
    j = int(rng.integers(k))
    rel = RELATIONS[int(rng.integers(4))]
    cands = [i for i in range(k) if i != j and relation_holds(rel, boxes[i], boxes[j], MIN_OFFSET)]
    if cands:
      dist = [np.hypot(*np.subtract(_centre(boxes[i]), _centre(boxes[j]))) for i in cands]
      ans = str(labels[cands[int(np.argmin(dist))]])
    else:
      ans = "none"
    return ["what", "digit", "is", rel, "of", "the", str(labels[j]), "?"], [ans]
  if qtype == "where":
    j = int(rng.integers(k))
    return ["where", "is", "the", str(labels[j]), "?"], v.box_words(boxes[j])
  if qtype == "which_at":
    j = int(rng.integers(k))
    return ["which", "digit", "is", "at", *v.box_words(boxes[j]), "?"], [str(labels[j])]
  raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")


def make_questions(scenes: dict[str, np.ndarray], qtypes, cfg: CanvasConfig, seed: int, max_question: int = 12,
                   max_answer: int = 4) -> dict[str, np.ndarray]:
  """One question per scene, its type drawn uniformly from ``qtypes``.

  Returns arrays (``n`` records):
    ``qtype`` int32 (index in :data:`QTYPES`), ``question`` int32 ``[max_question]`` (padded),
    ``question_len`` int32, ``answer`` int32 ``[max_answer]`` (padded), ``answer_len`` int32, ``answer_class``
    int32 (index in :data:`ANSWERS`, -1 for box answers).
  """
  bad = [q for q in qtypes if q not in QTYPES]
  if not qtypes or bad:
    raise ValueError(f"qtypes must be a non-empty subset of {QTYPES}, got {tuple(qtypes)!r}")
  v = Vocab(cfg)
  n = scenes["labels"].shape[0]
  rng = np.random.default_rng([seed, 104729])
  out = dict(qtype=np.zeros(n, np.int32), question=np.full((n, max_question), v.pad, np.int32),
             question_len=np.zeros(n, np.int32), answer=np.full((n, max_answer), v.pad, np.int32),
             answer_len=np.zeros(n, np.int32), answer_class=np.full(n, -1, np.int32))
  for i in range(n):
    k = int(scenes["count"][i])
    t = int(rng.integers(len(qtypes)))
    q, a = ask(qtypes[t], scenes["labels"][i, :k], scenes["boxes"][i, :k], rng, cfg)
    if len(q) > max_question or len(a) > max_answer:
      raise ValueError(f"question {q} / answer {a} longer than max_question={max_question} / "
                       f"max_answer={max_answer}")
    out["qtype"][i] = QTYPES.index(qtypes[t])
    out["question"][i, :len(q)] = v.encode(q)
    out["question_len"][i] = len(q)
    out["answer"][i, :len(a)] = v.encode(a)
    out["answer_len"][i] = len(a)
    if a[0] in ANSWERS:
      out["answer_class"][i] = ANSWERS.index(a[0])
  return out
