"""Evaluation metrics: retrieval recall@k, BLEU-4, CIDEr and caption accuracy.

Retrieval follows BLIP's ``itm_eval``: for each query, the *rank* is the position of the
best-ranked correct candidate in the descending score order, and R@k is the share (in %)
of queries whose rank is below k.  Which candidates are correct is a boolean matrix, so
"semantic" recall is supported: several test images may share an identical caption, and a
text then counts as correct for every image whose caption is the same string (otherwise
retrieving the twin image would be scored as a miss, which no model can avoid).

Captioning metrics use pycocoevalcap's pure-Python BLEU and CIDEr scorers with a simple
tokenizer (lowercase, punctuation stripped) instead of the Java PTB tokenizer.
"""
from __future__ import annotations

import re
import string
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from vlp_core.synthetic.world import Scene, check_caption, check_parsed, parse_for_check

RECALL_KS = (1, 5, 10)
CAPTION_ATTRIBUTES = ("colour", "shape", "size", "relation")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


# --------------------------------------------------------------------------- retrieval
def first_correct_rank(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """For each row (query), the 0-based rank of its best-ranked correct candidate.

    ``scores``: (n_query, n_cand) float, higher is better.  ``correct``: (n_query, n_cand)
    bool.  Ties are broken by candidate index (a stable sort), as a deterministic rule.
    Rows with no correct candidate get rank ``n_cand`` (never retrieved).
    """
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if scores.shape != correct.shape:
        raise ValueError(f"scores {scores.shape} and correct {correct.shape} differ in shape")
    order = np.argsort(-scores, axis=1, kind="stable")  # (n_query, n_cand)
    hit = np.take_along_axis(correct, order, axis=1)  # (n_query, n_cand) correct in rank order
    ranks = np.where(hit.any(axis=1), hit.argmax(axis=1), scores.shape[1])
    return ranks.astype(np.int64)


def recall_at_k(scores: np.ndarray, correct: np.ndarray, ks: Iterable[int] = RECALL_KS) -> dict[int, float]:
    """``{k: R@k in percent}`` for the queries (rows) of ``scores``."""
    ranks = first_correct_rank(scores, correct)
    if len(ranks) == 0:
        return {k: 0.0 for k in ks}
    return {k: 100.0 * float(np.mean(ranks < k)) for k in ks}


def same_caption_matrix(image_texts: Sequence[str | Sequence[str]], texts: Sequence[str]) -> np.ndarray:
    """``(n_image, n_text)`` bool: text j is correct for image i when it is the same string as
    (one of) image i's caption(s) after :func:`normalize_caption` (semantic recall).
    ``image_texts[i]`` is one caption or a list of captions."""
    index: dict[str, list[int]] = {}
    for j, t in enumerate(texts):
        index.setdefault(normalize_caption(t), []).append(j)
    out = np.zeros((len(image_texts), len(texts)), dtype=bool)
    for i, caps in enumerate(image_texts):
        for t in ([caps] if isinstance(caps, str) else caps):
            out[i, index.get(normalize_caption(t), [])] = True
    return out


def retrieval_metrics(score_i2t: np.ndarray, score_t2i: np.ndarray, correct_i2t: np.ndarray) -> dict[str, float]:
    """TR (image -> text) and IR (text -> image) R@1/5/10 in percent, their means, and
    ``r1_mean`` = mean of TR R@1 and IR R@1.

    ``score_i2t``: (n_image, n_text); ``score_t2i``: (n_text, n_image);
    ``correct_i2t``: (n_image, n_text) bool (its transpose judges the IR direction).
    """
    tr = recall_at_k(score_i2t, correct_i2t)
    ir = recall_at_k(score_t2i, np.asarray(correct_i2t).T)
    out = {f"tr_r{k}": v for k, v in tr.items()}
    out.update({f"ir_r{k}": v for k, v in ir.items()})
    out["tr_mean"] = float(np.mean(list(tr.values())))
    out["ir_mean"] = float(np.mean(list(ir.values())))
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2.0  # BLIP's r_mean
    out["r1_mean"] = (out["tr_r1"] + out["ir_r1"]) / 2.0
    return out


def scene_matrix(texts: Sequence[str], scenes: Sequence[str]) -> np.ndarray:
    """``(n_scene, n_text)`` bool: text j is a right caption of scene i by the synthetic world's
    own judge (:func:`vlp_core.synthetic.world.check_caption`'s ``all``).  Two test images whose
    scenes only differ where no caption looks (the exact boxes, the background) share every right
    caption; exact recall cannot tell which of them a text was written for."""
    out = np.zeros((len(scenes), len(texts)), dtype=bool)
    read = [parse_for_check(t) for t in texts]  # each text read once, not once per scene
    for i, scene in enumerate(scenes):
        parsed = Scene.from_json(scene) if isinstance(scene, str) else scene  # once per row, not per text
        out[i] = [bool(check_parsed(t, parsed)["all"]) for t in read]
    return out


def scene_recall(score_i2t: np.ndarray, score_t2i: np.ndarray, correct_i2t: np.ndarray,
                 scene_i2t: np.ndarray) -> dict[str, float]:
    """Retrieval judged by the scene (``scene_i2t``, :func:`scene_matrix`; a text is right for
    every image it is true of) next to exact recall's ceiling:

    * ``tr_r1_scene``, ``ir_r1_scene``, ``r1_mean_scene``: R@1 with a retrieved candidate right
      when the world's judge says so;
    * ``tr_r1_ceiling``, ``ir_r1_ceiling``, ``r1_ceiling``: the best *expected* exact R@1 (the
      ``correct_i2t`` of :func:`retrieval_metrics`) of a model that ranks every scene-right
      candidate first but cannot tell them apart (ties at random): the mean over queries of
      (exact answers among the scene-right ones) / (scene-right ones).  Exact R@1 near this
      ceiling has no room left to show a better corpus."""
    correct = np.asarray(correct_i2t, dtype=bool)
    judged = np.asarray(scene_i2t, dtype=bool) | correct  # an exact answer is always right
    out = {"tr_r1_scene": recall_at_k(score_i2t, judged, (1,))[1],
           "ir_r1_scene": recall_at_k(score_t2i, judged.T, (1,))[1]}
    out["r1_mean_scene"] = (out["tr_r1_scene"] + out["ir_r1_scene"]) / 2.0
    for name, j, c in (("tr", judged, correct), ("ir", judged.T, correct.T)):
        out[f"{name}_r1_ceiling"] = 100.0 * float(np.mean((j & c).sum(axis=1) / np.maximum(j.sum(axis=1), 1)))
    out["r1_ceiling"] = (out["tr_r1_ceiling"] + out["ir_r1_ceiling"]) / 2.0
    return out


def chance_recall(correct: np.ndarray, k: int = 1) -> float:
    """Expected R@k (percent) of a random ranking for each query, averaged over queries:
    1 - C(n - m, k) / C(n, k) with m correct among n candidates."""
    correct = np.asarray(correct, dtype=bool)
    n = correct.shape[1]
    vals = []
    for m in correct.sum(axis=1):
        miss = 1.0
        for j in range(min(k, n)):
            miss *= max(0.0, (n - m - j) / (n - j))
        vals.append(1.0 - miss)
    return 100.0 * float(np.mean(vals)) if vals else 0.0


# --------------------------------------------------------------------------- captions
def normalize_caption(text: Optional[str]) -> str:
    """Lowercase, strip punctuation, collapse whitespace (our stand-in for the PTB tokenizer)."""
    return " ".join(_PUNCT.sub(" ", str(text or "").lower()).split())


def _coco_inputs(refs: Mapping[str, Sequence[str]], hyps: Mapping[str, str]):
    if set(refs) != set(hyps):
        raise ValueError("references and hypotheses must cover the same ids")
    gts = {str(k): [normalize_caption(r) for r in refs[k]] for k in refs}
    res = {str(k): [normalize_caption(hyps[k])] for k in refs}
    return gts, res


def bleu4(refs: Mapping[str, Sequence[str]], hyps: Mapping[str, str]) -> float:
    """Corpus BLEU-4 in [0, 1] (pycocoevalcap, 'closest' reference length)."""
    from pycocoevalcap.bleu.bleu import Bleu

    if not refs:
        return 0.0
    gts, res = _coco_inputs(refs, hyps)
    score, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(score[3])


def cider(refs: Mapping[str, Sequence[str]], hyps: Mapping[str, str]) -> float:
    """Corpus CIDEr-D-style score of pycocoevalcap (x10 scale; 10 = every caption identical to
    its references, when the references differ across images)."""
    from pycocoevalcap.cider.cider import Cider

    if not refs:
        return 0.0
    gts, res = _coco_inputs(refs, hyps)
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def caption_accuracy(captions: Sequence[str], scenes: Sequence[str]) -> dict[str, float]:
    """Share of captions whose stated attributes are all true (``caption_acc``) and, per
    attribute, the share of captions stating it that got it right.  ``scenes`` are the
    ground truth's scene JSON strings; checked with the synthetic world's ``check_caption``."""
    if len(captions) != len(scenes):
        raise ValueError("one scene per caption is needed")
    results = [check_caption(c, s) for c, s in zip(captions, scenes)]
    out = {"caption_acc": float(np.mean([bool(r["all"]) for r in results])) if results else 0.0}
    for attr in CAPTION_ATTRIBUTES:
        stated = [bool(r[attr]) for r in results if r[attr] is not None]
        out[f"caption_acc_{attr}"] = float(np.mean(stated)) if stated else 0.0
    return out


def binary_accuracy(pos_scores: Sequence[float], neg_scores: Sequence[float], threshold: float = 0.5) -> float:
    """Accuracy of ``score > threshold`` on positives and ``score <= threshold`` on negatives."""
    pos = np.asarray(pos_scores, dtype=np.float64)
    neg = np.asarray(neg_scores, dtype=np.float64)
    n = len(pos) + len(neg)
    if n == 0:
        return 0.0
    return float(((pos > threshold).sum() + (neg <= threshold).sum()) / n)
