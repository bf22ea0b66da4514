"""Template text with latent slots and topic labels (numpy only): paraphrase pairs, retrieval corpora with planted
evidence at a controlled position, long documents of 64-512 tokens.

A sentence renders a **latent tuple** ``(subject, verb, object, modifier)`` of concept indices: a template (word
order and function words) is drawn, and every concept is written as one of its synonyms. Two renderings of the
same tuple are paraphrases; the graded gold similarity of two sentences is the fraction of slots their tuples share
(0, 1/4, ..., 1: Trans-Encoder's / DSE's synthetic STS, ``papers/cross.md`` §4, §6 in the shared notes). The topic
label of a sentence is its object's concept group (``object // (num_concepts // num_topics)``).

**Splits by construction:** every tuple belongs to ``test`` or ``train`` by a fixed hash (``test_fraction`` of the
tuple space), and every generator draws all its tuples (anchors, paraphrases, negatives, evidence, near misses)
from its own split, so train and test never share a latent tuple.

- :func:`paraphrase_pairs`: ``(a, b)`` sentence pairs, half paraphrases (same tuple, independently re-rendered),
  half non-paraphrases sharing ``0..3`` slots (mostly 2-3: hard negatives); label and graded similarity.
- :func:`retrieval_corpus`: per query a question about one tuple (its own synonyms), a positive document of length
  ``L`` (from ``doc_lengths``) of noise words with the evidence sentence starting at relative position ``r``
  (uniform over ``position_bins`` bins), a few distractor fact sentences, and ``hard_negatives`` documents that
  hold a near-miss sentence (the query's tuple with one or two slots changed) instead of the evidence.
- :class:`Vocab`: ids and words (``decode`` for reading samples); ids 0 pad, 1 [CLS], 2 [SEP] as
  :mod:`jaxattn.nn.pair` expects.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["TextSpec", "Vocab", "SLOTS", "TEMPLATES", "tuple_split", "render", "paraphrase_pairs",
           "retrieval_corpus", "similarity"]

SLOTS = ("S", "V", "O", "M")
SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")
FUNCTION_WORDS = ("the", "a", "was", "by", "that", "it", "which", "?", ".", "and", "then", "so")
# Word orders; slot letters are filled with a synonym of the tuple's concept, the rest are function words.
TEMPLATES = (
    "the S V the O M .",
    "the O was V by the S M .",
    "M the S V the O .",
    "it was the S that V the O M .",
    "the S M V the O .",
    "the O that the S V was M .",
)
QUERY_TEMPLATE = "which S V the O M ?"
_CONS, _VOW = "bdfgklmnprstvz", "aeiou"


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """The generator's vocabulary and split.

  Attributes:
    num_concepts: concepts per slot (the tuple space has ``num_concepts ** 4`` tuples).
    num_synonyms: surface words per concept.
    num_topics: topic labels (groups of object concepts; must divide ``num_concepts``).
    num_noise: noise words (document filler).
    test_fraction: share of tuples in the test split.
  """

  num_concepts: int = 12
  num_synonyms: int = 3
  num_topics: int = 4
  num_noise: int = 200
  test_fraction: float = 0.2

  def __post_init__(self):
    for f in ("num_concepts", "num_synonyms", "num_topics", "num_noise"):
      if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
        raise ValueError(f"{f} must be a positive int, got {getattr(self, f)!r}")
    if self.num_concepts < 4:
      raise ValueError(f"num_concepts must be >= 4 (near misses change slots), got {self.num_concepts}")
    if self.num_concepts % self.num_topics:
      raise ValueError(f"num_topics={self.num_topics} must divide num_concepts={self.num_concepts}")
    if not 0.0 < self.test_fraction < 1.0:
      raise ValueError(f"test_fraction must lie in (0, 1), got {self.test_fraction!r}")


class Vocab:
  """Word ids: specials, function words, then per slot ``num_concepts x num_synonyms`` words, then noise words."""

  def __init__(self, spec: TextSpec):
    self.spec = spec
    words = list(SPECIALS) + list(FUNCTION_WORDS)
    self.func = {w: i for i, w in enumerate(words) if w in FUNCTION_WORDS}
    self.slot_base = {}
    gen = _pseudo_words()
    for s in SLOTS:
      self.slot_base[s] = len(words)
      words += [next(gen) for _ in range(spec.num_concepts * spec.num_synonyms)]
    self.noise_base = len(words)
    words += [next(gen) for _ in range(spec.num_noise)]
    self.words = words

  def __len__(self) -> int:
    return len(self.words)

  def word_id(self, slot: str, concept, synonym):
    """Id of synonym ``synonym`` of concept ``concept`` in slot ``slot`` (arrays broadcast)."""
    return self.slot_base[slot] + np.asarray(concept) * self.spec.num_synonyms + np.asarray(synonym)

  def decode(self, ids) -> str:
    return " ".join(self.words[int(i)] for i in np.asarray(ids) if int(i) != 0)


def _pseudo_words():
  """Distinct pronounceable pseudo-words: ``ba``, ``be``, ... then two syllables, three syllables."""
  syl = [c + v for c in _CONS for v in _VOW]
  seen = set(FUNCTION_WORDS)
  n = 1
  while True:
    for idx in np.ndindex(*([len(syl)] * n)):
      w = "".join(syl[i] for i in idx)
      if w not in seen:
        seen.add(w)
        yield w
    n += 1


_HASH = np.array([7919, 104729, 1299709, 15485863], np.int64)


def tuple_split(tuples, spec: TextSpec) -> np.ndarray:
  """``True`` where a tuple ``[..., 4]`` is in the test split (a fixed hash of the tuple)."""
  t = np.asarray(tuples, np.int64)
  h = (t * _HASH).sum(-1) % 1000003
  return (h * 2654435761 % 1000003) / 1000003.0 < spec.test_fraction


def similarity(t1, t2) -> np.ndarray:
  """Graded gold similarity: the fraction of the 4 slots two tuples share."""
  return (np.asarray(t1) == np.asarray(t2)).mean(-1)


def _draw_tuples(rng, n: int, spec: TextSpec, test: bool) -> np.ndarray:
  out, have = [], 0
  while have < n:
    t = rng.integers(0, spec.num_concepts, size=(2 * (n - have) + 16, 4))
    t = t[tuple_split(t, spec) == test]
    out.append(t[: n - have])
    have += len(out[-1])
  return np.concatenate(out)


def _perturb(rng, t: np.ndarray, n_shared: np.ndarray, spec: TextSpec, test: bool) -> np.ndarray:
  """A tuple sharing ``n_shared[i]`` slots with ``t[i]``, in the same split (rejection sampling).

  In a small tuple space a tuple may have no same-split neighbour at that overlap; then one slot fewer is shared
  (callers read the realised overlap from the tuples, e.g. :func:`similarity`)."""
  out = np.empty_like(t)
  for i in range(len(t)):
    k = int(n_shared[i])
    while True:
      for _ in range(200):
        change = rng.permutation(4)[: 4 - k]
        new = t[i].copy()
        new[change] = (t[i][change] + rng.integers(1, spec.num_concepts, size=len(change))) % spec.num_concepts
        if tuple_split(new, spec) == test:
          out[i] = new
          break
      else:
        k -= 1
        continue
      break
  return out


def render(rng, vocab: Vocab, tuples, template=None, query: bool = False) -> list[np.ndarray]:
  """Token ids of each tuple, rendered with a random (or the given) template and random synonyms."""
  out = []
  for t in np.asarray(tuples):
    tpl = QUERY_TEMPLATE if query else TEMPLATES[rng.integers(len(TEMPLATES)) if template is None else template]
    ids = []
    for w in tpl.split():
      if w in SLOTS:
        k = SLOTS.index(w)
        ids.append(int(vocab.word_id(w, t[k], rng.integers(vocab.spec.num_synonyms))))
      else:
        ids.append(vocab.func[w])
    out.append(np.asarray(ids, np.int32))
  return out


def _pad(seqs, T: int) -> tuple[np.ndarray, np.ndarray]:
  arr = np.zeros((len(seqs), T), np.int32)
  for i, s in enumerate(seqs):
    arr[i, : len(s)] = s
  return arr, np.array([len(s) for s in seqs], np.int32)


MAX_SENTENCE = max(len(t.split()) for t in TEMPLATES + (QUERY_TEMPLATE,))


def paraphrase_pairs(spec: TextSpec, n: int, *, split: str, seed: int = 0, positive_fraction: float = 0.5,
                     shared_probs=(0.05, 0.15, 0.35, 0.45)) -> dict[str, np.ndarray]:
  """``n`` sentence pairs of one split.

  Returns a dict of arrays: ``a, b`` int32 ``[n, MAX_SENTENCE]`` (right-padded), ``a_len, b_len [n]``, ``label``
  (1 paraphrase, 0 not), ``sim`` (graded gold similarity, 1.0 for paraphrases), ``shared`` (slots shared, 0..4),
  ``topic_a``, ``topic_b``, ``tuple_a, tuple_b [n, 4]``. Non-paraphrases share ``k`` slots with probability
  ``shared_probs[k]``; paraphrases are re-rendered (independent template and synonyms).
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if len(shared_probs) != 4 or abs(sum(shared_probs) - 1) > 1e-6:
    raise ValueError(f"shared_probs must be 4 probabilities summing to 1, got {shared_probs}")
  test = split == "test"
  rng = np.random.default_rng([seed, int(test), 17])
  vocab = Vocab(spec)
  ta = _draw_tuples(rng, n, spec, test)
  pos = rng.random(n) < positive_fraction
  shared = np.where(pos, 4, rng.choice(4, size=n, p=shared_probs))
  tb = ta.copy()
  neg = ~pos
  tb[neg] = _perturb(rng, ta[neg], shared[neg], spec, test)
  shared = (ta == tb).sum(1)
  a, a_len = _pad(render(rng, vocab, ta), MAX_SENTENCE)
  b, b_len = _pad(render(rng, vocab, tb), MAX_SENTENCE)
  per = spec.num_concepts // spec.num_topics
  return dict(a=a, b=b, a_len=a_len, b_len=b_len, label=pos.astype(np.int32), sim=similarity(ta, tb),
              shared=shared.astype(np.int32), topic_a=(ta[:, 2] // per).astype(np.int32),
              topic_b=(tb[:, 2] // per).astype(np.int32), tuple_a=ta.astype(np.int32), tuple_b=tb.astype(np.int32))


def _document(rng, vocab: Vocab, L: int, planted: np.ndarray, start: int, distractors) -> np.ndarray:
  """``L`` noise tokens with ``planted`` at ``start`` and the distractor sentences at random free places."""
  spec = vocab.spec
  doc = (vocab.noise_base + rng.integers(0, spec.num_noise, size=L)).astype(np.int32)
  doc[start:start + len(planted)] = planted
  taken = [(start, start + len(planted))]
  for s in distractors:
    for _ in range(20):
      p = int(rng.integers(0, L - len(s) + 1))
      if all(p + len(s) <= a or p >= b for a, b in taken):
        doc[p:p + len(s)] = s
        taken.append((p, p + len(s)))
        break
  return doc


def retrieval_corpus(spec: TextSpec, n: int, *, split: str, seed: int = 0, doc_lengths=(64, 128, 256),
                     position_bins: int = 4, hard_negatives: int = 2, distractors: int = 2,
                     near_miss_shared=(2, 3)) -> dict[str, np.ndarray]:
  """``n`` queries, each with its positive document and ``hard_negatives`` near-miss documents.

  Returns a dict of arrays (``Lmax = max(doc_lengths)``): ``query [n, MAX_SENTENCE]``, ``query_len``,
  ``doc [n, Lmax]``, ``doc_len`` (drawn uniformly from ``doc_lengths``), ``evidence_start``, ``evidence_len``,
  ``rel_pos`` (evidence start / (doc_len - evidence_len), in [0, 1]), ``pos_bin`` (``0..position_bins-1``, uniform:
  the position is drawn inside its bin), ``len_bucket`` (index into ``doc_lengths``), ``hard_neg [n, M, Lmax]``,
  ``hard_neg_len [n, M]``, ``tuple [n, 4]``. Hard negatives have the positive's length; their near-miss sentence
  (``near_miss_shared`` slots kept) sits at a uniformly random position.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  doc_lengths = tuple(int(x) for x in doc_lengths)
  if not doc_lengths or min(doc_lengths) < 4 * MAX_SENTENCE:
    raise ValueError(f"doc_lengths must be >= {4 * MAX_SENTENCE} tokens (room for evidence and distractors), "
                     f"got {doc_lengths}")
  if not isinstance(position_bins, int) or position_bins < 1:
    raise ValueError(f"position_bins must be a positive int, got {position_bins!r}")
  test = split == "test"
  rng = np.random.default_rng([seed, int(test), 29])
  vocab = Vocab(spec)
  Lmax = max(doc_lengths)
  tup = _draw_tuples(rng, n, spec, test)
  queries, q_len = _pad(render(rng, vocab, tup, query=True), MAX_SENTENCE)
  bucket = rng.integers(0, len(doc_lengths), size=n)
  pbin = rng.integers(0, position_bins, size=n)
  M = int(hard_negatives)
  docs = np.zeros((n, Lmax), np.int32)
  hn = np.zeros((n, M, Lmax), np.int32)
  starts, ev_len, rel = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.float32)
  lens = np.asarray(doc_lengths, np.int32)[bucket]
  for i in range(n):
    L = int(lens[i])
    ev = render(rng, vocab, tup[i:i + 1])[0]
    span = L - len(ev)
    r = (pbin[i] + rng.random()) / position_bins
    st = min(int(round(r * span)), span)
    dis = render(rng, vocab, _draw_tuples(rng, distractors, spec, test)) if distractors else []
    docs[i, :L] = _document(rng, vocab, L, ev, st, dis)
    starts[i], ev_len[i], rel[i] = st, len(ev), st / max(span, 1)
    if M:
      k = rng.choice(np.asarray(near_miss_shared), size=M)
      miss = render(rng, vocab, _perturb(rng, np.repeat(tup[i:i + 1], M, 0), k, spec, test))
      for j in range(M):
        dis = render(rng, vocab, _draw_tuples(rng, distractors, spec, test)) if distractors else []
        hn[i, j, :L] = _document(rng, vocab, L, miss[j], int(rng.integers(0, L - len(miss[j]) + 1)), dis)
  return dict(query=queries, query_len=q_len, doc=docs, doc_len=lens, evidence_start=starts, evidence_len=ev_len,
              rel_pos=rel, pos_bin=pbin.astype(np.int32), len_bucket=bucket.astype(np.int32), hard_neg=hn,
              hard_neg_len=np.repeat(lens[:, None], M, 1).astype(np.int32), tuple=tup.astype(np.int32))
