"""The DuckDB catalog: record, list, diff against a hand-built expectation, read-only query,
version-name checks, and the HTML report (with images read from a real tar shard)."""
from __future__ import annotations

import base64
import io
import json
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from vlp_core import catalog
from vlp_core.catalog import CatalogError, diff_versions, list_versions, query, record_version
from vlp_core.config import Params
from vlp_core.io import write_json, write_parquet
from vlp_core.schema import CORPUS_SCHEMA, conform


def _corpus(path: Path, rows: list[tuple]) -> Path:
    """rows: (key, candidate, text, source, itm, kept, reason, round); url = /web/<key>.jpg."""
    cols = ["key", "candidate", "text", "source", "itm", "kept", "reason", "round"]
    data = {c: [r[i] for r in rows] for i, c in enumerate(cols)}
    data["url"] = [f"/web/{k}.jpg" for k in data["key"]]
    data["shard"] = ["shards/00000.tar"] * len(rows)
    data["itc"] = [s - 0.1 for s in data["itm"]]
    write_parquet(conform(pa.table(data), CORPUS_SCHEMA), path / "corpus" / "00000.parquet")
    return path


A_ROWS = [
    ("k1", 0, "a red cube", "web", 0.9, True, None, 0),
    ("k1", 1, "a red cube left of a ball", "synthetic", 0.8, True, None, 0),
    ("k2", 0, "click here", "web", 0.1, False, "itm_below_threshold", 0),
    ("k2", 1, "a blue ball", "synthetic", 0.4, False, "itm_below_threshold", 0),
    ("k3", 0, "a green cone", "web", 0.6, True, None, 0),
]
B_ROWS = [
    ("k1", 0, "a red cube", "web", 0.95, True, None, 1),  # score +0.05
    ("k1", 1, "a red cube above a ball", "synthetic", 0.7, True, None, 1),  # caption changed, -0.1
    ("k2", 0, "click here", "web", 0.1, False, "itm_below_threshold", 1),  # same
    ("k2", 1, "a blue ball", "synthetic", 0.6, True, None, 1),  # dropped -> kept, +0.2
    ("k4", 0, "a yellow star", "web", 0.7, True, None, 1),  # added (k3 removed)
]


@pytest.fixture()
def two_versions(tmp_path):
    cat = tmp_path / "cat.duckdb"
    params = Params().replace(**{"catalog.path": str(cat)})
    a = _corpus(tmp_path / "a", A_ROWS)
    b = _corpus(tmp_path / "b", B_ROWS)
    write_json({"stage": "capfilt", "rows_in": 3, "rows_out": 3, "counts": {"kept": 3}, "seconds": 1.0},
               a / "stats.json")
    write_json({"retrieval": {"r1_mean": 0.2}, "bleu4": 0.1, "note": "text"}, a / "evaluate" / "metrics.json")
    write_json({"retrieval": {"r1_mean": 0.25}, "bleu4": 0.12}, b / "evaluate" / "metrics.json")
    sa = record_version(params, "v-a", a, [a / "stats.json"], [a / "evaluate" / "metrics.json"], repo_dir=tmp_path)
    params_b = params.replace(**{"capfilt.itm_threshold": 0.7, "capfilt.threshold_mode": "fixed"})
    sb = record_version(params_b, "v-b", b, [], [b / "evaluate" / "metrics.json"], repo_dir=tmp_path)
    assert (sa.corpus_rows, sa.stats, sa.metrics, sa.git_rev) == (5, 1, 2, None)
    assert (sb.corpus_rows, sb.metrics) == (5, 2)
    return cat, params, tmp_path


def test_diff_matches_hand_built_expectation(two_versions):
    cat, _, _ = two_versions
    d = diff_versions(cat, "v-a", "v-b", n_examples=10)
    assert (d.rows_a, d.rows_b) == (5, 5)
    assert (d.rows_added, d.rows_removed, d.rows_matched) == (1, 1, 4)
    assert (d.kept_gained, d.kept_lost, d.text_changed) == (1, 0, 1)
    # matched itm shifts: +0.05, -0.1, 0, +0.2
    assert d.itm_mean_shift == pytest.approx((0.05 - 0.1 + 0.0 + 0.2) / 4, abs=1e-6)
    assert d.itm_mean_abs_shift == pytest.approx((0.05 + 0.1 + 0.0 + 0.2) / 4, abs=1e-6)
    assert d.by_source == {
        "web": {"rows_a": 3, "kept_a": 2, "rows_b": 3, "kept_b": 2},
        "synthetic": {"rows_a": 2, "kept_a": 1, "rows_b": 2, "kept_b": 2},
    }
    assert d.metrics["evaluate.retrieval.r1_mean"]["delta"] == pytest.approx(0.05)
    assert "evaluate.note" not in d.metrics  # non-numeric leaves are not metrics
    # examples: the text change first, then the kept flip
    assert [(e["key"], e["candidate"]) for e in d.examples] == [("k1", 1), ("k2", 1)]
    assert d.examples[0]["text_a"] == "a red cube left of a ball"
    assert d.examples[0]["text_b"] == "a red cube above a ball"
    assert (d.examples[1]["kept_a"], d.examples[1]["kept_b"]) == (False, True)
    assert d.params_changed == {"capfilt.itm_threshold": {"a": 0.5, "b": 0.7},
                                "capfilt.threshold_mode": {"a": "calibrated", "b": "fixed"}}
    text = catalog.format_diff(d)
    assert "capfilt.itm_threshold: 0.5 -> 0.7" in text
    assert "added 1, removed 1" in text and "dropped->kept 1" in text


