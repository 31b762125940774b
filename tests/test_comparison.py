"""The comparison's reuse rule: stored test metrics count only when they were computed with the
current evaluation settings (a rerun with another ``evaluate.k_test`` must not reuse them)."""
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
