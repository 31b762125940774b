"""bench/cycle.py's outcome rules (the benchmark itself is not a test; its arithmetic is)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_cycle", Path(__file__).parents[1] / "bench" / "cycle.py")
cycle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cycle)


def _seeds(rows):
    names = ("pretrained", "round 0", "filter-only", "oracle")
    return {s: dict(zip(names, r)) for s, r in enumerate(rows)}


def test_outcomes_met_and_robustness_is_reported():
    (o1, m1, d1), (o2, m2, d2), (o3, m3, d3) = cycle.outcomes(
        _seeds([(10.0, 20.0, 15.0, 20.0), (11.0, 21.0, 14.0, 21.0), (12.0, 22.0, 16.0, 22.0)]))
    assert m1 and "gain +10.00" in d1  # gain 10 +- 0 against spreads of 1
    assert m2 and "closed 100%" in d2
    assert m3 and "ahead in 3 of 3 seeds" in d3 and "not a robust" not in d3


def test_outcomes_one_lucky_seed_is_flagged():
    *_, (o3, m3, d3) = cycle.outcomes(
        _seeds([(10.0, 45.0, 22.0, 26.0), (11.0, 23.0, 33.0, 21.0), (10.0, 18.0, 20.0, 21.0)]))
    assert m3  # the rule: a positive mean
    assert "ahead in 1 of 3 seeds" in d3 and "not a robust effect" in d3


def test_outcomes_gain_inside_spread_is_not_met():
    (o1, m1, d1), (o2, m2, _), _ = cycle.outcomes(
        _seeds([(5.0, 6.0, 6.0, 20.0), (15.0, 16.0, 16.0, 20.0), (10.0, 11.0, 11.0, 20.0)]))
    assert not m1  # gain 1 against the pretrained model's sd of 5
    assert not m2  # 1 point of a 10-point gap