def test_list_and_rerecord_replaces(two_versions):
    cat, params, root = two_versions
    names = [d["name"] for d in list_versions(cat)]
    assert names == ["v-a", "v-b"]
    record_version(params, "v-a", root / "b", [], [], repo_dir=None)  # replace, not append
    rows = {d["name"]: d for d in list_versions(cat)}
    assert rows["v-a"]["rows"] == 5 and rows["v-a"]["kept"] == 4 and rows["v-a"]["metrics"] == {}


def test_query_reads_and_refuses_writes(two_versions):
    cat, _, _ = two_versions
    cols, rows = query(cat, "SELECT version, count(*) AS n FROM corpus WHERE kept GROUP BY 1 ORDER BY 1")
    assert cols == ["version", "n"] and rows == [("v-a", 2 + 1), ("v-b", 4)]
    cols, rows = query(cat, "-- comment\nWITH x AS (SELECT 1 AS one) SELECT one FROM x;")
    assert rows == [(1,)]
    for bad in ("DELETE FROM corpus", "drop table versions", "INSERT INTO metrics VALUES ('x','y','z',1)",
                "SELECT 1; DELETE FROM corpus", "COPY corpus TO 'x.csv'", "ATTACH 'other.db'", "  "):
        with pytest.raises(CatalogError, match="refused"):
            query(cat, bad)
    # even if the verb check were fooled, the file is opened read-only
    with pytest.raises(CatalogError, match="query failed"):
        query(cat, "WITH x AS (SELECT 1) INSERT INTO metrics VALUES ('x','y','z',1)")
    assert query(cat, "SELECT count(*) FROM metrics")[1] == [(4,)]
    with pytest.raises(CatalogError, match="query failed"):  # no reading files through the catalog
        query(cat, "SELECT * FROM read_csv('/etc/passwd')")


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "x" * 200, "a\nb", "round..1"])
def test_version_names_refused(two_versions, name):
    cat, params, root = two_versions
    with pytest.raises(CatalogError, match="refused"):
        record_version(params, name, root / "a", repo_dir=None)
    with pytest.raises(CatalogError):
        diff_versions(cat, "v-a", name)


def test_unknown_version_is_a_clear_error(two_versions):
    cat, _, _ = two_versions
    with pytest.raises(CatalogError, match="no version 'nope'"):
        diff_versions(cat, "v-a", "nope")


