"""Compositional hard negatives: made from the caption's text alone, one change each, seeded."""
from __future__ import annotations

import numpy as np
import pytest

from vlp_core.train.hardneg import STOPWORDS, HardNegatives

CORPUS = [
    "a red circle left of a blue square", "a blue circle left of a red square",
    "a green square left of a red triangle", "a red triangle right of a green circle",
    "a blue square right of a green triangle", "a green circle right of a blue square",
    "a red circle on the left", "a blue square on the right", "a green triangle on the left",
    "a red square on the right", "IMG_0001.jpg", "click here",
]


def _diff(a: str, b: str) -> list[tuple[str, str]]:
    return [(x, y) for x, y in zip(a.split(), b.split()) if x != y]


def test_each_negative_changes_content_words_only_and_stays_in_the_corpus_vocabulary():
    hn = HardNegatives(CORPUS)
    vocab = {w for c in CORPUS for w in c.lower().split()}
    rng = np.random.default_rng(0)
    seen = set()
    for caption in CORPUS[:10]:
        for _ in range(20):
            neg = hn.negative(caption, rng)
            assert neg is not None and neg != caption
            changes = _diff(caption, neg)
            assert len(neg.split()) == len(caption.split())
            assert 1 <= len(changes) <= 2, (caption, neg)
            assert all(x not in STOPWORDS and y not in STOPWORDS and y in vocab for x, y in changes)
            if len(changes) == 2:  # a swap: the same two words trade places
                assert changes[0] == changes[1][::-1]
            seen.add(tuple(sorted(changes)))
    # colour swaps, noun swaps (the relation reversed) and same-slot replacements all occur
    assert (("blue", "red"), ("red", "blue")) in seen
    assert (("circle", "square"), ("square", "circle")) in seen
    assert any(c == (("left", "right"),) or c == (("right", "left"),) for c in seen)


def test_text_without_interchangeable_words_gets_none():
    hn = HardNegatives(CORPUS)
    rng = np.random.default_rng(0)
    assert hn.negative("", rng) is None
    assert hn.negative("the of a", rng) is None
    assert hn.negative("zebra", rng) is None
    # a word seen once in a slot is not a substitute (no one-off typos)
    assert HardNegatives(["a red circle", "a blue circle"]).negative("a red circle", rng) is None
    assert HardNegatives(["a red circle", "a blue circle"], min_count=1).negative("a red circle", rng) == "a blue circle"


def test_synonym_groups_are_never_used_as_negatives():
    corpus = ["a red circle", "a red disc", "a red square"] * 3
    hn = HardNegatives(corpus, synonyms=[("circle", "disc")])
    rng = np.random.default_rng(0)
    assert {hn.negative("a red circle", rng) for _ in range(30)} == {"a red square"}
    assert {hn.negative("a red square", rng) for _ in range(30)} == {"a red circle", "a red disc"}


def test_the_worlds_synonym_groups_keep_synonyms_out_of_the_negatives():
    """With the synthetic world's groups (bench/cycle.py --synonyms) a size word is replaced by the
    other size only, never by a word of its own group; without them the corpus offers both."""
    from vlp_core.synthetic.world import synonym_groups

    corpus = [f"a {s} {c} circle" for s in ("big", "large", "small", "tiny", "little") for c in ("red", "blue")] * 3
    rng = np.random.default_rng(0)
    plain = HardNegatives(corpus)
    assert {"large", "small"} <= set(plain.substitutes("big"))
    hn = HardNegatives(corpus, synonyms=synonym_groups())
    assert set(hn.substitutes("big")) == {"small", "tiny", "little"}
    assert set(hn.substitutes("tiny")) == {"big", "large"}


def test_batch_share_and_seeding():
    hn = HardNegatives(CORPUS)
    texts = CORPUS[:8] * 8
    a = hn.batch(texts, 1.0, seed=3, step=7)
    assert a == hn.batch(texts, 1.0, seed=3, step=7)  # a resumed run makes the same ones
    assert a != hn.batch(texts, 1.0, seed=3, step=8)
    assert all(n is not None for n in a)
    assert hn.batch(texts, 0.0, seed=3, step=7) == [None] * len(texts)
    half = hn.batch(texts, 0.5, seed=3, step=7)
    assert 0 < sum(n is not None for n in half) < len(texts)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_training_with_hard_negatives_resumes_bit_identically(tiny_world, tmp_path, share):
    from fixtures_world import tiny_params

    from vlp_core.train.loop import run_pretrain

    params = tiny_params(**{"pretrain.steps": 6, "pretrain.batch_size": 16, "pretrain.warmup_steps": 2,
                            "pretrain.checkpoint_every": 3, "pretrain.log_every": 1, "pretrain.lr": 5e-4,
                            "pretrain.hard_negatives": share, "model.vocab_size": 128})
    sources = [(tiny_world / "web.parquet", "web"), (tiny_world / "human.parquet", "human")]
    full = run_pretrain(params, sources, tmp_path / "full")
    run_pretrain(params, sources, tmp_path / "part", stop_after_step=3)
    resumed = run_pretrain(params, sources, tmp_path / "part")
    assert resumed.extra["resumed_from_step"] == 3
    assert resumed.extra["rank_state_sha256"] == full.extra["rank_state_sha256"]
    assert full.extra["fingerprint_inputs"]["pretrain.hard_negatives"] == share


def test_phrase_swaps_trade_aligned_phrases_and_reverse_the_relation():
    corpus = ["a big red circle left of a small blue square", "a small green square right of a big red triangle",
              "a big blue triangle above a small green circle", "a small red square below a big blue circle"] * 3
    hn = HardNegatives(corpus, phrase_share=1.0)
    rng = np.random.default_rng(0)
    negs = {hn.negative(corpus[0], rng) for _ in range(10)}
    # every negative trades the two whole object phrases: same words, the relation reversed
    assert negs == {"a small blue square left of a big red circle"}
    # a caption without two aligned runs falls back to word swaps and replacements
    assert hn.negative("a big red circle", rng) not in (None, "a big red circle")


def test_phrase_swaps_line_up_synonyms_too():
    """With big/large one group, "big red circle" and "large blue box" still line up word for word:
    the whole phrases trade (the relation reversed), not only their colour and shape."""
    import itertools

    corpus = [f"a {s1} {c1} {h1} {r} a {s2} {c2} {h2}" for (s1, s2), (c1, c2), (h1, h2), r in itertools.product(
        [("big", "small"), ("small", "large"), ("large", "small"), ("small", "big")], [("red", "blue"), ("green", "red")],
        [("circle", "square"), ("square", "circle")], ["left of", "above"])]
    hn = HardNegatives(corpus, phrase_share=1.0, synonyms=[("big", "large")])
    assert "large" not in hn.substitutes("big")
    rng = np.random.default_rng(0)
    negs = {hn.negative("a big red circle left of a large blue square", rng) for _ in range(10)}
    assert negs == {"a large blue square left of a big red circle"}


def test_phrase_swaps_off_make_the_negatives_of_before():
    """phrase_share 0 draws nothing extra: a run recorded before the setting gets the same negatives."""
    on_off = [HardNegatives(CORPUS), HardNegatives(CORPUS, phrase_share=0.0)]
    texts = CORPUS[:10] * 4
    assert on_off[0].batch(texts, 1.0, seed=1, step=2) == on_off[1].batch(texts, 1.0, seed=1, step=2)
    assert HardNegatives(CORPUS, phrase_share=1.0).batch(texts, 1.0, seed=1, step=2) != \
        on_off[0].batch(texts, 1.0, seed=1, step=2)
