"""Tests for ``experiments.substrates.text``: vocabulary layout, determinism, paraphrase labels and graded
similarity, planted evidence positions and lengths, near-miss hard negatives, and disjoint train / test tuples."""

import numpy as np
import pytest

from experiments.substrates import text

SPEC = text.TextSpec(num_concepts=8, num_synonyms=2, num_topics=4, num_noise=40)
SPEC12 = text.TextSpec(num_concepts=12, num_synonyms=2, num_topics=4, num_noise=40)


def _words(ids, n):
  return set(np.asarray(ids[:n]).tolist())


def test_vocab_layout_and_decode():
  v = text.Vocab(SPEC)
  assert len(v) == len(text.SPECIALS) + len(text.FUNCTION_WORDS) + 4 * 8 * 2 + 40
  assert v.words[:3] == ["[PAD]", "[CLS]", "[SEP]"]  # the ids jaxattn.nn.pair reserves
  assert len(set(v.words)) == len(v.words)
  ids = text.render(np.random.default_rng(0), v, np.array([[1, 2, 3, 4]]), template=0)[0]
  words = v.decode(ids).split()
  assert words[0] == "the" and words[-1] == "." and len(words) == len(text.TEMPLATES[0].split())
  with pytest.raises(ValueError, match="num_topics"):
    text.TextSpec(num_concepts=10, num_topics=4)


def test_paraphrase_pairs_labels_similarity_and_split():
  tr = text.paraphrase_pairs(SPEC, 600, split="train", seed=1)
  te = text.paraphrase_pairs(SPEC, 300, split="test", seed=1)
  again = text.paraphrase_pairs(SPEC, 300, split="test", seed=1)
  assert all(np.array_equal(te[k], again[k]) for k in te)  # deterministic
  for d, n in ((tr, 600), (te, 300)):
    assert d["a"].shape == (n, text.MAX_SENTENCE) and (d["a_len"] > 0).all()
    assert ((d["label"] == 1) == (d["shared"] == 4)).all()
    np.testing.assert_allclose(d["sim"], text.similarity(d["tuple_a"], d["tuple_b"]))
    np.testing.assert_allclose(d["sim"], d["shared"] / 4)
    assert 0.35 < d["label"].mean() < 0.65
    assert (d["topic_a"] == d["tuple_a"][:, 2] // 2).all()
  # every tuple of a split belongs to it; the splits share none
  assert not text.tuple_split(np.concatenate([tr["tuple_a"], tr["tuple_b"]]), SPEC).any()
  assert text.tuple_split(np.concatenate([te["tuple_a"], te["tuple_b"]]), SPEC).all()
  tr_set = {tuple(t) for t in np.concatenate([tr["tuple_a"], tr["tuple_b"]])}
  te_set = {tuple(t) for t in np.concatenate([te["tuple_a"], te["tuple_b"]])}
  assert not tr_set & te_set
  # paraphrases are re-rendered: many differ in surface form though the tuple is the same
  pos = tr["label"] == 1
  differ = [not np.array_equal(a[:la], b[:lb]) for a, la, b, lb in
            zip(tr["a"][pos], tr["a_len"][pos], tr["b"][pos], tr["b_len"][pos])]
  assert np.mean(differ) > 0.5
  with pytest.raises(ValueError, match="split"):
    text.paraphrase_pairs(SPEC, 4, split="dev")


def test_retrieval_corpus_planted_evidence_and_near_misses():
  lengths = (48, 96)
  d = text.retrieval_corpus(SPEC12, 80, split="test", seed=2, doc_lengths=lengths, position_bins=4,
                            hard_negatives=2)
  v = text.Vocab(SPEC12)
  assert d["doc"].shape == (80, 96) and d["hard_neg"].shape == (80, 2, 96)
  assert set(np.unique(d["doc_len"])) <= set(lengths)
  assert (np.asarray(lengths)[d["len_bucket"]] == d["doc_len"]).all()
  assert (d["pos_bin"] == np.minimum((d["rel_pos"] * 4).astype(int), 3)).mean() > 0.9  # rounding at bin edges
  assert 0.0 <= d["rel_pos"].min() and d["rel_pos"].max() <= 1.0
  noise = range(v.noise_base, len(v))
  for i in range(80):
    L, st, n = d["doc_len"][i], d["evidence_start"][i], d["evidence_len"][i]
    doc = d["doc"][i]
    assert (doc[L:] == 0).all() and (doc[:L] > 0).all()
    ev = doc[st:st + n]
    assert ev[-1] == v.func["."]  # a whole sentence
    # the evidence carries the query's concepts (every slot, possibly as another synonym)
    t = d["tuple"][i]
    for k, slot in enumerate(text.SLOTS):
      ids = set(v.word_id(slot, t[k], np.arange(SPEC12.num_synonyms)).tolist())
      assert ids & set(ev.tolist())
    # near misses keep 2-3 slots of the tuple and never the whole evidence tuple
    for j in range(2):
      hn = d["hard_neg"][i, j, :L]
      hits = 0
      for k, slot in enumerate(text.SLOTS):
        ids = set(v.word_id(slot, t[k], np.arange(SPEC12.num_synonyms)).tolist())
        hits += bool(ids & set(hn.tolist()))
      assert hits >= 2
    rest = np.concatenate([doc[:st], doc[st + n:L]])
    assert np.isin(rest, noise).mean() >= 0.4  # the filler is noise (plus a few distractor sentences)
  tr = text.retrieval_corpus(SPEC12, 40, split="train", seed=2, doc_lengths=lengths)
  assert not {tuple(x) for x in tr["tuple"]} & {tuple(x) for x in d["tuple"]}
  with pytest.raises(ValueError, match="doc_lengths"):
    text.retrieval_corpus(SPEC, 4, split="test", doc_lengths=(16,))


def test_long_documents_up_to_512():
  d = text.retrieval_corpus(SPEC, 8, split="train", doc_lengths=(512,), position_bins=2, hard_negatives=0)
  assert d["doc"].shape == (8, 512) and (d["doc_len"] == 512).all() and d["hard_neg"].shape == (8, 0, 512)
  late = d["pos_bin"] == 1
  assert (d["evidence_start"][late] >= (512 - text.MAX_SENTENCE) // 2 - 1).all()
