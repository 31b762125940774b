"""Held-out pairs (vlp_core/holdout.py): chosen by key alone, kept out of a fine-tune, and the
pairs CapFilt calibrates its threshold on."""
from __future__ import annotations

from fixtures_world import tiny_params

from vlp_core.holdout import held_out, key_position
from vlp_core.io import read_json
from vlp_core.train.data import load_pairs
from vlp_core.train.loop import run_finetune


def test_held_out_is_by_key_nested_and_near_the_share():
    keys = [f"{i:09d}" for i in range(4000)]
    small, large = held_out(keys, 0.1), held_out(keys, 0.3)
    assert 0.08 < small.mean() < 0.12 and 0.27 < large.mean() < 0.33
    assert not (small & ~large).any()  # a smaller share holds out a subset of a larger one
    assert (held_out(list(reversed(keys)), 0.1)[::-1] == small).all()  # by key, not by position
    assert not held_out(keys, 0.0).any()
    assert all(0.0 <= key_position(k) < 1.0 for k in keys[:50])


def test_finetune_with_holdout_trains_on_the_rest_and_counts_every_pair(tiny_world, untrained_model, tmp_path):
    params = tiny_params(**{"finetune.filter.steps": 2, "finetune.filter.batch_size": 16,
                            "finetune.filter.holdout": 0.3})
    source = [(tiny_world / "human.parquet", "human")]
    table = load_pairs(source)
    stats = run_finetune(params, "filter", source, untrained_model, tmp_path / "filt")
    n_held = int(held_out(table["key"].to_pylist(), 0.3).sum())
    assert 0 < n_held < table.num_rows
    assert stats.counts["held_out"] == n_held
    assert stats.rows_in == stats.rows_out == table.num_rows  # every pair is counted: used, skipped or held out
    assert stats.counts["used"] + n_held + sum(v for k, v in stats.counts.items() if k.startswith("skipped.")) \
        == table.num_rows
    assert read_json(tmp_path / "filt" / "stats.json")["extra"]["fingerprint_inputs"]["finetune.filter.holdout"] == 0.3
