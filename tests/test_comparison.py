"""The comparison: its reuse rule (stored test metrics count only when they were computed with the
current evaluation settings: a rerun with another ``evaluate.k_test`` must not reuse them) and a
later round's own filter-only control."""
from __future__ import annotations

from vlp_core.catalog import flatten_metrics
from vlp_core.comparison import same_evaluation
from vlp_core.config import Params
from vlp_core.train.evaluate import evaluation_settings


def test_same_evaluation_checks_k_test_and_decode_of_legacy_metrics():
    p = Params().replace(**{"evaluate.k_test": 128})
    assert same_evaluation({"k_test": 128, "caption_decode": "greedy"}, p)
    assert not same_evaluation({"k_test": 16, "caption_decode": "greedy"}, p)
    assert not same_evaluation({"k_test": 128, "caption_decode": "beam"}, p)
    # metrics written before caption_decode was recorded were greedy (the only default)
    assert same_evaluation({"k_test": 128}, p)
    assert not same_evaluation({"k_test": 128}, p.replace(**{"evaluate.caption_decode": "beam"}))
    assert not same_evaluation({}, p)


def test_same_evaluation_compares_every_recorded_setting():
    p = Params().replace(**{"evaluate.k_test": 128})
    stored = {"k_test": 128, "caption_decode": "greedy", "settings": evaluation_settings(p)}
    assert same_evaluation(stored, p)
    # settings the legacy rule cannot see: the prompt, caption length, swap-negative seed
    assert not same_evaluation(stored, p.replace(**{"capfilt.prompt": "an image of "}))
    assert not same_evaluation(stored, p.replace(**{"capfilt.max_length": 12}))
    assert not same_evaluation(stored, p.replace(**{"pretrain.seed": 7}))
    # beam width counts only when captions are decoded by beam search
    assert same_evaluation(stored, p.replace(**{"capfilt.num_beams": 5}))
    beam = p.replace(**{"evaluate.caption_decode": "beam"})
    stored_beam = {"settings": evaluation_settings(beam)}
    assert same_evaluation(stored_beam, beam)
    assert not same_evaluation(stored_beam, beam.replace(**{"capfilt.num_beams": 5}))
    # a batch size changes no number
    assert same_evaluation(stored, p.replace(**{"evaluate.batch_size": 7}))


def test_catalog_metrics_leave_out_the_settings_record():
    p = Params()
    flat = flatten_metrics({"k_test": 16, "r1_mean": 3.5, "settings": evaluation_settings(p)})
    assert flat == {"k_test": 16.0, "r1_mean": 3.5}


def test_stored_metrics_without_scene_recall_are_recomputed_only_where_it_exists():
    from vlp_core.comparison import lacks_scene_recall

    assert lacks_scene_recall({"n_images": 1000, "n_ground_truth": 1000, "r1_mean": 84.0})  # written before
    assert not lacks_scene_recall({"n_images": 1000, "n_ground_truth": 1000, "r1_mean_scene": 90.0})
    assert not lacks_scene_recall({"n_images": 1000, "n_ground_truth": 990})  # not every image has a scene
    assert not lacks_scene_recall({"n_images": 1000})  # no ground truth (real data)


def test_a_later_round_gets_its_own_filter_only(tiny_ingest, untrained_model, fast, tmp_path):
    """With more than one round, the last round's synthetic captions are set against that round's
    filter alone: its corpus without them, trained like its retrain (from scratch)."""
    import shutil

    import pyarrow.parquet as pq

    from vlp_core.schema import C
    from vlp_core.capfilt.stage import run_capfilt
    from vlp_core.comparison import Inputs, filter_only_name, last_filter_only
    from vlp_core.layout import Layout

    layout = Layout.at(tmp_path / "work")
    shutil.copytree(untrained_model, layout.model(0, "retrain"))  # round 1's base model
    keep_all = fast.replace(**{"capfilt.threshold_mode": "fixed", "capfilt.itm_threshold": 0.0})
    run_capfilt(keep_all, tiny_ingest["web_manifest"], untrained_model, untrained_model, layout.stage(1, "capfilt"))
    inputs = Inputs(web=str(tiny_ingest["web_dir"]), human=str(tiny_ingest["human_dir"]),
                    test=str(tiny_ingest["test_dir"]), world=str(tiny_ingest["world"]), root=str(layout.root))
    logged = []
    res = last_filter_only(fast.replace(**{"pretrain.steps": 2}), inputs, layout, 1, log=logged.append)
    assert res.name == filter_only_name(1) == "filter-only (round 1)" and filter_only_name(0) == "filter-only"
    assert "training from scratch" in logged[0]
    kept = pq.read_table(sorted(layout.corpus(1).glob("*.parquet")))
    fo = pq.read_table(sorted((layout.comparison / "filteronly_round1" / "corpus").glob("*.parquet")))
    assert "synthetic" in set(kept[C.SOURCE].to_pylist())  # so leaving them out is a real test
    assert fo.num_rows == sum(s != "synthetic" for s in kept[C.SOURCE].to_pylist()) > 0
    assert "synthetic" not in set(fo[C.SOURCE].to_pylist())
    assert (layout.comparison / "filteronly_round1" / "train" / "model").is_dir() and "r1_mean" in res.metrics
    from vlp_core.train.curves import loss_summary
    assert res.training == loss_summary(layout.comparison / "filteronly_round1" / "train" / "loss.csv")