def test_cli_versions_query_record(two_versions, capsys):
    from vlp_core.cli import main

    cat, _, root = two_versions
    assert main(["versions", "list", "--catalog", str(cat)]) == 0
    assert "v-a" in capsys.readouterr().out
    assert main(["versions", "diff", "v-a", "v-b", "--catalog", str(cat), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows_added"] == 1
    assert main(["query", "DELETE FROM corpus", "--catalog", str(cat)]) == 2
    assert "refused" in capsys.readouterr().err
    assert main(["record", "--name", "../x", "--corpus", str(root / "a"), "--catalog", str(cat)]) == 2
    assert "refused" in capsys.readouterr().err


def test_report_is_self_contained_with_images(two_versions, tmp_path, monkeypatch):
    from vlp_core.report import write_report

    cat, _, root = two_versions
    # a real webdataset tar shard holding k1, k2 and k4 (k3 missing: the report notes it)
    shard = root / "shards" / "00000.tar"
    shard.parent.mkdir(parents=True)
    with tarfile.open(shard, "w") as tar:
        for i, key in enumerate(("k1", "k2", "k4")):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (40 * i, 200, 90)).save(buf, format="JPEG")
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    out = write_report(cat, tmp_path / "r" / "index.html", base_dir=root)
    page = out.read_text()
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    jpgs = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(pngs) == 3  # histograms, kept ratio, metrics
    assert len(jpgs) == 3  # the sample images of v-b
    for b64 in pngs + jpgs:
        Image.open(io.BytesIO(base64.b64decode(b64))).verify()
    assert "a red cube above a ball" in page and "a yellow star" in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch


def test_query_stops_after_the_timeout(tmp_path):
    import time

    cat = tmp_path / "cat.duckdb"
    catalog.connect(cat).close()
    t0 = time.perf_counter()
    with pytest.raises(CatalogError, match=r"query stopped after 0.5 s \(catalog.query_timeout_seconds"):
        query(cat, "SELECT count(*) FROM range(100000000) a, range(1000000) b WHERE a.range + b.range = -1",
              timeout=0.5)
    assert time.perf_counter() - t0 < 10
    assert query(cat, "SELECT 41 + 1", timeout=5)[1] == [(42,)]  # a quick one is unaffected


def test_query_on_a_file_that_is_not_duckdb_is_one_line(tmp_path, capsys):
    from vlp_core.cli import main

    bad = tmp_path / "not.duckdb"
    bad.write_bytes(b"PAR1" + b"\x00" * 5000)
    with pytest.raises(CatalogError, match=r"not\.duckdb: not a DuckDB catalog"):
        query(bad, "SELECT 1")
    assert main(["query", "SELECT 1", "--catalog", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}: ") and "\n" not in err


def test_query_on_a_catalog_held_by_another_process_is_one_line(tmp_path, capsys):
    import subprocess
    import sys

    from vlp_core.cli import main

    cat = tmp_path / "cat.duckdb"
    catalog.connect(cat).close()
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time\n"
                               f"con = duckdb.connect({str(cat)!r})\nprint('open', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(CatalogError, match="held open by another process"):
            query(cat, "SELECT 1")
        assert main(["query", "SELECT 1", "--catalog", str(cat)]) == 2
        err = capsys.readouterr().err.strip()
        assert str(cat) in err and "\n" not in err
    finally:
        holder.kill()
        holder.wait()


def test_gate_state_is_stored_listed_and_replaced(two_versions, capsys):
    from vlp_core.cli import main

    cat, params, root = two_versions
    assert [d["state"] for d in list_versions(cat)] == [None, None]  # recorded without a verdict
    record_version(params, "v-b", root / "b", [], [], repo_dir=None, state="rejected",
                   reason="r1_mean 1.0000 vs 2.0000 (v-a): gain -1.0000, margin 0: does not beat its parent",
                   parent="v-a")
    record_version(params, "v-c", root / "a", [], [], repo_dir=None, state="promoted", reason="beats", parent="v-a")
    rows = {d["name"]: d for d in list_versions(cat)}
    assert (rows["v-b"]["state"], rows["v-b"]["parent"]) == ("rejected", "v-a")
    assert rows["v-b"]["state_reason"].endswith("does not beat its parent")
    assert (rows["v-c"]["state"], rows["v-c"]["rows"], rows["v-c"]["kept"]) == ("promoted", 5, 3)  # no double count
    assert rows["v-a"]["state"] is None
    assert main(["versions", "list", "--catalog", str(cat)]) == 0
    out = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[2:]}
    assert "rejected" in out["v-b"] and "does not beat its parent" in out["v-b"]
    assert "promoted" in out["v-c"] and "recorded without a gate verdict" in out["v-a"]
    # re-recording replaces the verdict (none given: none kept)
    record_version(params, "v-b", root / "b", [], [], repo_dir=None)
    assert {d["name"]: d["state"] for d in list_versions(cat)}["v-b"] is None
    assert query(cat, "SELECT count(*) FROM version_states")[1] == [(1,)]
    with pytest.raises(CatalogError, match="state 'maybe' refused"):
        record_version(params, "v-d", root / "a", repo_dir=None, state="maybe")
    assert main(["record", "--name", "v-e", "--corpus", str(root / "a"), "--catalog", str(cat), "--repo",
                 str(root), "--state", "rejected", "--reason", "by hand"]) == 0
    assert {d["name"]: d["state_reason"] for d in list_versions(cat)}["v-e"] == "by hand"


def test_a_catalog_written_before_the_gate_still_opens(tmp_path):
    """An older file has no version_states table: listed read-only, every state is NULL; the first
    write adds the table and the old versions stay."""
    import duckdb

    cat = tmp_path / "old.duckdb"
    con = duckdb.connect(str(cat))
    con.execute(catalog._DDL.split("CREATE TABLE IF NOT EXISTS version_states")[0])  # the DDL before the gate
    con.execute("INSERT INTO versions VALUES ('round0', now()::TIMESTAMP, NULL, '{}', '{}', 0, NULL)")
    con.close()
    assert [(d["name"], d["state"], d["state_reason"]) for d in list_versions(cat)] == [("round0", None, None)]
    assert query(cat, "SELECT count(*) FROM versions")[1] == [(1,)]
    _corpus(tmp_path / "c", A_ROWS)
    record_version(Params(), "round1", tmp_path / "c", repo_dir=None, catalog=cat, state="rejected", reason="worse")
    assert [(d["name"], d["state"]) for d in list_versions(cat)] == [("round0", None), ("round1", "rejected")]
