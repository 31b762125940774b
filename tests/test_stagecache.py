"""The stage cache decides what is skipped at every grain: a stage (its marker in
``data/.flow``) and a shard inside it (:class:`vlp_core.stagecache.Entry`), by one key rule."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from vlp_core.config import Params
from vlp_core.layout import Layout
from vlp_core.stagecache import Entry, cached_stage, input_key


def test_a_shard_entry_is_skipped_only_with_the_same_key_and_its_outputs(tmp_path, caplog):
    out = tmp_path / "corpus" / "00000.parquet"
    entry = Entry("capfilt", "00000", tmp_path / "corpus", {"model": "abc", "threshold": 0.5})
    assert entry.cached(out) is None  # no marker yet: run it
    out.parent.mkdir(parents=True)
    out.write_bytes(b"rows")
    written = entry.done({"rows_out": 3, "counts": {"kept": 2}})
    assert entry.marker == tmp_path / "corpus" / "00000_stats.json"
    on_disk = json.loads(entry.marker.read_text())
    assert on_disk == written and on_disk["key"] == entry.key and on_disk["fingerprint"] == entry.inputs
    assert on_disk["rows_out"] == 3 and on_disk["stage"] == "capfilt" and on_disk["shard"] == "00000"
    assert entry.cached(out)["counts"] == {"kept": 2}  # same inputs, output in place: skipped

    out.unlink()
    assert entry.cached(out) is None  # the output is gone: redone
    out.write_bytes(b"rows")
    other = Entry("capfilt", "00000", tmp_path / "corpus", {"model": "abc", "threshold": 0.6})
    assert other.key != entry.key
    with caplog.at_level(logging.INFO, logger="vlp_core.stagecache"):
        assert other.cached(out) is None  # other inputs: redone, and said so
    assert "other settings" in caplog.text
    entry.marker.write_text("{ not json")
    assert entry.cached(out) is None  # a damaged marker is no marker


def test_one_key_rule_for_stages_and_shards(tmp_path):
    """A shard's key changes with its stage, its name and each input, and never with the
    inputs' order; a stage's key likewise with its settings."""
    a = Entry("features", "00000", tmp_path, {"m": 1, "s": "x"})
    assert a.key == Entry("features", "00000", tmp_path / "elsewhere", {"s": "x", "m": 1}).key
    assert len({a.key, Entry("capfilt", "00000", tmp_path, a.inputs).key,
                Entry("features", "00001", tmp_path, a.inputs).key,
                Entry("features", "00000", tmp_path, {"m": 2, "s": "x"}).key}) == 4
    p = Params()
    assert input_key("capfilt", p, ["capfilt"], []) != input_key(
        "capfilt", p.replace(**{"capfilt.itm_threshold": 0.1}), ["capfilt"], [])


def test_a_stage_marker_stores_its_out_dir_relative_to_the_root(tmp_path):
    layout = Layout.at(tmp_path)
    out = layout.stage(0, "capfilt")
    calls = []

    def run() -> None:
        calls.append(1)
        out.mkdir(parents=True)
        (out / "stats.json").write_text("{}")

    first = cached_stage(Params(), layout, "capfilt", 0, out, ["capfilt"], [], [], run)
    again = cached_stage(Params(), layout, "capfilt", 0, out, ["capfilt"], [], [], run)
    assert not first["skipped"] and again["skipped"] and calls == [1]
    assert json.loads(layout.marker("round0-capfilt").read_text())["out_dir"] == str(Path("data/round0/capfilt"))
