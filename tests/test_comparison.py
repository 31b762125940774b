"""The comparison's reuse rule: stored test metrics count only when they were computed with the
current evaluation settings (a rerun with another ``evaluate.k_test`` must not reuse them)."""
from __future__ import annotations

from vlp_core.comparison import same_evaluation
from vlp_core.config import Params


def test_same_evaluation_checks_k_test_and_decode():
    p = Params().replace(**{"evaluate.k_test": 128})
    assert same_evaluation({"k_test": 128, "caption_decode": "greedy"}, p)
    assert not same_evaluation({"k_test": 16, "caption_decode": "greedy"}, p)
    assert not same_evaluation({"k_test": 128, "caption_decode": "beam"}, p)
    # metrics written before caption_decode was recorded were greedy (the only default)
    assert same_evaluation({"k_test": 128}, p)
    assert not same_evaluation({"k_test": 128}, p.replace(**{"evaluate.caption_decode": "beam"}))
    assert not same_evaluation({}, p)
