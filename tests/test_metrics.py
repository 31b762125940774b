"""Metric correctness on hand-computed cases (vlp_core.train.metrics)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from vlp_core.synthetic.world import Scene, SceneObject
from vlp_core.train import metrics as m


SIM = np.array([[0.9, 0.1, 0.5],
                [0.2, 0.8, 0.3],
                [0.6, 0.7, 0.1]])


def test_recall_at_k_identity_hand_case():
    correct = np.eye(3, dtype=bool)
    # row 0: order 0,2,1 -> rank 0; row 1: order 1,2,0 -> rank 0; row 2: order 1,0,2 -> rank 2
    assert m.first_correct_rank(SIM, correct).tolist() == [0, 0, 2]
    r = m.recall_at_k(SIM, correct, ks=(1, 2, 3))
    assert r[1] == pytest.approx(200 / 3)
    assert r[2] == pytest.approx(200 / 3)
    assert r[3] == pytest.approx(100.0)


def test_semantic_recall_counts_identical_captions():
    # images 0 and 2 share the caption "a red circle" -> text 0 is also right for image 2
    captions = ["A red circle.", "a blue square", "a red circle"]
    correct = m.same_caption_matrix(captions, captions)
    assert correct.tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    ranks = m.first_correct_rank(SIM, correct)
    assert ranks.tolist() == [0, 0, 1]  # row 2: order 1,0,2 -> text 0 is correct at rank 1
    assert m.recall_at_k(SIM, correct, ks=(1,))[1] == pytest.approx(200 / 3)


def test_retrieval_metrics_both_directions():
    correct = np.eye(3, dtype=bool)
    # t2i: column view of the same matrix: text 0 -> images order 0,2,1 (rank 0);
    # text 1 -> order 1,2,0 (rank 0); text 2 -> order 0,1,2 (rank 2)
    out = m.retrieval_metrics(SIM, SIM.T, correct)
    assert out["tr_r1"] == pytest.approx(200 / 3)
    assert out["ir_r1"] == pytest.approx(200 / 3)
    assert out["tr_r5"] == out["ir_r10"] == 100.0
    assert out["r1_mean"] == pytest.approx(200 / 3)
    perfect = m.retrieval_metrics(np.eye(4), np.eye(4), np.eye(4, dtype=bool))
    assert perfect["r1_mean"] == 100.0


def test_no_correct_candidate_is_a_miss():
    assert m.first_correct_rank(np.array([[1.0, 0.0]]), np.array([[False, False]])).tolist() == [2]


def test_chance_recall():
    assert m.chance_recall(np.eye(4, dtype=bool), k=1) == pytest.approx(25.0)
    # 2 correct of 4, k=2: 1 - C(2,2)/C(4,2) = 1 - 1/6
    two = np.array([[True, True, False, False]])
    assert m.chance_recall(two, k=2) == pytest.approx(100 * 5 / 6)


def test_normalize_caption():
    assert m.normalize_caption("  A Red,  circle!\n") == "a red circle"
    assert m.normalize_caption(None) == ""


REFS = {"1": ["a red circle left of a blue square"], "2": ["the big green cross above a small box"]}


def test_bleu_and_cider_identical_is_maximal():
    hyps = {k: v[0].upper() + "." for k, v in REFS.items()}  # case and punctuation ignored
    assert m.bleu4(REFS, hyps) == pytest.approx(1.0, abs=1e-6)
    assert m.cider(REFS, hyps) == pytest.approx(10.0, abs=1e-6)


def test_bleu_and_cider_disjoint_is_zero():
    hyps = {"1": "one two three four five", "2": "six seven eight nine ten"}
    assert m.bleu4(REFS, hyps) == pytest.approx(0.0, abs=1e-6)
    assert m.cider(REFS, hyps) == pytest.approx(0.0, abs=1e-6)


def test_bleu_hand_computed_precisions_and_brevity():
    # p1..p4 = 4/5, 3/4, 2/3, 1/2, no brevity penalty -> (0.2) ** (1/4)
    refs = {"1": ["a b c d f"]}
    assert m.bleu4(refs, {"1": "a b c d e"}) == pytest.approx(0.2 ** 0.25, abs=1e-6)
    # all precisions 1, hypothesis 4 words vs reference 6: BP = exp(1 - 6/4)
    refs = {"1": ["a b c d e f"]}
    assert m.bleu4(refs, {"1": "a b c d"}) == pytest.approx(math.exp(-0.5), abs=1e-6)


def test_caption_accuracy_against_scene():
    scene = Scene((SceneObject("red", "circle", "large", (2, 2, 22, 22)),
                   SceneObject("blue", "square", "small", (30, 5, 42, 17))), "left", (128, 128, 128))
    js = scene.to_json()
    caps = ["a big red circle to the left of a small blue square",  # all right
            "a small blue box right of a large red disc",  # all right, other order + synonyms
            "a big red circle above a small blue square",  # relation wrong
            "a big green circle left of a small blue square"]  # colour wrong
    out = m.caption_accuracy(caps, [js] * 4)
    assert out["caption_acc"] == pytest.approx(0.5)
    assert out["caption_acc_relation"] == pytest.approx(0.75)
    assert out["caption_acc_colour"] == pytest.approx(0.75)
    assert out["caption_acc_shape"] == 1.0
    assert out["caption_acc_size"] == 1.0


def test_binary_accuracy():
    assert m.binary_accuracy([0.9, 0.4], [0.1, 0.6]) == pytest.approx(0.5)
    assert m.binary_accuracy([0.9], [0.1]) == 1.0


def test_same_caption_matrix_with_several_captions_per_image():
    correct = m.same_caption_matrix([["a", "b"], "c"], ["b", "c", "a", "d"])
    assert correct.tolist() == [[True, False, True, False], [False, True, False, False]]


def test_scene_recall_and_the_exact_ceiling_hand_case():
    # images 0 and 1 show the same scene up to the boxes (a big red circle left of a small blue
    # square); image 2 another.  Each image's caption is worded differently, so exact recall
    # counts only its own text, while the world's judge calls texts 0 and 1 right for both.
    a = Scene((SceneObject("red", "circle", "large", (2, 2, 22, 22)),
               SceneObject("blue", "square", "small", (30, 5, 42, 17))), "left", (128, 128, 128))
    b = Scene((SceneObject("red", "circle", "large", (4, 8, 24, 28)),
               SceneObject("blue", "square", "small", (32, 9, 44, 21))), "left", (100, 90, 140))
    c = Scene((SceneObject("green", "cross", "small", (2, 2, 14, 14)),
               SceneObject("blue", "square", "large", (2, 25, 22, 45))), "above", (128, 128, 128))
    texts = ["a big red circle to the left of a small blue square",
             "a small blue box right of a large red disc",
             "a small green cross above a large blue square"]
    judged = m.scene_matrix(texts, [a.to_json(), b.to_json(), c.to_json()])
    assert judged.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    exact = np.eye(3, dtype=bool)
    # image 1 ranks text 0 first: an exact miss, a scene hit; image 2 ranks text 1 first: a miss
    # both ways.  The texts rank images by the transpose of the same scores.
    s = np.array([[0.9, 0.5, 0.1], [0.8, 0.7, 0.1], [0.2, 0.6, 0.5]])
    out = m.scene_recall(s, s.T, exact, judged)
    assert m.recall_at_k(s, exact, (1,))[1] == pytest.approx(100 / 3)
    assert out["tr_r1_scene"] == pytest.approx(200 / 3)
    # text 0 -> image 0 (hit), text 1 -> image 1 (0.7 > 0.6: hit), text 2 -> image 2 (0.5 > 0.1)
    assert out["ir_r1_scene"] == pytest.approx(100.0)
    assert out["r1_mean_scene"] == pytest.approx((200 / 3 + 100.0) / 2)
    # the ceiling: images 0 and 1 each have two indistinguishable right texts (1/2), image 2 one
    assert out["tr_r1_ceiling"] == out["ir_r1_ceiling"] == out["r1_ceiling"] == pytest.approx(100 * 2 / 3)
    # a text the judge does not accept but exact recall does (a noisy reference) still counts
    assert m.scene_recall(s, s.T, exact, np.zeros((3, 3), dtype=bool))["r1_ceiling"] == 100.0
