"""``run_evaluate`` end to end on the tiny world, plus BLIP's re-rank protocol on a known case."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_world import tiny_params

from vlp_core.train.evaluate import rerank_scores, run_evaluate, run_swap_accuracy
from vlp_core.train.loop import run_pretrain

KEYS = {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r1_mean", "bleu4", "cider", "itm_acc",
        "chance_tr_r1", "chance_ir_r1", "n_images", "n_texts"}
GT_KEYS = {"caption_acc", "caption_acc_colour", "caption_acc_shape", "caption_acc_size", "caption_acc_relation",
           "itm_acc_swap", "tr_r1_scene", "ir_r1_scene", "r1_mean_scene", "tr_r1_ceiling", "ir_r1_ceiling",
           "r1_ceiling"}


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_model")
    params = tiny_params(**{"pretrain.steps": 4, "pretrain.batch_size": 16, "pretrain.warmup_steps": 1,
                            "model.vocab_size": 128})
    run_pretrain(params, [(tiny_world / "human.parquet", "human")], out)
    return out / "model"


def test_evaluate_end_to_end_with_ground_truth(tiny_model_dir, tiny_world, tmp_path):
    params = tiny_params(**{"evaluate.k_test": 8, "capfilt.max_length": 12})
    m = run_evaluate(params, tiny_model_dir, f"{tiny_world / 'test.parquet'}:human", tmp_path,
                     ground_truth=tiny_world / "ground_truth.parquet")
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert set(on_disk) >= KEYS | GT_KEYS
    assert m["n_images"] == 100 and m["n_texts"] == 100 and m["n_ground_truth"] == 100
    for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"):
        assert 0.0 <= m[k] <= 100.0
    assert m["tr_r1"] <= m["tr_r5"] <= m["tr_r10"]
    assert m["r1_mean"] == pytest.approx((m["tr_r1"] + m["ir_r1"]) / 2)
    assert 0.0 <= m["itm_acc"] <= 1.0 and 0.0 <= m["caption_acc"] <= 1.0
    assert m["chance_tr_r1"] == pytest.approx(1.0, abs=0.5)  # ~1 correct text in 100
    # judged by the scene, a retrieved twin counts: never below exact recall, whose ceiling is <= 100
    assert m["tr_r1_scene"] >= m["tr_r1"] and m["ir_r1_scene"] >= m["ir_r1"] and 0 < m["r1_ceiling"] <= 100.0
    caps = pq.read_table(tmp_path / "captions.parquet")
    assert caps.num_rows == 100 and set(caps.column_names) == {"url", "reference", "generated"}
    # without ground truth: no caption accuracy (the pipeline never reads ground truth)
    m2 = run_evaluate(params, tiny_model_dir, (tiny_world / "test.parquet", "human"), tmp_path / "b")
    assert "caption_acc" not in m2 and "r1_mean_scene" not in m2 and m2["tr_r1"] == m["tr_r1"]
    # the swap accuracy alone (bench/cycle.py: the filter's), as the full evaluation has it
    s = run_swap_accuracy(params, tiny_model_dir, f"{tiny_world / 'test.parquet'}:human",
                          tiny_world / "ground_truth.parquet")
    assert s["n_ground_truth"] == 100 and s["itm_acc_swap"] == m["itm_acc_swap"]
    assert "itm_acc_relation" in s  # None in a one-object world, else an accuracy
    assert s["itm_acc_relation"] is None or 0.0 <= s["itm_acc_relation"] <= 1.0


def test_relation_reversed_captions_change_only_the_relation():
    """The negatives of ``itm_acc_relation``: every attribute still right, the relation wrong, and
    one-object scenes left out."""
    from vlp_core.synthetic import world
    from vlp_core.train.evaluate import relation_reversed_captions

    rng = np.random.default_rng(5)
    scenes = [world.sample_scene(rng, 48).to_json() for _ in range(40)]
    scenes.insert(3, world.sample_scene(rng, 48, objects=1).to_json())
    idx, true, rev, traded = relation_reversed_captions(scenes, seed=0)
    assert 3 not in idx and len(idx) == 40
    assert (idx, true, rev, traded) == relation_reversed_captions(scenes, seed=0)  # seeded
    for i, t, r, x in zip(idx, true, rev, traded):
        assert world.check_caption(t, scenes[i])["all"] is True
        for neg in (r, x):
            c = world.check_caption(neg, scenes[i])
            assert c["relation"] is False and all(c[a] is True for a in ("colour", "shape", "size")), (t, neg)


class _FixedItm:
    """A stand-in ITM head with known logits, to check the re-rank arithmetic only."""

    def __init__(self, logits: np.ndarray):
        self.logits = logits  # (n_image, n_text) ITM "match" logits

    def itm_logits(self, image_embeds, texts):
        rows = image_embeds[:, 0, 0].long().tolist()
        cols = [int(t) for t in texts]
        out = torch.zeros(len(rows), 2)
        out[:, 1] = torch.tensor([self.logits[r, c] for r, c in zip(rows, cols)], dtype=torch.float32)
        return out


def test_rerank_follows_blip_protocol():
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.3, 0.7]])  # (2 images, 3 texts) ITC
    itm = np.array([[0.0, 5.0, 9.0], [1.0, 0.0, 0.0]])
    model = _FixedItm(itm)
    embeds = torch.arange(2, dtype=torch.float32).view(2, 1, 1)  # row i encodes image i
    texts = ["0", "1", "2"]
    s = rerank_scores(sim, texts, 2, model, embeds, True, 8, torch.device("cpu"))
    # image 0: top-2 by ITC are texts 0, 1 -> ITM + ITC; text 2 stays at -100 despite ITM 9
    np.testing.assert_allclose(s[0], [0.9, 5.8, -100.0], rtol=1e-6)
    np.testing.assert_allclose(s[1], [-100.0, 0.3, 0.7], rtol=1e-6)
    t2i = rerank_scores(sim.T.contiguous(), texts, 1, model, embeds, False, 8, torch.device("cpu"))
    # text 1: top-1 image by ITC is image 0 -> ITM[0, 1] + 0.8
    np.testing.assert_allclose(t2i[1], [5.8, -100.0], rtol=1e-6)


def test_cli_evaluate_and_clear_errors(tiny_model_dir, tiny_world, tmp_path, capsys):
    from vlp_core.cli import main

    rc = main(["evaluate", "--model", str(tiny_model_dir), "--test", f"{tiny_world / 'test.parquet'}:human",
               "--out", str(tmp_path / "ev"), "-S", "evaluate.k_test=4", "-S", "capfilt.max_length=10"])
    assert rc == 0 and (tmp_path / "ev" / "metrics.json").is_file()
    assert '"r1_mean"' in capsys.readouterr().out
    rc = main(["evaluate", "--model", str(tmp_path / "no_model"), "--test", str(tiny_world / "test.parquet"),
               "--out", str(tmp_path / "ev2")])
    err = capsys.readouterr().err
    assert rc == 2 and "no_model" in err and "Traceback" not in err
    rc = main(["pretrain", "--train", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.parquet" in err
