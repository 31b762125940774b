"""Compositional hard negatives for ITM (NegCLIP-style), derived from the captions alone.

A hard negative is the positive caption itself, changed in one place so that it no longer
describes the image while it still reads like a caption:

* **swap**: two content words of the caption that may stand in for each other trade places
  ("a red circle left of a blue square" -> "a blue circle left of a red square"; swapping the
  two nouns reverses the relation);
* **replace**: one content word is replaced by another word that may stand in for it
  ("... on the left" -> "... on the right", "a red circle" -> "a green circle");
* **phrase swap** (with ``phrase_share > 0``): two runs of content words that line up word for
  word (each pair of words the same or interchangeable) trade places whole: "a tiny green plus
  left of a large purple cross" -> "a large purple cross left of a tiny green plus".  The bag of
  words is unchanged and the relation is reversed -- NegCLIP's order negatives.  A word swap
  changes which attribute goes with which object; it reverses a relation only when each object is
  one word, and a replacement hits the relation word in few captions (4 % of the negatives made
  from the synthetic world's captions), so without this kind ITM is barely ever shown a reversed
  relation -- and ``bench/relations.py`` found every model at chance on them (issue 16).

Which words may stand in for each other is learnt from the corpus: words whose left and right
neighbours are distributed alike (cosine similarity of their neighbour profiles, on each side).  Nothing here
reads ground truth, so the same code serves real alt-texts.  Function words
(:data:`STOPWORDS`) are never changed, and only words seen ``min_count`` times take part, so
one-off typos and junk do not become negatives.

Limitation, stated: the corpus alone cannot tell a synonym from an antonym ("disc" keeps the
same company as "circle" and "square" alike), so a share of replacements are paraphrases labelled
negative.  Pass ``synonyms`` (groups of words that mean the same) to exclude them.

Reference: Yuksekgonul et al., "When and why vision-language models behave like
bags-of-words, and what to do about it?" (ICLR 2023).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Optional, Sequence

import numpy as np

STOPWORDS = frozenset("""
a an the this that these those there here it its is are was were be been being has have had
of to in on at by for from with without into onto over under near as and or but not no nor
so than then very too also just some any each every all both either neither one two his her
their our your my me we you he she they them i am do does did can could will would should may
might must shall
""".split())
_BOS, _EOS = "<s>", "</s>"
_WORD = re.compile(r"^[a-z][a-z'-]*$")


def _norm(token: str) -> str:
    return token.strip(".,;:!?\"'()[]{}").lower()


class HardNegatives:
    """Build once from the training captions; :meth:`negative` makes one per caption.

    Words are grouped by the company they keep: each frequent content word gets a profile of
    its left neighbours and one of its right neighbours over the corpus, and two words whose
    left profiles and right profiles both have a cosine similarity of at least ``similarity``
    may stand in for each other (colours end up with
    colours, nouns with nouns, positions with positions).  Only the ``max_vocab`` most
    frequent content words seen at least ``min_count`` times take part."""

    def __init__(self, captions: Iterable[str], min_count: int = 2, similarity: float = 0.5,
                 max_vocab: int = 2000, max_contexts: int = 2000,
                 synonyms: Sequence[Sequence[str] | str] = (), swap_share: float = 0.5, phrase_share: float = 0.0):
        self.swap_share = float(swap_share)
        self.phrase_share = float(phrase_share)
        same: dict[str, set[str]] = {}
        for group in synonyms:  # a group: its words, or one string of them ("big large", as settings write it)
            g = {_norm(w) for w in (group.split() if isinstance(group, str) else group)}
            for w in g:
                same.setdefault(w, set()).update(g)
        self._same = same
        docs = [[_norm(t) for t in (text or "").split()] for text in captions]
        counts = Counter(w for words in docs for w in words if self._content(w))
        vocab = [w for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count][:max_vocab]
        index = {w: i for i, w in enumerate(vocab)}
        # neighbour profiles: (word, "L:" / "R:" + neighbour) counts, the most frequent contexts only
        pairs: Counter = Counter()
        for words in docs:
            for i, w in enumerate(words):
                if w in index:
                    pairs[(w, "L:" + (words[i - 1] if i > 0 else _BOS))] += 1
                    pairs[(w, "R:" + (words[i + 1] if i + 1 < len(words) else _EOS))] += 1
        ctx_counts: Counter = Counter()
        for (_, c), n in pairs.items():
            ctx_counts[c] += n
        contexts = {c: j for j, (c, _) in enumerate(sorted(ctx_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_contexts])}
        sims = []
        for side in ("L:", "R:"):  # both neighbours must agree: "photo" follows "a" like "big" does, but not "of"
            cols = {c: j for j, c in enumerate(c for c in contexts if c.startswith(side))}
            prof = np.zeros((len(vocab), max(1, len(cols))), dtype=np.float64)
            for (w, c), n in pairs.items():
                if c in cols:
                    prof[index[w], cols[c]] += n
            prof /= np.maximum(np.linalg.norm(prof, axis=1, keepdims=True), 1e-12)
            sims.append(prof @ prof.T)
        sim = np.minimum(*sims) if sims else np.zeros((0, 0))
        self._subs: dict[str, tuple[list[str], np.ndarray]] = {}
        for i, w in enumerate(vocab):
            js = [j for j in np.flatnonzero(sim[i] >= similarity) if j != i and vocab[j] not in same.get(w, ())]
            if js:
                self._subs[w] = ([vocab[j] for j in js], np.array([counts[vocab[j]] for j in js], dtype=np.float64))

    @staticmethod
    def _content(word: str) -> bool:
        return bool(_WORD.match(word)) and word not in STOPWORDS and len(word) > 1

    def __len__(self) -> int:
        """The number of words that have at least one substitute."""
        return len(self._subs)

    def substitutes(self, word: str) -> list[str]:
        """The words that may replace ``word`` (sorted by frequency)."""
        return list(self._subs.get(_norm(word), ([], None))[0])

    def negative(self, text: str, rng: np.random.Generator) -> Optional[str]:
        """A hard negative of ``text``, or None when no word of it can be swapped or replaced."""
        tokens = (text or "").split()
        words = [_norm(t) for t in tokens]
        options = {i: self._subs[w] for i, w in enumerate(words) if w in self._subs}
        if not options:
            return None
        # two words that may stand in for each other trade places (not neighbours: "red circle")
        swaps = [(i, j) for i in options for j in options
                 if j > i + 1 and words[i] != words[j] and words[j] in options[i][0]]
        out = list(tokens)
        if self.phrase_share > 0:  # no random draw when off: negatives made before it existed stay the same
            phrases = self._phrase_swaps(words, swaps)
            if phrases and rng.random() < self.phrase_share:
                i, j, n = phrases[int(rng.integers(len(phrases)))]
                out[i:i + n], out[j:j + n] = tokens[j:j + n], tokens[i:i + n]
                return " ".join(out)
        if swaps and rng.random() < self.swap_share:
            i, j = swaps[int(rng.integers(len(swaps)))]
            out[i], out[j] = words[j], words[i]
        else:
            positions = sorted(options)
            i = positions[int(rng.integers(len(positions)))]
            cands, counts = options[i]
            out[i] = cands[int(rng.choice(len(cands), p=counts / counts.sum()))]
        return " ".join(out)

    def _phrase_swaps(self, words: Sequence[str], swaps: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """``(i, j, n)``: the runs ``words[i:i+n]`` and ``words[j:j+n]`` (``n >= 2``, ``i + n < j``)
        line up word for word -- each pair the same word, interchangeable or synonyms, all content words --
        grown as far as they go from a swappable pair.  Deduplicated, in order."""
        def pairs(a: int, b: int) -> bool:
            wa, wb = words[a], words[b]
            return self._content(wa) and self._content(wb) and (wa == wb or wb in self.substitutes(wa)
                                                                or wb in self._same.get(wa, ()))

        found = set()
        for i, j in swaps:
            lo = 0
            while i - lo - 1 >= 0 and pairs(i - lo - 1, j - lo - 1):
                lo += 1
            hi = 0
            while j + hi + 1 < len(words) and i + hi + 1 < j and pairs(i + hi + 1, j + hi + 1):
                hi += 1
            a, b, n = i - lo, j - lo, lo + hi + 1
            if n >= 2 and a + n < b and words[a:a + n] != words[b:b + n]:
                found.add((a, b, n))
        return sorted(found)

    def batch(self, texts: Sequence[str], share: float, seed: int, step: int) -> list[Optional[str]]:
        """A hard negative for a ``share`` of ``texts`` (None elsewhere), seeded by (seed, step) so
        that a resumed run makes the same ones."""
        rng = np.random.default_rng([int(seed), int(step), 0x4E4547])
        picked = rng.random(len(texts)) < share
        return [self.negative(t, rng) if p else None for t, p in zip(texts, picked)]
